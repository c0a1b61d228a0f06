import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// The operator's metrics over HTTP for a Prometheus scrape: `GET /metrics` answers the text of
/// the last published status (reconciles, actions by kind, members by state), `GET /healthz`
/// answers `ok`; anything else is 404.
public final class MetricsServer: Sendable {
    private let channel: Channel
    private let text: NIOLockedValueBox<String>

    /// The port the server listens on (useful when it was asked for port 0).
    public var port: Int { channel.localAddress?.port ?? 0 }

    public static func start(host: String, port: Int, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> MetricsServer {
        let text = NIOLockedValueBox(ClusterStatus().metricsText)
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(MetricsHandler(text: text))
                }
            }
            .bind(host: host, port: port).get()
        return MetricsServer(channel: channel, text: text)
    }

    private init(channel: Channel, text: NIOLockedValueBox<String>) {
        self.channel = channel
        self.text = text
    }

    /// What later scrapes answer.
    public func update(_ status: ClusterStatus) {
        let metrics = status.metricsText
        text.withLockedValue { $0 = metrics }
    }

    public func close() async {
        try? await channel.close()
    }
}

private final class MetricsHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let text: NIOLockedValueBox<String>
    private var head: HTTPRequestHead?

    init(text: NIOLockedValueBox<String>) {
        self.text = text
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let request):
            head = request
        case .body:
            break
        case .end:
            guard let request = head else { return }
            head = nil
            let path = request.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.uri
            let (status, contentType, body): (HTTPResponseStatus, String, String)
            switch (request.method, path) {
            case (.GET, "/metrics"), (.HEAD, "/metrics"):
                (status, contentType, body) = (.ok, "text/plain; version=0.0.4; charset=utf-8", text.withLockedValue { $0 })
            case (.GET, "/healthz"), (.HEAD, "/healthz"):
                (status, contentType, body) = (.ok, "text/plain; charset=utf-8", "ok\n")
            case (_, "/metrics"), (_, "/healthz"):
                (status, contentType, body) = (.methodNotAllowed, "text/plain; charset=utf-8", "method not allowed\n")
            default:
                (status, contentType, body) = (.notFound, "text/plain; charset=utf-8", "404 page not found\n")
            }
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: contentType)
            headers.add(name: "Content-Length", value: "\(body.utf8.count)")
            let keepAlive = request.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: status, headers: headers))), promise: nil)
            if request.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: body)))), promise: nil)
            }
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if !keepAlive {
                let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
                done.whenComplete { _ in loopBound.value.close(promise: nil) }
            }
        }
    }
}
