import Foundation
import NIOCore
import NIOHPACK
import NIOHTTP1

/// HTTP/1.1 on the client port: etcd's JSON gateway (`POST /v3/...`, `/v3beta/...`) and its plain
/// endpoints (`/health`, `/livez`, `/readyz`, `/version`). Gateway calls run the same method
/// handlers as gRPC. NIO's pipelining helper holds a connection's next request until the current
/// response has ended, so answers stay in order.
final class HTTPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let server: EtcdLiteServer
    private let methods: GRPCMethods
    private var head: HTTPRequestHead?
    private var body: ByteBuffer?
    private var bodyTooLarge = false
    private var context: ChannelHandlerContext?
    /// A streaming call in progress, cancelled if the client goes away.
    private var streamTask: Task<Void, Never>?
    /// The largest body accepted: the gRPC receive limit, with room for base64 and JSON syntax.
    private var bodyLimit: Int { methods.receiveLimit * 2 + 64 * 1024 }

    init(server: EtcdLiteServer, methods: GRPCMethods) {
        self.server = server
        self.methods = methods
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    /// The context refers to this handler: drop it, or the two keep each other alive.
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        streamTask?.cancel()
        streamTask = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
            body = nil
            bodyTooLarge = false
        case .body(var chunk):
            guard !bodyTooLarge else { return }
            if (body?.readableBytes ?? 0) + chunk.readableBytes > bodyLimit {
                bodyTooLarge = true
                body = nil
                return
            }
            if body == nil { body = chunk } else { body!.writeBuffer(&chunk) }
        case .end:
            guard let head else { return }
            self.head = nil
            let bytes = body.map { Array($0.readableBytesView) } ?? []
            body = nil
            handle(head, bytes)
        }
    }

    private func handle(_ head: HTTPRequestHead, _ body: [UInt8]) {
        let parts = head.uri.split(separator: "?", maxSplits: 1)
        let path = parts.first.map(String.init) ?? head.uri
        let query = parts.count > 1 ? String(parts[1]) : ""
        switch path {
        case "/version":
            respond(head, .ok, "{\"etcdserver\":\"\(EtcdLiteServer.apiVersion)\",\"etcdcluster\":\"\(EtcdLiteServer.clusterVersion)\"}")
        case "/health", "/livez", "/readyz":
            let (status, text) = health(query: query)
            respond(head, status, text)
        case "/metrics":
            // Counting keys reads SQLite: off the event loop.
            let loop = NIOLoopBound(self, eventLoop: context!.eventLoop)
            let server = self.server
            Task {
                let text = server.metricsText()
                loop.eventLoop.execute { loop.value.respond(head, .ok, text, contentType: "text/plain; version=0.0.4; charset=utf-8") }
            }
        default:
            guard let route = GatewayRoute.route(for: path) else {
                // The gateway's own 404 under its prefixes; Go's mux's elsewhere.
                let gatewayPath = path.hasPrefix("/v3/") || path.hasPrefix("/v3beta/")
                respond(head, .notFound, gatewayPath ? "Not Found\n" : "404 page not found\n", contentType: "text/plain; charset=utf-8")
                return
            }
            guard head.method == .POST else {
                respond(head, .methodNotAllowed, "Method Not Allowed\n", contentType: "text/plain; charset=utf-8")
                return
            }
            if bodyTooLarge {
                fail(head, EtcdError(.resourceExhausted, "grpc: received message larger than max (\(bodyLimit) vs. \(methods.receiveLimit))"))
                return
            }
            call(route, head, body)
        }
    }

    // MARK: - etcd's HTTP endpoints

    /// etcd's /health: unhealthy (503) while an alarm is active (`?exclude=NOSPACE` ignores that one);
    /// `?serializable=true` skips the leader check.
    private func health(query: String) -> (HTTPResponseStatus, String) {
        var excluded: Set<String> = []
        for item in query.split(separator: "&") {
            let pair = item.split(separator: "=", maxSplits: 1)
            if pair.first == "exclude", pair.count == 2 { excluded.insert(String(pair[1])) }
        }
        let serializable = query.split(separator: "&").contains("serializable=true")
        let alarms = server.status.alarms.filter { !excluded.contains(EtcdLiteServer.alarmName($0.alarm)) }
        // etcd 3.4's body: the verdict only. Without a leader a member is unhealthy unless the
        // caller asked for a serializable check.
        let healthy = alarms.isEmpty && (serializable || server.hasLeader)
        return healthy ? (.ok, "{\"health\":\"true\"}") : (.serviceUnavailable, "{\"health\":\"false\"}")
    }

    // MARK: - Gateway calls

    private func call(_ route: GatewayRoute, _ head: HTTPRequestHead, _ body: [UInt8]) {
        guard let method = methods[route.method] else {
            fail(head, EtcdError(.unimplemented, GRPCStatus.unimplemented(route.method).message))
            return
        }
        var requests: [[UInt8]]
        do {
            let values = try JSONValues.split(body)
            requests = try values.map(route.decode)
            if requests.isEmpty { requests = [try route.decode(Data("{}".utf8))] }  // an empty body is an empty request
        } catch {
            fail(head, error)
            return
        }
        if let large = requests.first(where: { $0.count > methods.receiveLimit }) {
            fail(head, EtcdError(.resourceExhausted, "grpc: received message larger than max (\(large.count) vs. \(methods.receiveLimit))"))
            return
        }
        let callContext = CallContext(headers: Self.metadata(head))
        let loop = NIOLoopBound(self, eventLoop: context!.eventLoop)
        switch method {
        case .unary(let handler):
            let request = requests[0]
            Task {
                let result: Result<[UInt8], any Error>
                do { result = .success(try await handler(request, callContext)) } catch { result = .failure(error) }
                loop.eventLoop.execute { loop.value.finishUnary(head, route, result) }
            }
        case .unaryDirect(let handler):
            handler(requests[0], callContext) { result in
                loop.eventLoop.execute { loop.value.finishUnary(head, route, result.mapError { $0 }) }
            }
        case .streaming(let handler):
            startStream(head)
            let (inbound, continuation) = AsyncStream.makeStream(of: [UInt8].self)
            for request in requests { continuation.yield(request) }
            continuation.finish()  // the body has ended: half-close, as the gateway does
            let writer = ResponseWriter { messages in
                let promise = loop.eventLoop.makePromise(of: Void.self)
                loop.eventLoop.execute {
                    for (index, message) in messages.enumerated() {
                        loop.value.writeLine(route, message, promise: index == messages.count - 1 ? promise : nil)
                    }
                }
                try await promise.futureResult.get()
            }
            streamTask = Task {
                var failure: GRPCStatus?
                do { try await handler(inbound, writer, callContext) } catch { failure = GRPCStatus(error) }
                let outcome = failure
                loop.eventLoop.execute {
                    if let outcome, outcome.code != 1 { loop.value.writeStreamError(outcome) }
                    loop.value.streamTask = nil
                    loop.value.endStream(head)
                }
            }
        }
    }

    /// gRPC metadata from HTTP headers (lowercase names), as grpc-gateway passes them: the
    /// `Authorization` header as `authorization` (the raw token, no "Bearer "), `Grpc-Metadata-X`
    /// as `x`; a plain `Token` header is not metadata.
    static func metadata(_ head: HTTPRequestHead) -> HPACKHeaders {
        var headers = HPACKHeaders()
        for (name, value) in head.headers {
            let lower = name.lowercased()
            if lower.hasPrefix("grpc-metadata-") {
                headers.add(name: String(lower.dropFirst("grpc-metadata-".count)), value: value)
            } else if lower != "token" {
                headers.add(name: lower, value: value)
            }
        }
        return headers
    }

    private func finishUnary(_ head: HTTPRequestHead, _ route: GatewayRoute, _ result: Result<[UInt8], any Error>) {
        switch result {
        case .success(let bytes):
            do {
                respond(head, .ok, try route.encode(bytes))
            } catch {
                fail(head, EtcdError(.internal, "etcdserver: \(error)"))
            }
        case .failure(let error):
            fail(head, error)
        }
    }

    /// grpc-gateway's error body (etcd 3.4's field order) and etcd's HTTP status for the gRPC code.
    private func fail(_ head: HTTPRequestHead, _ error: any Error) {
        let status = GRPCStatus(error)
        respond(head, Self.httpStatus(status.code), Self.errorBody(status))
    }

    static func errorBody(_ status: GRPCStatus) -> String {
        let message = JSONText.quote(status.message)
        return "{\"error\":\(message),\"message\":\(message),\"code\":\(status.code)}"
    }

    static func httpStatus(_ code: Int) -> HTTPResponseStatus {
        switch code {
        case 0: .ok
        case 1: .requestTimeout
        case 3, 11: .badRequest
        case 9: .preconditionFailed
        case 4: .gatewayTimeout
        case 5: .notFound
        case 6, 10: .conflict
        case 7: .forbidden
        case 8: .tooManyRequests
        case 12: .notImplemented
        case 14: .serviceUnavailable
        case 16: .unauthorized
        default: .internalServerError
        }
    }

    // MARK: - Writing

    private func respond(_ head: HTTPRequestHead, _ status: HTTPResponseStatus, _ text: String,
                         contentType: String = "application/json") {
        guard let context else { return }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: contentType)
        headers.add(name: "Content-Length", value: "\(text.utf8.count)")
        if !head.isKeepAlive { headers.add(name: "Connection", value: "close") }
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: text)))), promise: nil)
        let keepAlive = head.isKeepAlive
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if !keepAlive { context.close(promise: nil) }
        }
    }

    private func startStream(_ head: HTTPRequestHead) {
        guard let context else { return }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: "application/json")
        headers.add(name: "Transfer-Encoding", value: "chunked")
        context.writeAndFlush(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: .ok, headers: headers))), promise: nil)
    }

    /// One stream message: a line `{"result":{...}}`, flushed at once.
    private func writeLine(_ route: GatewayRoute, _ message: [UInt8], promise: EventLoopPromise<Void>? = nil) {
        guard let context else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        let json = (try? route.encode(message)) ?? "{}"
        context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: "{\"result\":\(json)}\n")))), promise: promise)
    }

    /// grpc-gateway's in-stream error line.
    private func writeStreamError(_ status: GRPCStatus) {
        guard let context else { return }
        let http = Self.httpStatus(status.code)
        let line = "{\"error\":{\"grpc_code\":\(status.code),\"http_code\":\(http.code),\"message\":\(JSONText.quote(status.message)),\"http_status\":\(JSONText.quote(http.reasonPhrase))}}\n"
        context.writeAndFlush(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: line)))), promise: nil)
    }

    private func endStream(_ head: HTTPRequestHead) {
        guard let context else { return }
        let keepAlive = head.isKeepAlive
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
            if !keepAlive { context.close(promise: nil) }
        }
    }
}
