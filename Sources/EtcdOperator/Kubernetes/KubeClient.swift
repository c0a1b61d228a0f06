import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import NIOSSL

/// A failure the API server answered with (its `Status` object: code, reason, message).
public struct KubeAPIError: Error, CustomStringConvertible, Sendable, Equatable {
    public var code: Int
    /// The Status reason: NotFound, AlreadyExists, Conflict, Gone, Forbidden, Invalid, ...
    public var reason: String
    public var message: String
    public var description: String { "\(code) \(reason): \(message)" }

    public var isConflict: Bool { code == 409 && reason != "AlreadyExists" }
    public var isNotFound: Bool { code == 404 }
    public var isAlreadyExists: Bool { code == 409 && reason == "AlreadyExists" }
    public var isGone: Bool { code == 410 }

    /// From a response: its Status object when it carries one, else the HTTP status alone.
    init(code: Int, body: Data) {
        self.code = code
        let status = (try? JSONSerialization.jsonObject(with: body)) as? [String: Any]
        reason = status?["reason"] as? String ?? HTTPResponseStatus(statusCode: code).reasonPhrase
        message = status?["message"] as? String ?? String(decoding: body.prefix(200), as: UTF8.self)
    }

    public init(code: Int, reason: String, message: String) {
        self.code = code
        self.reason = reason
        self.message = message
    }
}

/// One watch event (ADDED, MODIFIED, DELETED, BOOKMARK, ERROR) and its object.
public struct WatchEvent: @unchecked Sendable {
    public var type: String
    public var object: [String: Any]
}

/// A small client of the Kubernetes API: HTTP/1.1 (TLS with the cluster's CA) and a bearer
/// token, one connection per request, JSON bodies, watches read line by line.
public final class KubeClient: Sendable {
    public let host: String
    public let port: Int
    let tls: NIOSSLContext?
    let token: String?
    let group: EventLoopGroup
    public let timeout: TimeAmount

    public init(host: String, port: Int, tls: NIOSSLContext? = nil, token: String? = nil,
                group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton, timeout: TimeAmount = .seconds(10)) {
        self.host = host
        self.port = port
        self.tls = tls
        self.token = token
        self.group = group
        self.timeout = timeout
    }

