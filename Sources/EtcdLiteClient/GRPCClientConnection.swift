import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOHPACK
import NIOHTTP2
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
                    var configuration = NIOHTTP2Handler.ConnectionConfiguration()
                    configuration.initialSettings = [
                        HTTP2Setting(parameter: .maxConcurrentStreams, value: 1 << 20),
                        HTTP2Setting(parameter: .initialWindowSize, value: 8 << 20),
                        HTTP2Setting(parameter: .maxFrameSize, value: 1 << 20),
                    ]
                    // grpc-go servers send BDP pings as data arrives: thousands a second under load.
                    configuration.controlFrameRateLimit.maximumCount = Int.max / 2
                    configuration.controlFrameRateLimit.windowLength = .seconds(1)
                    // A load generator trusts the headers it builds and the server's: validating
                    // every header block costs it more than the server spends answering.
                    configuration.headerBlockValidation = .disabled
                    configuration.contentLengthValidation = .disabled
                    if let tls {
                        try channel.pipeline.syncOperations.addHandler(try NIOSSLClientHandler(context: tls, serverHostname: nil))
                    }
                    try channel.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client, connectionConfiguration: configuration))
                    try channel.pipeline.syncOperations.addHandler(ClientFrameHandler(authority: "\(host):\(port)", scheme: tls == nil ? "http" : "https"))
                }
            }
            .connect(host: host, port: port).get()
        let handler = try await channel.eventLoop.submit {
            NIOLoopBound(try channel.pipeline.syncOperations.handler(type: ClientFrameHandler.self), eventLoop: channel.eventLoop)
        }.get()
        return GRPCClientConnection(channel: channel, handler: handler)
    }

    private init(channel: Channel, handler: NIOLoopBound<ClientFrameHandler>) {
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
    let streamID = NIOLockedValueBox<HTTP2StreamID?>(nil)

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

/// The connection's frames: opens streams, frames messages, reassembles responses, keeps the
/// receive windows open.
final class ClientFrameHandler: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    private struct Call {
        let call: ClientCall
        let observer: ClientCallObserver
        var buffer: ByteBuffer?
    }

    private let authority: String
    private var calls: [HTTP2StreamID: Call] = [:]
    private var nextStreamID = HTTP2StreamID(1)
    private var context: ChannelHandlerContext?
    private var unacknowledgedBytes = 0
    private var flushScheduled = false
    private var closed = false

    private let scheme: String
    var defaultMetadata: [(String, String)] = []

    init(authority: String, scheme: String = "http") {
        self.authority = authority
        self.scheme = scheme
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        if context.channel.isActive { openWindow(context) }
    }

    func channelActive(context: ChannelHandlerContext) {
        context.fireChannelActive()
        openWindow(context)
    }

    private var windowOpened = false

    /// Opens the connection window beyond HTTP/2's 64 KiB start (once the preface is out).
    private func openWindow(_ context: ChannelHandlerContext) {
        guard !windowOpened else { return }
        windowOpened = true
        context.write(wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: (16 << 20) - 65_535))), promise: nil)
        context.flush()
    }

    func open(_ call: ClientCall, path: String, metadata: [(String, String)], messages: [[UInt8]], endRequest: Bool, observer: ClientCallObserver) {
        guard !closed, let context else {
            observer.closed(ClientStatus(code: 14, message: "connection closed"))
            return
        }
        let id = nextStreamID
        nextStreamID = HTTP2StreamID(Int(id) + 2)
        call.streamID.withLockedValue { $0 = id }
        calls[id] = Call(call: call, observer: observer)
        var headers = HPACKHeaders()
        headers.add(name: ":method", value: "POST")
        headers.add(name: ":scheme", value: scheme)
        headers.add(name: ":path", value: path)
        headers.add(name: ":authority", value: authority)
        headers.add(name: "content-type", value: "application/grpc")
        headers.add(name: "te", value: "trailers")
        for (name, value) in defaultMetadata { headers.add(name: name, value: value) }
        for (name, value) in metadata { headers.add(name: name, value: value) }
        context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers, endStream: false)))), promise: nil)
        writeMessages(id, messages, end: endRequest)
    }

    func send(_ call: ClientCall, _ messages: [[UInt8]], end: Bool) {
        guard let id = call.streamID.withLockedValue({ $0 }), calls[id] != nil else { return }
        writeMessages(id, messages, end: end)
    }

    func cancel(_ call: ClientCall) {
        guard let id = call.streamID.withLockedValue({ $0 }), let entry = calls.removeValue(forKey: id) else { return }
        context?.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .rstStream(.cancel))), promise: nil)
        scheduleFlush()
        entry.observer.closed(ClientStatus(code: 1, message: "cancelled"))
    }

    private func writeMessages(_ id: HTTP2StreamID, _ messages: [[UInt8]], end: Bool) {
        guard let context else { return }
        if messages.isEmpty {
            if end {
                context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(ByteBuffer()), endStream: true)))), promise: nil)
            }
        } else {
            let total = messages.reduce(0) { $0 + 5 + $1.count }
            var buffer = context.channel.allocator.buffer(capacity: total)
            for message in messages {
                buffer.writeInteger(UInt8(0))
                buffer.writeInteger(UInt32(message.count))
                buffer.writeBytes(message)
            }
            context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(buffer), endStream: end)))), promise: nil)
        }
        scheduleFlush()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        let id = frame.streamID
        switch frame.payload {
        case .headers(let headers):
            // Response headers carry nothing we need; trailers (or trailers-only) end the call.
            if headers.endStream || headers.headers.first(name: "grpc-status") != nil {
                finish(id, headers.headers)
            }
        case .data(let payload):
            guard case .byteBuffer(var bytes) = payload.data else { return }
            let consumed = bytes.readableBytes + (payload.paddingBytes ?? 0)
            if consumed > 0 {
                unacknowledgedBytes += consumed
                if unacknowledgedBytes >= 8 << 20 {
                    context.write(wrapOutboundOut(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: unacknowledgedBytes))), promise: nil)
                    unacknowledgedBytes = 0
                }
                if !payload.endStream && calls[id] != nil {
                    context.write(wrapOutboundOut(HTTP2Frame(streamID: id, payload: .windowUpdate(windowSizeIncrement: consumed))), promise: nil)
                }
            }
            receive(id, &bytes)
            if payload.endStream { finish(id, HPACKHeaders()) }
        case .rstStream(let code):
            if let entry = calls.removeValue(forKey: id) {
                entry.observer.closed(ClientStatus(code: 14, message: "stream reset: \(code)"))
            }
        case .goAway(_, let code, let data):
            if ProcessInfo.processInfo.environment["ETCDLITE_CLIENT_DEBUG"] != nil {
                let text = data.map { String(buffer: $0) } ?? ""
                FileHandle.standardError.write(Data("GOAWAY \(code) \(text)\n".utf8))
            }
        default:
            break
        }
    }

    private func receive(_ id: HTTP2StreamID, _ bytes: inout ByteBuffer) {
        guard calls[id] != nil else { return }
        var pending: ByteBuffer
        if var buffered = calls[id]!.buffer.take() {
            buffered.writeBuffer(&bytes)
            pending = buffered
        } else {
            pending = bytes
        }
        let observer = calls[id]!.observer
        while pending.readableBytes >= 5 {
            let length = Int(pending.getInteger(at: pending.readerIndex + 1, as: UInt32.self)!)
            guard pending.readableBytes >= 5 + length else { break }
            pending.moveReaderIndex(forwardBy: 5)
            observer.received(pending.readBytes(length: length)!)
        }
        if pending.readableBytes > 0 {
            pending.discardReadBytes()
            calls[id]?.buffer = pending
        }
    }

    private func finish(_ id: HTTP2StreamID, _ trailers: HPACKHeaders) {
        guard let entry = calls.removeValue(forKey: id) else { return }
        let code = trailers.first(name: "grpc-status").flatMap { Int($0) } ?? 2
        let message = trailers.first(name: "grpc-message")?.removingPercentEncoding ?? ""
        entry.observer.closed(ClientStatus(code: code, message: message))
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushIfNeeded()
        context.flush()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        let open = calls
        calls.removeAll()
        for (_, entry) in open { entry.observer.closed(ClientStatus(code: 14, message: "connection closed")) }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if ProcessInfo.processInfo.environment["ETCDLITE_CLIENT_DEBUG"] != nil {
            FileHandle.standardError.write(Data("connection error: \(error)\n".utf8))
        }
        context.close(promise: nil)
    }

    private func scheduleFlush() {
        guard !flushScheduled, let context else { return }
        flushScheduled = true
        let loop = NIOLoopBound(self, eventLoop: context.eventLoop)
        context.eventLoop.execute { loop.value.flushIfNeeded() }
    }

    private func flushIfNeeded() {
        guard flushScheduled, let context else { return }
        flushScheduled = false
        context.flush()
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
