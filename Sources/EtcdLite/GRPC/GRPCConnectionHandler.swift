import EtcdLiteHTTP2
import NIOConcurrencyHelpers
import NIOCore
import NIOHPACK

/// Serves gRPC on one HTTP/2 connection, on bytes (RFC 9113 framing done here, HPACK decoding by
/// NIOHPACK): requests are reassembled from DATA frames, each call runs on the event loop, in a
/// task, or on the apply loop, and answers go out as HEADERS, DATA and trailers within the
/// client's flow-control windows. Answer header blocks use no HPACK dynamic table, so the common
/// ones are encoded once. Everything here runs on the connection's event loop; tasks hop back.
final class GRPCConnectionHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

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

    /// Answer bytes of one stream waiting for flow-control window, and whether the trailers that
    /// end the stream follow them.
    private struct Outbound {
        /// What the client's window lets us send on this stream.
        var window: Int
        var pending = CircularBuffer<PendingData>()
        var trailers: [UInt8]?
    }

    private struct PendingData {
        var bytes: ByteBuffer
        /// Completed when the last of these bytes is on the socket (a streaming call's writer waits).
        let promise: EventLoopPromise<Void>?
        let size: Int
    }

    private let methods: GRPCMethods
    /// Answers of calls completed on other threads, delivered with one hop per burst.
    private let mailbox = ResponseMailbox()
    private var calls: [UInt32: Call] = [:]
    /// Streams we have not ended yet (our side of every open stream).
    private var outbound: [UInt32: Outbound] = [:]
    /// Streams with bytes waiting for the connection's window, in the order they blocked.
    private var blocked: [UInt32] = []
    private var context: ChannelHandlerContext?
    private var out: ByteBuffer
    /// What completes once `out` has been written: writers' promises and the unsent-byte count.
    private var outSize = 0
    private var outPromises: [EventLoopPromise<Void>] = []
    private var flushScheduled = false
    private var prefaceSent = false
    /// Bytes of the client's connection preface still to skip.
    private var prefaceRemaining = HTTP2Wire.preface.count
    private var closed = false
    private var lastStreamID: UInt32 = 0
    private var draining = false
    private var lastPing: NIODeadline?
    private var pingStrikes = 0
    /// Response bytes queued or handed to the socket and not yet written: a client that does not
    /// read (or reads slowly) leaves them behind its flow-control window.
    private var unsentResponseBytes = 0

    private var reader = HTTP2Wire.FrameReader(maxFrameSize: HTTP2Wire.defaultMaxFrameSize)
    /// A header block waiting for its CONTINUATION frames.
    private var headerBlock: (stream: UInt32, endStream: Bool, bytes: ByteBuffer)?
    private var decoder = HPACKDecoder(allocator: ByteBufferAllocator(), maxDynamicTableSize: HPACKDecoder.maxDynamicTableSize,
                                       maxHeaderListSize: GRPCConnectionHandler.maxHeaderListSize)

    // The client's settings.
    private var peerMaxFrameSize = HTTP2Wire.defaultMaxFrameSize
    private var peerInitialWindow = HTTP2Wire.defaultWindow
    private var connectionSendWindow = HTTP2Wire.defaultWindow

    // What we announce, and the receive side's accounting.
    private let maxConcurrentStreams: UInt32
    static let streamReceiveWindow = 1 << 20
    static let maxHeaderListSize = 16 << 20
    /// The connection-level receive window we open at the start (the protocol starts it at 64 KiB);
    /// consumed bytes are returned once half of it is used, not frame by frame.
    static let connectionWindow = 16 << 20
    private var connectionReceiveWindow = GRPCConnectionHandler.connectionWindow
    private var connectionUnacknowledged = 0
    /// Received bytes of each stream not yet returned to its window (only streams still reading).
    private var streamUnacknowledged: [UInt32: Int] = [:]

    /// Past this many unsent response bytes the connection takes no new calls: new streams are
    /// refused (RST_STREAM REFUSED_STREAM, which gRPC clients retry transparently) until the
    /// client has read enough. Reading goes on, so the client's window updates still arrive.
    static let maxUnsentResponseBytes = 64 << 20

    /// etcd's keepalive enforcement: pings closer than `minPingInterval` count as strikes.
    private let minPingInterval: TimeAmount
    static let maxPingStrikes = 2

    /// The CN of the client's verified certificate, when there is one.
    private let commonName: String?

    /// Answer header blocks that never change.
    private static let responseHeaders: [UInt8] = {
        var encoder = HTTP2Wire.HeaderBlockEncoder()
        encoder.indexed(8)  // :status: 200
        encoder.literal(nameIndex: 31, value: "application/grpc")
        return encoder.bytes
    }()
    private static let okTrailers: [UInt8] = {
        var encoder = HTTP2Wire.HeaderBlockEncoder()
        encoder.literal(name: "grpc-status", value: "0")
        return encoder.bytes
    }()

    init(methods: GRPCMethods, maxConcurrentStreams: UInt32 = .max, minPingInterval: TimeAmount = .seconds(5), commonName: String? = nil) {
        self.methods = methods
        self.maxConcurrentStreams = maxConcurrentStreams
        self.minPingInterval = minPingInterval
        self.commonName = commonName
        out = ByteBufferAllocator().buffer(capacity: 16 << 10)
    }

    /// etcd's SETTINGS (grpc-go): the stream limit when one is set, a 1 MiB stream window, and a
    /// 16 MiB header list.
    static func settings(maxConcurrentStreams: UInt32) -> [(HTTP2Wire.Setting, UInt32)] {
        [(.maxConcurrentStreams, maxConcurrentStreams), (.initialWindowSize, UInt32(streamReceiveWindow)),
         (.maxHeaderListSize, UInt32(maxHeaderListSize))]
    }

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        out = context.channel.allocator.buffer(capacity: 16 << 10)
        if context.channel.isActive { sendPreface() }
    }

    /// The context refers to this handler: drop it, or the two keep each other alive.
    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelActive(context: ChannelHandlerContext) {
        sendPreface()
        context.fireChannelActive()
    }

    /// Our SETTINGS, then a connection window wider than HTTP/2's 64 KiB.
    private func sendPreface() {
        guard !prefaceSent else { return }
        prefaceSent = true
        HTTP2Wire.writeSettings(&out, Self.settings(maxConcurrentStreams: maxConcurrentStreams))
        HTTP2Wire.writeWindowUpdate(&out, stream: 0, increment: Self.connectionWindow - HTTP2Wire.defaultWindow)
        flushNow()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closed = true
        for (_, call) in calls {
            call.task?.cancel()
            call.inbound?.finish()
        }
        calls.removeAll()
        for (_, stream) in outbound {
            for data in stream.pending { data.promise?.fail(ChannelError.ioOnClosedChannel) }
        }
        outbound.removeAll()
        for promise in outPromises { promise.fail(ChannelError.ioOnClosedChannel) }
        outPromises.removeAll()
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    // MARK: - Frames from the client

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if prefaceRemaining > 0 {
            // The sniffer has checked the preface; skip it.
            let skipped = min(prefaceRemaining, bytes.readableBytes)
            bytes.moveReaderIndex(forwardBy: skipped)
            prefaceRemaining -= skipped
        }
        let error = reader.read(bytes, proceed: { !closed }) { type, flags, stream, payload in
            frame(type: type, flags: flags, stream: stream, payload: payload)
        }
        if let error { connectionError(error) }
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushNow()
    }

    private func frame(type rawType: UInt8, flags: UInt8, stream id: UInt32, payload: ByteBuffer) {
        if let pending = headerBlock, rawType != HTTP2Wire.FrameType.continuation.rawValue || id != pending.stream {
            // A header block must continue without anything in between.
            return connectionError(.protocolError)
        }
        guard let type = HTTP2Wire.FrameType(rawValue: rawType) else { return }  // unknown types are ignored
        var payload = payload
        switch type {
        case .data:
            guard id != 0, id <= lastStreamID else { return connectionError(.protocolError) }
            let consumed = payload.readableBytes
            let endStream = flags & HTTP2Wire.Flag.endStream != 0
            connectionReceiveWindow -= consumed
            guard connectionReceiveWindow >= 0 else { return connectionError(.flowControlError) }
            guard HTTP2Wire.stripPadding(&payload, flags: flags) else { return connectionError(.protocolError) }
            returnWindow(id, consumed: consumed, endStream: endStream)
            receive(id, &payload)
            if endStream { endOfRequest(id) }
        case .headers:
            guard id != 0, id & 1 == 1, HTTP2Wire.stripPadding(&payload, flags: flags) else { return connectionError(.protocolError) }
            if flags & HTTP2Wire.Flag.priority != 0 {
                guard payload.readableBytes >= 5 else { return connectionError(.protocolError) }
                payload.moveReaderIndex(forwardBy: 5)
            }
            let endStream = flags & HTTP2Wire.Flag.endStream != 0
            if flags & HTTP2Wire.Flag.endHeaders != 0 {
                headers(id, payload, endStream: endStream)
            } else {
                headerBlock = (id, endStream, payload)
            }
        case .continuation:
            guard var pending = headerBlock.take() else { return connectionError(.protocolError) }
            guard pending.bytes.readableBytes + payload.readableBytes <= Self.maxHeaderListSize else {
                return connectionError(.enhanceYourCalm)
            }
            pending.bytes.writeBuffer(&payload)
            if flags & HTTP2Wire.Flag.endHeaders != 0 {
                headers(id, pending.bytes, endStream: pending.endStream)
            } else {
                headerBlock = pending
            }
        case .rstStream:
            guard id != 0 else { return connectionError(.protocolError) }
            guard payload.readableBytes == 4 else { return connectionError(.frameSizeError) }
            reset(id)
        case .settings:
            guard id == 0 else { return connectionError(.protocolError) }
            guard flags & HTTP2Wire.Flag.ack == 0 else { return }
            guard payload.readableBytes % 6 == 0 else { return connectionError(.frameSizeError) }
            while let key = payload.readInteger(as: UInt16.self), let value = payload.readInteger(as: UInt32.self) {
                guard apply(setting: key, value: Int(value)) else { return }
            }
            HTTP2Wire.writeFrameHeader(&out, length: 0, type: .settings, flags: HTTP2Wire.Flag.ack, stream: 0)
            unblock()
        case .ping:
            guard id == 0 else { return connectionError(.protocolError) }
            guard payload.readableBytes == 8 else { return connectionError(.frameSizeError) }
            guard flags & HTTP2Wire.Flag.ack == 0 else { return }
            HTTP2Wire.writeFrameHeader(&out, length: 8, type: .ping, flags: HTTP2Wire.Flag.ack, stream: 0)
            out.writeBuffer(&payload)
            policePing()
        case .goAway:
            // The client opens no more streams; what it has open goes on.
            guard id == 0 else { return connectionError(.protocolError) }
        case .windowUpdate:
            guard payload.readableBytes == 4 else { return connectionError(.frameSizeError) }
            let increment = Int(payload.readInteger(as: UInt32.self)! & 0x7FFF_FFFF)
            if id == 0 {
                guard increment > 0 else { return connectionError(.protocolError) }
                connectionSendWindow += increment
                guard connectionSendWindow <= HTTP2Wire.maxWindow else { return connectionError(.flowControlError) }
                unblock()
            } else if outbound[id] != nil {
                guard increment > 0 else { return streamError(id, .protocolError) }
                outbound[id]!.window += increment
                guard outbound[id]!.window <= HTTP2Wire.maxWindow else { return streamError(id, .flowControlError) }
                pump(id)
            }
        case .priority:
            guard payload.readableBytes == 5 else { return connectionError(.frameSizeError) }
        case .pushPromise:
            // Clients may not push.
            connectionError(.protocolError)
        }
    }

    private func apply(setting key: UInt16, value: Int) -> Bool {
        if let error = HTTP2Wire.settingError(key, value) {
            connectionError(error)
            return false
        }
        switch HTTP2Wire.Setting(rawValue: key) {
        case .initialWindowSize:
            let delta = value - peerInitialWindow
            peerInitialWindow = value
            for id in outbound.keys { outbound[id]!.window += delta }
            for id in outbound.keys { pump(id) }
        case .maxFrameSize:
            peerMaxFrameSize = value
        default:
            break  // our blocks never use the dynamic table, and we never push
        }
        return true
    }

    /// Returns received bytes to the windows in bulk, once half of a window is used.
    private func returnWindow(_ id: UInt32, consumed: Int, endStream: Bool) {
        guard consumed > 0 else { return }
        connectionUnacknowledged += consumed
        if connectionUnacknowledged >= Self.connectionWindow / 2 {
            HTTP2Wire.writeWindowUpdate(&out, stream: 0, increment: connectionUnacknowledged)
            connectionReceiveWindow += connectionUnacknowledged
            connectionUnacknowledged = 0
            scheduleFlush()
        }
        guard !endStream, calls[id] != nil else { return }
        let unacknowledged = streamUnacknowledged[id, default: 0] + consumed
        if unacknowledged >= Self.streamReceiveWindow / 2 {
            HTTP2Wire.writeWindowUpdate(&out, stream: id, increment: unacknowledged)
            streamUnacknowledged[id] = nil
            scheduleFlush()
        } else {
            streamUnacknowledged[id] = unacknowledged
        }
    }

    /// A request's header block (a new stream), or the trailers that end a request.
    private func headers(_ id: UInt32, _ block: ByteBuffer, endStream: Bool) {
        // Every block is decoded: the decoder's table must follow the client's encoder.
        var block = block
        let headers: HPACKHeaders
        do {
            headers = try decoder.decodeHeaders(from: &block)
        } catch {
            return connectionError(.compressionError)
        }
        if id <= lastStreamID {
            // Trailers of a request (or HEADERS on a stream already over, which has no effect).
            if endStream && calls[id] != nil { endOfRequest(id) }
            return
        }
        lastStreamID = id
        start(id, headers, endStream: endStream)
    }

    private func policePing() {
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
            context?.close(promise: nil)
        }
    }

    // MARK: - Requests

    private func start(_ id: UInt32, _ headers: HPACKHeaders, endStream: Bool) {
        if draining || unsentResponseBytes > Self.maxUnsentResponseBytes || outbound.count >= Int(maxConcurrentStreams) {
            HTTP2Wire.writeRstStream(&out, stream: id, code: .refusedStream)
            scheduleFlush()
            return
        }
        outbound[id] = Outbound(window: peerInitialWindow)
        let path = headers.first(name: ":path") ?? ""
        guard let contentType = headers.first(name: "content-type"), contentType.hasPrefix("application/grpc") else {
            var encoder = HTTP2Wire.HeaderBlockEncoder()
            encoder.literal(nameIndex: 8, value: "415")  // :status
            closeStream(id, trailers: encoder.bytes)
            return
        }
        guard let method = methods[path] else {
            writeTrailers(id, .unimplemented(path), trailersOnly: true)
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

    private func receive(_ id: UInt32, _ bytes: inout ByteBuffer) {
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

    private func endOfRequest(_ id: UInt32) {
        streamUnacknowledged[id] = nil
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

    /// The client reset the stream: its call is cancelled and its answer dropped.
    private func reset(_ id: UInt32) {
        streamUnacknowledged[id] = nil
        if let call = calls.removeValue(forKey: id) {
            handled(call, 1)
            call.task?.cancel()
            call.inbound?.finish()
        }
        if let stream = outbound.removeValue(forKey: id) {
            for data in stream.pending {
                unsentResponseBytes -= data.size
                data.promise?.fail(CancellationError())
            }
        }
        callEnded()
    }

    // MARK: - Responses

    fileprivate func drainMailbox() {
        for (id, result) in mailbox.take() { respond(id, result) }
    }

    private func respond(_ id: UInt32, _ result: Result<[UInt8], GRPCStatus>) {
        guard let call = calls.removeValue(forKey: id) else { return }  // reset meanwhile
        streamUnacknowledged[id] = nil
        switch result {
        case .success(let message):
            handled(call, 0)
            writeHeaderBlock(Self.responseHeaders, stream: id, endStream: false)
            writeMessages(id, [message], promise: nil)
            closeStream(id, trailers: Self.okTrailers)
        case .failure(let status):
            handled(call, status.code)
            writeTrailers(id, status, trailersOnly: true)
        }
        callEnded()
    }

    /// A streaming call's handler returned.
    private func finish(_ id: UInt32, _ status: GRPCStatus) {
        guard let call = calls.removeValue(forKey: id) else { return }
        streamUnacknowledged[id] = nil
        call.inbound?.finish()
        handled(call, status.code)
        writeTrailers(id, status, trailersOnly: !call.headersSent)
        callEnded()
    }

    private func fail(_ id: UInt32, _ status: GRPCStatus) {
        guard let call = calls.removeValue(forKey: id) else { return }
        streamUnacknowledged[id] = nil
        call.task?.cancel()
        call.inbound?.finish()
        handled(call, status.code)
        writeTrailers(id, status, trailersOnly: !call.headersSent)
        callEnded()
    }

    private func handled(_ call: Call, _ code: Int) {
        methods.metrics?.rpcHandled(call.path, code: code)
    }

    private func makeWriter(_ id: UInt32) -> ResponseWriter {
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
                    handler.writeHeaderBlock(Self.responseHeaders, stream: id, endStream: false)
                }
                handler.writeMessages(id, messages, promise: promise)
            }
            try await promise.futureResult.get()
        }
    }

    /// Messages of one stream, gRPC-framed, as DATA within the windows; what does not fit waits
    /// in the stream's queue. `promise` completes once the socket has the last of the bytes.
    private func writeMessages(_ id: UInt32, _ messages: [[UInt8]], promise: EventLoopPromise<Void>?) {
        guard outbound[id] != nil else {
            promise?.fail(CancellationError())
            return
        }
        pingStrikes = 0
        let size = messages.reduce(0) { $0 + 5 + $1.count }
        unsentResponseBytes += size
        let window = min(outbound[id]!.window, connectionSendWindow)
        if outbound[id]!.pending.isEmpty && size <= window && size <= peerMaxFrameSize {
            // The usual case: one frame straight into the output.
            HTTP2Wire.writeFrameHeader(&out, length: size, type: .data, stream: id)
            for message in messages {
                out.writeInteger(UInt8(0))
                out.writeInteger(UInt32(message.count))
                out.writeBytes(message)
            }
            outbound[id]!.window -= size
            connectionSendWindow -= size
            written(size, promise)
            scheduleFlush()
            return
        }
        var bytes = ByteBufferAllocator().buffer(capacity: size)
        for message in messages {
            bytes.writeInteger(UInt8(0))
            bytes.writeInteger(UInt32(message.count))
            bytes.writeBytes(message)
        }
        outbound[id]!.pending.append(PendingData(bytes: bytes, promise: promise, size: size))
        pump(id)
    }

    /// Bytes (and their promise) now in `out`: settled when `out` is written.
    private func written(_ size: Int, _ promise: EventLoopPromise<Void>?) {
        outSize += size
        if let promise { outPromises.append(promise) }
    }

    /// Sends the stream's waiting bytes as far as both windows and the frame size allow, then its
    /// trailers once nothing is left.
    private func pump(_ id: UInt32) {
        guard var stream = outbound[id] else { return }
        while var data = stream.pending.first {
            let length = min(data.bytes.readableBytes, stream.window, connectionSendWindow, peerMaxFrameSize)
            guard length > 0 else {
                if stream.window > 0 && !blocked.contains(id) { blocked.append(id) }
                outbound[id] = stream
                return
            }
            HTTP2Wire.writeFrameHeader(&out, length: length, type: .data, stream: id)
            var slice = data.bytes.readSlice(length: length)!
            out.writeBuffer(&slice)
            stream.window -= length
            connectionSendWindow -= length
            if data.bytes.readableBytes == 0 {
                stream.pending.removeFirst()
                written(data.size, data.promise)
            } else {
                stream.pending[stream.pending.startIndex] = data
            }
        }
        scheduleFlush()
        if let trailers = stream.trailers {
            writeHeaderBlock(trailers, stream: id, endStream: true)
            outbound[id] = nil
            callEnded()
        } else {
            outbound[id] = stream
        }
    }

    /// Streams that waited for the connection's window get another go.
    private func unblock() {
        guard !blocked.isEmpty else { return }
        let ids = blocked
        blocked.removeAll()
        for id in ids { pump(id) }
    }

    private func writeTrailers(_ id: UInt32, _ status: GRPCStatus, trailersOnly: Bool) {
        var encoder = HTTP2Wire.HeaderBlockEncoder()
        if trailersOnly {
            encoder.indexed(8)  // :status: 200
            encoder.literal(nameIndex: 31, value: "application/grpc")
        }
        encoder.literal(name: "grpc-status", value: String(status.code))
        if !status.message.isEmpty { encoder.literal(name: "grpc-message", value: status.encodedMessage) }
        closeStream(id, trailers: encoder.bytes)
    }

    /// Ends our side of the stream with `trailers`, after any answer bytes still waiting.
    private func closeStream(_ id: UInt32, trailers: [UInt8]) {
        guard let stream = outbound[id] else { return }
        if stream.pending.isEmpty {
            outbound[id] = nil
            writeHeaderBlock(trailers, stream: id, endStream: true)
        } else {
            outbound[id]!.trailers = trailers
        }
    }

    private func writeHeaderBlock(_ block: [UInt8], stream: UInt32, endStream: Bool) {
        HTTP2Wire.writeHeaderBlock(&out, block, stream: stream, endStream: endStream, maxFrameSize: peerMaxFrameSize)
        scheduleFlush()
    }

    private func streamError(_ id: UInt32, _ code: HTTP2Wire.ErrorCode) {
        HTTP2Wire.writeRstStream(&out, stream: id, code: code)
        reset(id)
        scheduleFlush()
    }

    /// Responses finished in one event-loop tick share one flush.
    private func scheduleFlush() {
        guard !flushScheduled, let context else { return }
        flushScheduled = true
        let loop = loopBound()
        context.eventLoop.execute { loop.value.flushNow() }
    }

    private func flushNow() {
        flushScheduled = false
        guard let context, out.readableBytes > 0 else { return }
        let bytes = out
        out = context.channel.allocator.buffer(capacity: 16 << 10)
        guard outSize > 0 || !outPromises.isEmpty else {
            context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
            return
        }
        // Counted until the socket has the bytes (or the connection is gone).
        let size = outSize
        let promises = outPromises
        outSize = 0
        outPromises.removeAll()
        let written = context.eventLoop.makePromise(of: Void.self)
        let loop = loopBound()
        written.futureResult.whenComplete { result in
            loop.value.unsentResponseBytes -= size
            for promise in promises { promise.completeWith(result) }
        }
        context.writeAndFlush(wrapOutboundOut(bytes), promise: written)
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
        if draining && calls.isEmpty && outbound.isEmpty {
            flushNow()
            context?.close(promise: nil)
        }
    }

    private func goAway(_ code: HTTP2Wire.ErrorCode, debug: String) {
        HTTP2Wire.writeGoAway(&out, lastStream: lastStreamID, code: code, debug: debug)
        flushNow()
    }

    private func connectionError(_ code: HTTP2Wire.ErrorCode) {
        guard !closed, let context else { return }
        goAway(code, debug: "")
        closed = true
        context.close(promise: nil)
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
    private let pending = NIOLockedValueBox<[(UInt32, Result<[UInt8], GRPCStatus>)]>([])

    func post(_ id: UInt32, _ result: Result<[UInt8], GRPCStatus>, to loop: LoopBoundHandler) {
        let first = pending.withLockedValue { pending in
            pending.append((id, result))
            return pending.count == 1
        }
        if first { loop.execute { $0.drainMailbox() } }
    }

    func take() -> [(UInt32, Result<[UInt8], GRPCStatus>)] {
        pending.withLockedValue { pending in
            defer { pending.removeAll(keepingCapacity: true) }
            return pending
        }
    }
}