    /// The in-cluster configuration: KUBERNETES_SERVICE_HOST/PORT, the service account's token and CA.
    public static func inCluster(serviceAccount: String = "/var/run/secrets/kubernetes.io/serviceaccount") throws -> KubeClient {
        let env = ProcessInfo.processInfo.environment
        guard let host = env["KUBERNETES_SERVICE_HOST"], let port = env["KUBERNETES_SERVICE_PORT"].flatMap(Int.init) else {
            throw OperatorError("not in a cluster: KUBERNETES_SERVICE_HOST/PORT are not set")
        }
        let token = try String(contentsOfFile: serviceAccount + "/token", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .file(serviceAccount + "/ca.crt")
        return KubeClient(host: host, port: port, tls: try NIOSSLContext(configuration: configuration), token: token)
    }

    // MARK: Requests

    /// A JSON request; the decoded object of a 2xx answer, a `KubeAPIError` otherwise.
    @discardableResult
    public func send(_ method: HTTPMethod, _ path: String, body: [String: Any]? = nil,
                     contentType: String = "application/json") async throws -> [String: Any] {
        let data = try body.map { try JSONSerialization.data(withJSONObject: $0, options: [.sortedKeys]) }
        let collector = BodyCollector()
        let status = try await exchange(method, path, body: data, contentType: contentType, timeout: timeout, collector)
        guard (200..<300).contains(status) else { throw KubeAPIError(code: status, body: collector.body) }
        guard !collector.body.isEmpty else { return [:] }
        guard let object = try JSONSerialization.jsonObject(with: collector.body) as? [String: Any] else {
            throw KubeAPIError(code: status, reason: "BadResponse", message: "the answer is not a JSON object")
        }
        return object
    }

    public func get(_ path: String) async throws -> [String: Any] { try await send(.GET, path) }

    /// GET `path` into the file at `file` (made anew); throws unless the answer is a 2xx. A body
    /// cut short is written as far as it came: the caller checks what it downloaded.
    public func download(_ path: String, to file: String, timeout: TimeAmount = .minutes(10)) async throws {
        guard FileManager.default.createFile(atPath: file, contents: nil), let handle = FileHandle(forWritingAtPath: file) else {
            throw OperatorError("cannot write \(file)")
        }
        defer { try? handle.close() }
        let sink = FileSink(handle)
        let status = try await exchange(.GET, path, body: nil, contentType: "application/octet-stream", timeout: timeout, sink)
        if let failure = sink.failure { throw failure }
        guard (200..<300).contains(status) else { throw KubeAPIError(code: status, reason: "Failed", message: "GET \(path) answered \(status)") }
    }

    /// Watches `path` from `resourceVersion` until the server ends the stream (its timeout) or
    /// `onEvent` returns false. An ERROR event with a Status of 410 (the version is too old) is
    /// thrown as `KubeAPIError` Gone: the caller lists again and watches from the new version.
    public func watch(_ path: String, resourceVersion: String?, timeoutSeconds: Int = 290,
                      onEvent: @escaping @Sendable (WatchEvent) -> Bool) async throws {
        var query = "watch=1&allowWatchBookmarks=true&timeoutSeconds=\(timeoutSeconds)"
        if let resourceVersion { query += "&resourceVersion=\(resourceVersion)" }
        let separator = path.contains("?") ? "&" : "?"
        let lines = LineSplitter(onEvent)
        let status = try await exchange(.GET, path + separator + query, body: nil, contentType: "application/json",
                                        timeout: .seconds(Int64(timeoutSeconds) + 30), lines)
        guard (200..<300).contains(status) else { throw KubeAPIError(code: status, body: lines.rejected) }
        if let failure = lines.failure { throw failure }
    }

    /// Sends one request and feeds the answer's body to `sink`; returns the HTTP status.
    private func exchange(_ method: HTTPMethod, _ path: String, body: Data?, contentType: String, timeout: TimeAmount,
                          _ sink: ResponseSink) async throws -> Int {
        let host = self.host, tls = self.tls
        let channel = try await ClientBootstrap(group: group)
            .connectTimeout(self.timeout)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        let serverName = host.first?.isNumber == true || host.contains(":") ? nil : host
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: tls, serverHostname: serverName))
                    }
                    try channel.pipeline.syncOperations.addHTTPClientHandlers()
                    try channel.pipeline.syncOperations.addHandler(ResponseHandler(sink: sink))
                }
            }
            .connect(host: host, port: port).get()
        var headers = HTTPHeaders()
        headers.add(name: "Host", value: "\(host):\(port)")
        headers.add(name: "Accept", value: "application/json")
        headers.add(name: "User-Agent", value: "etcdlite-operator")
        if let token { headers.add(name: "Authorization", value: "Bearer \(token)") }
        if let body {
            headers.add(name: "Content-Type", value: contentType)
            headers.add(name: "Content-Length", value: String(body.count))
        }
        let head = HTTPRequestHead(version: .http1_1, method: method, uri: path, headers: headers)
        let done = sink.done
        channel.write(HTTPClientRequestPart.head(head), promise: nil)
        if let body { channel.write(HTTPClientRequestPart.body(.byteBuffer(ByteBuffer(bytes: body))), promise: nil) }
        channel.writeAndFlush(HTTPClientRequestPart.end(nil), promise: nil)
        let deadline = channel.eventLoop.scheduleTask(in: timeout) { channel.close(promise: nil) }
        defer {
            deadline.cancel()
            channel.close(promise: nil)
        }
        return try await withCheckedThrowingContinuation { continuation in
            done.setContinuation(continuation, on: channel.eventLoop)
        }
    }
}

