import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL

/// A gRPC status as a client sees it.
public struct ClientStatus: Error, Sendable, Equatable, CustomStringConvertible {
    public var code: Int
    public var message: String
    public init(code: Int, message: String) {
        self.code = code
        self.message = message
    }
    public static let ok = ClientStatus(code: 0, message: "")
    public var description: String { "grpc status \(code): \(message)" }
}

/// Receives what arrives on one client call: messages as they come, then the final status.
public protocol ClientCallObserver: AnyObject, Sendable {
    /// Runs on the connection's event loop.
    func received(_ message: [UInt8])
    /// Runs on the connection's event loop, once.
    func closed(_ status: ClientStatus)
}

/// One HTTP/2 connection speaking gRPC with raw message bytes, on frames directly: no channel
/// and no task per call, so a load generator can drive tens of thousands of calls a second from
/// one core. Calls are opened with `unary` or `stream`; their answers reach an observer on the
/// connection's event loop.
public final class GRPCClientConnection: Sendable {
    let channel: Channel
    private let handler: NIOLoopBound<ClientFrameHandler>

    public var eventLoop: EventLoop { channel.eventLoop }

    /// Whether the connection is still open.
    public var isActive: Bool { channel.isActive }

    /// `tls`: TLS first (ALPN h2), as to an https:// endpoint.
    public static func connect(host: String, port: Int, group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
                               connectTimeout: TimeAmount = .seconds(10), tls: NIOSSLContext? = nil) async throws -> GRPCClientConnection {
        let channel = try await ClientBootstrap(group: group)
            .connectTimeout(connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: tls, serverHostname: nil))
                    }
                    try channel.pipeline.syncOperations.addHandler(ClientFrameHandler(authority: "\(host):\(port)", scheme: tls == nil ? "http" : "https"))
                }
            }
            .connect(host: host, port: port).get()
        let handler = try await channel.eventLoop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: ClientFrameHandler.self), eventLoop: channel.eventLoop)
        }.get()
        return GRPCClientConnection(channel: channel, handler: handler)
    }

    /// Internal for tests that drive the handler on an embedded channel.
    init(channel: Channel, handler: NIOLoopBound<ClientFrameHandler>) {
        self.channel = channel
        self.handler = handler
    }

    /// Metadata every later call carries (e.g. an auth `token`).
    public func setDefaultMetadata(_ metadata: [(String, String)]) async throws {
        let handler = self.handler
        try await eventLoop.submit { handler.value.defaultMetadata = metadata }.get()
    }

    /// Starts a call on `path` (`/package.Service/Method`) and returns its handle; `messages` go
    /// out first, and the request side ends with them when `endRequest` is set.
    public func start(_ path: String, metadata: [(String, String)] = [], messages: [[UInt8]], endRequest: Bool,
                      observer: ClientCallObserver) -> ClientCall {
        let call = ClientCall(connection: self)
        let handler = self.handler
        if eventLoop.inEventLoop {
            handler.value.open(call, path: path, metadata: metadata, messages: messages, endRequest: endRequest, observer: observer)
        } else {
            eventLoop.execute {
                handler.value.open(call, path: path, metadata: metadata, messages: messages, endRequest: endRequest, observer: observer)
            }
        }
        return call
    }

    /// One request, one response.
    public func unary(_ path: String, _ request: [UInt8]) async throws -> [UInt8] {
        let observer = UnaryObserver()
        return try await withCheckedThrowingContinuation { continuation in
            observer.continuation = continuation
            _ = start(path, messages: [request], endRequest: true, observer: observer)
        }
    }

    /// One request, one response, or `DEADLINE_EXCEEDED` (code 4) after `timeout`: the call is
    /// cancelled (RST_STREAM), as a gRPC client's deadline does.
    public func unary(_ path: String, _ request: [UInt8], timeout: TimeAmount) async throws -> [UInt8] {
        let observer = UnaryObserver()
        let loop = eventLoop
        return try await withCheckedThrowingContinuation { continuation in
            observer.continuation = continuation
            let call = start(path, messages: [request], endRequest: true, observer: observer)
            loop.execute {
                // On the loop, after the open above (which runs there too, in order).
                let deadline = loop.scheduleTask(in: timeout) {
                    guard observer.continuation != nil else { return }
                    observer.timedOut = true
                    call.cancel()
                    // A call whose stream never opened is not in the handler's table: answer it here.
                    observer.closed(ClientStatus(code: 4, message: "context deadline exceeded"))
                }
                observer.deadline = deadline
            }
        }
    }

    fileprivate func send(_ call: ClientCall, _ messages: [[UInt8]], end: Bool) {
        let handler = self.handler
        if eventLoop.inEventLoop {
            handler.value.send(call, messages, end: end)
        } else {
            eventLoop.execute { handler.value.send(call, messages, end: end) }
        }
    }

    fileprivate func cancel(_ call: ClientCall) {
        let handler = self.handler
        eventLoop.execute { handler.value.cancel(call) }
    }

    public func close() async {
        try? await channel.close()
    }
}

/// A call in progress: more request messages for streaming calls, and cancellation.
public final class ClientCall: Sendable {
    private let connection: GRPCClientConnection
    let streamID = NIOLockedValueBox<UInt32?>(nil)

    fileprivate init(connection: GRPCClientConnection) {
        self.connection = connection
    }

    public func send(_ message: [UInt8]) { connection.send(self, [message], end: false) }
    public func send(_ messages: [[UInt8]]) { connection.send(self, messages, end: false) }
    public func endRequest() { connection.send(self, [], end: true) }
    public func cancel() { connection.cancel(self) }
}

private final class UnaryObserver: ClientCallObserver, @unchecked Sendable {
    var continuation: CheckedContinuation<[UInt8], any Error>?
    var response: [UInt8]?
    var timedOut = false
    var deadline: Scheduled<Void>?

    func received(_ message: [UInt8]) { response = message }

    func closed(_ status: ClientStatus) {
        guard let continuation else { return }
        self.continuation = nil
        deadline?.cancel()
        deadline = nil
        if timedOut {
            continuation.resume(throwing: ClientStatus(code: 4, message: "context deadline exceeded"))
            return
        }
        if status.code == 0, let response {
            continuation.resume(returning: response)
        } else {
            continuation.resume(throwing: status.code == 0 ? ClientStatus(code: 13, message: "no response message") : status)
        }
    }
}

extension String {
    /// grpc-message's percent-decoding.
    var removingPercentEncoding: String? {
        var bytes: [UInt8] = []
        var iterator = utf8.makeIterator()
        while let byte = iterator.next() {
            if byte == UInt8(ascii: "%"), let high = iterator.next(), let low = iterator.next(),
               let value = UInt8(String(decoding: [high, low], as: UTF8.self), radix: 16) {
                bytes.append(value)
            } else {
                bytes.append(byte)
            }
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}
