import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import NIOHPACK
import Testing
@testable import EtcdLiteClient

/// The client's HTTP/2 layer against frames a test plays as the server (on an embedded channel):
/// stream limits, flow-control windows, header blocks split over frames, padding, PING, GOAWAY.
/// Against real servers it is exercised by every test that uses the client (bench, verify, the
/// operator's admin calls).
@Suite struct ClientFrameHandlerTests {
    typealias Frame = HTTP2TestFrame

    final class Recorder: ClientCallObserver, @unchecked Sendable {
        private let lock = NIOLock()
        private var _messages: [[UInt8]] = []
        private var _status: ClientStatus?
        func received(_ message: [UInt8]) { lock.withLock { _messages.append(message) } }
        func closed(_ status: ClientStatus) { lock.withLock { _status = status } }
        var messages: [[UInt8]] { lock.withLock { _messages } }
        var status: ClientStatus? { lock.withLock { _status } }
    }

    /// A connection whose server is this test.
    final class Harness {
        let channel = EmbeddedChannel()
        let connection: GRPCClientConnection
        var serverEncoder = HPACKEncoder(allocator: ByteBufferAllocator())
        var clientDecoder = HPACKDecoder(allocator: ByteBufferAllocator(), maxDynamicTableSize: HPACKDecoder.maxDynamicTableSize, maxHeaderListSize: 1 << 20)
        private var pending = ByteBuffer()
        private var sawPreface = false

