import Foundation
import EtcdLiteProto
import NIOHPACK
import NIOCore
import NIOHTTP2
import NIOPosix
import Testing

/// Records the connection-level frames a raw HTTP/2 client receives.
final class FrameRecorder: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTP2Frame
    private let lock = NSLock()
    private var pingAcks = 0
    private var goAways: [HTTP2ErrorCode] = []

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        lock.lock(); defer { lock.unlock() }
        switch frame.payload {
        case .ping(_, ack: true): pingAcks += 1
        case .goAway(_, let code, _): goAways.append(code)
        default: break
        }
    }

    var snapshot: (acks: Int, goAways: [HTTP2ErrorCode]) {
        lock.lock(); defer { lock.unlock() }
        return (pingAcks, goAways)
    }
}

/// kube-apiserver and etcd clients ping idle connections every 10–30 s; etcd accepts pings
/// spaced at least 5 s apart and answers faster ones with GOAWAY too_many_pings.
@Suite(.serialized, .timeLimit(.minutes(2))) struct KeepaliveTests {
    func connect(port: Int) async throws -> (Channel, FrameRecorder) {
        let recorder = FrameRecorder()
        let channel = try await ClientBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    var configuration = NIOHTTP2Handler.ConnectionConfiguration()
                    configuration.controlFrameRateLimit.maximumCount = 100_000  // we count the server's acks
                    try channel.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client, connectionConfiguration: configuration))
                    try channel.pipeline.syncOperations.addHandler(recorder)
                }
            }
            .connect(host: "127.0.0.1", port: port).get()
        return (channel, recorder)
    }

    func ping(_ channel: Channel, _ n: UInt64) async throws {
        try await channel.writeAndFlush(HTTP2Frame(streamID: .rootStream, payload: .ping(HTTP2PingData(withInteger: n), ack: false))).get()
    }

    @Test func idleConnectionSurvivesPoliteKeepalivePings() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let (channel, recorder) = try await connect(port: lite.clientPort)
        defer { channel.close(promise: nil) }
        for n in 1...3 {
            try await ping(channel, UInt64(n))
            try await Task.sleep(for: .seconds(6))
        }
        let seen = recorder.snapshot
        #expect(seen.acks == 3 && seen.goAways.isEmpty && channel.isActive)
    }

    @Test func pingFloodGetsTooManyPings() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let (channel, recorder) = try await connect(port: lite.clientPort)
        defer { channel.close(promise: nil) }
        for n in 1...10 where channel.isActive {
            try? await ping(channel, UInt64(n))
            try await Task.sleep(for: .milliseconds(100))
        }
        try await Task.sleep(for: .milliseconds(500))
        #expect(recorder.snapshot.goAways.contains(.enhanceYourCalm))
    }

    /// grpc-go clients ping (BDP estimation) whenever data arrives; hundreds of pings each
    /// answered by data in between are no abuse, and neither are hundreds of cancelled calls.
    @Test func busyClientsPingsAndCancelsKeepTheConnection() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let (channel, recorder) = try await connect(port: lite.clientPort)
        defer { channel.close(promise: nil) }
        var request = Etcdserverpb_RangeRequest()
        request.key = Data("k".utf8)
        let message: [UInt8] = try request.serializedBytes()
        var headers = HPACKHeaders()
        for (name, value) in [(":method", "POST"), (":scheme", "http"), (":path", "/etcdserverpb.KV/Range"),
                              (":authority", "127.0.0.1"), ("content-type", "application/grpc"), ("te", "trailers")] {
            headers.add(name: name, value: value)
        }
        var body = ByteBuffer()
        body.writeInteger(UInt8(0))
        body.writeInteger(UInt32(message.count))
        body.writeBytes(message)
        for n in 0..<800 {
            let id = HTTP2StreamID(2 * n + 1)
            channel.write(HTTP2Frame(streamID: id, payload: .headers(.init(headers: headers))), promise: nil)
            if n % 2 == 0 {
                // A call the client gives up on.
                channel.write(HTTP2Frame(streamID: id, payload: .rstStream(.cancel)), promise: nil)
                channel.flush()
                continue
            }
            try await channel.writeAndFlush(HTTP2Frame(streamID: id, payload: .data(.init(data: .byteBuffer(body), endStream: true))))
            try await Task.sleep(for: .milliseconds(3))  // the answer's DATA comes back
            try await ping(channel, UInt64(n))
        }
        try await Task.sleep(for: .milliseconds(300))
        let seen = recorder.snapshot
        #expect(seen.goAways.isEmpty && channel.isActive)
        #expect(seen.acks >= 390, "acks: \(seen.acks)")
    }
}

/// A large answer leaves in many DATA frames as the client's window opens, and grpc-go sends a
/// bandwidth-probing PING as they arrive: those pings are not abuse (found when a 1 MiB value read
/// through etcdctl ended in "transport is closing": the member had answered the pings with GOAWAY
/// too_many_pings).
@Suite(.serialized) struct LargeResponseTests {
    @Test func largeValuesAndRangesAreReadThroughEtcdctl() throws {
        let member = try ServerProcess(executable: etcdliteBinary())
        defer { member.stop() }
        for n in 0..<8 {
            #expect(try member.etcdctl(["put", "big\(n)"], stdin: String(repeating: Character(String(n)), count: 1 << 20)).status == 0)
        }
        let one = try member.etcdctl(["get", "big0", "--print-value-only"])
        #expect(one.status == 0 && one.stdout.count == (1 << 20) + 1, "\(one.stderr.suffix(300))")
        // 8 MiB in one answer.
        let all = try member.etcdctl(["get", "big", "--prefix", "--keys-only"])
        #expect(all.status == 0 && all.stdout.split(separator: "\n").count == 8)
        let values = try member.etcdctl(["get", "big", "--prefix", "--print-value-only"])
        #expect(values.status == 0 && values.stdout.count == 8 * ((1 << 20) + 1), "\(values.stderr.suffix(300))")
    }
}
