import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Raft

/// Raft messages between members over TCP. Each member keeps one long-lived outbound connection
/// per peer and accepts the peers' connections on its peer URL. A connection opens with a hello
/// (`ELP1`, cluster ID, sender, receiver): a member of another cluster is refused with
/// `cluster ID mismatch`. Then each message is a frame: `length u32 (little-endian) | message`
/// (`RaftMessageCodec`).
///
/// Messages to a peer queue while its connection is being made, bounded in bytes: past the bound,
/// or when the connection fails or breaks, the queued messages are dropped and the peer is reported
/// unreachable, so that the Raft core goes back to probing it (backpressure without blocking the
/// sender). Reconnection waits with a doubling backoff (100 ms to 2 s).
public final class PeerTransport: Sendable {
    public typealias Deliver = @Sendable (Message) -> Void
    public typealias Unreachable = @Sendable (NodeID) -> Void

    static let magic: [UInt8] = Array("ELP1".utf8)
    static let helloSize = 4 + 24
    static let maxFrameBytes = 64 << 20
    static let maxQueuedBytes = 16 << 20

    let memberID: UInt64
    let clusterID: UInt64
    let group: any EventLoopGroup
    let deliver: Deliver
    let unreachable: Unreachable
    private let links = NIOLockedValueBox<[UInt64: PeerLink]>([:])
    private let server = NIOLockedValueBox<Channel?>(nil)
    /// Refusals seen by this member's listener (for logs and tests).
    let refusals = NIOLockedValueBox<[String]>([])

    public init(memberID: UInt64, clusterID: UInt64, group: any EventLoopGroup,
                deliver: @escaping Deliver, unreachable: @escaping Unreachable) {
        self.memberID = memberID
        self.clusterID = clusterID
        self.group = group
        self.deliver = deliver
        self.unreachable = unreachable
    }

    /// Listens for peers; returns the bound port.
    public func listen(host: String, port: Int) async throws -> Int {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] child in
                child.eventLoop.makeCompletedFuture {
                    try child.pipeline.syncOperations.addHandlers([
                        ByteToMessageHandler(FrameDecoder(expectHello: true)),
                        InboundHandler(transport: self),
                    ])
                }
            }
            .bind(host: host, port: port).get()
        server.withLockedValue { $0 = channel }
        return channel.localAddress?.port ?? port
    }

    /// Sets (or changes) where a peer listens.
    public func setPeer(_ id: UInt64, host: String, port: Int) {
        let link = PeerLink(transport: self, peer: id, host: host, port: port, loop: group.next())
        let old = links.withLockedValue { links -> PeerLink? in
            defer { links[id] = link }
            return links[id]
        }
        old?.close()
    }

    public func removePeer(_ id: UInt64) {
        links.withLockedValue { $0.removeValue(forKey: id) }?.close()
    }

    /// Sends messages (in order per peer); never blocks.
    public func send(_ messages: [Message]) {
        guard !messages.isEmpty else { return }
        // One buffer of frames per peer.
        var byPeer: [UInt64: [UInt8]] = [:]
        for m in messages { Self.appendFrame(RaftMessageCodec.encode(m), to: &byPeer[m.to.value, default: []]) }
        for (peer, frames) in byPeer {
            guard let link = links.withLockedValue({ $0[peer] }) else {
                unreachable(NodeID(peer))
                continue
            }
            link.enqueue(frames)
        }
    }

    public func close() {
        for link in links.withLockedValue({ links in defer { links = [:] }; return Array(links.values) }) { link.close() }
        try? server.withLockedValue { $0 }?.close().wait()
    }

    static func appendFrame(_ payload: [UInt8], to buffer: inout [UInt8]) {
        for i in 0..<4 { buffer.append(UInt8(truncatingIfNeeded: UInt32(payload.count) >> (8 * i))) }
        buffer += payload
    }

    func hello(to peer: UInt64) -> [UInt8] {
        var w = ByteWriter()
        w.bytes = Self.magic
        w.u64(clusterID)
        w.u64(memberID)
        w.u64(peer)
        return w.bytes
    }
}

/// Splits the inbound byte stream into the hello and message frames.
struct FrameDecoder: ByteToMessageDecoder {
    typealias InboundOut = Frame
    enum Frame { case hello(clusterID: UInt64, from: UInt64, to: UInt64), message([UInt8]) }
    struct Refused: Error, CustomStringConvertible { let description: String }

    var expectHello: Bool

    mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        if expectHello {
            guard buffer.readableBytes >= PeerTransport.helloSize else { return .needMoreData }
            guard let magic = buffer.readBytes(length: 4), magic == PeerTransport.magic,
                  let cluster = buffer.readInteger(endianness: .little, as: UInt64.self),
                  let from = buffer.readInteger(endianness: .little, as: UInt64.self),
                  let to = buffer.readInteger(endianness: .little, as: UInt64.self) else {
                throw Refused(description: "not an etcdlite peer")
            }
            expectHello = false
            context.fireChannelRead(wrapInboundOut(.hello(clusterID: cluster, from: from, to: to)))
            return .continue
        }
        guard let length = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) else { return .needMoreData }
        guard Int(length) <= PeerTransport.maxFrameBytes else { throw Refused(description: "frame of \(length) bytes") }
        guard buffer.readableBytes >= 4 + Int(length) else { return .needMoreData }
        buffer.moveReaderIndex(forwardBy: 4)
        context.fireChannelRead(wrapInboundOut(.message(buffer.readBytes(length: Int(length))!)))
        return .continue
    }
}

/// Checks the hello, then hands each decoded message to the member. Anything wrong closes the
/// connection (the sender reconnects and retries).
final class InboundHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = FrameDecoder.Frame
    let transport: PeerTransport
    private var peer: UInt64?
    private var refused = false

    init(transport: PeerTransport) { self.transport = transport }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }  // frames already buffered behind a refusal
        switch unwrapInboundIn(data) {
        case .hello(let cluster, let from, let to):
            if cluster != transport.clusterID {
                refuse(context, "cluster ID mismatch")
            } else if to != transport.memberID {
                refuse(context, "member ID mismatch")
            } else {
                peer = from
            }
        case .message(let bytes):
            guard let peer, let message = try? RaftMessageCodec.decode(bytes), message.from.value == peer else {
                refuse(context, "malformed message")
                return
            }
            transport.deliver(message)
        }
    }

    private func refuse(_ context: ChannelHandlerContext, _ reason: String) {
        refused = true
        transport.refusals.withLockedValue { $0.append(reason) }
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }
}

/// The outbound connection to one peer, confined to one event loop.
final class PeerLink: @unchecked Sendable {
    private weak var transport: PeerTransport?
    let peer: UInt64
    let host: String
    let port: Int
    let loop: any EventLoop
    private var channel: Channel?
    private var connecting = false
    private var closed = false
    private var queued: [[UInt8]] = []
    private var queuedBytes = 0
    private var backoff: TimeAmount = .milliseconds(100)
    private var retryAt: NIODeadline = .distantPast

    init(transport: PeerTransport, peer: UInt64, host: String, port: Int, loop: any EventLoop) {
        self.transport = transport
        self.peer = peer
        self.host = host
        self.port = port
        self.loop = loop
    }

    /// `frames`: whole frames, back to back.
    func enqueue(_ frames: [UInt8]) {
        loop.execute { [self] in
            guard !closed else { return }
            if let channel {
                channel.writeAndFlush(channel.allocator.buffer(bytes: frames), promise: nil)
                return
            }
            if queuedBytes + frames.count > PeerTransport.maxQueuedBytes {
                dropQueued()
                return
            }
            queued.append(frames)
            queuedBytes += frames.count
            connectIfDue()
        }
    }

    private func connectIfDue() {
        guard channel == nil, !connecting, !closed else { return }
        let now = NIODeadline.now()
        guard now >= retryAt else {
            // Too soon after a failure: what waits is dropped and reported; the next message after
            // the backoff tries again.
            dropQueued()
            return
        }
        connecting = true
        let bootstrap = ClientBootstrap(group: loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(1))
            .channelInitializer { channel in
                // Nothing comes back on an outbound connection; a close is all we listen for.
                channel.eventLoop.makeSucceededVoidFuture()
            }
        bootstrap.connect(host: host, port: port).hop(to: loop).whenComplete { [self] result in
            connecting = false
            switch result {
            case .success(let channel):
                guard !closed else {
                    channel.close(promise: nil)
                    return
                }
                self.channel = channel
                backoff = .milliseconds(100)
                channel.closeFuture.hop(to: loop).whenComplete { [self] _ in
                    if self.channel === channel { self.channel = nil }
                    transport?.unreachable(NodeID(peer))
                }
                var buffer = channel.allocator.buffer(capacity: queuedBytes + PeerTransport.helloSize)
                buffer.writeBytes(transport?.hello(to: peer) ?? [])
                for frame in queued { buffer.writeBytes(frame) }
                queued = []
                queuedBytes = 0
                channel.writeAndFlush(buffer, promise: nil)
            case .failure:
                retryAt = .now() + backoff
                backoff = min(backoff * 2, .seconds(2))
                dropQueued()
            }
        }
    }

    /// The messages waiting for this peer are lost: tell the core.
    private func dropQueued() {
        queued = []
        queuedBytes = 0
        transport?.unreachable(NodeID(peer))
    }

    func close() {
        loop.execute { [self] in
            closed = true
            queued = []
            queuedBytes = 0
            channel?.close(promise: nil)
            channel = nil
        }
    }
}
