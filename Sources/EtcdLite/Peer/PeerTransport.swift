import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import Raft

/// Raft messages between members over TCP. Each member keeps one long-lived outbound connection
/// per peer and accepts the peers' connections on its peer URL. A connection opens with a hello
/// (`ELP1`, cluster ID, sender, receiver): a member of another cluster is refused with
/// `cluster ID mismatch`, a removed member with `ELRM` written back (it stops when it reads that).
/// Then each message is a frame: `length u32 (little-endian) | message` (`RaftMessageCodec`), or
/// `0xF0 | application bytes` for requests between the members' servers (membership changes
/// forwarded to the leader).
///
/// A member joining a running cluster asks a peer for the cluster's members first: hello `ELQ1`
/// (the rest zero), answered with one frame `cluster ID u64 | MemberListResponse` and a close.
/// A member checking its store against its peers' at start-up asks each for the hash of its
/// history up to a revision: hello `ELH1` (cluster ID, sender, revision), answered with one frame
/// `HashAnswer` and a close.
///
/// Messages to a peer queue while its connection is being made, bounded in bytes: past the bound,
/// or when the connection fails or breaks, the queued messages are dropped and the peer is reported
/// unreachable, so that the Raft core goes back to probing it (backpressure without blocking the
/// sender). Reconnection waits with a doubling backoff (100 ms to 2 s).
public final class PeerTransport: Sendable {
    public typealias Deliver = @Sendable (Message) -> Void
    public typealias Unreachable = @Sendable (NodeID) -> Void
    typealias DeliverApp = @Sendable (UInt64, [UInt8]) -> Void

    static let magic: [UInt8] = Array("ELP1".utf8)
    static let queryMagic: [UInt8] = Array("ELQ1".utf8)
    static let hashQueryMagic: [UInt8] = Array("ELH1".utf8)
    static let removedReply: [UInt8] = Array("ELRM".utf8)
    static let snapshotMagic: [UInt8] = Array("ELS2".utf8)
    static let snapshotReceived: [UInt8] = Array("ELOK".utf8)
    static let appFrameTag: UInt8 = 0xF0
    static let helloSize = 4 + 24
    static let maxFrameBytes = 64 << 20
    static let maxQueuedBytes = 16 << 20

    let memberID: UInt64
    let clusterID: UInt64
    let group: any EventLoopGroup
    let deliver: Deliver
    let unreachable: Unreachable
    /// Peer TLS (--peer-cert-file ...): for an https:// peer URL we listen on, and for connections
    /// to peers whose URL is https://.
    let tls: TLSContexts?
    private let links = NIOLockedValueBox<[UInt64: PeerLink]>([:])
    private let server = NIOLockedValueBox<Channel?>(nil)
    /// Refusals seen by this member's listener (for logs and tests).
    let refusals = NIOLockedValueBox<[String]>([])
    /// Members removed from the cluster: their connections are refused with `ELRM`.
    let removed = NIOLockedValueBox<Set<UInt64>>([])
    /// Where each peer was last set to listen (to leave unchanged links alone).
    private let addresses = NIOLockedValueBox<[UInt64: (host: String, port: Int, secure: Bool)]>([:])
    /// Set once: application frames from peers, the members a joining member asks for, and news
    /// that a peer refused us as removed.
    let hooks = NIOLockedValueBox<Hooks>(Hooks())

    struct Hooks: Sendable {
        var deliverApp: DeliverApp = { _, _ in }
        var members: @Sendable () -> [UInt8] = { [] }
        /// Where received snapshot images are written.
        var snapshotDirectory = ""
        var removedByPeer: @Sendable () -> Void = {}
        /// HashKV at a revision, for a peer's start-up check (run off the event loop).
        var hashKV: @Sendable (Int64) -> HashAnswer = { _ in HashAnswer(status: .unavailable) }
        /// A received image whose checksums did not match (it was refused).
        var snapshotRefused: @Sendable (SnapshotCorruptionError) -> Void = { _ in }
    }

    init(memberID: UInt64, clusterID: UInt64, group: any EventLoopGroup, tls: TLSContexts? = nil,
         deliver: @escaping Deliver, unreachable: @escaping Unreachable) {
        self.tls = tls
        self.memberID = memberID
        self.clusterID = clusterID
        self.group = group
        self.deliver = deliver
        self.unreachable = unreachable
    }

