import Foundation
import EtcdLiteProto

/// Reads a watcher's past events from the revision history in SQLite. Events of a revision range
/// are a rowid range of `revs` (`RevisionID`), so a catch-up is one indexed scan.
enum WatchHistory {
    /// At most this many rows per read; a revision is never split, so a read may end early.
    static let rowLimit = 2_000

    struct Result {
        var events: [Mvccpb_Event]
        var readThrough: Int64
        /// Set when the first revision wanted has been compacted away.
        var compactedAt: Int64?
    }

    private static let columns = "key, create_rev, mod_rev, version, lease, value, tombstone"
    private static let singleKey = "SELECT \(columns) FROM revs WHERE key = ?1 AND mod_rev >= ?5 AND mod_rev <= ?6 ORDER BY mod_rev LIMIT ?3"
    // `+key` keeps SQLite on the rowid range (the revision window) rather than the key index.
    private static let interval = "SELECT \(columns) FROM revs WHERE id >= ?5 AND id < ?6 AND +key >= ?1 AND +key < ?2 ORDER BY id LIMIT ?3"
    private static let from = "SELECT \(columns) FROM revs WHERE id >= ?5 AND id < ?6 AND +key >= ?1 ORDER BY id LIMIT ?3"
    private static let previous = "SELECT \(columns) FROM revs WHERE key = ?1 AND mod_rev < ?2 ORDER BY mod_rev DESC LIMIT 1"

    /// Reads the next events of `catchUp`: whole revisions, at most `rowLimit` rows and about
    /// `byteLimit` bytes (a single revision larger than either is read whole).
    static func read(_ view: ReadView, _ catchUp: WatchHub.CatchUp, byteLimit: Int) throws -> Result {
        // etcd cancels a watcher whose next revision is older than the compaction point.
        if catchUp.from < view.compactRevision {
            return Result(events: [], readThrough: catchUp.from - 1, compactedAt: view.compactRevision)
        }
        let through = min(catchUp.through, view.readRevision)
        guard catchUp.from <= through else { return Result(events: [], readThrough: through) }
        var rows = try rowsOf(view, catchUp.watcher.range, from: catchUp.from, through: through, limit: rowLimit + 1)
        var readThrough = through
        if rows.count > rowLimit {
            // Keep whole revisions only; a single revision bigger than the limit is read whole.
            let last = rows.last!.kv.modRevision
            rows.removeAll { $0.kv.modRevision == last }
            if rows.isEmpty {
                rows = try rowsOf(view, catchUp.watcher.range, from: last, through: last, limit: -1)
                readThrough = last
            } else {
                readThrough = last - 1
            }
        }
        // Bound the bytes too: stop before the revision that crosses the limit.
        var bytes = 0
        for (index, row) in rows.enumerated() {
            bytes += WatchHub.size(row) * (catchUp.watcher.prevKV ? 2 : 1)
            guard bytes > byteLimit else { continue }
            let crossing = row.kv.modRevision
            if crossing > rows[0].kv.modRevision {
                rows.removeSubrange(rows.firstIndex { $0.kv.modRevision == crossing }!...)
                readThrough = crossing - 1
            } else if index + 1 < rows.count {
                rows.removeAll { $0.kv.modRevision != crossing }
                readThrough = crossing
            }
            break
        }
        var events: [Mvccpb_Event] = []
        events.reserveCapacity(rows.count)
        for var event in rows {
            if event.type == .put ? catchUp.watcher.noPut : catchUp.watcher.noDelete { continue }
            if catchUp.watcher.prevKV, let previous = try previousVersion(view, event.kv.key, before: event.kv.modRevision) {
                event.prevKv = previous
            }
            events.append(event)
        }
        return Result(events: events, readThrough: readThrough)
    }

    private static func rowsOf(_ view: ReadView, _ range: KeyRange, from: Int64, through: Int64, limit: Int) throws -> [Mvccpb_Event] {
        let statement: SQLiteStatement
        switch range {
        case .single:
            statement = try view.connection.prepared(singleKey)
            statement.bind(5, from)
            statement.bind(6, through)
        case .interval:
            statement = try view.connection.prepared(interval)
            statement.bind(5, RevisionID.first(of: from))
            statement.bind(6, RevisionID.first(of: through + 1))
        case .from:
            statement = try view.connection.prepared(Self.from)
            statement.bind(5, RevisionID.first(of: from))
            statement.bind(6, RevisionID.first(of: through + 1))
        }
        RangeQuery.bind(range, statement)
        statement.bind(3, Int64(limit))
        defer { statement.reset() }
        var events: [Mvccpb_Event] = []
        while try statement.step() {
            events.append(event(statement))
        }
        return events
    }

    /// A row as etcd reports it: a deletion carries only the key and its revision.
    private static func event(_ row: SQLiteStatement) -> Mvccpb_Event {
        var event = Mvccpb_Event()
        var kv = Mvccpb_KeyValue()
        kv.key = row.data(0)
        kv.modRevision = row.int64(2)
        if row.int64(6) != 0 {
            event.type = .delete
        } else {
            event.type = .put
            kv.createRevision = row.int64(1)
            kv.version = row.int64(3)
            kv.lease = row.int64(4)
            kv.value = row.data(5)
        }
        event.kv = kv
        return event
    }

    /// The key's value just before `revision`; nil when it did not exist or was compacted away.
    private static func previousVersion(_ view: ReadView, _ key: Data, before revision: Int64) throws -> Mvccpb_KeyValue? {
        let statement = try view.connection.prepared(previous)
        statement.bind(1, key)
        statement.bind(2, revision)
        defer { statement.reset() }
        guard try statement.step(), statement.int64(6) == 0 else { return nil }
        let event = event(statement)
        return event.kv
    }
}
