import Foundation

/// Storage faults for tests, compiled into debug builds only (ETCDLITE_FAILPOINTS): release
/// binaries have none. `ETCDLITE_FAILPOINT_LOG_SYNC` arms the Raft log's fdatasync:
/// - `fail-after:N`: the syncs after the first N fail with EIO (the member must stop without
///   acknowledging what that sync was to make durable);
/// - `slow:MS`: every sync first waits MS milliseconds (a slow disk).
enum Failpoints {
    #if ETCDLITE_FAILPOINTS
    private static let logSync: (failAfter: Int?, delay: Int?)? = {
        guard let spec = ProcessInfo.processInfo.environment["ETCDLITE_FAILPOINT_LOG_SYNC"] else { return nil }
        let parts = spec.split(separator: ":", maxSplits: 1).map(String.init)
        guard parts.count == 2, let value = Int(parts[1]) else { return nil }
        switch parts[0] {
        case "fail-after": return (value, nil)
        case "slow": return (nil, value)
        default: return nil
        }
    }()
    nonisolated(unsafe) private static var syncs = 0

    /// What is armed, for the member's start-up log (nil: nothing).
    static var armed: String? { ProcessInfo.processInfo.environment["ETCDLITE_FAILPOINT_LOG_SYNC"].flatMap { logSync == nil ? nil : $0 } }

    /// Called by the log's (single) writer thread before each fdatasync.
    static func beforeLogSync() throws {
        guard let point = logSync else { return }
        syncs += 1
        if let delay = point.delay { usleep(useconds_t(delay * 1_000)) }
        if let limit = point.failAfter, syncs > limit { throw POSIXError(.EIO) }
    }
    #else
    static var armed: String? { nil }
    @inline(__always) static func beforeLogSync() throws {}
    #endif
}