    /// Listens for peers (with TLS when `secure`: a peer without an acceptable certificate fails
    /// the handshake under --peer-client-cert-auth); returns the bound port.
    public func listen(host: String, port: Int, secure: Bool = false) async throws -> Int {
        let tls = secure ? self.tls : nil
        if secure && tls == nil { throw FrameDecoder.Refused(description: "an https:// peer URL needs --peer-cert-file and --peer-key-file") }
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { [self] child in
                child.eventLoop.makeCompletedFuture {
                    if let tls { try child.pipeline.syncOperations.addHandler(NIOSSLServerHandler(context: try tls.server())) }
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

    /// Sets (or changes) where a peer listens (`secure`: an https:// URL); an unchanged address
    /// keeps its connection.
    public func setPeer(_ id: UInt64, host: String, port: Int, secure: Bool = false) {
        let changed = addresses.withLockedValue { addresses -> Bool in
            defer { addresses[id] = (host, port, secure) }
            return addresses[id].map { $0.host != host || $0.port != port || $0.secure != secure } ?? true
        }
        guard changed else { return }
        let link = PeerLink(transport: self, peer: id, host: host, port: port, secure: secure, loop: group.next())
        let old = links.withLockedValue { links -> PeerLink? in
            defer { links[id] = link }
            return links[id]
        }
        old?.close()
    }

    public func removePeer(_ id: UInt64) {
        addresses.withLockedValue { $0[id] = nil }
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

    func hasAddress(for peer: UInt64) -> Bool { addresses.withLockedValue { $0[peer] != nil } }

    /// Sends application bytes to a peer (dropped if it cannot be reached: the sender times out).
    func sendApp(to peer: UInt64, _ bytes: [UInt8]) {
        guard let link = links.withLockedValue({ $0[peer] }) else { return }
        var frame: [UInt8] = []
        Self.appendFrame([Self.appFrameTag] + bytes, to: &frame)
        link.enqueue(frame)
    }

    /// Streams a snapshot to its receiver on a connection of its own: hello `ELS2`, the message
    /// frame, the image's size (u64) and bytes, then a CRC-32C (u32) of every 1 MiB block of them
    /// (`SnapshotImage`); the receiver answers `ELOK` once the image checked out and is on its
    /// disk. Blocks (run it on a thread of its own); returns whether the receiver has it.
    func sendSnapshot(_ message: Message, image: URL) -> Bool {
        guard let address = addresses.withLockedValue({ $0[message.to.value] }),
              let handle = try? FileHandle(forReadingFrom: image) else { return false }
        defer { try? handle.close() }
        let collector = ReplyCollector()
        let tls = address.secure ? self.tls : nil
        do {
            let size = try handle.seekToEnd()
            try handle.seek(toOffset: 0)
            let channel = try ClientBootstrap(group: group)
                .connectTimeout(.seconds(2))
                .channelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        try PeerTransport.addClientTLS(tls, to: channel)
                        try channel.pipeline.syncOperations.addHandler(collector)
                    }
                }
                .connect(host: address.host, port: address.port).wait()
            defer { channel.close(promise: nil) }
            // A receiver that stops reading does not hold the sender forever: the connection is
            // closed after a generous time for the size (10 MB/s and a minute).
            channel.eventLoop.scheduleTask(in: .seconds(60 + Int64(size / 10_000_000))) { channel.close(promise: nil) }
            var head = ByteWriter()
            head.bytes = Self.snapshotMagic
            head.u64(clusterID)
            head.u64(memberID)
            head.u64(message.to.value)
            Self.appendFrame(RaftMessageCodec.encode(message), to: &head.bytes)
            head.u64(size)
            try channel.writeAndFlush(channel.allocator.buffer(bytes: head.bytes)).wait()
            // One chunk in flight at a time: a slow receiver slows the sender, memory stays flat.
            var sums = SnapshotImage.BlockChecksums()
            let corruptAt = Failpoints.corruptOutgoingSnapshot(size: size)
            var sent: UInt64 = 0
            while let chunk = try handle.read(upToCount: SnapshotImage.blockSize), !chunk.isEmpty {
                chunk.withUnsafeBytes { sums.add($0) }
                var buffer = channel.allocator.buffer(bytes: chunk)
                if let at = corruptAt, at >= sent, at < sent + UInt64(chunk.count) {
                    let index = buffer.readerIndex + Int(at - sent)
                    buffer.setInteger(buffer.getInteger(at: index, as: UInt8.self)! ^ 0xFF, at: index)
                }
                sent += UInt64(chunk.count)
                try channel.writeAndFlush(buffer).wait()
            }
            guard sent == size else { return false }  // the image changed under us
            try channel.writeAndFlush(channel.allocator.buffer(bytes: SnapshotImage.encode(sums.finish()))).wait()
            // The receiver answers once the image is synced; give it a minute.
            channel.eventLoop.scheduleTask(in: .seconds(60)) { channel.close(promise: nil) }
            try channel.closeFuture.wait()
        } catch {
            return false
        }
        return collector.bytes.withLockedValue { $0 } == Self.snapshotReceived
    }

    /// Asks the member listening at `host:port` for the cluster's ID and members (a member joining
    /// with `--initial-cluster-state existing`). Blocks; not for an event loop.
    static func fetchMembers(host: String, port: Int, group: any EventLoopGroup, tls: TLSContexts? = nil) throws -> (clusterID: UInt64, members: [UInt8]) {
        var reader = try ask(host: host, port: port, group: group, tls: tls, hello: queryMagic + [UInt8](repeating: 0, count: 24))
        guard let clusterID = try? reader.u64() else { throw FrameDecoder.Refused(description: "no member list from \(host):\(port)") }
        return (clusterID, reader.rest())
    }

    /// Asks the member listening at `host:port` for the hash of its store's history up to
    /// `revision` (the start-up corruption check). Blocks; not for an event loop.
    func fetchHash(host: String, port: Int, secure: Bool, revision: Int64) throws -> HashAnswer {
        var hello = ByteWriter()
        hello.bytes = Self.hashQueryMagic
        hello.u64(clusterID)
        hello.u64(memberID)
        hello.u64(UInt64(bitPattern: revision))
        var reader = try Self.ask(host: host, port: port, group: group, tls: secure ? tls : nil, hello: hello.bytes)
        guard let answer = HashAnswer(decoding: &reader) else { throw FrameDecoder.Refused(description: "no hash from \(host):\(port)") }
        return answer
    }

    /// One question to a peer on a connection of its own: the hello, then the peer's one frame
    /// and its close (a peer that does not answer in 5 s is given up on). Returns the frame's body.
    private static func ask(host: String, port: Int, group: any EventLoopGroup, tls: TLSContexts?, hello: [UInt8]) throws -> ByteReader {
        let collector = ReplyCollector()
        let channel = try ClientBootstrap(group: group)
            .connectTimeout(.seconds(2))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try addClientTLS(tls, to: channel)
                    try channel.pipeline.syncOperations.addHandler(collector)
                }
            }
            .connect(host: host, port: port).wait()
        try channel.writeAndFlush(channel.allocator.buffer(bytes: hello)).wait()
        channel.eventLoop.scheduleTask(in: .seconds(5)) { channel.close(promise: nil) }
        try channel.closeFuture.wait()
        let reply = collector.bytes.withLockedValue { $0 }
        var reader = ByteReader(reply)
        guard let length = try? reader.u32le(), Int(length) == reply.count - 4 else {
            throw FrameDecoder.Refused(description: "no answer from \(host):\(port)")
        }
        return reader
    }

