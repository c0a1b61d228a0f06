import Foundation
import NIOCore
import NIOHPACK
import EtcdLiteHTTP2

/// The client side of one HTTP/2 connection, on bytes: opens streams, frames messages within the
/// server's flow-control windows, reassembles responses, keeps the receive windows open, answers
/// SETTINGS and PING, and honours GOAWAY and the server's stream limit. Everything runs on the
/// connection's event loop. Request header blocks use no HPACK dynamic table, so the block of a
/// path is encoded once; response blocks are decoded with the server's dynamic table.
final class ClientFrameHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private struct Stream {
        let call: ClientCall
        let observer: ClientCallObserver
        /// Bytes of a response message that spans DATA frames.
        var message: ByteBuffer?
        /// What the server's window lets us send on this stream.
        var sendWindow: Int
        /// Request bytes (gRPC-framed) waiting for window.
        var pending: ByteBuffer?
        /// The request side ends once `pending` is out.
        var endRequested = false
        var endSent = false
        /// Received bytes not yet returned to the stream's window.
        var unacknowledged = 0
    }

    /// A call waiting for a stream: the server's concurrent-stream limit is reached.
    private struct WaitingCall {
        let call: ClientCall
        let path: String
        let metadata: [(String, String)]
        var messages: [[UInt8]]
        var end: Bool
        let observer: ClientCallObserver
    }

    private let authority: String
    private let scheme: String
    var defaultMetadata: [(String, String)] = [] {
        didSet { headerBlocks.removeAll() }
    }

    private var context: ChannelHandlerContext?
    private var streams: [UInt32: Stream] = [:]
    private var waiting = CircularBuffer<WaitingCall>()
    private var nextStreamID: UInt32 = 1
    /// Header blocks of calls without per-call metadata, by path.
    private var headerBlocks: [String: [UInt8]] = [:]
    private var decoder: HPACKDecoder
    private var out: ByteBuffer
    private var flushScheduled = false
    private var prefaceSent = false
    private var closed = false
    /// Set by GOAWAY: streams above it were not processed, and no new stream may open.
    private var goAwayLastStream: UInt32?

    private var reader = HTTP2Wire.FrameReader(maxFrameSize: ClientFrameHandler.maxReceiveFrameSize)
    /// A header block waiting for its CONTINUATION frames.
    private var headerBlock: (stream: UInt32, endStream: Bool, bytes: ByteBuffer)?

    // The server's settings.
    private var peerMaxFrameSize = HTTP2Wire.defaultMaxFrameSize
    private var peerInitialWindow = HTTP2Wire.defaultWindow
    private var peerMaxStreams = Int.max
    private var connectionSendWindow = HTTP2Wire.defaultWindow
    /// Streams with request bytes waiting for window, in the order they blocked.
    private var blocked: [UInt32] = []

    // What we tell the server.
    static let receiveWindow = 8 << 20
    static let connectionReceiveWindow = 16 << 20
    static let maxReceiveFrameSize = 1 << 20
    private var connectionUnacknowledged = 0

    init(authority: String, scheme: String = "http") {
        self.authority = authority
        self.scheme = scheme
        // grpc-message can be long; grpc-go clients accept far larger header lists than HTTP/2's 16 KiB.
        decoder = HPACKDecoder(allocator: ByteBufferAllocator(), maxDynamicTableSize: HPACKDecoder.maxDynamicTableSize, maxHeaderListSize: 1 << 20)
        out = ByteBufferAllocator().buffer(capacity: 16 << 10)
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
        context.fireChannelActive()
        sendPreface()
    }

    /// The connection preface, our settings, and a connection window wider than HTTP/2's 64 KiB.
    private func sendPreface() {
        guard !prefaceSent else { return }
        prefaceSent = true
        out.writeBytes(HTTP2Wire.preface)
        HTTP2Wire.writeSettings(&out, [
            (.enablePush, 0),
            (.maxConcurrentStreams, 1 << 20),
            (.initialWindowSize, UInt32(Self.receiveWindow)),
            (.maxFrameSize, UInt32(Self.maxReceiveFrameSize)),
        ])
        HTTP2Wire.writeWindowUpdate(&out, stream: 0, increment: Self.connectionReceiveWindow - HTTP2Wire.defaultWindow)
        flushNow()
    }

    // MARK: - Calls

    func open(_ call: ClientCall, path: String, metadata: [(String, String)], messages: [[UInt8]], endRequest: Bool, observer: ClientCallObserver) {
        guard !closed, context != nil, goAwayLastStream == nil else {
            observer.closed(ClientStatus(code: 14, message: "connection closed"))
            return
        }
        let entry = WaitingCall(call: call, path: path, metadata: metadata, messages: messages, end: endRequest, observer: observer)
        if streams.count >= peerMaxStreams || !waiting.isEmpty {
            waiting.append(entry)
            return
        }
        startStream(entry)
        scheduleFlush()
    }

    private func startStream(_ entry: WaitingCall) {
        guard nextStreamID < 0x7FFF_FFFF else {
            entry.observer.closed(ClientStatus(code: 14, message: "connection closed: stream IDs exhausted"))
            return
        }
        let id = nextStreamID
        nextStreamID += 2
        entry.call.streamID.withLockedValue { $0 = id }
        streams[id] = Stream(call: entry.call, observer: entry.observer, sendWindow: peerInitialWindow)
        let block = headerBlock(path: entry.path, metadata: entry.metadata)
        let endNow = entry.end && entry.messages.isEmpty
        writeHeaderBlock(block, stream: id, endStream: endNow)
        if endNow {
            streams[id]!.endRequested = true
            streams[id]!.endSent = true
        } else {
            queue(id, entry.messages, end: entry.end)
        }
    }

    private func headerBlock(path: String, metadata: [(String, String)]) -> [UInt8] {
        if metadata.isEmpty, let cached = headerBlocks[path] { return cached }
        var encoder = HTTP2Wire.HeaderBlockEncoder()
        encoder.methodPOST()
        encoder.scheme(https: scheme == "https")
        encoder.literal(nameIndex: 4, value: path)
        encoder.literal(nameIndex: 1, value: authority)
        encoder.literal(nameIndex: 31, value: "application/grpc")
        encoder.literal(name: "te", value: "trailers")
        for (name, value) in defaultMetadata { encoder.literal(name: name, value: value) }
        for (name, value) in metadata { encoder.literal(name: name, value: value) }
        if metadata.isEmpty { headerBlocks[path] = encoder.bytes }
        return encoder.bytes
    }

    private func writeHeaderBlock(_ block: [UInt8], stream: UInt32, endStream: Bool) {
        HTTP2Wire.writeHeaderBlock(&out, block, stream: stream, endStream: endStream, maxFrameSize: peerMaxFrameSize)
    }

    func send(_ call: ClientCall, _ messages: [[UInt8]], end: Bool) {
        if let id = call.streamID.withLockedValue({ $0 }) {
            guard streams[id] != nil else { return }
            queue(id, messages, end: end)
            scheduleFlush()
            return
        }
        // Not opened yet: it waits for a stream with what it has to send.
        guard let index = waiting.firstIndex(where: { $0.call === call }) else { return }
        waiting[index].messages += messages
        if end { waiting[index].end = true }
    }

    func cancel(_ call: ClientCall) {
        if let id = call.streamID.withLockedValue({ $0 }) {
            guard let stream = streams.removeValue(forKey: id) else { return }
            HTTP2Wire.writeRstStream(&out, stream: id, code: .cancel)
            scheduleFlush()
            stream.observer.closed(ClientStatus(code: 1, message: "cancelled"))
            openWaiting()
            return
        }
        guard let index = waiting.firstIndex(where: { $0.call === call }) else { return }
        let entry = waiting.remove(at: index)
        entry.observer.closed(ClientStatus(code: 1, message: "cancelled"))
    }

    /// Frames `messages` (gRPC's 5-byte prefix each) onto the stream's request side and sends what
    /// the windows allow.
    private func queue(_ id: UInt32, _ messages: [[UInt8]], end: Bool) {
        guard var stream = streams[id], !stream.endRequested else { return }
        if !messages.isEmpty {
            var pending = stream.pending ?? ByteBufferAllocator().buffer(capacity: messages.reduce(0) { $0 + 5 + $1.count })
            for message in messages {
                pending.writeInteger(UInt8(0))
                pending.writeInteger(UInt32(message.count))
                pending.writeBytes(message)
            }
            stream.pending = pending
        }
        if end { stream.endRequested = true }
        streams[id] = stream
        pump(id)
    }

    /// Sends the stream's waiting bytes as far as both windows and the frame size allow.
    private func pump(_ id: UInt32) {
        guard var stream = streams[id] else { return }
        while var pending = stream.pending, pending.readableBytes > 0 {
            let length = min(pending.readableBytes, stream.sendWindow, connectionSendWindow, peerMaxFrameSize)
            guard length > 0 else {
                if !blocked.contains(id) { blocked.append(id) }
                streams[id] = stream
                return
            }
            let last = length == pending.readableBytes
            let flags = last && stream.endRequested ? HTTP2Wire.Flag.endStream : 0
            HTTP2Wire.writeFrameHeader(&out, length: length, type: .data, flags: flags, stream: id)
            var slice = pending.readSlice(length: length)!
            out.writeBuffer(&slice)
            stream.sendWindow -= length
            connectionSendWindow -= length
            if flags != 0 { stream.endSent = true }
            stream.pending = last ? nil : pending
        }
        if stream.endRequested && !stream.endSent {
            HTTP2Wire.writeFrameHeader(&out, length: 0, type: .data, flags: HTTP2Wire.Flag.endStream, stream: id)
            stream.endSent = true
        }
        streams[id] = stream
    }

    /// Calls waiting for a stream, as the server's limit allows.
    private func openWaiting() {
        while !waiting.isEmpty, streams.count < peerMaxStreams, !closed, goAwayLastStream == nil {
            startStream(waiting.removeFirst())
        }
        scheduleFlush()
    }

    // MARK: - Frames from the server

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let error = reader.read(unwrapInboundIn(data), proceed: { !closed }) { type, flags, stream, payload in
            frame(type: type, flags: flags, stream: stream, payload: payload)
        }
        if let error { connectionError(error) }
    }

    private func frame(type rawType: UInt8, flags: UInt8, stream id: UInt32, payload: ByteBuffer) {
        if let pending = headerBlock, rawType != HTTP2Wire.FrameType.continuation.rawValue || id != pending.stream {
            // A header block must continue without anything in between.
            connectionError(.protocolError)
            return
        }
        guard let type = HTTP2Wire.FrameType(rawValue: rawType) else { return }  // unknown types are ignored
        var payload = payload
        switch type {
        case .data:
            guard id != 0 else { return connectionError(.protocolError) }
            let consumed = payload.readableBytes
            guard HTTP2Wire.stripPadding(&payload, flags: flags) else { return connectionError(.protocolError) }
            returnWindow(id, consumed: consumed, endStream: flags & HTTP2Wire.Flag.endStream != 0)
            receive(id, &payload)
            if flags & HTTP2Wire.Flag.endStream != 0 { finish(id, HPACKHeaders()) }
        case .headers:
            guard id != 0, HTTP2Wire.stripPadding(&payload, flags: flags) else { return connectionError(.protocolError) }
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
            pending.bytes.writeBuffer(&payload)
            if flags & HTTP2Wire.Flag.endHeaders != 0 {
                headers(id, pending.bytes, endStream: pending.endStream)
            } else {
                headerBlock = pending
            }
        case .rstStream:
            guard payload.readableBytes == 4 else { return connectionError(.frameSizeError) }
            let code = payload.readInteger(as: UInt32.self)!
            if let stream = streams.removeValue(forKey: id) {
                stream.observer.closed(ClientStatus(code: 14, message: "stream reset: \(HTTP2Wire.ErrorCode.name(code))"))
                openWaiting()
            }
        case .settings:
            guard id == 0 else { return connectionError(.protocolError) }
            guard flags & HTTP2Wire.Flag.ack == 0 else { return }
            guard payload.readableBytes % 6 == 0 else { return connectionError(.frameSizeError) }
            while let key = payload.readInteger(as: UInt16.self), let value = payload.readInteger(as: UInt32.self) {
                guard apply(setting: key, value: Int(value)) else { return }
            }
            HTTP2Wire.writeFrameHeader(&out, length: 0, type: .settings, flags: HTTP2Wire.Flag.ack, stream: 0)
            openWaiting()
            unblock()
            scheduleFlush()
        case .ping:
            guard payload.readableBytes == 8 else { return connectionError(.frameSizeError) }
            if flags & HTTP2Wire.Flag.ack == 0 {
                HTTP2Wire.writeFrameHeader(&out, length: 8, type: .ping, flags: HTTP2Wire.Flag.ack, stream: 0)
                out.writeBuffer(&payload)
                scheduleFlush()
            }
        case .goAway:
            guard payload.readableBytes >= 8 else { return connectionError(.frameSizeError) }
            let last = payload.readInteger(as: UInt32.self)! & 0x7FFF_FFFF
            let code = payload.readInteger(as: UInt32.self)!
            if ProcessInfo.processInfo.environment["ETCDLITE_CLIENT_DEBUG"] != nil {
                let text = payload.readString(length: payload.readableBytes) ?? ""
                FileHandle.standardError.write(Data("GOAWAY \(HTTP2Wire.ErrorCode.name(code)) \(text)\n".utf8))
            }
            goAwayLastStream = min(last, goAwayLastStream ?? last)
            // Streams the server did not take will not be answered; calls not opened never will be.
            for (streamID, stream) in streams where streamID > last {
                streams[streamID] = nil
                stream.observer.closed(ClientStatus(code: 14, message: "connection closed: GOAWAY \(HTTP2Wire.ErrorCode.name(code))"))
            }
            failWaiting(ClientStatus(code: 14, message: "connection closed: GOAWAY \(HTTP2Wire.ErrorCode.name(code))"))
        case .windowUpdate:
            guard payload.readableBytes == 4 else { return connectionError(.frameSizeError) }
            let increment = Int(payload.readInteger(as: UInt32.self)! & 0x7FFF_FFFF)
            if id == 0 {
                connectionSendWindow += increment
                guard connectionSendWindow <= HTTP2Wire.maxWindow else { return connectionError(.flowControlError) }
                unblock()
            } else if streams[id] != nil {
                streams[id]!.sendWindow += increment
                pump(id)
            }
            scheduleFlush()
        case .priority, .pushPromise:
            // Priority is advice; push is disabled in our settings.
            if type == .pushPromise { connectionError(.protocolError) }
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
            for id in streams.keys { streams[id]!.sendWindow += delta }
        case .maxFrameSize:
            peerMaxFrameSize = value
        case .maxConcurrentStreams:
            peerMaxStreams = value
        default:
            break  // our blocks never use the dynamic table, so its size does not matter
        }
        return true
    }

    /// Streams that waited for window get another go.
    private func unblock() {
        guard !blocked.isEmpty else { return }
        let ids = blocked
        blocked.removeAll()
        for id in ids { pump(id) }
    }

    private func returnWindow(_ id: UInt32, consumed: Int, endStream: Bool) {
        guard consumed > 0 else { return }
        connectionUnacknowledged += consumed
        if connectionUnacknowledged >= Self.connectionReceiveWindow / 2 {
            HTTP2Wire.writeWindowUpdate(&out, stream: 0, increment: connectionUnacknowledged)
            connectionUnacknowledged = 0
            scheduleFlush()
        }
        guard !endStream, streams[id] != nil else { return }
        streams[id]!.unacknowledged += consumed
        if streams[id]!.unacknowledged >= Self.receiveWindow / 2 {
            HTTP2Wire.writeWindowUpdate(&out, stream: id, increment: streams[id]!.unacknowledged)
            streams[id]!.unacknowledged = 0
            scheduleFlush()
        }
    }

    private func headers(_ id: UInt32, _ block: ByteBuffer, endStream: Bool) {
        // Every block is decoded, answered or not: the decoder's table must follow the server's.
        var block = block
        let headers: HPACKHeaders
        do {
            headers = try decoder.decodeHeaders(from: &block)
        } catch {
            connectionError(.compressionError)
            return
        }
        // Response headers carry nothing we need; trailers (or trailers-only) end the call.
        if endStream || headers.first(name: "grpc-status") != nil { finish(id, headers) }
    }

    private func receive(_ id: UInt32, _ bytes: inout ByteBuffer) {
        guard streams[id] != nil else { return }
        var pending: ByteBuffer
        if var buffered = streams[id]!.message.take() {
            buffered.writeBuffer(&bytes)
            pending = buffered
        } else {
            pending = bytes
        }
        let observer = streams[id]!.observer
        while pending.readableBytes >= 5 {
            let length = Int(pending.getInteger(at: pending.readerIndex + 1, as: UInt32.self)!)
            guard pending.readableBytes >= 5 + length else { break }
            pending.moveReaderIndex(forwardBy: 5)
            observer.received(pending.readBytes(length: length)!)
            guard streams[id] != nil else { return }  // the observer cancelled the call
        }
        if pending.readableBytes > 0 {
            pending.discardReadBytes()
            streams[id]?.message = pending
        }
    }

    private func finish(_ id: UInt32, _ trailers: HPACKHeaders) {
        guard let stream = streams.removeValue(forKey: id) else { return }
        if !stream.endSent {
            // The server ended the call while our side was open: release the stream there too.
            HTTP2Wire.writeRstStream(&out, stream: id, code: .cancel)
            scheduleFlush()
        }
        let code = trailers.first(name: "grpc-status").flatMap { Int($0) } ?? 2
        let message = trailers.first(name: "grpc-message")?.removingPercentEncoding ?? ""
        stream.observer.closed(ClientStatus(code: code, message: message))
        openWaiting()
    }

    // MARK: - Connection

    private func connectionError(_ code: HTTP2Wire.ErrorCode) {
        guard !closed, let context else { return }
        if ProcessInfo.processInfo.environment["ETCDLITE_CLIENT_DEBUG"] != nil {
            FileHandle.standardError.write(Data("HTTP/2 connection error \(HTTP2Wire.ErrorCode.name(code.rawValue))\n".utf8))
        }
        HTTP2Wire.writeGoAway(&out, lastStream: 0, code: code)
        flushNow()
        closeAll(ClientStatus(code: 14, message: "connection closed: \(HTTP2Wire.ErrorCode.name(code.rawValue))"))
        context.close(promise: nil)
    }

    private func failWaiting(_ status: ClientStatus) {
        let entries = waiting
        waiting.removeAll()
        for entry in entries { entry.observer.closed(status) }
    }

    private func closeAll(_ status: ClientStatus) {
        closed = true
        let open = streams
        streams.removeAll()
        for (_, stream) in open { stream.observer.closed(status) }
        failWaiting(status)
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        flushNow()
    }

    func channelInactive(context: ChannelHandlerContext) {
        closeAll(ClientStatus(code: 14, message: "connection closed"))
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
        context.eventLoop.execute { loop.value.flushNow() }
    }

    private func flushNow() {
        flushScheduled = false
        guard let context, out.readableBytes > 0 else { return }
        let bytes = out
        out = context.channel.allocator.buffer(capacity: 16 << 10)
        context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
    }
}