/// What a response's body goes to; completes with the HTTP status at the end of the response.
class ResponseSink: @unchecked Sendable {
    let done = Completion()
    var status = 0
    func head(_ status: Int) { self.status = status }
    func body(_ bytes: ByteBuffer) {}
    /// False: stop reading (the channel is closed).
    var wantsMore: Bool { true }
}

/// Completes once with a status or an error, whichever comes first (on the channel's loop).
final class Completion: @unchecked Sendable {
    private var continuation: CheckedContinuation<Int, any Error>?
    private var result: Result<Int, any Error>?

    func setContinuation(_ continuation: CheckedContinuation<Int, any Error>, on loop: EventLoop) {
        loop.execute {
            if let result = self.result { continuation.resume(with: result) } else { self.continuation = continuation }
        }
    }

    func finish(_ result: Result<Int, any Error>) {
        guard self.result == nil else { return }
        self.result = result
        continuation?.resume(with: result)
        continuation = nil
    }
}

final class BodyCollector: ResponseSink, @unchecked Sendable {
    var body = Data()
    override func body(_ bytes: ByteBuffer) { body.append(contentsOf: bytes.readableBytesView) }
}

/// A body written to a file as it comes.
final class FileSink: ResponseSink, @unchecked Sendable {
    let handle: FileHandle
    var failure: (any Error)?
    init(_ handle: FileHandle) { self.handle = handle }
    override var wantsMore: Bool { failure == nil }
    override func body(_ bytes: ByteBuffer) {
        guard (200..<300).contains(status) else { return }
        do { try handle.write(contentsOf: Data(bytes.readableBytesView)) } catch { failure = error }
    }
}

/// A watch's body: one JSON event per line.
final class LineSplitter: ResponseSink, @unchecked Sendable {
    private var pending = Data()
    private let onEvent: @Sendable (WatchEvent) -> Bool
    private var stopped = false
    var failure: KubeAPIError?
    /// The body of a refused watch (a Status).
    var rejected = Data()

    init(_ onEvent: @escaping @Sendable (WatchEvent) -> Bool) { self.onEvent = onEvent }

    override var wantsMore: Bool { !stopped }

    override func body(_ bytes: ByteBuffer) {
        guard (200..<300).contains(status) else {
            rejected.append(contentsOf: bytes.readableBytesView)
            return
        }
        pending.append(contentsOf: bytes.readableBytesView)
        while !stopped, let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
            let line = pending[pending.startIndex..<newline]
            pending = Data(pending[pending.index(after: newline)...])
            guard !line.isEmpty, let event = (try? JSONSerialization.jsonObject(with: line)) as? [String: Any],
                  let type = event["type"] as? String else { continue }
            let object = event["object"] as? [String: Any] ?? [:]
            if type == "ERROR" {
                // A Status in the stream: 410 Gone when the version is too old.
                failure = KubeAPIError(code: object["code"] as? Int ?? 500, reason: object["reason"] as? String ?? "InternalError",
                                       message: object["message"] as? String ?? "")
                stopped = true
                return
            }
            if !onEvent(WatchEvent(type: type, object: object)) { stopped = true }
        }
    }
}

private final class ResponseHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPClientResponsePart
    let sink: ResponseSink

    init(sink: ResponseSink) { self.sink = sink }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            sink.head(Int(head.status.code))
        case .body(let bytes):
            sink.body(bytes)
            if !sink.wantsMore {
                sink.done.finish(.success(sink.status))
                context.close(promise: nil)
            }
        case .end:
            sink.done.finish(.success(sink.status))
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        // A watch the server ended (or our deadline): what arrived counts.
        if sink.status != 0 {
            sink.done.finish(.success(sink.status))
        } else {
            sink.done.finish(.failure(KubeAPIError(code: 503, reason: "ServiceUnavailable", message: "the connection closed before an answer")))
        }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        sink.done.finish(.failure(error))
        context.close(promise: nil)
    }
}
