import Foundation
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
                    try channel.pipeline.syncOperations.addHandler(NIOHTTP2Handler(mode: .client))
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
}
