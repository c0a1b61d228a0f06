import EtcdLiteHTTP2
import EtcdLiteProto
import Foundation
import NIOCore
import NIOEmbedded

extension FuzzTargets {
    /// What a gRPC client sends: the bytes after the connection preface, fed to the member's HTTP/2
    /// layer (`GRPCConnectionHandler`) on an embedded channel in pieces of `first byte + 1` bytes,
    /// as TCP might cut them, with one method that answers at once. It must not trap, and what
    /// it writes back must be whole frames no larger than HTTP/2 allows.
    public static func http2(_ input: [UInt8]) {
        guard let selector = input.first else { return }
        let piece = Int(selector) + 1
        let body = input.dropFirst()
        let channel = EmbeddedChannel()
        defer { _ = try? channel.finish() }
        guard (try? channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 2379)).wait()) != nil,
              (try? channel.pipeline.syncOperations.addHandler(GRPCConnectionHandler(methods: http2Methods, maxConcurrentStreams: 8))) != nil
        else { preconditionFailure("the embedded channel did not take the handler") }
        var chunks = [ArraySlice(HTTP2Wire.preface)]
        var start = body.startIndex
        while start < body.endIndex {
            let end = min(body.endIndex, start + piece)
            chunks.append(body[start..<end])
            start = end
        }
        var written = ByteBuffer()
        for chunk in chunks where channel.isActive {
            _ = try? channel.writeInbound(ByteBuffer(bytes: chunk))
            channel.pipeline.fireChannelReadComplete()
            channel.embeddedEventLoop.run()
            while let bytes = try? channel.readOutbound(as: ByteBuffer.self) {
                var bytes = bytes
                written.writeBuffer(&bytes)
            }
        }
        while written.readableBytes > 0 {
            guard written.readableBytes >= HTTP2Wire.frameHeaderLength else { preconditionFailure("a partial frame header was written") }
            let length = Int(written.readInteger(as: UInt8.self)!) << 16 | Int(written.readInteger(as: UInt16.self)!)
            written.moveReaderIndex(forwardBy: 6)
            guard written.readableBytes >= length else { preconditionFailure("a partial frame was written") }
            written.moveReaderIndex(forwardBy: length)
        }
    }

    private static let http2Methods: GRPCMethods = {
        var methods = GRPCMethods(receiveLimit: 64 << 10)
        methods.unaryDirect("/etcdserverpb.KV/Range") { (request: Etcdserverpb_RangeRequest, _, done: @escaping @Sendable (Result<Etcdserverpb_RangeResponse, any Error>) -> Void) in
            var kv = Mvccpb_KeyValue()
            kv.key = request.key
            kv.value = Data(repeating: 0x61, count: Int(min(max(request.limit, 0), 100_000)))
            var response = Etcdserverpb_RangeResponse()
            response.kvs = [kv]
            done(.success(response))
        }
        return methods
    }()
}
