import Foundation

/// A failure to read the log that must stop the member: it names the file and the offset.
public struct LogCorruptionError: Error, CustomStringConvertible {
    public let file: String
    public let offset: Int
    public let reason: String
    public var description: String { "log corrupted in \(file) at offset \(offset): \(reason)" }
}

/// One entry of the log: its index and the encoded request.
struct LogEntry {
    var index: UInt64
    var data: [UInt8]
}

/// The ordered, durable, checksummed log of write requests, in append-only segment files named by
/// the index of their first entry. A record is
/// `length u32 | crc32c u32 | index u64 | data`, little-endian, the checksum covering index and data.
/// `sync()` makes everything appended so far durable with one fdatasync (group commit).
final class WriteAheadLog {
    static let headerSize = 16
    let directory: URL
    let segmentLimit: Int
    private var segment: FileHandle
    private var segmentPath: String
    private var segmentSize: Int
    /// Segments and the index of their first entry, oldest first.
    private var segments: [(first: UInt64, path: String)]
    private var pending: [UInt8] = []
    private(set) var lastIndex: UInt64

    /// Opens the log, truncating a torn tail, and returns the entries after `appliedIndex`.
    init(directory: URL, appliedIndex: UInt64, segmentLimit: Int = 64 << 20) throws {
        self.directory = directory
        self.segmentLimit = segmentLimit
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let names = try FileManager.default.contentsOfDirectory(atPath: directory.path)
            .filter { $0.hasSuffix(".log") }.sorted()
        segments = names.compactMap { name in
            UInt64(name.dropLast(4), radix: 16).map { ($0, directory.appendingPathComponent(name).path) }
        }
        lastIndex = appliedIndex
        if segments.isEmpty {
            let first = appliedIndex + 1
            let path = directory.appendingPathComponent(Self.segmentName(first)).path
            FileManager.default.createFile(atPath: path, contents: nil)
            segments = [(first, path)]
            try Self.syncDirectory(directory.path)
        }
        segmentPath = segments.last!.path
        segment = try FileHandle(forUpdating: URL(fileURLWithPath: segmentPath))
        segmentSize = 0
    }

    private static func segmentName(_ first: UInt64) -> String {
        let hex = String(first, radix: 16)
        return String(repeating: "0", count: max(0, 16 - hex.count)) + hex + ".log"
    }

