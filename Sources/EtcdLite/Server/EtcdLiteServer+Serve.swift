import Foundation
import GRPCCore
import GRPCNIOTransportCore
import GRPCNIOTransportHTTP2Posix
import NIOCore
import NIOPosix

extension EtcdLiteServer {
    /// Serves gRPC and HTTP on every --listen-client-urls address until the task is cancelled or
    /// `shutdown` is called; then stops accepting, lets in-flight RPCs finish and closes the store.
    /// `onListening` receives the bound ports (useful with port 0).
    public func serve(onListening: @Sendable ([Int]) -> Void = { _ in }) async throws {
        let group = MultiThreadedEventLoopGroup.singleton
        var servers: [GRPCServer<HTTP2ServerTransport.Custom<ClientListener>>] = []
        var listeners: [ClientListener] = []
        for text in config.listenClientURLs {
            guard let url = URLComponents(string: text), let host = url.host else { throw ConfigError("invalid URL \(text)") }
            var transportConfig = HTTP2ServerTransport.Custom<ClientListener>.Config.defaults
            transportConfig.connection.keepalive.clientBehavior = .init(minPingIntervalWithoutCalls: .seconds(5), allowWithoutCalls: true)
            // The transport only guards memory; EtcdDeserializer enforces etcd's limit with etcd's error.
            transportConfig.rpc.maxRequestPayloadSize = max(64 << 20, 2 * (config.maxRequestBytes + 512 * 1024))
            let listener = ClientListener(host: host == "localhost" ? "127.0.0.1" : host, port: url.port ?? 2379, eventLoopGroup: group) { [self] in
                HTTPHandler(server: self)
            }
            let transport = HTTP2ServerTransport.Custom(listenerFactory: listener, config: transportConfig)
            listeners.append(listener)
            servers.append(GRPCServer(transport: transport, services: [EtcdServices(server: self)]))
        }
        let running = servers
        shutdownHook.withLock { $0 = { for server in running { server.beginGracefulShutdown() } } }
        let retention = try config.autoCompactionRetentionValue()
        try await withTaskCancellationHandler {
            // Child tasks: the gRPC servers (true) and the auto compactor (false), which stops with them.
            try await withThrowingTaskGroup(of: Bool.self) { group in
                for server in running { group.addTask { try await server.serve(); return true } }
                if let retention {
                    group.addTask { await AutoCompactor(server: self, retention: retention).run(); return false }
                }
                var ports: [Int] = []
                for listener in listeners {
                    while listener.localAddress.withLockedValue({ $0 }) == nil { try await Task.sleep(for: .milliseconds(5)) }
                    ports.append(listener.localAddress.withLockedValue { $0 }?.port ?? 0)
                }
                logger.info("ready to serve client requests", metadata: ["listen-client-urls": "\(config.listenClientURLs)", "ports": "\(ports)"])
                onListening(ports)
                var serving = running.count
                while serving > 0, let isServer = try await group.next() {
                    if isServer { serving -= 1 }
                }
                group.cancelAll()
            }
        } onCancel: {
            for server in running { server.beginGracefulShutdown() }
        }
        close()
    }

    /// Stops accepting connections; `serve` returns once in-flight RPCs are done.
    public func shutdown() {
        shutdownHook.withLock { $0 }?()
    }
}
