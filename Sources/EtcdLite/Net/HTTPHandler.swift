import Foundation
import NIOCore
import NIOHTTP1

/// etcd's plain HTTP endpoints on the client port (`/health`, `/livez`, `/readyz`, `/version`).
/// The JSON gateway (`/v3/...`) arrives with its own issue; until then those paths answer 404.
final class HTTPHandler: ChannelInboundHandler, @unchecked Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    private let server: EtcdLiteServer
    private var head: HTTPRequestHead?

    init(server: EtcdLiteServer) {
        self.server = server
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            self.head = head
        case .body:
            break
        case .end:
            guard let head else { return }
            self.head = nil
            let (status, body) = respond(to: head)
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "application/json")
            headers.add(name: "Content-Length", value: "\(body.utf8.count)")
            if !head.isKeepAlive { headers.add(name: "Connection", value: "close") }
            context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: status, headers: headers))), promise: nil)
            context.write(wrapOutboundOut(.body(.byteBuffer(context.channel.allocator.buffer(string: body)))), promise: nil)
            let keepAlive = head.isKeepAlive
            context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in
                if !keepAlive { context.close(promise: nil) }
            }
        }
    }

    private func respond(to head: HTTPRequestHead) -> (HTTPResponseStatus, String) {
        let path = head.uri.split(separator: "?", maxSplits: 1).first.map(String.init) ?? head.uri
        switch path {
        case "/version":
            return (.ok, "{\"etcdserver\":\"\(EtcdLiteServer.apiVersion)\",\"etcdcluster\":\"\(EtcdLiteServer.clusterVersion)\"}")
        case "/health", "/livez", "/readyz":
            let alarms = server.status.alarms
            if alarms.isEmpty { return (.ok, "{\"health\":\"true\",\"reason\":\"\"}") }
            let names = alarms.map { "ALARM \(EtcdLiteServer.alarmName($0.alarm))" }.joined(separator: ", ")
            return (.serviceUnavailable, "{\"health\":\"false\",\"reason\":\"\(names)\"}")
        default:
            return (.notFound, "404 page not found\n")
        }
    }
}