    /// TLS first on a connection to a peer (its certificate checked against the peer CA; ours
    /// shown as the client's).
    static func addClientTLS(_ tls: TLSContexts?, to channel: Channel) throws {
        guard let tls else { return }
        try channel.pipeline.syncOperations.addHandler(NIOSSLClientHandler(context: try tls.client(), serverHostname: nil))
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
struct FrameDecoder: NIOSingleStepByteToMessageDecoder {
    typealias InboundOut = Frame
    enum Frame {
        case hello(clusterID: UInt64, from: UInt64, to: UInt64), query, message([UInt8])
        /// A peer's start-up check asks for the hash of the history up to a revision.
        case hashQuery(clusterID: UInt64, revision: Int64)
        /// A snapshot stream: its hello, its message and size, the image's bytes, its end.
        case snapshotHello(clusterID: UInt64, from: UInt64, to: UInt64), snapshotStart([UInt8], size: UInt64), snapshotChunk(ByteBuffer),
             snapshotEnd(checksums: [UInt32])
    }
    struct Refused: Error, CustomStringConvertible { let description: String }

    var expectHello: Bool
    private var snapshotHeader = false
    private var snapshotRemaining: UInt64?
    /// The bytes of the block checksums that follow a snapshot's image.
    private var trailerBytes: Int?

    init(expectHello: Bool) { self.expectHello = expectHello }

    mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> Frame? {
        try decode(buffer: &buffer)
    }

    mutating func decode(buffer: inout ByteBuffer) throws -> Frame? {
        if expectHello {
            guard buffer.readableBytes >= PeerTransport.helloSize else { return nil }
            guard let magic = buffer.readBytes(length: 4),
                  [PeerTransport.magic, PeerTransport.queryMagic, PeerTransport.snapshotMagic, PeerTransport.hashQueryMagic].contains(magic),
                  let cluster = buffer.readInteger(endianness: .little, as: UInt64.self),
                  let from = buffer.readInteger(endianness: .little, as: UInt64.self),
                  let to = buffer.readInteger(endianness: .little, as: UInt64.self) else {
                throw Refused(description: "not an etcdlite peer")
            }
            expectHello = false
            if magic == PeerTransport.queryMagic {
                return .query
            }
            if magic == PeerTransport.hashQueryMagic {
                return .hashQuery(clusterID: cluster, revision: Int64(bitPattern: to))
            }
            if magic == PeerTransport.snapshotMagic {
                snapshotHeader = true
                return .snapshotHello(clusterID: cluster, from: from, to: to)
            }
            return .hello(clusterID: cluster, from: from, to: to)
        }
        if let remaining = snapshotRemaining {
            guard buffer.readableBytes > 0 else { return nil }
            let count = Int(min(UInt64(buffer.readableBytes), remaining))
            let chunk = buffer.readSlice(length: count)!
            snapshotRemaining = remaining - UInt64(count)
            if snapshotRemaining == 0 { snapshotRemaining = nil }
            return .snapshotChunk(chunk)
        }
        if let trailer = trailerBytes {
            guard trailer >= 0 else {
                if buffer.readableBytes > 0 { throw Refused(description: "bytes after a snapshot") }
                return nil
            }
            guard buffer.readableBytes >= trailer else { return nil }
            trailerBytes = -1
            return .snapshotEnd(checksums: SnapshotImage.decode(buffer.readBytes(length: trailer)!))
        }
        guard let length = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) else { return nil }
        guard Int(length) <= PeerTransport.maxFrameBytes else { throw Refused(description: "frame of \(length) bytes") }
        guard buffer.readableBytes >= 4 + Int(length) + (snapshotHeader ? 8 : 0) else { return nil }
        buffer.moveReaderIndex(forwardBy: 4)
        let bytes = buffer.readBytes(length: Int(length))!
        if snapshotHeader {
            snapshotHeader = false
            let size = buffer.readInteger(endianness: .little, as: UInt64.self)!
            guard size <= UInt64(Int.max / 8) else { throw Refused(description: "snapshot of \(size) bytes") }
            snapshotRemaining = size > 0 ? size : nil
            trailerBytes = 4 * SnapshotImage.blockCount(size: size)
            return .snapshotStart(bytes, size: size)
        }
        return .message(bytes)
    }
}

/// Checks the hello, then hands each decoded message to the member. Anything wrong closes the
/// connection (the sender reconnects and retries).
final class InboundHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = FrameDecoder.Frame
    typealias OutboundOut = ByteBuffer
    let transport: PeerTransport
    private var peer: UInt64?
    private var refused = false
    /// A snapshot being received: its message and the file its image goes to.
    private var snapshot: (message: Message, path: String, file: FileHandle, sums: SnapshotImage.BlockChecksums)?

