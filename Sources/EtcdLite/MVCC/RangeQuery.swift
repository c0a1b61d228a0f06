import CSQLite
import EtcdLiteProto

/// The result of reading a key range at one revision.
struct RangeResult {
    var kvs: [Mvccpb_KeyValue]
    /// Keys in the whole range at that revision, ignoring the limit.
    var count: Int
}

/// Range reads over the MVCC tables, shared by read views and write transactions (which read their
/// own uncommitted writes through the same connection).
enum RangeQuery {
    /// SQL per range shape, built once: the hot paths look statements up by these strings.
    private struct Queries {
        let latestRows: String
        let historicalRows: String
        let latestCount: String
        let historicalCount: String
        let deleteLatest: String

        init(_ condition: (String) -> String) {
            latestRows = "SELECT r.key, r.create_rev, r.mod_rev, r.version, r.lease, r.value FROM latest l JOIN revs r ON r.id = l.id WHERE \(condition("l.key")) ORDER BY l.key LIMIT ?3"
            // At an older revision: each distinct key of the range (a skip scan of the revs_by_key
            // index, one seek per key), then that key's newest revision at or below ?4 (one more
            // seek) — never a walk through every revision the range ever had, whose cost grows
            // with history (kube-apiserver's paginated lists read at a pinned revision).
            let keys = """
                WITH RECURSIVE k(key) AS (
                  SELECT (SELECT key FROM revs WHERE \(condition("key")) ORDER BY key LIMIT 1)
                  UNION ALL
                  SELECT (SELECT key FROM revs WHERE key > k.key AND \(condition("key")) ORDER BY key LIMIT 1) FROM k WHERE k.key IS NOT NULL)
                """
            let newest = "r.id = (SELECT id FROM revs WHERE key = k.key AND mod_rev <= ?4 ORDER BY mod_rev DESC LIMIT 1)"
            historicalRows = """
                \(keys)
                SELECT r.key, r.create_rev, r.mod_rev, r.version, r.lease, r.value FROM k JOIN revs r ON \(newest)
                WHERE k.key IS NOT NULL AND r.tombstone = 0 ORDER BY r.key LIMIT ?3
                """
            latestCount = "SELECT count(*) FROM latest WHERE \(condition("key"))"
            historicalCount = """
                \(keys)
                SELECT count(*) FROM k JOIN revs r ON \(newest) WHERE k.key IS NOT NULL AND r.tombstone = 0
                """
            deleteLatest = "DELETE FROM latest WHERE \(condition("key"))"
        }
    }

    private static let single = Queries { "\($0) = ?1" }
    private static let interval = Queries { "\($0) >= ?1 AND \($0) < ?2" }
    private static let from = Queries { "\($0) >= ?1" }

    private static func queries(_ range: KeyRange) -> Queries {
        switch range {
        case .single: single
        case .interval: interval
        case .from: from
        }
    }

    /// Binds the range's keys to ?1 (and ?2).
    static func bind(_ range: KeyRange, _ statement: SQLiteStatement) {
        switch range {
        case .single(let key), .from(let key):
            statement.bind(1, key)
        case .interval(let start, let end):
            statement.bind(1, start)
            statement.bind(2, end)
        }
    }

    /// Reads `range` as of `revision`; `atLatest` means `revision` is the current revision, which
    /// the `latest` table answers without scanning history.
    static func read(
        _ connection: SQLiteConnection, range: KeyRange, revision: Int64, atLatest: Bool,
        limit: Int, countOnly: Bool, keysOnly: Bool = false
    ) throws -> RangeResult {
        if countOnly {
            return RangeResult(kvs: [], count: try count(connection, range: range, revision: revision, atLatest: atLatest))
        }
        let queries = queries(range)
        let statement = try connection.prepared(atLatest ? queries.latestRows : queries.historicalRows)
        bind(range, statement)
        statement.bind(3, limit > 0 ? Int64(limit) : -1)
        if !atLatest { statement.bind(4, revision) }
        var kvs: [Mvccpb_KeyValue] = []
        while try statement.step() {
            var kv = Mvccpb_KeyValue()
            kv.key = statement.data(0)
            kv.createRevision = statement.int64(1)
            kv.modRevision = statement.int64(2)
            kv.version = statement.int64(3)
            kv.lease = statement.int64(4)
            if !keysOnly { kv.value = statement.data(5) }
            kvs.append(kv)
        }
        statement.reset()
        let total = (limit <= 0 || kvs.count < limit) ? kvs.count
            : try count(connection, range: range, revision: revision, atLatest: atLatest)
        return RangeResult(kvs: kvs, count: total)
    }

    static func count(_ connection: SQLiteConnection, range: KeyRange, revision: Int64, atLatest: Bool) throws -> Int {
        let queries = queries(range)
        let statement = try connection.prepared(atLatest ? queries.latestCount : queries.historicalCount)
        bind(range, statement)
        if !atLatest { statement.bind(4, revision) }
        defer { statement.reset() }
        return try statement.step() ? Int(statement.int64(0)) : 0
    }

    /// Removes the range from the current-key index (its tombstones are in `revs`).
    static func deleteLatest(_ connection: SQLiteConnection, range: KeyRange) throws {
        let statement = try connection.prepared(queries(range).deleteLatest)
        bind(range, statement)
        try statement.run()
    }
}
