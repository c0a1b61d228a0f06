import GRPCNIOTransportCore
import GRPCNIOTransportHTTP2Posix
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// Accepts client connections on one port for both gRPC and HTTP/1.1: a `ListenerFactory` for
/// grpc-swift's custom HTTP/2 transport whose connections pass through `ProtocolSniffer` first.
final class ClientListener: HTTP2ServerTransport.ListenerFactory {
    let host: String
    let port: Int
    let eventLoopGroup: any EventLoopGroup
    /// Builds the HTTP/1.1 handler of one connection.
    let makeHTTPHandler: @Sendable () -> any ChannelHandler & Sendable
    /// The bound address of the listening socket, once bound.
    let localAddress = NIOLockedValueBox<NIOCore.SocketAddress?>(nil)

    init(host: String, port: Int, eventLoopGroup: any EventLoopGroup, makeHTTPHandler: @escaping @Sendable () -> any ChannelHandler & Sendable) {
        self.host = host
        self.port = port
        self.eventLoopGroup = eventLoopGroup
        self.makeHTTPHandler = makeHTTPHandler
    }

    func makeListeningChannel(
        listenerConfigurator: HTTP2ServerTransport.ListenerConfigurator,
        connectionConfigurator: HTTP2ServerTransport.ConnectionConfigurator
    ) async throws -> NIOAsyncChannel<HTTP2ServerTransport.ConnectionConfigurator.ConnectionChannel, Never> {
        let sink = ConnectionSink()
        let makeHTTPHandler = self.makeHTTPHandler
        let server = try await ServerBootstrap(group: eventLoopGroup)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .serverChannelOption(.backlog, value: 1024)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .serverChannelInitializer { channel in listenerConfigurator.configure(channel: channel) }
            .childChannelInitializer { child in
                child.eventLoop.makeCompletedFuture {
                    let sniffer = ProtocolSniffer { channel, kind in
                        switch kind {
                        case .http2:
                            let configured = connectionConfigurator.configure(channel: channel, tls: .none)
                            configured.whenSuccess { sink.deliver($0) }
                        case .http1:
                            try channel.pipeline.syncOperations.configureHTTPServerPipeline(withErrorHandling: true)
                            try channel.pipeline.syncOperations.addHandler(makeHTTPHandler())
                        }
                    }
                    try child.pipeline.syncOperations.addHandler(sniffer)
                }
            }
            .bind(host: host, port: port).get()
        // grpc-swift consumes connections from an async channel. The listening channel cannot be
        // that channel (its pipeline carries the accepted children, which must reach its tail to be
        // registered), so a loopback UDP socket that never receives anything carries them instead.
        let carrier = try await DatagramBootstrap(group: eventLoopGroup).bind(host: "127.0.0.1", port: 0).get()
        server.closeFuture.whenComplete { _ in carrier.close(promise: nil) }
        carrier.closeFuture.whenComplete { _ in server.close(promise: nil) }
        localAddress.withLockedValue { $0 = server.localAddress }
        return try await carrier.eventLoop.submit {
            let channel = try NIOAsyncChannel<HTTP2ServerTransport.ConnectionConfigurator.ConnectionChannel, Never>(
                wrappingChannelSynchronously: carrier)
            sink.attach(carrier)
            return channel
        }.get()
    }
}

/// Hands HTTP/2 connections to the carrier channel that grpc-swift reads them from.
final class ConnectionSink: Sendable {
    typealias Connection = HTTP2ServerTransport.ConnectionConfigurator.ConnectionChannel

    private enum State {
        case waiting([Connection])
        case attached(Channel)
    }

    private let state = NIOLockedValueBox(State.waiting([]))

    /// Called once the carrier is wrapped; delivers what arrived before.
    func attach(_ carrier: Channel) {
        let early = state.withLockedValue { state -> [Connection] in
            defer { state = .attached(carrier) }
            if case .waiting(let early) = state { return early }
            return []
        }
        for connection in early { forward(connection, carrier) }
    }

    func deliver(_ connection: Connection) {
        let carrier = state.withLockedValue { state -> Channel? in
            switch state {
            case .waiting(var early):
                early.append(connection)
                state = .waiting(early)
                return nil
            case .attached(let carrier):
                return carrier
            }
        }
        if let carrier { forward(connection, carrier) }
    }

    private func forward(_ connection: Connection, _ carrier: Channel) {
        carrier.eventLoop.execute {
            carrier.pipeline.fireChannelRead(connection)
            carrier.pipeline.fireChannelReadComplete()
        }
    }
}
