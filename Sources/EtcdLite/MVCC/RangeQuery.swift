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
    private static let columns = "r.key, r.create_rev, r.mod_rev, r.version, r.lease, r.value"

    /// Reads `range` as of `revision`; `atLatest` means `revision` is the current revision, which
    /// the `latest` table answers without scanning history.
    static func read(
        _ connection: SQLiteConnection, range: KeyRange, revision: Int64, atLatest: Bool,
        limit: Int, countOnly: Bool, keysOnly: Bool = false
    ) throws -> RangeResult {
        if countOnly {
            return RangeResult(kvs: [], count: try count(connection, range: range, revision: revision, atLatest: atLatest))
        }
        let (condition, binds) = where_(range, column: atLatest ? "l.key" : "r.key")
        let sql: String
        if atLatest {
            sql = "SELECT \(columns) FROM latest l JOIN revs r ON r.id = l.id WHERE \(condition) ORDER BY l.key LIMIT ?3"
        } else {
            // SQLite returns the bare columns of the row holding max(mod_rev) in each group.
            sql = """
                SELECT r.key, r.create_rev, max(r.mod_rev), r.version, r.lease, r.value FROM revs r
                WHERE \(condition) AND r.mod_rev <= ?4
                GROUP BY r.key HAVING r.tombstone = 0 ORDER BY r.key LIMIT ?3
                """
        }
        let statement = try connection.prepared(sql)
        binds(statement)
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
        let (condition, binds) = where_(range, column: "key")
        let sql = atLatest
            ? "SELECT count(*) FROM latest WHERE \(condition)"
            : "SELECT count(*) FROM (SELECT tombstone, max(mod_rev) FROM revs WHERE \(condition) AND mod_rev <= ?4 GROUP BY key HAVING tombstone = 0)"
        let statement = try connection.prepared(sql)
        binds(statement)
        if !atLatest { statement.bind(4, revision) }
        defer { statement.reset() }
        return try statement.step() ? Int(statement.int64(0)) : 0
    }

    /// The SQL condition for a range over `column`, using parameters ?1 and ?2.
    static func where_(_ range: KeyRange, column: String) -> (String, (SQLiteStatement) -> Void) {
        switch range {
        case .single(let key):
            return ("\(column) = ?1", { $0.bind(1, key) })
        case .interval(let start, let end):
            return ("\(column) >= ?1 AND \(column) < ?2", { $0.bind(1, start); $0.bind(2, end) })
        case .from(let start):
            return ("\(column) >= ?1", { $0.bind(1, start) })
        }
    }
}