        init() throws {
            let handler = ClientFrameHandler(authority: "127.0.0.1:2379")
            try channel.pipeline.syncOperations.addHandler(handler)
            try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 2379)).wait()
            connection = GRPCClientConnection(channel: channel, handler: NIOLoopBound(handler, eventLoop: channel.eventLoop))
        }

        /// Frames the client wrote since the last call.
        func written() throws -> [Frame] {
            channel.embeddedEventLoop.run()
            while let bytes = try channel.readOutbound(as: ByteBuffer.self) {
                var bytes = bytes
                pending.writeBuffer(&bytes)
            }
            if !sawPreface {
                let preface = pending.readBytes(length: 24)
                #expect(preface == Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8))
                sawPreface = true
            }
            return Frame.take(from: &pending)
        }

        func send(type: UInt8, flags: UInt8 = 0, stream: UInt32, _ payload: [UInt8]) throws {
            try channel.writeInbound(ByteBuffer(bytes: Frame.bytes(type: type, flags: flags, stream: stream, payload)))
            channel.embeddedEventLoop.run()
        }

        func settings(_ values: [(UInt16, UInt32)]) throws {
            try send(type: 4, stream: 0, Frame.settings(values))
        }

        func block(_ headers: [(String, String)]) throws -> [UInt8] {
            var buffer = ByteBuffer()
            try serverEncoder.encode(headers: HPACKHeaders(headers), to: &buffer)
            return buffer.readBytes(length: buffer.readableBytes)!
        }

        func decode(_ frame: Frame) throws -> HPACKHeaders {
            var payload = frame.payload
            return try clientDecoder.decodeHeaders(from: &payload)
        }

        func call(_ path: String, _ message: [UInt8], metadata: [(String, String)] = [], end: Bool = true) -> (ClientCall, Recorder) {
            let recorder = Recorder()
            let call = connection.start(path, metadata: metadata, messages: [message], endRequest: end, observer: recorder)
            return (call, recorder)
        }
    }

    static func grpcMessage(_ bytes: [UInt8]) -> [UInt8] {
        [0] + withUnsafeBytes(of: UInt32(bytes.count).bigEndian, Array.init) + bytes
    }

    static func windowUpdate(_ increment: UInt32) -> [UInt8] { Frame.windowUpdate(increment) }

    @Test func theConnectionOpensWithItsSettingsAndAWiderWindow() throws {
        let harness = try Harness()
        let frames = try harness.written()
        #expect(frames.map(\.type) == [4, 8])
        #expect(frames[0].payload.readableBytes % 6 == 0 && frames[0].flags == 0)
        var increment = frames[1].payload
        #expect(increment.readInteger(as: UInt32.self) == UInt32((16 << 20) - 65_535))
        // The server's settings are acknowledged.
        try harness.settings([(3, 100)])
        let ack = try harness.written()
        #expect(ack.count == 1 && ack[0].type == 4 && ack[0].flags == 1 && ack[0].payload.readableBytes == 0)
    }

    @Test func callsWaitForTheServersStreamLimitAndRequestsForItsWindow() throws {
        let harness = try Harness()
        _ = try harness.written()
        try harness.settings([(3, 1), (4, 10)])  // one stream at a time, 10-byte stream windows
        _ = try harness.written()

        let request = [UInt8](repeating: 7, count: 20)
        let (_, first) = harness.call("/etcdserverpb.KV/Put", request)
        let (_, second) = harness.call("/etcdserverpb.KV/Range", [1, 2, 3])
        var frames = try harness.written()
        #expect(frames.map(\.type) == [1, 0])
        #expect(frames.allSatisfy { $0.stream == 1 })
        let headers = try harness.decode(frames[0])
        #expect(headers.first(name: ":method") == "POST")
        #expect(headers.first(name: ":path") == "/etcdserverpb.KV/Put")
        #expect(headers.first(name: ":authority") == "127.0.0.1:2379")
        #expect(headers.first(name: "content-type") == "application/grpc")
        #expect(headers.first(name: "te") == "trailers")
        #expect(frames[1].payload.readableBytes == 10 && !frames[1].endStream)

        // More window: the rest of the request, ending the stream.
        try harness.send(type: 8, stream: 1, Self.windowUpdate(100))
        frames = try harness.written()
        #expect(frames.count == 1 && frames[0].type == 0 && frames[0].payload.readableBytes == 15 && frames[0].endStream)

        // The answer: headers split over HEADERS + CONTINUATION, a padded DATA frame, trailers.
        let responseHeaders = try harness.block([(":status", "200"), ("content-type", "application/grpc")])
        try harness.send(type: 1, flags: 0, stream: 1, Array(responseHeaders.prefix(2)))
        try harness.send(type: 9, flags: 0x4, stream: 1, Array(responseHeaders.dropFirst(2)))
        let padded = [UInt8(3)] + Self.grpcMessage([9, 9]) + [0, 0, 0]
        try harness.send(type: 0, flags: 0x8, stream: 1, padded)
        #expect(first.messages == [[9, 9]])
        #expect(first.status == nil)
        #expect(try harness.written().isEmpty)  // the stream limit still holds the second call
        try harness.send(type: 1, flags: 0x5, stream: 1, try harness.block([("grpc-status", "0")]))
        #expect(first.status == .ok)

        // The first stream is done, so the second opens, on stream 3.
        frames = try harness.written()
        #expect(frames.map(\.type) == [1, 0])
        #expect(frames.allSatisfy { $0.stream == 3 })
        #expect(try harness.decode(frames[0]).first(name: ":path") == "/etcdserverpb.KV/Range")
        #expect(frames[1].payload.readableBytes == 8 && frames[1].endStream)
        let trailersOnly = try harness.block([(":status", "200"), ("grpc-status", "5"), ("grpc-message", "etcdserver:%20not%20found")])
        try harness.send(type: 1, flags: 0x5, stream: 3, trailersOnly)
        #expect(second.status == ClientStatus(code: 5, message: "etcdserver: not found"))
        #expect(second.messages.isEmpty)
    }

    @Test func theConnectionWindowHoldsDataUntilItIsUpdated() throws {
        let harness = try Harness()
        _ = try harness.written()
        let request = [UInt8](repeating: 1, count: 70_000)
        let (_, recorder) = harness.call("/etcdserverpb.KV/Put", request)
        var frames = try harness.written()
        // 65,535 bytes of window, in frames of at most 16,384.
        let data = frames.filter { $0.type == 0 }
        #expect(data.map(\.payload.readableBytes).reduce(0, +) == 65_535)
        #expect(data.allSatisfy { $0.payload.readableBytes <= 16_384 && !$0.endStream })
        // The stream window is also 65,535: both must open.
        try harness.send(type: 8, stream: 0, Self.windowUpdate(10_000))
        #expect(try harness.written().isEmpty)
        try harness.send(type: 8, stream: 1, Self.windowUpdate(10_000))
        frames = try harness.written()
        #expect(frames.count == 1 && frames[0].payload.readableBytes == 70_005 - 65_535 && frames[0].endStream)
        #expect(recorder.status == nil)
    }

    @Test func largeMetadataContinuesInContinuationFrames() throws {
        let harness = try Harness()
        _ = try harness.written()
        let token = String(repeating: "t", count: 40_000)
        _ = harness.call("/etcdserverpb.KV/Range", [], metadata: [("Token", token)])
        let frames = try harness.written()
        #expect(frames.map(\.type) == [1, 9, 9, 0])
        #expect(frames[0].flags & 0x4 == 0 && frames[1].flags & 0x4 == 0 && frames[2].flags & 0x4 != 0)
        var block = ByteBuffer()
        for frame in frames.prefix(3) {
            var payload = frame.payload
            block.writeBuffer(&payload)
        }
        let headers = try harness.clientDecoder.decodeHeaders(from: &block)
        #expect(headers.first(name: "token") == token)
    }

    @Test func pingsAreAnsweredAndGoAwayEndsWhatTheServerDidNotTake() throws {
        let harness = try Harness()
        _ = try harness.written()
        try harness.send(type: 6, stream: 0, [1, 2, 3, 4, 5, 6, 7, 8])
        var frames = try harness.written()
        #expect(frames.count == 1 && frames[0].type == 6 && frames[0].flags == 1)
        #expect(frames[0].payload.getBytes(at: frames[0].payload.readerIndex, length: 8) == [1, 2, 3, 4, 5, 6, 7, 8])

        let (_, taken) = harness.call("/etcdserverpb.KV/Put", [1])
        let (_, notTaken) = harness.call("/etcdserverpb.KV/Put", [2])
        frames = try harness.written()
        #expect(Set(frames.map(\.stream)) == [1, 3])
        // GOAWAY: the server took stream 1 only.
        try harness.send(type: 7, stream: 0, [0, 0, 0, 1, 0, 0, 0, 0])
        #expect(notTaken.status?.code == 14)
        #expect(taken.status == nil)
        let (_, late) = harness.call("/etcdserverpb.KV/Put", [3])
        #expect(late.status?.code == 14)
        #expect(try harness.written().isEmpty)
        try harness.send(type: 1, flags: 0x5, stream: 1, try harness.block([(":status", "200"), ("grpc-status", "0")]))
        #expect(taken.status == .ok)
    }

    @Test func aStreamResetOrAnEarlyEndReachesTheCaller() throws {
        let harness = try Harness()
        _ = try harness.written()
        let (_, reset) = harness.call("/etcdserverpb.KV/Put", [1])
        let (_, watch) = harness.call("/etcdserverpb.Watch/Watch", [2], end: false)
        _ = try harness.written()
        try harness.send(type: 3, stream: 1, [0, 0, 0, 7])
        #expect(reset.status == ClientStatus(code: 14, message: "stream reset: REFUSED_STREAM"))
        // The server ends a stream whose request side is still open: the client resets it.
        try harness.send(type: 1, flags: 0x5, stream: 3, try harness.block([(":status", "200"), ("grpc-status", "1"), ("grpc-message", "canceled")]))
        #expect(watch.status == ClientStatus(code: 1, message: "canceled"))
        let frames = try harness.written()
        #expect(frames.count == 1 && frames[0].type == 3 && frames[0].stream == 3)
    }
}
