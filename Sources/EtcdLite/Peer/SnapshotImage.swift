import Foundation

/// A snapshot image (a copy of the leader's SQLite store) is checked block by block: the sender
/// computes a CRC-32C of every 1 MiB block as it reads the image and sends the list after the
/// image's bytes; the receiver computes the same as the bytes arrive, refuses an image whose
/// checksums differ (the leader sends it again), and keeps the list beside the image
/// (`<image>.crc`). Before the member installs the image it reads it once more against that list:
/// an image that changed on the disk in between stops the member, naming the file and the offset,
/// and nothing of it is installed.
enum SnapshotImage {
    static let blockSize = 1 << 20

    static func blockCount(size: UInt64) -> Int { Int((size + UInt64(blockSize) - 1) / UInt64(blockSize)) }

    static func sidecarPath(_ image: String) -> String { image + ".crc" }

    /// Block checksums of bytes fed in pieces of any size.
    struct BlockChecksums {
        private(set) var sums: [UInt32] = []
        private var current: UInt32 = 0
        private var filled = 0

        mutating func add(_ bytes: UnsafeRawBufferPointer) {
            var rest = bytes[...]
            while !rest.isEmpty {
                let take = min(rest.count, SnapshotImage.blockSize - filled)
                current = CRC32C.checksum(UnsafeRawBufferPointer(rebasing: rest.prefix(take)), seed: current)
                filled += take
                rest = rest.dropFirst(take)
                if filled == SnapshotImage.blockSize {
                    sums.append(current)
                    current = 0
                    filled = 0
                }
            }
        }

        /// The checksums, the partial last block's included.
        mutating func finish() -> [UInt32] {
            if filled > 0 {
                sums.append(current)
                current = 0
                filled = 0
            }
            return sums
        }
    }

    /// The first block whose checksum differs: its offset (nil: they all match).
    static func firstMismatch(_ actual: [UInt32], _ expected: [UInt32]) -> Int? {
        for (n, (a, e)) in zip(actual, expected).enumerated() where a != e { return n * blockSize }
        return actual.count == expected.count ? nil : min(actual.count, expected.count) * blockSize
    }

    static func encode(_ sums: [UInt32]) -> [UInt8] {
        var w = ByteWriter()
        for sum in sums { w.u32le(sum) }
        return w.bytes
    }

    static func decode(_ bytes: [UInt8]) -> [UInt32] {
        var r = ByteReader(bytes)
        return (0..<bytes.count / 4).compactMap { _ in try? r.u32le() }
    }

    /// Reads the image at `path` against the checksums written beside it when it was received.
    static func verify(_ path: String) throws {
        guard let expectedBytes = FileManager.default.contents(atPath: sidecarPath(path)) else {
            throw SnapshotCorruptionError(file: path, offset: 0, reason: "its checksums (\(sidecarPath(path))) are missing")
        }
        let expected = decode([UInt8](expectedBytes))
        guard let handle = FileHandle(forReadingAtPath: path) else {
            throw SnapshotCorruptionError(file: path, offset: 0, reason: "it cannot be read")
        }
        defer { try? handle.close() }
        var sums = BlockChecksums()
        var offset = 0
        while let chunk = try handle.read(upToCount: blockSize), !chunk.isEmpty {
            chunk.withUnsafeBytes { sums.add($0) }
            offset += chunk.count
        }
        let actual = sums.finish()
        if let at = firstMismatch(actual, expected) {
            throw SnapshotCorruptionError(file: path, offset: at,
                                          reason: actual.count == expected.count ? "block checksum mismatch" : "\(offset) bytes, not the \(expected.count) blocks sent")
        }
    }

    static func remove(_ path: String) {
        try? FileManager.default.removeItem(atPath: path)
        try? FileManager.default.removeItem(atPath: sidecarPath(path))
    }
}

/// A snapshot image that does not check out: the member stops rather than install it.
public struct SnapshotCorruptionError: Error, CustomStringConvertible {
    public let file: String
    public let offset: Int
    public let reason: String
    public var description: String { "snapshot image \(file) corrupted at offset \(offset): \(reason)" }
}
