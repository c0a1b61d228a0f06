import Foundation
import Synchronization

/// The member's SQLite database: one writer connection owned by the apply loop, and a pool of
/// reader connections that see committed snapshots (WAL mode lets both run at once).
final class Backend: Sendable {
    let path: String
    /// Owned by the apply loop's thread; no other thread touches it.
    nonisolated(unsafe) let writer: SQLiteConnection
    private let readers = Mutex<[SQLiteConnection]>([])
    private let pageSize: Int64

    init(path: String) throws {
        self.path = path
        writer = try SQLiteConnection(path: path)
        try writer.execute("PRAGMA journal_mode=WAL")
        // Durability comes from our own log: SQLite may lose its last commits on power loss, and
        // the entries after the recorded applied index are re-applied from the log.
        try writer.execute("PRAGMA synchronous=NORMAL")
        try writer.execute("PRAGMA cache_size=-8192")
        // A WAL that was restarted is cut back to this size on disk.
        try writer.execute("PRAGMA journal_size_limit=\(Self.walLimit)")
        try writer.execute("BEGIN IMMEDIATE")
        for statement in Schema.statements { try writer.execute(statement) }
        try writer.execute("COMMIT")
        pageSize = try writer.pragmaInt("page_size")
    }

    /// Runs `body` on a consistent snapshot of committed state.
    func read<T>(_ body: (ReadView) throws -> T) throws -> T {
        let connection = try checkout()
        defer { checkin(connection) }
        try connection.prepared("BEGIN").run()
        defer { try? connection.prepared("COMMIT").run() }
        let view = ReadView(connection: connection, state: try StoreState.load(connection))
        return try body(view)
    }

    /// Runs `body` with a reader connection outside any transaction (VACUUM INTO, hashes).
    func withReader<T>(_ body: (SQLiteConnection) throws -> T) throws -> T {
        let connection = try checkout()
        defer { checkin(connection) }
        return try body(connection)
    }

    /// Writes a consistent copy of the committed store to a new file at `path` (SQLite's
    /// `VACUUM INTO`, on a reader connection: the writer goes on meanwhile).
    func copy(to path: String) throws {
        try withReader { connection in
            // VACUUM INTO writes only the new file, but query_only forbids it; lift it meanwhile.
            try connection.execute("PRAGMA query_only=0")
            defer { try? connection.execute("PRAGMA query_only=1") }
            let statement = try connection.prepared("VACUUM INTO ?1")
            statement.bind(1, path)
            try statement.run()
        }
    }

    private func checkout() throws -> SQLiteConnection {
        if let connection = readers.withLock({ $0.popLast() }) { return connection }
        let connection = try SQLiteConnection(path: path)
        try connection.execute("PRAGMA query_only=1")
        try connection.execute("PRAGMA cache_size=-4096")
        try connection.execute("PRAGMA mmap_size=268435456")
        return connection
    }

    private func checkin(_ connection: SQLiteConnection) {
        readers.withLock { $0.append(connection) }
    }

    /// Database size and size in use, in bytes; call on the writer's thread.
    func sizes() throws -> (size: Int64, inUse: Int64) {
        let pages = try writer.pragmaInt("page_count")
        let free = try writer.pragmaInt("freelist_count")
        return (pages * pageSize, (pages - free) * pageSize)
    }

    /// Makes every committed transaction durable by syncing SQLite's WAL file (checkpoints sync
    /// the main file themselves in WAL mode).
    func syncCommitted() throws {
        try writer.execute("PRAGMA wal_checkpoint(PASSIVE)")
        for file in [path + "-wal", path] {
            let fd = open(file, O_RDWR)
            guard fd >= 0 else { continue }
            defer { close(fd) }
            if fdatasync(fd) != 0 { throw POSIXError(POSIXErrorCode(rawValue: errno) ?? .EIO) }
        }
    }

    /// SQLite's WAL only restarts from its beginning when no reader still uses it; under a steady
    /// stream of reads that never happens by itself (checkpoint starvation) and the WAL grows
    /// without bound, slowing every read. Past `walLimit` bytes the writer checkpoints and waits for
    /// the readers of the WAL to finish (RESTART), so that the next writes start it over.
    func restartWALIfLarge() throws {
        var info = stat()
        guard stat(path + "-wal", &info) == 0, Int64(info.st_size) > Self.walLimit else { return }
        // Waits at most 50 ms for the readers (a long one, such as a snapshot copy, is not waited
        // for: the next check tries again); then the usual 30 s again.
        try writer.execute("PRAGMA busy_timeout=50")
        defer { try? writer.execute("PRAGMA busy_timeout=30000") }
        try writer.execute("PRAGMA wal_checkpoint(RESTART)")
    }

    static let walLimit: Int64 = 64 << 20

    func closeReaders() {
        readers.withLock { $0.removeAll() }
    }
}
