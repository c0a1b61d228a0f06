import NIOConcurrencyHelpers
import NIOCore
import NIOHPACK
import NIOHTTP2

/// Serves gRPC on one HTTP/2 connection, working on frames directly (no channel per stream):
/// requests are reassembled from DATA frames, each call runs as one task, and responses go out as
/// HEADERS, DATA and trailers. Runs on the connection's event loop; tasks hop back to it.
final class GRPCConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = HTTP2Frame
    typealias OutboundOut = HTTP2Frame

    private struct Call {
        let path: String
        let method: GRPCMethod
        let context: CallContext
        /// Bytes of a message that spans DATA frames.
        var buffer: ByteBuffer?
        var message: [UInt8]?
        var inbound: AsyncStream<[UInt8]>.Continuation?
        var task: Task<Void, Never>?
        var started = false
        var headersSent = false
    }

    private let methods: GRPCMethods
    /// Answers of calls completed on other threads, delivered with one hop per burst.
    private let mailbox = ResponseMailbox()
    private var calls: [HTTP2StreamID: Call] = [:]
    private var context: ChannelHandlerContext?
    private var flushScheduled = false
    private var lastStreamID = HTTP2StreamID.rootStream
    private var draining = false
    /// Inbound bytes not yet returned to the connection window; returned in bulk.
    private var unacknowledgedBytes = 0
    private var lastPing: NIODeadline?
    private var pingStrikes = 0
    /// Response bytes handed to the HTTP/2 layer and not yet written to the socket: a client that
    /// does not read (or reads slowly) leaves them queued behind its flow-control window.
    private var unsentResponseBytes = 0

    /// Past this many unsent response bytes the connection takes no new calls: new streams are
    /// refused (RST_STREAM REFUSED_STREAM, which gRPC clients retry transparently) until the
    /// client has read enough. Reading goes on, so the client's window updates still arrive.
    static let maxUnsentResponseBytes = 64 << 20

    /// The connection-level receive window we open at the start (the protocol starts it at 64 KiB);
    /// consumed bytes are returned once half of it is used, not frame by frame.
    static let connectionWindow = 16 << 20

    /// etcd's keepalive enforcement: pings closer than `minPingInterval` count as strikes.
    private let minPingInterval: TimeAmount
    static let maxPingStrikes = 2

    /// The CN of the client's verified certificate, when there is one.
    private let commonName: String?

    init(methods: GRPCMethods, minPingInterval: TimeAmount = .seconds(5), commonName: String? = nil) {
        self.methods = methods
        self.minPingInterval = minPingInterval
        self.commonName = commonName
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
    }

    private var connectionWindowOpened = false

    func channelInactive(context: ChannelHandlerContext) {
        for (_, call) in calls {
            call.task?.cancel()
            call.inbound?.finish()
        }
        calls.removeAll()
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        let id = frame.streamID
        if !connectionWindowOpened {
            // The client's preface has arrived, so frames may flow both ways: widen the window.
            connectionWindowOpened = true
            write(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: Self.connectionWindow - 65_535)))
        }
        switch frame.payload {
        case .headers(let headers):
            if calls[id] != nil {
                if headers.endStream { endOfRequest(id) }  // trailers from the client
            } else {
                start(id, headers.headers, endStream: headers.endStream)
            }
        case .data(let payload):
            guard case .byteBuffer(var bytes) = payload.data else { return }
            let consumed = bytes.readableBytes + (payload.paddingBytes ?? 0)
            if consumed > 0 {
                // Keep both windows open: what a call may buffer is bounded by the message limit.
                unacknowledgedBytes += consumed
                if unacknowledgedBytes >= Self.connectionWindow / 2 {
                    write(HTTP2Frame(streamID: .rootStream, payload: .windowUpdate(windowSizeIncrement: unacknowledgedBytes)))
                    unacknowledgedBytes = 0
                }
                if !payload.endStream && calls[id] != nil {
                    write(HTTP2Frame(streamID: id, payload: .windowUpdate(windowSizeIncrement: consumed)))
                }
            }
            receive(id, &bytes)
            if payload.endStream { endOfRequest(id) }
        case .rstStream:
            if let call = calls.removeValue(forKey: id) {
                handled(call, 1)
                call.task?.cancel()
                call.inbound?.finish()
            }
        case .ping(_, ack: false):
            // NIOHTTP2Handler answers pings; we only police their rate.
            let now = NIODeadline.now()
            if unsentResponseBytes > 0 {
                // A response is still going out (a large one leaves in many frames as the client's
                // window opens, and grpc-go pings for bandwidth as they arrive): data is flowing,
                // which clears the strikes (grpc-go's server resets them on every DATA frame).
                pingStrikes = 0
            } else if let lastPing, now - lastPing < minPingInterval {
                pingStrikes += 1
            }
            lastPing = now
            if pingStrikes > Self.maxPingStrikes {
                goAway(.enhanceYourCalm, debug: "too_many_pings")
                context.close(promise: nil)
            }
        default:
            break
        }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushIfNeeded()
    }

    // MARK: - Requests

    private func start(_ id: HTTP2StreamID, _ headers: HPACKHeaders, endStream: Bool) {
        if draining {
            write(HTTP2Frame(streamID: id, payload: .rstStream(.refusedStream)))
            return
        }
        lastStreamID = max(lastStreamID, id)
        if unsentResponseBytes > Self.maxUnsentResponseBytes {
            write(HTTP2Frame(streamID: id, payload: .rstStream(.refusedStream)))
            return
        }
        let path = headers.first(name: ":path") ?? ""
        guard let contentType = headers.first(name: "content-type"), contentType.hasPrefix("application/grpc") else {
            var response = HPACKHeaders()
            response.add(name: ":status", value: "415")
            write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: response, endStream: true))))
            return
        }
        guard let method = methods[path] else {
            respondWithStatus(id, .unimplemented(path), headersSent: false)
            return
        }
        methods.metrics?.rpcStarted(path)
        var call = Call(path: path, method: method, context: CallContext(headers: headers, commonName: commonName), buffer: nil)
        if case .streaming(let handler) = method {
            let (requests, continuation) = AsyncStream<[UInt8]>.makeStream()
            call.inbound = continuation
            let writer = makeWriter(id)
            let loop = loopBound()
            let callContext = call.context
            call.task = Task {
                let status: GRPCStatus
                do {
                    try await handler(requests, writer, callContext)
                    status = .ok
                } catch {
                    status = GRPCStatus(error)
                }
                loop.execute { $0.finish(id, status) }
            }
        }
        calls[id] = call
        if endStream { endOfRequest(id) }
    }

    private func receive(_ id: HTTP2StreamID, _ bytes: inout ByteBuffer) {
        guard calls[id] != nil else { return }
        // Usually a DATA frame holds whole messages: parse it in place; keep only a partial tail.
        var pending: ByteBuffer
        if var buffered = calls[id]!.buffer.take() {
            buffered.writeBuffer(&bytes)
            pending = buffered
        } else {
            pending = bytes
        }
        while pending.readableBytes >= 5 {
            let start = pending.readerIndex
            let compressed = pending.getInteger(at: start, as: UInt8.self)!
            let length = Int(pending.getInteger(at: start + 1, as: UInt32.self)!)
            if length > methods.receiveLimit {
                fail(id, GRPCStatus(code: 8, message: "grpc: received message larger than max (\(length) vs. \(methods.receiveLimit))"))
                return
            }
            if compressed != 0 {
                fail(id, GRPCStatus(code: 12, message: "grpc: Decompressor is not installed for grpc-encoding"))
                return
            }
            guard pending.readableBytes >= 5 + length else { break }
            pending.moveReaderIndex(forwardBy: 5)
            let message = pending.readBytes(length: length)!
            if let inbound = calls[id]!.inbound {
                inbound.yield(message)
            } else if calls[id]!.message == nil {
                calls[id]!.message = message
            } else {
                fail(id, GRPCStatus(code: 13, message: "grpc: too many request messages for a unary call"))
                return
            }
        }
        if pending.readableBytes > 0 {
            pending.discardReadBytes()
            calls[id]!.buffer = pending
        }
    }

    private func endOfRequest(_ id: HTTP2StreamID) {
        guard var call = calls[id] else { return }
        if let inbound = call.inbound {
            inbound.finish()
            return
        }
        guard !call.started else { return }
        guard let message = call.message else {
            fail(id, GRPCStatus(code: 13, message: "grpc: no request message"))
            return
        }
        call.started = true
        call.message = nil
        calls[id] = call
        let loop = loopBound()
        let callContext = call.context
        if case .unaryDirect(let handler) = call.method {
            let mailbox = self.mailbox
            handler(message, callContext) { result in mailbox.post(id, result, to: loop) }
            return
        }
        guard case .unary(let handler) = call.method else { return }
        calls[id]!.task = Task {
            let result: Result<[UInt8], GRPCStatus>
            do {
                result = .success(try await handler(message, callContext))
            } catch {
                result = .failure(GRPCStatus(error))
            }
            loop.execute { $0.respond(id, result) }
        }
    }

    // MARK: - Responses

    fileprivate func drainMailbox() {
        for (id, result) in mailbox.take() { respond(id, result) }
    }

    private func respond(_ id: HTTP2StreamID, _ result: Result<[UInt8], GRPCStatus>) {
        guard let call = calls.removeValue(forKey: id) else { return }  // reset meanwhile
        if case .failure(let status) = result { handled(call, status.code) } else { handled(call, 0) }
        switch result {
        case .success(let message):
            writeHeaders(id)
            writeMessages(id, [message], promise: nil)
            writeTrailers(id, .ok, trailersOnly: false)
        case .failure(let status):
            writeTrailers(id, status, trailersOnly: true)
        }
        callEnded()
    }

    /// A streaming call's handler returned.
    private func finish(_ id: HTTP2StreamID, _ status: GRPCStatus) {
        guard let call = calls.removeValue(forKey: id) else { return }
        call.inbound?.finish()
        handled(call, status.code)
        writeTrailers(id, status, trailersOnly: !call.headersSent)
        callEnded()
    }

    private func fail(_ id: HTTP2StreamID, _ status: GRPCStatus) {
        guard let call = calls.removeValue(forKey: id) else { return }
        call.task?.cancel()
        call.inbound?.finish()
        handled(call, status.code)
        respondWithStatus(id, status, headersSent: call.headersSent)
        callEnded()
    }

    private func handled(_ call: Call, _ code: Int) {
        methods.metrics?.rpcHandled(call.path, code: code)
    }

    private func respondWithStatus(_ id: HTTP2StreamID, _ status: GRPCStatus, headersSent: Bool) {
        writeTrailers(id, status, trailersOnly: !headersSent)
    }

    private func makeWriter(_ id: HTTP2StreamID) -> ResponseWriter {
        let loop = loopBound()
        return ResponseWriter { messages in
            guard !messages.isEmpty else { return }
            let promise = loop.eventLoop.makePromise(of: Void.self)
            loop.execute { handler in
                guard handler.calls[id] != nil else {
                    promise.fail(CancellationError())
                    return
                }
                if !handler.calls[id]!.headersSent {
                    handler.calls[id]!.headersSent = true
                    handler.writeHeaders(id)
                }
                handler.writeMessages(id, messages, promise: promise)
            }
            try await promise.futureResult.get()
        }
    }

    private func writeHeaders(_ id: HTTP2StreamID) {
        var headers = HPACKHeaders()
        headers.add(name: ":status", value: "200")
        headers.add(name: "content-type", value: "application/grpc")
        write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers, endStream: false))))
    }

    /// Several messages of one stream in a single DATA frame (split by the HTTP/2 layer when it
    /// exceeds the peer's frame size): one frame instead of one per message.
    private func writeMessages(_ id: HTTP2StreamID, _ messages: [[UInt8]], promise: EventLoopPromise<Void>?) {
        guard let context else { return }
        var buffer = context.channel.allocator.buffer(capacity: messages.reduce(0) { $0 + 5 + $1.count })
        for message in messages {
            buffer.writeInteger(UInt8(0))
            buffer.writeInteger(UInt32(message.count))
            buffer.writeBytes(message)
        }
        pingStrikes = 0
        // Counted until the socket has the bytes (or the stream or connection is gone).
        let size = buffer.readableBytes
        unsentResponseBytes += size
        let written = promise ?? context.eventLoop.makePromise(of: Void.self)
        let loop = loopBound()
        written.futureResult.whenComplete { _ in loop.value.unsentResponseBytes -= size }
        write(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(buffer)))), promise: written)
    }

    private func writeTrailers(_ id: HTTP2StreamID, _ status: GRPCStatus, trailersOnly: Bool) {
        var headers = HPACKHeaders()
        if trailersOnly {
            headers.add(name: ":status", value: "200")
            headers.add(name: "content-type", value: "application/grpc")
        }
        headers.add(name: "grpc-status", value: String(status.code))
        if !status.message.isEmpty { headers.add(name: "grpc-message", value: status.encodedMessage) }
        write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers, endStream: true))))
    }

    private func write(_ frame: HTTP2Frame, promise: EventLoopPromise<Void>? = nil) {
        guard let context else {
            promise?.fail(ChannelError.ioOnClosedChannel)
            return
        }
        context.write(wrapOutboundOut(frame), promise: promise)
        scheduleFlush()
    }

    /// Responses finished in one event-loop tick share one flush.
    private func scheduleFlush() {
        guard !flushScheduled, let context else { return }
        flushScheduled = true
        let loop = loopBound()
        context.eventLoop.execute { loop.value.flushIfNeeded() }
    }

    private func flushIfNeeded() {
        guard flushScheduled, let context else { return }
        flushScheduled = false
        context.flush()
    }

    // MARK: - Shutdown

    /// Stops taking new calls (GOAWAY) and closes the connection once the running calls are done.
    func drain() {
        guard !draining else { return }
        draining = true
        goAway(.noError, debug: "server shutting down")
        callEnded()
    }

    private func callEnded() {
        if draining && calls.isEmpty {
            flushIfNeeded()
            context?.close(promise: nil)
        }
    }

    private func goAway(_ code: HTTP2ErrorCode, debug: String) {
        guard let context else { return }
        let data = context.channel.allocator.buffer(string: debug)
        write(HTTP2Frame(streamID: .rootStream, payload: .goAway(lastStreamID: lastStreamID, errorCode: code, opaqueData: data)))
        flushIfNeeded()
    }

    private func loopBound() -> LoopBoundHandler {
        LoopBoundHandler(NIOLoopBound(self, eventLoop: context!.eventLoop))
    }
}

