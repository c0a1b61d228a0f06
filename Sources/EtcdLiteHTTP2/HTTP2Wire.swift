import NIOCore

/// The parts of HTTP/2's wire format (RFC 9113) that gRPC's client and server sides share: frame
/// headers, settings and a stateless header-block encoder (static-table references and literals,
/// never the dynamic table, so an encoded block can be reused for every call on the same path and
/// every answer of the same shape).
public enum HTTP2Wire {
    public static let preface: [UInt8] = Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8)
    public static let frameHeaderLength = 9
    public static let defaultWindow = 65_535
    public static let defaultMaxFrameSize = 16_384
    public static let maxWindow = Int(Int32.max)

    public enum FrameType: UInt8 {
        case data = 0, headers, priority, rstStream, settings, pushPromise, ping, goAway, windowUpdate, continuation
    }

    public enum Flag {
        public static let endStream: UInt8 = 0x1
        public static let ack: UInt8 = 0x1
        public static let endHeaders: UInt8 = 0x4
        public static let padded: UInt8 = 0x8
        public static let priority: UInt8 = 0x20
    }

    public enum Setting: UInt16 {
        case headerTableSize = 1, enablePush, maxConcurrentStreams, initialWindowSize, maxFrameSize, maxHeaderListSize
    }

    public enum ErrorCode: UInt32 {
        case noError = 0, protocolError, internalError, flowControlError, settingsTimeout, streamClosed, frameSizeError,
             refusedStream, cancel, compressionError, connectError, enhanceYourCalm, inadequateSecurity, http11Required

        public static func name(_ code: UInt32) -> String {
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

    @inlinable public static func writeFrameHeader(_ out: inout ByteBuffer, length: Int, type: FrameType, flags: UInt8 = 0, stream: UInt32) {
        out.writeInteger(UInt8(truncatingIfNeeded: length >> 16))
        out.writeInteger(UInt16(truncatingIfNeeded: length))
        out.writeInteger(type.rawValue)
        out.writeInteger(flags)
        out.writeInteger(stream & 0x7FFF_FFFF)
    }

    @inlinable public static func writeSettings(_ out: inout ByteBuffer, _ settings: [(Setting, UInt32)]) {
        writeFrameHeader(&out, length: 6 * settings.count, type: .settings, stream: 0)
        for (setting, value) in settings {
            out.writeInteger(setting.rawValue)
            out.writeInteger(value)
        }
    }

    @inlinable public static func writeWindowUpdate(_ out: inout ByteBuffer, stream: UInt32, increment: Int) {
        writeFrameHeader(&out, length: 4, type: .windowUpdate, stream: stream)
        out.writeInteger(UInt32(increment) & 0x7FFF_FFFF)
    }

    @inlinable public static func writeRstStream(_ out: inout ByteBuffer, stream: UInt32, code: ErrorCode) {
        writeFrameHeader(&out, length: 4, type: .rstStream, stream: stream)
        out.writeInteger(code.rawValue)
    }

    /// GOAWAY, with optional debug data (etcd's servers say why, e.g. `too_many_pings`).
    @inlinable public static func writeGoAway(_ out: inout ByteBuffer, lastStream: UInt32, code: ErrorCode, debug: String = "") {
        writeFrameHeader(&out, length: 8 + debug.utf8.count, type: .goAway, stream: 0)
        out.writeInteger(lastStream & 0x7FFF_FFFF)
        out.writeInteger(code.rawValue)
        out.writeString(debug)
    }

    /// Removes DATA/HEADERS padding; false when the padding is longer than the frame.
    @inlinable public static func stripPadding(_ payload: inout ByteBuffer, flags: UInt8) -> Bool {
        guard flags & Flag.padded != 0 else { return true }
        guard let pad = payload.readInteger(as: UInt8.self), Int(pad) <= payload.readableBytes else { return false }
        payload = payload.getSlice(at: payload.readerIndex, length: payload.readableBytes - Int(pad))!
        return true
    }

    /// The error a SETTINGS value is (RFC 9113 §6.5.2), or nil when it is acceptable.
    @inlinable public static func settingError(_ key: UInt16, _ value: Int) -> ErrorCode? {
        switch Setting(rawValue: key) {
        case .initialWindowSize: return value <= maxWindow ? nil : .flowControlError
        case .maxFrameSize: return value >= defaultMaxFrameSize && value <= (1 << 24) - 1 ? nil : .protocolError
        case .enablePush: return value <= 1 ? nil : .protocolError
        default: return nil
        }
    }

    /// A header block as HEADERS, then CONTINUATION frames when it is larger than `maxFrameSize`.
    @inlinable public static func writeHeaderBlock(_ out: inout ByteBuffer, _ block: [UInt8], stream: UInt32, endStream: Bool, maxFrameSize: Int) {
        var offset = 0
        var first = true
        repeat {
            let length = min(block.count - offset, maxFrameSize)
            let last = offset + length == block.count
            var flags: UInt8 = last ? Flag.endHeaders : 0
            if first && endStream { flags |= Flag.endStream }
            writeFrameHeader(&out, length: length, type: first ? .headers : .continuation, flags: flags, stream: stream)
            out.writeBytes(block[offset..<(offset + length)])
            offset += length
            first = false
        } while offset < block.count
    }

    /// Cuts a connection's bytes into frames, keeping an incomplete one for the next read.
    public struct FrameReader {
        @usableFromInline var partial: ByteBuffer?
        @usableFromInline let maxFrameSize: Int

        public init(maxFrameSize: Int) {
            self.maxFrameSize = maxFrameSize
        }

        /// Calls `frame(type, flags, stream, payload)` for each whole frame in `bytes` while
        /// `proceed()` holds; FRAME_SIZE_ERROR for a frame longer than `maxFrameSize`.
        @inlinable public mutating func read(_ bytes: ByteBuffer, proceed: () -> Bool,
                                             frame: (UInt8, UInt8, UInt32, ByteBuffer) -> Void) -> ErrorCode? {
            var bytes = bytes
            if var earlier = partial.take() {
                earlier.writeBuffer(&bytes)
                bytes = earlier
            }
            while proceed(), bytes.readableBytes >= frameHeaderLength {
                let start = bytes.readerIndex
                let length = Int(bytes.getInteger(at: start, as: UInt8.self)!) << 16 | Int(bytes.getInteger(at: start + 1, as: UInt16.self)!)
                guard length <= maxFrameSize else { return .frameSizeError }
                guard bytes.readableBytes >= frameHeaderLength + length else { break }
                let type = bytes.getInteger(at: start + 3, as: UInt8.self)!
                let flags = bytes.getInteger(at: start + 4, as: UInt8.self)!
                let stream = bytes.getInteger(at: start + 5, as: UInt32.self)! & 0x7FFF_FFFF
                bytes.moveReaderIndex(forwardBy: frameHeaderLength)
                frame(type, flags, stream, bytes.readSlice(length: length)!)
            }
            if bytes.readableBytes > 0 && proceed() {
                bytes.discardReadBytes()
                partial = bytes
            }
            return nil
        }
    }

    /// A header block from RFC 7541's representations that need no shared state: indexed static
    /// entries, and literals "without indexing" (with a static-table name where one exists).
    public struct HeaderBlockEncoder {
        public private(set) var bytes: [UInt8] = []

        public init() {}

        /// `:method: POST`, static index 3.
        public mutating func methodPOST() { integer(3, prefixBits: 7, flags: 0x80) }

        /// A whole static-table entry, e.g. 8 for `:status: 200`.
        public mutating func indexed(_ index: Int) { integer(index, prefixBits: 7, flags: 0x80) }

        /// `:scheme`, static index 6 (`http`) or 7 (`https`).
        public mutating func scheme(https: Bool) { integer(https ? 7 : 6, prefixBits: 7, flags: 0x80) }

        /// A literal value for a static-table name (`:authority` 1, `:path` 4, `content-type` 31).
        public mutating func literal(nameIndex: Int, value: String) {
            integer(nameIndex, prefixBits: 4, flags: 0)
            string(value)
        }

        /// A literal name and value (names are lower case on HTTP/2).
        public mutating func literal(name: String, value: String) {
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
