import Crypto
import CryptoExtras
import Foundation

/// etcd's JWT tokens (`--auth-token jwt,pub-key=P,priv-key=K,sign-method=M[,ttl=D]`): claims
/// `username`, `revision` (the auth revision at issue) and `exp`; stateless, so valid on every
/// member with the same key until they expire or the auth revision moves on.
struct JWTTokens: Sendable {
    enum Method: String, Sendable {
        case RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, ES512, HS256, HS384, HS512
    }

    private enum Key: Sendable {
        case rsa(private: _RSA.Signing.PrivateKey?, public: _RSA.Signing.PublicKey)
        case p256(private: P256.Signing.PrivateKey?, public: P256.Signing.PublicKey)
        case p384(private: P384.Signing.PrivateKey?, public: P384.Signing.PublicKey)
        case p521(private: P521.Signing.PrivateKey?, public: P521.Signing.PublicKey)
        case hmac(SymmetricKey)
    }

    let method: Method
    let ttl: Duration
    private let key: Key

    static let invalidOptions = ConfigError("auth: invalid auth options")

    /// Parses etcd's option string; nil for `simple` (or empty). Bad options stop the member.
    static func parse(_ options: String) throws -> JWTTokens? {
        let parts = options.split(separator: ",", omittingEmptySubsequences: false).map(String.init)
        guard let kind = parts.first, !kind.isEmpty, kind != "simple" else {
            if parts.count > 1 { throw invalidOptions }
            return nil
        }
        guard kind == "jwt" else { throw invalidOptions }
        var values: [String: String] = [:]
        for part in parts.dropFirst() {
            let pair = part.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2, values[pair[0]] == nil else { throw invalidOptions }
            values[pair[0]] = pair[1]
        }
        guard let methodName = values["sign-method"], let method = Method(rawValue: methodName) else {
            throw ConfigError("auth: invalid auth options: missing or unknown sign-method")
        }
        var ttl = Duration.seconds(300)
        if let text = values["ttl"] {
            guard let seconds = Duration.parseGo(text), seconds > 0 else { throw invalidOptions }
            ttl = .seconds(seconds)
        }
        func read(_ path: String) throws -> String {
            do { return try String(contentsOfFile: path, encoding: .utf8) } catch {
                throw ConfigError("auth: failed to read key file \(path): \(error)")
            }
        }
        let privatePEM = try values["priv-key"].map(read)
        let publicPEM = try values["pub-key"].map(read)
        /// The private key when given, and the public key (from the private one, or its own file).
        func pair<Private, Public>(_ makePrivate: (String) throws -> Private, _ derive: (Private) -> Public,
                                   _ makePublic: (String) throws -> Public) throws -> (Private?, Public) {
            let privateKey = try privatePEM.map(makePrivate)
            guard let publicKey = try privateKey.map(derive) ?? publicPEM.map(makePublic) else { throw invalidOptions }
            return (privateKey, publicKey)
        }
        let key: Key
        do {
            switch method {
            case .HS256, .HS384, .HS512:
                guard let privatePEM else { throw invalidOptions }
                key = .hmac(SymmetricKey(data: Data(privatePEM.utf8)))
            case .RS256, .RS384, .RS512, .PS256, .PS384, .PS512:
                let (privateKey, publicKey) = try pair(_RSA.Signing.PrivateKey.init(pemRepresentation:), \.publicKey,
                                                       _RSA.Signing.PublicKey.init(pemRepresentation:))
                key = .rsa(private: privateKey, public: publicKey)
            case .ES256:
                let (privateKey, publicKey) = try pair(P256.Signing.PrivateKey.init(pemRepresentation:), \.publicKey,
                                                       P256.Signing.PublicKey.init(pemRepresentation:))
                key = .p256(private: privateKey, public: publicKey)
            case .ES384:
                let (privateKey, publicKey) = try pair(P384.Signing.PrivateKey.init(pemRepresentation:), \.publicKey,
                                                       P384.Signing.PublicKey.init(pemRepresentation:))
                key = .p384(private: privateKey, public: publicKey)
            case .ES512:
                let (privateKey, publicKey) = try pair(P521.Signing.PrivateKey.init(pemRepresentation:), \.publicKey,
                                                       P521.Signing.PublicKey.init(pemRepresentation:))
                key = .p521(private: privateKey, public: publicKey)
            }
        } catch let error as ConfigError {
            throw error
        } catch {
            throw ConfigError("auth: failed to load the \(method.rawValue) key: \(error)")
        }
        return JWTTokens(method: method, ttl: ttl, key: key)
    }

    /// A public key alone verifies tokens but cannot make them.
    var canSign: Bool {
        switch key {
        case .rsa(let privateKey, _): privateKey != nil
        case .p256(let privateKey, _): privateKey != nil
        case .p384(let privateKey, _): privateKey != nil
        case .p521(let privateKey, _): privateKey != nil
        case .hmac: true
        }
    }

