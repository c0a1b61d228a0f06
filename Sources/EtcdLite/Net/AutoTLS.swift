import Crypto
import Foundation
import SwiftASN1
import X509

/// etcd's --auto-tls and --peer-auto-tls: a self-signed certificate (ECDSA P-256, organization
/// "etcd", for the hosts of the listen URLs, valid for a year, server and client use) made once and
/// kept in `<data-dir>/fixtures/client` or `.../peer` as cert.pem and key.pem. Whoever connects
/// is not asked for a certificate signed by anyone in particular, and peers' self-signed
/// certificates are taken as they are (as etcd's auto TLS does).
enum AutoTLS {
    static func files(in directory: URL, hosts: [String]) throws -> (cert: String, key: String) {
        let cert = directory.appendingPathComponent("cert.pem").path, key = directory.appendingPathComponent("key.pem").path
        if FileManager.default.fileExists(atPath: cert) && FileManager.default.fileExists(atPath: key) { return (cert, key) }
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let privateKey = P256.Signing.PrivateKey()
        let name = try DistinguishedName { OrganizationName("etcd") }
        let names = Set(hosts).sorted().map { host -> GeneralName in
            if let bytes = ipAddressBytes(host) { return .ipAddress(ASN1OctetString(contentBytes: ArraySlice(bytes))) }
            return .dnsName(host)
        }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: .init(privateKey.publicKey),
            notValidBefore: now.addingTimeInterval(-60), notValidAfter: now.addingTimeInterval(365 * 86_400),
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: try Certificate.Extensions {
                Critical(KeyUsage(digitalSignature: true, keyEncipherment: true, keyCertSign: true))
                try ExtendedKeyUsage([.serverAuth, .clientAuth])
                Critical(BasicConstraints.isCertificateAuthority(maxPathLength: nil))
                SubjectAlternativeNames(names)
            },
            issuerPrivateKey: .init(privateKey))
        guard FileManager.default.createFile(atPath: key, contents: Data(privateKey.pemRepresentation.utf8), attributes: [.posixPermissions: 0o600]),
              FileManager.default.createFile(atPath: cert, contents: Data(try certificate.serializeAsPEM().pemString.utf8)) else {
            throw ConfigError("cannot write the generated certificate to \(directory.path)")
        }
        return (cert, key)
    }

    /// The hosts of URLs (`localhost` kept as a name).
    static func hosts(of urls: [String]) -> [String] {
        urls.compactMap { URLComponents(string: $0)?.host }.map { $0.hasPrefix("[") ? String($0.dropFirst().dropLast()) : $0 }
    }

    private static func ipAddressBytes(_ host: String) -> [UInt8]? {
        var v4 = in_addr()
        if inet_pton(AF_INET, host, &v4) == 1 { return withUnsafeBytes(of: &v4) { Array($0) } }
        var v6 = in6_addr()
        if inet_pton(AF_INET6, host, &v6) == 1 { return withUnsafeBytes(of: &v6) { Array($0) } }
        return nil
    }
}
