import Foundation
import NIOCore
import NIOPosix
import Synchronization

/// Which peer links are cut. Members advertise a proxy's port as their peer URL; every connection
/// to a member therefore passes a proxy, which reads the connection's hello (`ELP1`/`ELS2`/`ELH1`, cluster
/// ID, sender, receiver) to learn the sender, and refuses or cuts the links that are blocked. A
/// link is directed: blocking `a → b` stops what `a` sends to `b` (each member sends on its own
/// outbound connections), so one-way partitions are possible. With members in network namespaces
/// the kernel blocks the links instead (`NetworkNamespaces`).
final class LinkTable: Sendable {
    struct Link: Hashable, Sendable {
        let from: Int
        let to: Int
    }

    private struct State {
        var blocked: Set<Link> = []
        /// Member IDs to member slots (a replaced member gets a new ID in the same slot).
        var slots: [UInt64: Int] = [:]
        var connections: [ObjectIdentifier: (link: Link?, channels: [Channel])] = [:]
    }

    private let state = Mutex(State())
    private let namespaces: NetworkNamespaces?

    init(namespaces: NetworkNamespaces? = nil) { self.namespaces = namespaces }

    func setSlot(_ id: UInt64, _ slot: Int) { state.withLock { $0.slots[id] = slot } }

    func slot(of id: UInt64) -> Int? { state.withLock { $0.slots[id] } }

    var blocked: Set<Link> { state.withLock { $0.blocked } }

    /// Blocks these links (and cuts their open connections); every other link is open.
    func block(_ links: Set<Link>) {
        let cut = state.withLock { state -> [Channel] in
            state.blocked = links
            return state.connections.values.filter { entry in entry.link.map { links.contains($0) } ?? false }.flatMap(\.channels)
        }
        for channel in cut { channel.close(promise: nil) }
        namespaces?.block(links)
    }

    func healAll() { block([]) }

    /// Whether a connection from `from` (nil: not a member's peer connection, e.g. a join query)
    /// to slot `to` may pass: a sender we cannot name passes unless every link into `to` is cut.
    func allows(from: Int?, to: Int, members: Int) -> Bool {
        state.withLock { state in
            if let from { return !state.blocked.contains(Link(from: from, to: to)) }
            let into = (0..<members).filter { $0 != to }.map { Link(from: $0, to: to) }
            return !into.allSatisfy { state.blocked.contains($0) }
        }
    }

    func register(_ key: ObjectIdentifier, link: Link?, channels: [Channel]) {
        state.withLock { $0.connections[key] = (link, channels) }
    }

    func unregister(_ key: ObjectIdentifier) { _ = state.withLock { $0.connections.removeValue(forKey: key) } }
}

/// A TCP proxy in front of one member's peer port.
final class FaultProxy: Sendable {
    let slot: Int
    let port: Int
    private let channel: Channel

    private init(slot: Int, port: Int, channel: Channel) {
        self.slot = slot
        self.port = port
        self.channel = channel
    }

    static let helloSize = 28

    static func start(slot: Int, listenPort: Int, targetPort: Int, members: Int, links: LinkTable,
                      group: EventLoopGroup = MultiThreadedEventLoopGroup.singleton) async throws -> FaultProxy {
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ProxyFrontHandler(slot: slot, targetPort: targetPort, members: members, links: links))
                }
            }
            .bind(host: "127.0.0.1", port: listenPort).get()
        return FaultProxy(slot: slot, port: listenPort, channel: channel)
    }

    func close() async { try? await channel.close() }
}

/// The accepted side: holds the bytes until the hello names the sender, then connects to the
/// member and relays both ways.
private final class ProxyFrontHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let slot: Int
    let targetPort: Int
    let members: Int
    let links: LinkTable
    private var pending: ByteBuffer?
    private var back: Channel?
    private var deciding = true
    private var key: ObjectIdentifier { ObjectIdentifier(self) }

    init(slot: Int, targetPort: Int, members: Int, links: LinkTable) {
        self.slot = slot
        self.targetPort = targetPort
        self.members = members
        self.links = links
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        if let back {
            back.writeAndFlush(bytes, promise: nil)
            return
        }
        if pending == nil { pending = bytes } else { pending!.writeBuffer(&bytes) }
        guard deciding, let buffer = pending, buffer.readableBytes >= FaultProxy.helloSize else { return }
        deciding = false
        let magic = buffer.getBytes(at: buffer.readerIndex, length: 4) ?? []
        let senderID = buffer.getInteger(at: buffer.readerIndex + 12, endianness: .little, as: UInt64.self) ?? 0
        let isPeer = ["ELP1", "ELS2", "ELH1"].contains { magic == Array($0.utf8) }
        let from = isPeer ? links.slot(of: senderID) : nil
        guard links.allows(from: from, to: slot, members: members) else {
            context.close(promise: nil)
            return
        }
        let front = context.channel
        let link = from.map { LinkTable.Link(from: $0, to: slot) }
        ClientBootstrap(group: context.eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(2))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(ProxyBackHandler(front: front))
                }
            }
            .connect(host: "127.0.0.1", port: targetPort)
            .whenComplete { [self] result in
                switch result {
                case .success(let channel):
                    // The peer may have gone while we connected.
                    guard front.isActive else {
                        channel.close(promise: nil)
                        return
                    }
                    back = channel
                    links.register(key, link: link, channels: [front, channel])
                    // Blocked meanwhile: cut at once.
                    if !links.allows(from: from, to: slot, members: members) {
                        front.close(promise: nil)
                        channel.close(promise: nil)
                        return
                    }
                    if let pending { channel.writeAndFlush(pending, promise: nil) }
                    pending = nil
                case .failure:
                    front.close(promise: nil)
                }
            }
    }

    func channelInactive(context: ChannelHandlerContext) {
        back?.close(promise: nil)
        links.unregister(key)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}

/// The member's side: relays its answers (`ELRM`, `ELOK`, query replies) back.
private final class ProxyBackHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = ByteBuffer
    let front: Channel

    init(front: Channel) { self.front = front }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        front.writeAndFlush(unwrapInboundIn(data), promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        front.close(promise: nil)
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }
}