    init(transport: PeerTransport) { self.transport = transport }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }  // frames already buffered behind a refusal
        switch unwrapInboundIn(data) {
        case .snapshotHello(let cluster, let from, let to), .hello(let cluster, let from, let to):
            if cluster != transport.clusterID {
                refuse(context, "cluster ID mismatch")
            } else if to != transport.memberID {
                refuse(context, "member ID mismatch")
            } else if transport.removed.withLockedValue({ $0.contains(from) }) {
                refuseRemoved(context, from)
            } else {
                peer = from
            }
        case .snapshotStart(let bytes, _):
            guard let peer, let message = try? RaftMessageCodec.decode(bytes), message.from.value == peer, message.kind == .snapshot,
                  let index = message.snapshot?.index else {
                refuse(context, "malformed snapshot")
                return
            }
            let directory = transport.hooks.withLockedValue { $0.snapshotDirectory }
            let path = "\(directory)/incoming-\(index.value)-\(UInt64.random(in: 1...UInt64.max)).db"
            guard FileManager.default.createFile(atPath: path, contents: nil), let file = FileHandle(forWritingAtPath: path) else {
                refuse(context, "cannot write snapshot \(path)")
                return
            }
            snapshot = (message, path, file, SnapshotImage.BlockChecksums())
        case .snapshotChunk(let chunk):
            // Written on the event loop: the page cache takes it; the sync comes once, at the end.
            guard snapshot != nil else { return }
            do {
                try chunk.withUnsafeReadableBytes { bytes in
                    snapshot!.sums.add(bytes)
                    try snapshot!.file.write(contentsOf: bytes)
                }
            } catch {
                // A full disk (say): the sender is told nothing and tries again later.
                try? snapshot?.file.close()
                if let path = snapshot?.path { SnapshotImage.remove(path) }
                self.snapshot = nil
                refuse(context, "cannot write snapshot: \(error)")
            }
        case .snapshotEnd(let expected):
            guard var received = snapshot else { return }
            snapshot = nil
            // Bytes damaged on the way: refused (no `ELOK`), the leader sends the image again.
            if let offset = SnapshotImage.firstMismatch(received.sums.finish(), expected) {
                try? received.file.close()
                SnapshotImage.remove(received.path)
                let error = SnapshotCorruptionError(file: received.path, offset: offset, reason: "block checksum mismatch; refused")
                transport.hooks.withLockedValue { $0.snapshotRefused }(error)
                refuse(context, error.description)
                return
            }
            do {
                try received.file.synchronize()
                try received.file.close()
                let sidecar = SnapshotImage.sidecarPath(received.path)
                guard FileManager.default.createFile(atPath: sidecar, contents: Data(SnapshotImage.encode(expected))),
                      let handle = FileHandle(forUpdatingAtPath: sidecar) else { throw SnapshotCorruptionError(file: sidecar, offset: 0, reason: "not written") }
                defer { try? handle.close() }
                try handle.synchronize()
            } catch {
                SnapshotImage.remove(received.path)
                refuse(context, "cannot write snapshot: \(error)")
                return
            }
            // The core sees the image's path as the snapshot's data; the member installs it.
            received.message.snapshot?.data = Array(received.path.utf8)
            transport.deliver(received.message)
            refused = true
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: PeerTransport.snapshotReceived)))
                .whenComplete { _ in context.close(promise: nil) }
        case .hashQuery(let cluster, let revision):
            refused = true
            guard cluster == transport.clusterID else {
                refuse(context, "cluster ID mismatch")
                return
            }
            // Hashing reads the whole history: not on the event loop.
            let hashKV = transport.hooks.withLockedValue { $0.hashKV }
            let channel = context.channel
            DispatchQueue.global().async {
                var reply: [UInt8] = []
                PeerTransport.appendFrame(hashKV(revision).encoded(), to: &reply)
                channel.writeAndFlush(channel.allocator.buffer(bytes: reply)).whenComplete { _ in channel.close(promise: nil) }
            }
        case .query:
            var reply: [UInt8] = []
            var body = ByteWriter()
            body.u64(transport.clusterID)
            body.bytes += transport.hooks.withLockedValue { $0.members }()
            PeerTransport.appendFrame(body.bytes, to: &reply)
            refused = true
            context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: reply)))
                .whenComplete { _ in context.close(promise: nil) }
        case .message(let bytes):
            // A member removed while this connection was open is told so on its next message.
            if let peer, transport.removed.withLockedValue({ $0.contains(peer) }) {
                refuseRemoved(context, peer)
                return
            }
            if let peer, bytes.first == PeerTransport.appFrameTag {
                transport.hooks.withLockedValue { $0.deliverApp }(peer, Array(bytes.dropFirst()))
                return
            }
            guard let peer, let message = try? RaftMessageCodec.decode(bytes), message.from.value == peer else {
                refuse(context, "malformed message")
                return
            }
            transport.deliver(message)
        }
    }

    /// Tells a removed member so, then closes: it stops (etcd answers it 410 Gone).
    private func refuseRemoved(_ context: ChannelHandlerContext, _ member: UInt64) {
        refused = true
        transport.refusals.withLockedValue { $0.append("member \(String(member, radix: 16)) removed") }
        context.writeAndFlush(wrapOutboundOut(context.channel.allocator.buffer(bytes: PeerTransport.removedReply)))
            .whenComplete { _ in context.close(promise: nil) }
    }

    private func refuse(_ context: ChannelHandlerContext, _ reason: String) {
        refused = true
        transport.refusals.withLockedValue { $0.append(reason) }
        context.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        // A snapshot cut short leaves nothing behind.
        if let snapshot {
            try? snapshot.file.close()
            SnapshotImage.remove(snapshot.path)
            self.snapshot = nil
        }
        context.fireChannelInactive()
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

    let secure: Bool

    init(transport: PeerTransport, peer: UInt64, host: String, port: Int, secure: Bool = false, loop: any EventLoop) {
        self.secure = secure
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
        let onRemoved = transport?.hooks.withLockedValue { $0.removedByPeer } ?? {}
        let tls = secure ? transport?.tls : nil
        let bootstrap = ClientBootstrap(group: loop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(1))
            .channelInitializer { channel in
                // What comes back on an outbound connection is a refusal: `ELRM` means we were removed.
                channel.eventLoop.makeCompletedFuture {
                    try PeerTransport.addClientTLS(tls, to: channel)
                    try channel.pipeline.syncOperations.addHandler(RefusalReader(onRemoved: onRemoved))
                }
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

/// Reads what a peer writes back on our outbound connection: only `ELRM` (we were removed).
final class RefusalReader: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    private var seen: [UInt8] = []
    private let onRemoved: @Sendable () -> Void

    init(onRemoved: @escaping @Sendable () -> Void) { self.onRemoved = onRemoved }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        guard seen.count < 4 else { return }
        seen += buffer.readBytes(length: min(buffer.readableBytes, 4 - seen.count)) ?? []
        if seen == PeerTransport.removedReply { onRemoved() }
    }
}

/// Collects a member's reply to a members query until the connection closes.
final class ReplyCollector: ChannelInboundHandler, Sendable {
    typealias InboundIn = ByteBuffer
    let bytes = NIOLockedValueBox<[UInt8]>([])

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var buffer = unwrapInboundIn(data)
        let chunk = buffer.readBytes(length: buffer.readableBytes) ?? []
        bytes.withLockedValue { $0 += chunk }
    }
}