    /// Reads every entry, checks the chain of indexes, truncates a torn tail of the last segment,
    /// and positions the log for appending. Returns the entries with index > `after`.
    func recover(after: UInt64) throws -> [LogEntry] {
        var result: [LogEntry] = []
        var expected: UInt64? = nil
        for (position, (first, path)) in segments.enumerated() {
            let isLast = position == segments.count - 1
            let data = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
            var offset = 0
            if expected == nil { expected = first }
            while offset < data.count {
                let remaining = data.count - offset
                if remaining < Self.headerSize {
                    guard isLast else { throw LogCorruptionError(file: path, offset: offset, reason: "short record header") }
                    break
                }
                let length = Int(Self.readUInt32(data, offset))
                let crc = Self.readUInt32(data, offset + 4)
                let index = Self.readUInt64(data, offset + 8)
                let end = offset + Self.headerSize + length
                if length == 0 && crc == 0 && index == 0 {
                    // Zeroed space after the last record: a tail written by a crash mid-extension.
                    guard isLast, data[offset...].allSatisfy({ $0 == 0 }) else {
                        throw LogCorruptionError(file: path, offset: offset, reason: "zeroed record before valid data")
                    }
                    break
                }
                if end > data.count {
                    guard isLast else { throw LogCorruptionError(file: path, offset: offset, reason: "record runs past the end of the segment") }
                    break
                }
                let actual = data.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[(offset + 8)..<end])) }
                if actual != crc {
                    // A bad last record is a torn write; a bad record with records after it is corruption.
                    if isLast && end == data.count { break }
                    throw LogCorruptionError(file: path, offset: offset, reason: "checksum mismatch")
                }
                if let expected, index != expected {
                    throw LogCorruptionError(file: path, offset: offset, reason: "index \(index) where \(expected) was expected")
                }
                if index > after { result.append(LogEntry(index: index, data: Array(data[(offset + Self.headerSize)..<end]))) }
                lastIndex = max(lastIndex, index)
                expected = index + 1
                offset = end
            }
            if isLast {
                if offset < data.count {
                    try segment.truncate(atOffset: UInt64(offset))
                    try segment.synchronize()
                }
                try segment.seek(toOffset: UInt64(offset))
                segmentSize = offset
            }
        }
        if let firstRecovered = result.first, firstRecovered.index != after + 1 {
            throw LogCorruptionError(file: segments.first!.path, offset: 0,
                                     reason: "log starts at index \(firstRecovered.index) but the store has applied only \(after)")
        }
        return result
    }

    /// Buffers an entry; it is durable after the next `sync()`.
    func append(_ data: [UInt8]) -> UInt64 {
        lastIndex += 1
        var header = [UInt8](repeating: 0, count: Self.headerSize)
        Self.writeUInt32(&header, 0, UInt32(data.count))
        Self.writeUInt64(&header, 8, lastIndex)
        var crc = header.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[8..<16])) }
        crc = CRC32C.checksum(data, seed: crc)
        Self.writeUInt32(&header, 4, crc)
        pending += header
        pending += data
        return lastIndex
    }

    /// Writes the buffered entries and makes them durable with one fdatasync.
    func sync() throws {
        guard !pending.isEmpty else { return }
        try pending.withUnsafeBytes { raw in
            var written = 0
            while written < raw.count {
                let n = Foundation.write(segment.fileDescriptor, raw.baseAddress! + written, raw.count - written)
                if n < 0 {
                    if errno == EINTR { continue }
                    throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO)
                }
                written += n
            }
        }
        segmentSize += pending.count
        pending.removeAll(keepingCapacity: true)
        if fdatasync(segment.fileDescriptor) != 0 { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
    }

    var needsRotation: Bool { segmentSize >= segmentLimit }

    /// Starts a new segment after the last entry.
    func rotate() throws {
        try sync()
        try segment.close()
        let first = lastIndex + 1
        segmentPath = directory.appendingPathComponent(Self.segmentName(first)).path
        FileManager.default.createFile(atPath: segmentPath, contents: nil)
        try Self.syncDirectory(directory.path)
        segment = try FileHandle(forUpdating: URL(fileURLWithPath: segmentPath))
        segmentSize = 0
        segments.append((first, segmentPath))
    }

    /// Deletes whole segments whose entries are all ≤ `durableIndex` (already durable in the store).
    func release(through durableIndex: UInt64) throws {
        while segments.count > 1, segments[1].first <= durableIndex + 1 {
            try FileManager.default.removeItem(atPath: segments[0].path)
            segments.removeFirst()
        }
    }

    func close() {
        try? segment.close()
    }

    static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else { return }
        defer { Foundation.close(fd) }
        _ = fsync(fd)
    }

    private static func readUInt32(_ data: [UInt8], _ offset: Int) -> UInt32 {
        (0..<4).reduce(UInt32(0)) { $0 | UInt32(data[offset + $1]) << (8 * $1) }
    }

    private static func readUInt64(_ data: [UInt8], _ offset: Int) -> UInt64 {
        (0..<8).reduce(UInt64(0)) { $0 | UInt64(data[offset + $1]) << (8 * $1) }
    }

    private static func writeUInt32(_ data: inout [UInt8], _ offset: Int, _ value: UInt32) {
        for i in 0..<4 { data[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }

    private static func writeUInt64(_ data: inout [UInt8], _ offset: Int, _ value: UInt64) {
        for i in 0..<8 { data[offset + i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }
}
