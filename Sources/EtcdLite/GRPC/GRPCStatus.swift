/// A gRPC status as it goes on the wire: `grpc-status` and a percent-encoded `grpc-message`.
struct GRPCStatus: Error, Sendable, Equatable {
    var code: Int
    var message: String

    static let ok = GRPCStatus(code: 0, message: "")

    static func unimplemented(_ path: String) -> GRPCStatus {
        GRPCStatus(code: 12, message: "unknown service \(path)")
    }

    init(code: Int, message: String) {
        self.code = code
        self.message = message
    }

    /// etcd's errors keep their code and message; anything else is Unknown.
    init(_ error: any Error) {
        switch error {
        case let status as GRPCStatus: self = status
        case let etcd as EtcdError: self.init(code: etcd.code.rawValue, message: etcd.message)
        case is CancellationError: self.init(code: 1, message: "context canceled")
        default: self.init(code: 2, message: "\(error)")
        }
    }

    /// gRPC's percent-encoding of grpc-message: printable ASCII except '%' stays as it is.
    var encodedMessage: String {
        var out = ""
        for byte in message.utf8 {
            if byte >= 0x20 && byte <= 0x7E && byte != 0x25 {
                out.unicodeScalars.append(Unicode.Scalar(byte))
            } else {
                out += "%" + String(byte >> 4, radix: 16, uppercase: true) + String(byte & 0xF, radix: 16, uppercase: true)
            }
        }
        return out
    }
}