/// A member's answer to a peer's start-up hash question.
struct HashAnswer: Sendable, Equatable {
    enum Status: UInt8, Sendable { case ok = 0, futureRevision = 1, compacted = 2, unavailable = 3 }
    var status: Status
    var memberID: UInt64 = 0
    var hash: UInt32 = 0
    var compactRevision: Int64 = 0
    var hashRevision: Int64 = 0
    var revision: Int64 = 0

    func encoded() -> [UInt8] {
        var w = ByteWriter()
        w.u8(status.rawValue)
        w.u64(memberID)
        w.u32le(hash)
        w.u64(UInt64(bitPattern: compactRevision))
        w.u64(UInt64(bitPattern: hashRevision))
        w.u64(UInt64(bitPattern: revision))
        return w.bytes
    }
}

// In an extension, so that the memberwise initializer stays synthesized.
extension HashAnswer {
    init?(decoding reader: inout ByteReader) {
        guard let raw = try? reader.u8(), let status = Status(rawValue: raw), let member = try? reader.u64(), let hash = try? reader.u32le(),
              let compact = try? reader.u64(), let hashRevision = try? reader.u64(), let revision = try? reader.u64() else { return nil }
        self.init(status: status, memberID: member, hash: hash, compactRevision: Int64(bitPattern: compact),
                  hashRevision: Int64(bitPattern: hashRevision), revision: Int64(bitPattern: revision))
    }
}
