import NIOCore

/// HTTP/2 frames as the frame-handler tests see them (either side of a connection).
struct HTTP2TestFrame {
    var type: UInt8
    var flags: UInt8
    var stream: UInt32
    var payload: ByteBuffer
    var endStream: Bool { flags & 0x1 != 0 }

    /// The whole frames at the front of `pending` (an incomplete one stays).
    static func take(from pending: inout ByteBuffer) -> [HTTP2TestFrame] {
        var frames: [HTTP2TestFrame] = []
        while pending.readableBytes >= 9 {
            let length = Int(pending.getInteger(at: pending.readerIndex, as: UInt8.self)!) << 16
                | Int(pending.getInteger(at: pending.readerIndex + 1, as: UInt16.self)!)
            guard pending.readableBytes >= 9 + length else { break }
            pending.moveReaderIndex(forwardBy: 3)
            let type = pending.readInteger(as: UInt8.self)!
            let flags = pending.readInteger(as: UInt8.self)!
            let stream = pending.readInteger(as: UInt32.self)!
            frames.append(HTTP2TestFrame(type: type, flags: flags, stream: stream, payload: pending.readSlice(length: length)!))
        }
        return frames
    }

    /// A frame's bytes.
    static func bytes(type: UInt8, flags: UInt8 = 0, stream: UInt32, _ payload: [UInt8]) -> [UInt8] {
        [UInt8(payload.count >> 16), UInt8((payload.count >> 8) & 0xFF), UInt8(payload.count & 0xFF), type, flags]
            + withUnsafeBytes(of: stream.bigEndian, Array.init) + payload
    }

    /// A SETTINGS payload.
    static func settings(_ values: [(UInt16, UInt32)]) -> [UInt8] {
        values.flatMap { key, value in [UInt8(key >> 8), UInt8(key & 0xFF)] + withUnsafeBytes(of: value.bigEndian, Array.init) }
    }

    static func windowUpdate(_ increment: UInt32) -> [UInt8] { withUnsafeBytes(of: increment.bigEndian, Array.init) }
}
