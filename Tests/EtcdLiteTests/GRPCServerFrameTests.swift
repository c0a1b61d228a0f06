import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOHPACK
import Testing
@testable import EtcdLite
import EtcdLiteProto

/// The member's HTTP/2 layer against frames a test plays as the client (on an embedded channel):
/// settings, flow-control windows both ways, frame sizes, header blocks over CONTINUATION,
/// padding, PING and its policing, the stream limit, resets, protocol errors and the drain.
/// Against real clients (etcdctl, grpc-swift, h2load, nghttp) it is exercised by every test that
/// starts a member.
@Suite struct GRPCServerFrameTests {
    typealias Frame = HTTP2TestFrame

    /// A connection whose client is this test. Methods: `/t.T/Sized` answers a RangeResponse whose
    /// one value has `limit` bytes; `/t.T/Fail` fails with etcd's empty-key error; `/t.T/Held`
    /// answers only when the test says so.
    final class Harness {
        let channel = EmbeddedChannel()
        let handler: GRPCConnectionHandler
        var encoder = HPACKEncoder(allocator: ByteBufferAllocator())
        var decoder = HPACKDecoder(allocator: ByteBufferAllocator(), maxDynamicTableSize: HPACKDecoder.maxDynamicTableSize, maxHeaderListSize: 1 << 20)
        let held = NIOLockedValueBox<[@Sendable (Result<Etcdserverpb_RangeResponse, any Error>) -> Void]>([])
        private var pending = ByteBuffer()

