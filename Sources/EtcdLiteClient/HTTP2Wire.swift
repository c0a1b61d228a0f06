import NIOCore

/// The parts of HTTP/2's wire format (RFC 9113) a gRPC client needs: frame headers, settings and
/// a stateless header-block encoder (static-table references and literals, never the dynamic
/// table, so an encoded block can be reused for every call on the same path).
enum HTTP2Wire {
    static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    static let frameHeaderLength = 9
    static let defaultWindow = 65_535
    static let defaultMaxFrameSize = 16_384
    static let maxWindow = Int(Int32.max)

    enum FrameType: UInt8 {
        case data = 0, headers, priority, rstStream, settings, pushPromise, ping, goAway, windowUpdate, continuation
    }

    enum Flag {
        static let endStream: UInt8 = 0x1
        static let ack: UInt8 = 0x1
        static let endHeaders: UInt8 = 0x4
        static let padded: UInt8 = 0x8
        static let priority: UInt8 = 0x20
    }

    enum Setting: UInt16 {
        case headerTableSize = 1, enablePush, maxConcurrentStreams, initialWindowSize, maxFrameSize, maxHeaderListSize
    }

    enum ErrorCode: UInt32 {
        case noError = 0, protocolError, internalError, flowControlError, settingsTimeout, streamClosed, frameSizeError,
             refusedStream, cancel, compressionError, connectError, enhanceYourCalm, inadequateSecurity, http11Required

        static func name(_ code: UInt32) -> String {
            guard let known = ErrorCode(rawValue: code) else { return "0x\(String(code, radix: 16))" }
            switch known {
            case .noError: return "NO_ERROR"
            case .protocolError: return "PROTOCOL_ERROR"
            case .internalError: return "INTERNAL_ERROR"
            case .flowControlError: return "FLOW_CONTROL_ERROR"
            case .settingsTimeout: return "SETTINGS_TIMEOUT"
            case .streamClosed: return "STREAM_CLOSED"
            case .frameSizeError: return "FRAME_SIZE_ERROR"
            case .refusedStream: return "REFUSED_STREAM"
            case .cancel: return "CANCEL"
            case .compressionError: return "COMPRESSION_ERROR"
            case .connectError: return "CONNECT_ERROR"
            case .enhanceYourCalm: return "ENHANCE_YOUR_CALM"
            case .inadequateSecurity: return "INADEQUATE_SECURITY"
            case .http11Required: return "HTTP_1_1_REQUIRED"
            }
        }
    }

    static func writeFrameHeader(_ out: inout ByteBuffer, length: Int, type: FrameType, flags: UInt8 = 0, stream: UInt32) {
        out.writeInteger(UInt8(truncatingIfNeeded: length >> 16))
        out.writeInteger(UInt16(truncatingIfNeeded: length))
        out.writeInteger(type.rawValue)
        out.writeInteger(flags)
        out.writeInteger(stream & 0x7FFF_FFFF)
    }

    static func writeSettings(_ out: inout ByteBuffer, _ settings: [(Setting, UInt32)]) {
        writeFrameHeader(&out, length: 6 * settings.count, type: .settings, stream: 0)
        for (setting, value) in settings {
            out.writeInteger(setting.rawValue)
            out.writeInteger(value)
        }
    }

    static func writeWindowUpdate(_ out: inout ByteBuffer, stream: UInt32, increment: Int) {
        writeFrameHeader(&out, length: 4, type: .windowUpdate, stream: stream)
        out.writeInteger(UInt32(increment) & 0x7FFF_FFFF)
    }

    static func writeRstStream(_ out: inout ByteBuffer, stream: UInt32, code: ErrorCode) {
        writeFrameHeader(&out, length: 4, type: .rstStream, stream: stream)
        out.writeInteger(code.rawValue)
    }

    static func writeGoAway(_ out: inout ByteBuffer, lastStream: UInt32, code: ErrorCode) {
        writeFrameHeader(&out, length: 8, type: .goAway, stream: 0)
        out.writeInteger(lastStream & 0x7FFF_FFFF)
        out.writeInteger(code.rawValue)
    }

    /// A header block from RFC 7541's representations that need no shared state: indexed static
    /// entries, and literals "without indexing" (with a static-table name where one exists).
    struct HeaderBlockEncoder {
        private(set) var bytes: [UInt8] = []

        /// `:method: POST`, static index 3.
        mutating func methodPOST() { integer(3, prefixBits: 7, flags: 0x80) }

        /// `:scheme`, static index 6 (`http`) or 7 (`https`).
        mutating func scheme(https: Bool) { integer(https ? 7 : 6, prefixBits: 7, flags: 0x80) }

        /// A literal value for a static-table name (`:authority` 1, `:path` 4, `content-type` 31).
        mutating func literal(nameIndex: Int, value: String) {
            integer(nameIndex, prefixBits: 4, flags: 0)
            string(value)
        }

        /// A literal name and value (names are lower case on HTTP/2).
        mutating func literal(name: String, value: String) {
            bytes.append(0)
            string(name.lowercased())
            string(value)
        }

        private mutating func string(_ text: String) {
            let utf8 = Array(text.utf8)
            integer(utf8.count, prefixBits: 7, flags: 0)  // H = 0: no Huffman coding
            bytes += utf8
        }

        /// RFC 7541 §5.1: an integer with an N-bit prefix.
        private mutating func integer(_ value: Int, prefixBits: Int, flags: UInt8) {
            let limit = (1 << prefixBits) - 1
            if value < limit {
                bytes.append(flags | UInt8(value))
                return
            }
            bytes.append(flags | UInt8(limit))
            var rest = value - limit
            while rest >= 128 {
                bytes.append(UInt8(rest & 0x7F) | 0x80)
                rest >>= 7
            }
            bytes.append(UInt8(rest))
        }
    }
}
