import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL
import X509

/// Listens on one client URL for gRPC (HTTP/2 with prior knowledge) and HTTP/1.1 on the same
/// port: each connection passes `ProtocolSniffer` first. On an https:// URL the connection is TLS
/// first (ALPN offers h2 and http/1.1; the sniffer then reads the decrypted bytes).
final class ClientListener: Sendable {
    let host: String
    let port: Int
    let group: any EventLoopGroup
    let methods: GRPCMethods
    let makeHTTPHandler: @Sendable () -> any ChannelHandler & Sendable
    let tls: TLSContexts?
    /// etcd's --max-concurrent-streams, announced in the connection's SETTINGS.
    let maxConcurrentStreams: UInt32
    let minPingInterval: TimeAmount
    /// Connections one remote address may have open (0: no limit).
    let maxConnectionsPerClient: Int

    private struct Connection {
        let channel: Channel
        var grpc: NIOLoopBound<GRPCConnectionHandler>?
    }

    private let connections = NIOLockedValueBox<[ObjectIdentifier: Connection]>([:])
    /// Open connections by remote address.
    private let perHost = NIOLockedValueBox<[String: Int]>([:])
    private let server = NIOLockedValueBox<Channel?>(nil)

    init(host: String, port: Int, group: any EventLoopGroup, methods: GRPCMethods, tls: TLSContexts? = nil,
         maxConcurrentStreams: UInt32 = UInt32.max, minPingInterval: TimeAmount = .seconds(5), maxConnectionsPerClient: Int = 0,
         makeHTTPHandler: @escaping @Sendable () -> any ChannelHandler & Sendable) {
        self.tls = tls
        self.maxConnectionsPerClient = maxConnectionsPerClient
        self.minPingInterval = minPingInterval
        self.maxConcurrentStreams = maxConcurrentStreams
        self.host = host
        self.port = port
        self.group = group
        self.methods = methods
        self.makeHTTPHandler = makeHTTPHandler
    }

    /// The last commonName of a certificate's subject.
    static func commonName(_ certificate: NIOSSLCertificate) -> String? {
        guard let bytes = try? certificate.toDERBytes(), let parsed = try? Certificate(derEncoded: bytes) else { return nil }
        var name: String?
        for rdn in parsed.subject {
            for attribute in rdn where attribute.type == .RDNAttributeType.commonName {
                name = String(attribute.value)
            }
        }
        return name
    }

    /// Binds and returns the bound port.
    func bind() async throws -> Int {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] child in
                child.eventLoop.makeCompletedFuture {
                    let key = ObjectIdentifier(child)
                    let host = child.remoteAddress?.ipAddress ?? ""
                    let admitted = perHost.withLockedValue { counts -> Bool in
                        if maxConnectionsPerClient > 0 && counts[host, default: 0] >= maxConnectionsPerClient { return false }
                        counts[host, default: 0] += 1
                        return true
                    }
                    guard admitted else {
                        // Past the limit for this address: closed before anything is read.
                        child.close(promise: nil)
                        return
                    }
                    connections.withLockedValue { $0[key] = Connection(channel: child) }
                    child.closeFuture.whenComplete { [self] _ in
                        _ = connections.withLockedValue { $0.removeValue(forKey: key) }
                        perHost.withLockedValue { counts in
                            counts[host, default: 1] -= 1
                            if counts[host] == 0 { counts[host] = nil }
                        }
                    }
                    let sniffer = ProtocolSniffer { [self] channel, kind in
                        switch kind {
                        case .http2:
                            // The handshake is over once the sniffer has seen decrypted bytes.
                            let commonName = tls?.files.clientCertAuth == true
                                ? (try? channel.pipeline.syncOperations.handler(type: NIOSSLServerHandler.self))?.peerCertificate.flatMap(Self.commonName)
                                : nil
                            let handler = GRPCConnectionHandler(methods: methods, maxConcurrentStreams: maxConcurrentStreams, minPingInterval: minPingInterval, commonName: commonName)
                            try channel.pipeline.syncOperations.addHandler(handler)
                            let bound = NIOLoopBound(handler, eventLoop: channel.eventLoop)
                            connections.withLockedValue { $0[key]?.grpc = bound }
                        case .http1:
                            try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                            try channel.pipeline.syncOperations.addHandler(makeHTTPHandler())
                        }
                    }
                    if let tls {
                        // A client without an acceptable certificate fails the handshake.
                        try child.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: try tls.server()))
                    }
                    try child.pipeline.syncOperations.addHandler(sniffer)
                }
            }
            .bind(host: host, port: port).get()
        server.withLockedValue { $0 = channel }
        return channel.localAddress?.port ?? port
    }

    /// Stops accepting, asks gRPC connections to finish their calls (GOAWAY) and closes the rest;
    /// connections still open after `grace` are closed.
    func shutdown(grace: TimeAmount = .seconds(10)) async {
        if let server = server.withLockedValue({ $0 }) { try? await server.close() }
        let open = connections.withLockedValue { Array($0.values) }
        for connection in open {
            if let grpc = connection.grpc {
                grpc.eventLoop.execute { grpc.value.drain() }
            } else {
                connection.channel.close(promise: nil)
            }
        }
        let deadline = NIODeadline.now() + grace
        while !connections.withLockedValue({ $0.isEmpty }) && NIODeadline.now() < deadline {
            try? await Task.sleep(for: .milliseconds(10))
        }
        for connection in connections.withLockedValue({ Array($0.values) }) {
            connection.channel.close(promise: nil)
        }
    }
}