        init(maxConcurrentStreams: UInt32 = .max, sendPreface: Bool = true) throws {
            var methods = GRPCMethods(receiveLimit: 2 << 20)
            methods.unaryDirect("/t.T/Sized") { (request: Etcdserverpb_RangeRequest, _, done: @escaping @Sendable (Result<Etcdserverpb_RangeResponse, any Error>) -> Void) in
                var kv = Mvccpb_KeyValue()
                kv.value = Data(repeating: 0x61, count: Int(request.limit))
                var response = Etcdserverpb_RangeResponse()
                response.kvs = [kv]
                done(.success(response))
            }
            methods.unaryDirect("/t.T/Fail") { (_: Etcdserverpb_RangeRequest, _, done: @escaping @Sendable (Result<Etcdserverpb_RangeResponse, any Error>) -> Void) in
                done(.failure(GRPCStatus(code: 3, message: "etcdserver: key is not provided")))
            }
            let held = self.held
            methods.unaryDirect("/t.T/Held") { (_: Etcdserverpb_RangeRequest, _, done: @escaping @Sendable (Result<Etcdserverpb_RangeResponse, any Error>) -> Void) in
                held.withLockedValue { $0.append(done) }
            }
            handler = GRPCConnectionHandler(methods: methods, maxConcurrentStreams: maxConcurrentStreams)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 2379)).wait()
            try channel.pipeline.syncOperations.addHandler(handler)
            if sendPreface {
                try raw(Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8))
                try settings([])
            }
        }

        /// Frames the member wrote since the last call.
        func written() throws -> [Frame] {
            channel.embeddedEventLoop.run()
            while let bytes = try channel.readOutbound(as: ByteBuffer.self) {
                var bytes = bytes
                pending.writeBuffer(&bytes)
            }
            return Frame.take(from: &pending)
        }

        func raw(_ bytes: [UInt8]) throws {
            try channel.writeInbound(ByteBuffer(bytes: bytes))
            channel.pipeline.fireChannelReadComplete()
            channel.embeddedEventLoop.run()
        }

        static func frame(type: UInt8, flags: UInt8 = 0, stream: UInt32, _ payload: [UInt8]) -> [UInt8] {
            Frame.bytes(type: type, flags: flags, stream: stream, payload)
        }

        func send(type: UInt8, flags: UInt8 = 0, stream: UInt32, _ payload: [UInt8]) throws {
            try raw(Self.frame(type: type, flags: flags, stream: stream, payload))
        }

        func settings(_ values: [(UInt16, UInt32)]) throws {
            try send(type: 4, stream: 0, Frame.settings(values))
        }

        func requestBlock(_ path: String, contentType: String = "application/grpc") throws -> [UInt8] {
            var buffer = ByteBuffer()
            try encoder.encode(headers: HPACKHeaders([(":method", "POST"), (":scheme", "http"), (":path", path),
                                                      (":authority", "127.0.0.1:2379"), ("content-type", contentType), ("te", "trailers")]),
                               to: &buffer)
            return buffer.readBytes(length: buffer.readableBytes)!
        }

        /// A whole unary request on `stream`: HEADERS, then DATA with END_STREAM.
        func call(_ path: String, stream: UInt32, answerSize: Int = 0) throws {
            try send(type: 1, flags: 0x4, stream: stream, try requestBlock(path))
            try send(type: 0, flags: 0x1, stream: stream, GRPCServerFrameTests.message(size: answerSize))
        }

        func decode(_ frame: Frame) throws -> HPACKHeaders {
            var payload = frame.payload
            return try decoder.decodeHeaders(from: &payload)
        }
    }

    static func message(size: Int) -> [UInt8] {
        var request = Etcdserverpb_RangeRequest()
        request.key = Data("k".utf8)
        request.limit = Int64(size)
        let bytes: [UInt8] = try! request.serializedBytes()
        return [0] + withUnsafeBytes(of: UInt32(bytes.count).bigEndian, Array.init) + bytes
    }

    static func windowUpdate(_ increment: UInt32) -> [UInt8] { Frame.windowUpdate(increment) }

    /// The value size in the gRPC-framed RangeResponse carried by `data`.
    static func answerValueSize(_ data: [UInt8]) throws -> Int {
        try #require(data.count >= 5 && data[0] == 0)
        let length = Int(data[1]) << 24 | Int(data[2]) << 16 | Int(data[3]) << 8 | Int(data[4])
        try #require(data.count == 5 + length)
        let response = try Etcdserverpb_RangeResponse(serializedBytes: Array(data[5...]))
        return response.kvs.first?.value.count ?? -1
    }

    static func goAwayCode(_ frame: Frame) -> UInt32? {
        var payload = frame.payload
        payload.moveReaderIndex(forwardBy: 4)
        return payload.readInteger(as: UInt32.self)
    }

    @Test func theMemberOpensWithEtcdsSettingsAndAcknowledgesTheClients() throws {
        let harness = try Harness(maxConcurrentStreams: 100, sendPreface: false)
        var frames = try harness.written()
        #expect(frames.map(\.type) == [4, 8])
        var settings: [UInt16: UInt32] = [:]
        var payload = frames[0].payload
        while let key = payload.readInteger(as: UInt16.self), let value = payload.readInteger(as: UInt32.self) { settings[key] = value }
        #expect(settings == [3: 100, 4: 1 << 20, 6: 16 << 20])
        var increment = frames[1].payload
        #expect(increment.readInteger(as: UInt32.self) == UInt32((16 << 20) - 65_535))
        try harness.raw(Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) + Harness.frame(type: 4, stream: 0, []))
        frames = try harness.written()
        #expect(frames.count == 1 && frames[0].type == 4 && frames[0].flags == 1 && frames[0].payload.readableBytes == 0)
    }

    @Test func aUnaryCallIsAnsweredWithHeadersOneMessageAndTrailers() throws {
        let harness = try Harness()
        _ = try harness.written()
        try harness.call("/t.T/Sized", stream: 1, answerSize: 300)
        let frames = try harness.written()
        #expect(frames.map(\.type) == [1, 0, 1])
        #expect(frames.allSatisfy { $0.stream == 1 })
        let headers = try harness.decode(frames[0])
        #expect(headers.first(name: ":status") == "200" && headers.first(name: "content-type") == "application/grpc")
        #expect(!frames[0].endStream && !frames[1].endStream && frames[2].endStream)
        #expect(try Self.answerValueSize(Array(frames[1].payload.readableBytesView)) == 300)
        #expect(try harness.decode(frames[2]).first(name: "grpc-status") == "0")
    }

    @Test func answersWaitForTheClientsStreamAndConnectionWindows() throws {
        let harness = try Harness()
        _ = try harness.written()
        try harness.settings([(4, 100)])  // 100-byte stream windows
        _ = try harness.written()
        try harness.call("/t.T/Sized", stream: 1, answerSize: 1000)
        var frames = try harness.written()
        #expect(frames.map(\.type) == [1, 0])
        #expect(frames[1].payload.readableBytes == 100)
        var answer = Array(frames[1].payload.readableBytesView)
        // The rest, and then the trailers, once the stream's window opens.
        try harness.send(type: 8, stream: 1, Self.windowUpdate(5000))
        frames = try harness.written()
        #expect(frames.map(\.type) == [0, 1])
        answer += Array(frames[0].payload.readableBytesView)
        #expect(try Self.answerValueSize(answer) == 1000)
        #expect(frames[1].endStream)

        // The connection's window (65,535 at the start, 100 + 1,000-odd spent): a 100 KB answer on
        // a stream with a wide window stops where the connection's does, in frames of at most 16 KiB.
        try harness.settings([(4, 1 << 20)])
        _ = try harness.written()
        try harness.call("/t.T/Sized", stream: 3, answerSize: 100_000)
        frames = try harness.written()
        let sent = frames.filter { $0.type == 0 }
        #expect(sent.allSatisfy { $0.payload.readableBytes <= 16_384 })
        let first = sent.map(\.payload.readableBytes).reduce(0, +)
        #expect(first == 65_535 - answer.count)  // what the first answer took
        #expect(!frames.contains { $0.type == 1 && $0.endStream })
        answer = sent.flatMap { Array($0.payload.readableBytesView) }
        try harness.send(type: 8, stream: 0, Self.windowUpdate(1 << 20))
        frames = try harness.written()
        answer += frames.filter { $0.type == 0 }.flatMap { Array($0.payload.readableBytesView) }
        #expect(try Self.answerValueSize(answer) == 100_000)
        #expect(frames.last?.type == 1 && frames.last?.endStream == true)
    }

    @Test func requestsMayComeInContinuationFramesPaddedAndWithPriority() throws {
        let harness = try Harness()
        _ = try harness.written()
        let block = try harness.requestBlock("/t.T/Sized")
        // HEADERS (padded, with priority) carrying part of the block, CONTINUATION the rest.
        let headersPayload = [UInt8(2)] + [0, 0, 0, 0, 16] + Array(block.prefix(3)) + [0, 0]
        try harness.send(type: 1, flags: 0x8 | 0x20, stream: 1, headersPayload)
        try harness.send(type: 9, flags: 0x4, stream: 1, Array(block.dropFirst(3)))
        // The message split over two DATA frames, the second padded.
        let message = Self.message(size: 10)
        try harness.send(type: 0, stream: 1, Array(message.prefix(4)))
        try harness.send(type: 0, flags: 0x8 | 0x1, stream: 1, [3] + Array(message.dropFirst(4)) + [0, 0, 0])
        let frames = try harness.written()
        #expect(frames.map(\.type) == [1, 0, 1])
        #expect(try Self.answerValueSize(Array(frames[1].payload.readableBytesView)) == 10)
    }

    @Test func failuresUnknownMethodsAndOtherContentTypesGetTheirAnswers() throws {
        let harness = try Harness()
        _ = try harness.written()
        try harness.call("/t.T/Fail", stream: 1)
        try harness.call("/t.T/Nope", stream: 3)
        try harness.send(type: 1, flags: 0x5, stream: 5, try harness.requestBlock("/t.T/Sized", contentType: "text/plain"))
        let frames = try harness.written()
        #expect(frames.map(\.type) == [1, 1, 1])
        #expect(frames.allSatisfy { $0.endStream })
        let failed = try harness.decode(frames[0])
        #expect(failed.first(name: ":status") == "200")
        #expect(failed.first(name: "grpc-status") == "3" && failed.first(name: "grpc-message") == "etcdserver: key is not provided")
        let unknown = try harness.decode(frames[1])
        #expect(unknown.first(name: "grpc-status") == "12" && unknown.first(name: "grpc-message") == "unknown service /t.T/Nope")
        #expect(try harness.decode(frames[2]).first(name: ":status") == "415")
    }

    @Test func pingsAreAnsweredAndAFloodGetsTooManyPings() throws {
        let harness = try Harness()
        _ = try harness.written()
        try harness.send(type: 6, stream: 0, [1, 2, 3, 4, 5, 6, 7, 8])
        var frames = try harness.written()
        #expect(frames.count == 1 && frames[0].type == 6 && frames[0].flags == 1)
        #expect(Array(frames[0].payload.readableBytesView) == [1, 2, 3, 4, 5, 6, 7, 8])
        for n in 0..<3 { try harness.send(type: 6, stream: 0, [0, 0, 0, 0, 0, 0, 0, UInt8(n)]) }
        frames = try harness.written()
        let goAway = try #require(frames.last { $0.type == 7 })
        #expect(Self.goAwayCode(goAway) == 11)  // ENHANCE_YOUR_CALM
        #expect(String(buffer: goAway.payload.getSlice(at: goAway.payload.readerIndex + 8, length: goAway.payload.readableBytes - 8)!) == "too_many_pings")
        #expect(!harness.channel.isActive)
    }

    @Test func streamsBeyondTheLimitAreRefusedAndAResetDropsAnAnswer() throws {
        let harness = try Harness(maxConcurrentStreams: 1)
        _ = try harness.written()
        try harness.settings([(4, 10)])
        _ = try harness.written()
        try harness.call("/t.T/Sized", stream: 1, answerSize: 500)  // 10 bytes go, the rest waits
        try harness.call("/t.T/Sized", stream: 3, answerSize: 5)
        var frames = try harness.written()
        #expect(frames.map(\.type) == [1, 0, 3])
        #expect(frames[2].stream == 3)
        var code = frames[2].payload
        #expect(code.readInteger(as: UInt32.self) == 7)  // REFUSED_STREAM
        // The client gives up on stream 1: nothing more of it goes out, and its place is free.
        try harness.send(type: 3, stream: 1, [0, 0, 0, 8])
        try harness.send(type: 8, stream: 1, Self.windowUpdate(5000))
        #expect(try harness.written().isEmpty)
        try harness.settings([(4, 1 << 20)])
        try harness.call("/t.T/Sized", stream: 5, answerSize: 5)
        frames = try harness.written()
        #expect(frames.map(\.type) == [4, 1, 0, 1])
    }

    @Test func protocolErrorsCloseTheConnectionWithGoAway() throws {
        let cases: [(String, [UInt8], UInt32)] = [
            ("DATA on stream 0", Harness.frame(type: 0, stream: 0, [1]), 1),
            ("DATA on an idle stream", Harness.frame(type: 0, stream: 9, [1]), 1),
            ("HEADERS on an even stream", Harness.frame(type: 1, flags: 0x4, stream: 2, []), 1),
            ("a frame over 16 KiB", Harness.frame(type: 0, stream: 1, [UInt8](repeating: 0, count: 16_385)), 6),
            ("SETTINGS on a stream", Harness.frame(type: 4, stream: 1, []), 1),
            ("a window over 2^31-1", Harness.frame(type: 8, stream: 0, Self.windowUpdate(0x7FFF_FFFF)), 3),
            ("a header block that is not HPACK", Harness.frame(type: 1, flags: 0x4, stream: 1, [0xFF, 0xFF, 0xFF, 0xFF, 0xFF]), 9),
            ("PUSH_PROMISE from a client", Harness.frame(type: 5, stream: 1, [0, 0, 0, 2]), 1),
        ]
        for (name, bytes, expected) in cases {
            let harness = try Harness()
            _ = try harness.written()
            try harness.raw(bytes)
            let frames = try harness.written()
            let goAway = frames.last { $0.type == 7 }
            #expect(goAway.flatMap(Self.goAwayCode) == expected, "\(name): \(frames.map(\.type))")
            #expect(!harness.channel.isActive, "\(name)")
        }
    }

    @Test func aDrainAnswersWhatIsRunningRefusesNewStreamsAndCloses() throws {
        let harness = try Harness()
        _ = try harness.written()
        try harness.call("/t.T/Held", stream: 1)
        #expect(try harness.written().isEmpty)
        harness.handler.drain()
        var frames = try harness.written()
        #expect(frames.map(\.type) == [7])
        var payload = frames[0].payload
        #expect(payload.readInteger(as: UInt32.self) == 1 && payload.readInteger(as: UInt32.self) == 0)  // last stream 1, NO_ERROR
        try harness.call("/t.T/Sized", stream: 3, answerSize: 1)
        frames = try harness.written()
        #expect(frames.map(\.type) == [3] && frames.first?.stream == 3)
        #expect(harness.channel.isActive)
        for done in harness.held.withLockedValue({ $0 }) { done(.success(Etcdserverpb_RangeResponse())) }
        frames = try harness.written()
        #expect(frames.map(\.type) == [1, 0, 1])
        #expect(!harness.channel.isActive)
    }

    /// A connection's handler goes with the connection (it once kept itself alive through its
    /// context, a leak per connection that the http2 fuzz target's memory showed).
    @Test func aClosedConnectionsHandlerIsFreed() throws {
        weak var freed: GRPCConnectionHandler?
        do {
            let harness = try Harness()
            freed = harness.handler
            _ = try harness.written()
            try harness.call("/t.T/Sized", stream: 1, answerSize: 10)
            #expect(try harness.written().count == 3)
            try harness.channel.close().wait()
            harness.channel.embeddedEventLoop.run()
        }
        #expect(freed == nil)
    }
}
