import Foundation
import NIOConcurrencyHelpers

/// Storage faults for tests, compiled into debug builds only (ETCDLITE_FAILPOINTS): release
/// binaries have none.
/// - `ETCDLITE_FAILPOINT_LOG_SYNC` arms the Raft log's fdatasync:
///   - `fail-after:N`: the syncs after the first N fail with EIO (the member must stop without
///     acknowledging what that sync was to make durable);
///   - `slow:MS`: every sync first waits MS milliseconds (a slow disk).
/// - `ETCDLITE_FAILPOINT_SNAPSHOT` damages snapshot images:
///   - `corrupt-send:N`: the first N images this member sends have one byte flipped on the way
///     (after their checksums were taken), as a bad link or NIC would;
///   - `corrupt-install`: the first image this member receives has one byte flipped on its disk
///     after it was checked on arrival and before it is installed.
enum Failpoints {
    static let logSyncVariable = "ETCDLITE_FAILPOINT_LOG_SYNC"
    static let snapshotVariable = "ETCDLITE_FAILPOINT_SNAPSHOT"

    #if ETCDLITE_FAILPOINTS
    private static let logSync: (failAfter: Int?, delay: Int?)? = {
        guard let spec = ProcessInfo.processInfo.environment[logSyncVariable] else { return nil }
        let parts = spec.split(separator: ":", maxSplits: 1).map(String.init)
        guard parts.count == 2, let value = Int(parts[1]) else { return nil }
        switch parts[0] {
        case "fail-after": return (value, nil)
        case "slow": return (nil, value)
        default: return nil
        }
    }()
    nonisolated(unsafe) private static var syncs = 0

    private enum SnapshotFault { case corruptSend(Int), corruptInstall }
    private static let snapshotFault: SnapshotFault? = {
        guard let spec = ProcessInfo.processInfo.environment[snapshotVariable] else { return nil }
        if spec == "corrupt-install" { return .corruptInstall }
        let parts = spec.split(separator: ":", maxSplits: 1).map(String.init)
        guard parts.count == 2, parts[0] == "corrupt-send", let count = Int(parts[1]) else { return nil }
        return .corruptSend(count)
    }()
    private static let snapshotsDamaged = NIOLockedValueBox(0)

    /// What is armed, for the member's start-up log (empty: nothing).
    static var armed: [String: String] {
        var armed: [String: String] = [:]
        let environment = ProcessInfo.processInfo.environment
        if logSync != nil { armed["log-sync"] = environment[logSyncVariable] }
        if snapshotFault != nil { armed["snapshot"] = environment[snapshotVariable] }
        return armed
    }

    /// Called by the log's (single) writer thread before each fdatasync.
    static func beforeLogSync() throws {
        guard let point = logSync else { return }
        syncs += 1
        if let delay = point.delay { usleep(useconds_t(delay * 1_000)) }
        if let limit = point.failAfter, syncs > limit { throw POSIXError(.EIO) }
    }

    /// The offset of the byte to flip in an outgoing image of `size` bytes (nil: none).
    static func corruptOutgoingSnapshot(size: UInt64) -> UInt64? {
        guard case .corruptSend(let count) = snapshotFault, size > 0 else { return nil }
        let damage = snapshotsDamaged.withLockedValue { done in
            defer { done += 1 }
            return done < count
        }
        return damage ? size / 2 : nil
    }

    /// Flips a byte in the middle of a received image before it is installed (once).
    static func beforeSnapshotInstall(_ path: String) {
        guard case .corruptInstall = snapshotFault, snapshotsDamaged.withLockedValue({ done in defer { done += 1 }; return done == 0 }),
              let handle = FileHandle(forUpdatingAtPath: path), let size = try? handle.seekToEnd(), size > 0 else { return }
        defer { try? handle.close() }
        try? handle.seek(toOffset: size / 2)
        guard let byte = try? handle.read(upToCount: 1)?.first else { return }
        try? handle.seek(toOffset: size / 2)
        try? handle.write(contentsOf: [byte ^ 0xFF])
        try? handle.synchronize()
    }
    #else
    static var armed: [String: String] { [:] }
    @inline(__always) static func beforeLogSync() throws {}
    @inline(__always) static func corruptOutgoingSnapshot(size: UInt64) -> UInt64? { nil }
    @inline(__always) static func beforeSnapshotInstall(_ path: String) {}
    #endif
}
