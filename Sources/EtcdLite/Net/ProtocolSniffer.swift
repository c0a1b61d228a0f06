import NIOCore

/// Decides from the first bytes of a connection whether it speaks HTTP/2 with prior knowledge
/// (gRPC) or HTTP/1.x (the JSON gateway and etcd's HTTP endpoints), then hands the connection to
/// the matching pipeline and replays the bytes it held back.
final class ProtocolSniffer: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    enum Kind {
        case http2
        case http1
    }

    static let preface = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)

    private var buffered: ByteBuffer?
    private let configure: (Channel, Kind) throws -> Void

    /// `configure` adds the protocol's handlers after this one; it runs on the channel's loop.
    init(configure: @escaping (Channel, Kind) throws -> Void) {
        self.configure = configure
    }

    /// nil while the bytes seen so far are still a prefix of the HTTP/2 preface.
    static func classify(_ bytes: ByteBufferView) -> Kind? {
        let count = min(bytes.count, preface.count)
        if !bytes.prefix(count).elementsEqual(preface.prefix(count)) { return .http1 }
        return count == preface.count ? .http2 : nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var incoming = unwrapInboundIn(data)
        if buffered == nil {
            buffered = incoming
        } else {
            buffered!.writeBuffer(&incoming)
        }
        guard let decided = Self.classify(buffered!.readableBytesView) else { return }
        let bytes = buffered!
        buffered = nil
        do {
            try configure(context.channel, decided)
        } catch {
            context.fireErrorCaught(error)
            context.close(promise: nil)
            return
        }
        // Handlers added after channelActive need to see it (HTTP/2's connection timers start there).
        context.fireChannelActive()
        context.fireChannelRead(wrapInboundOut(bytes))
        context.fireChannelReadComplete()
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
    }

    func channelActive(context: ChannelHandlerContext) {
        // Held back until the protocol is known; replayed to the protocol's handlers then.
    }

    func channelInactive(context: ChannelHandlerContext) {
        context.fireChannelInactive()
    }
}