/// The handler, reachable from tasks through its event loop.
struct LoopBoundHandler: Sendable {
    let bound: NIOLoopBound<GRPCConnectionHandler>
    init(_ bound: NIOLoopBound<GRPCConnectionHandler>) { self.bound = bound }
    var eventLoop: EventLoop { bound.eventLoop }
    var value: GRPCConnectionHandler { bound.value }
    func execute(_ body: @escaping @Sendable (GRPCConnectionHandler) -> Void) {
        let bound = self.bound
        bound.eventLoop.execute { body(bound.value) }
    }
}

/// Completed answers waiting for the connection's event loop. The first post of a burst schedules
/// the one hop that delivers them all (the apply loop completes a whole batch at once).
final class ResponseMailbox: Sendable {
    private let pending = NIOLockedValueBox<[(HTTP2StreamID, Result<[UInt8], GRPCStatus>)]>([])

    func post(_ id: HTTP2StreamID, _ result: Result<[UInt8], GRPCStatus>, to loop: LoopBoundHandler) {
        let first = pending.withLockedValue { pending in
            pending.append((id, result))
            return pending.count == 1
        }
        if first { loop.execute { $0.drainMailbox() } }
    }

    func take() -> [(HTTP2StreamID, Result<[UInt8], GRPCStatus>)] {
        pending.withLockedValue { pending in
            defer { pending.removeAll(keepingCapacity: true) }
            return pending
        }
    }
}