    func sign(user: String, revision: UInt64, now: Date = Date()) throws -> String {
        let header = #"{"alg":"\#(method.rawValue)","typ":"JWT"}"#
        let expiry = Int64(now.timeIntervalSince1970) + ttl.components.seconds
        // Keys in Go's order (sorted), as etcd's tokens have them.
        let claims = #"{"exp":\#(expiry),"revision":\#(revision),"username":\#(Self.jsonString(user))}"#
        let input = Self.base64URL(Data(header.utf8)) + "." + Self.base64URL(Data(claims.utf8))
        return input + "." + Self.base64URL(try signature(Data(input.utf8)))
    }

    /// The token's user and auth revision, or nil when it is not valid now (signature, method,
    /// expiry, claim types).
    func verify(_ token: String, now: Date = Date()) -> AuthInfo? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 3, let headerData = Self.base64URLDecode(parts[0]), let claimsData = Self.base64URLDecode(parts[1]),
              let signature = Self.base64URLDecode(parts[2]),
              let header = try? JSONSerialization.jsonObject(with: headerData) as? [String: Any],
              header["alg"] as? String == method.rawValue,
              isValid(signature: signature, for: Data((parts[0] + "." + parts[1]).utf8)),
              let claims = try? JSONSerialization.jsonObject(with: claimsData) as? [String: Any],
              let user = claims["username"] as? String, let revision = (claims["revision"] as? NSNumber)?.uint64Value,
              let expiry = (claims["exp"] as? NSNumber)?.doubleValue, expiry > now.timeIntervalSince1970
        else { return nil }
        if let notBefore = (claims["nbf"] as? NSNumber)?.doubleValue, notBefore > now.timeIntervalSince1970 { return nil }
        return AuthInfo(user: user, revision: revision)
    }

    private func signature(_ data: Data) throws -> Data {
        switch (key, method) {
        case (.rsa(let privateKey?, _), _):
            let padding: _RSA.Signing.Padding = method.rawValue.hasPrefix("PS") ? .PSS : .insecurePKCS1v1_5
            switch method {
            case .RS384, .PS384: return try privateKey.signature(for: SHA384.hash(data: data), padding: padding).rawRepresentation
            case .RS512, .PS512: return try privateKey.signature(for: SHA512.hash(data: data), padding: padding).rawRepresentation
            default: return try privateKey.signature(for: SHA256.hash(data: data), padding: padding).rawRepresentation
            }
        case (.p256(let privateKey?, _), _): return try privateKey.signature(for: data).rawRepresentation
        case (.p384(let privateKey?, _), _): return try privateKey.signature(for: data).rawRepresentation
        case (.p521(let privateKey?, _), _): return try privateKey.signature(for: data).rawRepresentation
        case (.hmac(let secret), .HS384): return Data(HMAC<SHA384>.authenticationCode(for: data, using: secret))
        case (.hmac(let secret), .HS512): return Data(HMAC<SHA512>.authenticationCode(for: data, using: secret))
        case (.hmac(let secret), _): return Data(HMAC<SHA256>.authenticationCode(for: data, using: secret))
        default: throw EtcdError.verifyOnlyKey
        }
    }

    private func isValid(signature: Data, for data: Data) -> Bool {
        switch key {
        case .rsa(_, let publicKey):
            let padding: _RSA.Signing.Padding = method.rawValue.hasPrefix("PS") ? .PSS : .insecurePKCS1v1_5
            let value = _RSA.Signing.RSASignature(rawRepresentation: signature)
            switch method {
            case .RS384, .PS384: return publicKey.isValidSignature(value, for: SHA384.hash(data: data), padding: padding)
            case .RS512, .PS512: return publicKey.isValidSignature(value, for: SHA512.hash(data: data), padding: padding)
            default: return publicKey.isValidSignature(value, for: SHA256.hash(data: data), padding: padding)
            }
        case .p256(_, let publicKey):
            guard let value = try? P256.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return publicKey.isValidSignature(value, for: data)
        case .p384(_, let publicKey):
            guard let value = try? P384.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return publicKey.isValidSignature(value, for: data)
        case .p521(_, let publicKey):
            guard let value = try? P521.Signing.ECDSASignature(rawRepresentation: signature) else { return false }
            return publicKey.isValidSignature(value, for: data)
        case .hmac:
            guard let expected = try? self.signature(data), expected.count == signature.count else { return false }
            return zip(expected, signature).reduce(UInt8(0)) { $0 | ($1.0 ^ $1.1) } == 0
        }
    }

    static func base64URL(_ data: Data) -> String {
        data.base64EncodedString().replacingOccurrences(of: "+", with: "-").replacingOccurrences(of: "/", with: "_")
            .replacingOccurrences(of: "=", with: "")
    }

    static func base64URLDecode(_ text: Substring) -> Data? {
        var base64 = text.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while base64.count % 4 != 0 { base64 += "=" }
        return Data(base64Encoded: base64)
    }

    static func jsonString(_ text: String) -> String {
        let data = (try? JSONSerialization.data(withJSONObject: [text], options: [.withoutEscapingSlashes])) ?? Data("[\"\"]".utf8)
        let array = String(decoding: data, as: UTF8.self)
        return String(array.dropFirst().dropLast())
    }
}
