import Foundation
import NIOConcurrencyHelpers
import NIOSSL

/// etcd's TLS flags for one side (clients: --cert-file, --key-file, --trusted-ca-file,
/// --client-cert-auth; peers: the --peer-* ones).
public struct TLSFiles: Sendable, Equatable {
    public var certFile = ""
    public var keyFile = ""
    public var trustedCAFile = ""
    /// Require a certificate signed by the trusted CA from whoever connects.
    public var clientCertAuth = false
    /// --auto-tls / --peer-auto-tls: a self-signed certificate made in the data dir when no files
    /// are given; the other side's certificate is then not checked (as etcd).
    public var autoTLS = false

    public init() {}

    /// No certificate given (an https:// URL then cannot be served).
    public var isEmpty: Bool { certFile.isEmpty && keyFile.isEmpty }
}

/// The TLS contexts made from `TLSFiles`, made again whenever one of the files changes (a
/// certificate rotated on disk takes effect for the next connection; open ones keep theirs).
final class TLSContexts: Sendable {
    let files: TLSFiles
    private struct Made {
        var stamps: [String]
        var server: NIOSSLContext
        var client: NIOSSLContext
    }
    private let made = NIOLockedValueBox<Made?>(nil)

    /// Reads the files once now, so that a bad certificate stops the member at start.
    init(_ files: TLSFiles) throws {
        self.files = files
        _ = try contexts()
    }

    /// For accepted connections: our certificate, ALPN http/1.1 and h2, and, with
    /// `clientCertAuth`, a client certificate signed by the trusted CA required in the handshake.
    func server() throws -> NIOSSLContext { try contexts().server }

    /// For connections we make (to peers): our certificate as the client's, and the peer's
    /// checked against the trusted CA (not its host name: peer URLs are often IP addresses).
    func client() throws -> NIOSSLContext { try contexts().client }

    private func contexts() throws -> Made {
        let paths = [files.certFile, files.keyFile, files.trustedCAFile]
        let stamps = paths.map(Self.stamp)
        let current = made.withLockedValue { $0 }
        if let current, current.stamps == stamps { return current }
        do {
            return try make(stamps)
        } catch {
            // Half-rotated files (a new certificate, the old key): go on with what worked, try again
            // on the next connection.
            if let current { return current }
            throw error
        }
    }

    private func make(_ stamps: [String]) throws -> Made {
        let chain = try NIOSSLCertificate.fromPEMFile(files.certFile).map { NIOSSLCertificateSource.certificate($0) }
        let key = NIOSSLPrivateKeySource.privateKey(try NIOSSLPrivateKey(file: files.keyFile, format: .pem))
        let roots: NIOSSLTrustRoots = files.trustedCAFile.isEmpty ? .default : .certificates(try NIOSSLCertificate.fromPEMFile(files.trustedCAFile))
        var server = TLSConfiguration.makeServerConfiguration(certificateChain: chain, privateKey: key)
        // Our preference picks: gRPC clients offer only h2 and get it; HTTP clients that offer both
        // (curl, Go's net/http) get HTTP/1.1, which the JSON gateway speaks on this port.
        server.applicationProtocols = ["http/1.1", "h2"]
        if files.clientCertAuth {
            server.certificateVerification = .noHostnameVerification
            server.trustRoots = roots
            server.sendCANameList = true
        }
        var client = TLSConfiguration.makeClientConfiguration()
        client.certificateChain = chain
        client.privateKey = key
        client.trustRoots = roots
        client.certificateVerification = files.autoTLS ? .none : .noHostnameVerification
        client.applicationProtocols = ["etcdlite-peer"]
        let made = Made(stamps: stamps, server: try NIOSSLContext(configuration: server), client: try NIOSSLContext(configuration: client))
        self.made.withLockedValue { $0 = made }
        return made
    }

    /// What changes when a file is replaced or rewritten: inode, size, modification time.
    private static func stamp(_ path: String) -> String {
        guard !path.isEmpty else { return "" }
        var info = stat()
        guard stat(path, &info) == 0 else { return "missing" }
        return "\(info.st_ino):\(info.st_size):\(info.st_mtim.tv_sec).\(info.st_mtim.tv_nsec)"
    }
}
