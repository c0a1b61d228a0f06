import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// The operator's metrics over HTTP for a Prometheus scrape: `GET /metrics` answers the text of
/// the last published status (reconciles, actions by kind, members by state), `GET /healthz`
/// answers `ok`; anything else is 404.
public final class MetricsServer: Sendable {
    private let server: RouteServer
    private let text: NIOLockedValueBox<String>

    /// The port the server listens on (useful when it was asked for port 0).
    public var port: Int { server.port }

    /// `snapshot`: the file served at `/snapshots/<name>`, if any (a snapshot the operator
    /// offers a member that re-seeds from it; nothing else of the disk is reachable).
    public static func start(host: String, port: Int, snapshot: (@Sendable (String) -> String?)? = nil,
                             group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> MetricsServer {
        let text = NIOLockedValueBox(ClusterStatus().metricsText)
        let server = try await RouteServer.start(host: host, port: port, group: group) { method, path, _ in
            if path.hasPrefix("/snapshots/") {
                guard method == .GET || method == .HEAD else { return .methodNotAllowed }
                guard let file = snapshot?(String(path.dropFirst("/snapshots/".count))), FileManager.default.fileExists(atPath: file) else {
                    return .notFound
                }
                var answer = RouteServer.Answer(.ok, "application/octet-stream", "")
                answer.file = file
                return answer
            }
            switch (method, path) {
            case (.GET, "/metrics"), (.HEAD, "/metrics"):
                return RouteServer.Answer(.ok, "text/plain; version=0.0.4; charset=utf-8", text.withLockedValue { $0 })
            case (.GET, "/healthz"), (.HEAD, "/healthz"):
                return RouteServer.Answer(.ok, "text/plain; charset=utf-8", "ok\n")
            case (_, "/metrics"), (_, "/healthz"):
                return .methodNotAllowed
            default:
                return .notFound
            }
        }
        return MetricsServer(server: server, text: text)
    }

    private init(server: RouteServer, text: NIOLockedValueBox<String>) {
        self.server = server
        self.text = text
    }

    /// What later scrapes answer.
    public func update(_ status: ClusterStatus) {
        let metrics = status.metricsText
        text.withLockedValue { $0 = metrics }
    }

    public func close() async {
        await server.close()
    }
}

/// A small HTTP/1.1 server whose answers come from one function of the method, the path (without
/// the query) and the body (at most 1 MiB).
public final class RouteServer: Sendable {
    public struct Answer: Sendable {
        public var status: HTTPResponseStatus
        public var contentType: String
        public var body: String
        /// A file sent as the body instead (from disk to the socket).
        public var file: String?
        public init(_ status: HTTPResponseStatus, _ contentType: String, _ body: String) {
            self.status = status
            self.contentType = contentType
            self.body = body
        }
        public static let notFound = Answer(.notFound, "text/plain; charset=utf-8", "404 page not found\n")
        public static let methodNotAllowed = Answer(.methodNotAllowed, "text/plain; charset=utf-8", "method not allowed\n")
    }
    public typealias Route = @Sendable (HTTPMethod, String, [UInt8]) -> Answer

    private let channel: Channel
    public var port: Int { channel.localAddress?.port ?? 0 }

    public static func start(host: String, port: Int, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                             route: @escaping Route) async throws -> RouteServer {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.configureHTTPServerPipeline()
                    try channel.pipeline.syncOperations.addHandler(RouteHandler(route: route))
                }
            }
            .bind(host: host, port: port).get()
        return RouteServer(channel: channel)
    }

    private init(channel: Channel) {
        self.channel = channel
    }

    public func close() async {
        try? await channel.close()
    }
}

private final class RouteHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    static let bodyLimit = 1 << 20

    private let route: RouteServer.Route
    private var head: HTTPRequestHead?
    private var body: [UInt8] = []
    private var tooLarge = false

    init(route: @escaping RouteServer.Route) {
        self.route = route
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let request):
            head = request
            body = []
            tooLarge = false
        case .body(let buffer):
            if tooLarge || body.count + buffer.readableBytes > Self.bodyLimit {
                tooLarge = true
                body = []
            } else {
                body += buffer.readableBytesView
            }
        case .end:
            guard let request = head else { return }
            head = nil
            let path = request.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? request.uri
            let answer = tooLarge ? RouteServer.Answer(.payloadTooLarge, "text/plain; charset=utf-8", "request body too large\n")
                : route(request.method, path, body)
            body = []
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: answer.contentType)
            var file: (handle: NIOFileHandle, size: Int)?
            if let path = answer.file {
                guard let handle = try? NIOFileHandle(_deprecatedPath: path),
                      let size = try? handle.withUnsafeFileDescriptor({ fd in Int(lseek(fd, 0, SEEK_END)) }), size >= 0 else {
                    headers.replaceOrAdd(name: "Content-Length", value: "0")
                    context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: .internalServerError, headers: headers))), promise: nil)
                    context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
                    return
                }
                file = (handle, size)
                headers.add(name: "Content-Length", value: "\(size)")
            } else {
                headers.add(name: "Content-Length", value: "\(answer.body.utf8.count)")
            }
            let keepAlive = request.isKeepAlive
            if !keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: request.version, status: answer.status, headers: headers))), promise: nil)
            if let file {
                if request.method != .HEAD {
                    let region = FileRegion(fileHandle: file.handle, readerIndex: 0, endIndex: file.size)
                    context.write(wrapOutboundOut(.body(.fileRegion(region))), promise: nil)
                }
            } else if request.method != .HEAD {
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(string: answer.body)))), promise: nil)
            }
            let done = context.writeAndFlush(wrapOutboundOut(.end(nil)))
            if let handle = file?.handle { done.whenComplete { _ in try? handle.close() } }
            if !keepAlive {
                let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
                done.whenComplete { _ in loopBound.value.close(promise: nil) }
            }
        }
    }
}
