import Foundation
import EtcdLiteProto

/// Something requests can read keys through: a read view over committed state, or a write
/// transaction that also sees its own uncommitted writes.
protocol KVView: AnyObject {
    var connection: SQLiteConnection { get }
    /// The revision a read at "latest" observes.
    var readRevision: Int64 { get }
    /// The store's current revision as reported in response headers.
    var headerRevision: Int64 { get }
    var compactRevision: Int64 { get }
}

extension KVView {
    /// etcd's rangeKeys: a revision ≤ 0 reads the latest state; a future revision or one older
    /// than the compaction point is an error.
    func range(
        _ range: KeyRange, revision: Int64 = 0, limit: Int = 0, countOnly: Bool = false, keysOnly: Bool = false
    ) throws -> RangeResult {
        if revision > readRevision { throw EtcdError.futureRevision }
        let rev = revision <= 0 ? readRevision : revision
        if rev < compactRevision { throw EtcdError.compacted }
        return try RangeQuery.read(
            connection, range: range, revision: rev, atLatest: rev == readRevision,
            limit: limit, countOnly: countOnly, keysOnly: keysOnly)
    }

    func get(_ key: Data) throws -> Mvccpb_KeyValue? {
        try range(.single(key)).kvs.first
    }
}

/// A consistent snapshot of committed state, valid inside `Backend.read`.
final class ReadView: KVView {
    let connection: SQLiteConnection
    let readRevision: Int64
    let compactRevision: Int64
    var headerRevision: Int64 { readRevision }

    init(connection: SQLiteConnection, state: StoreState) {
        self.connection = connection
        self.readRevision = state.currentRevision
        self.compactRevision = state.compactRevision
    }
}

/// The durable counters of the store.
struct StoreState: Sendable, Equatable {
    var currentRevision: Int64
    var compactRevision: Int64
    var appliedIndex: UInt64

    static func load(_ connection: SQLiteConnection) throws -> StoreState {
        let statement = try connection.prepared("SELECT current_rev, compact_rev, applied_index FROM store_state WHERE id = 1")
        defer { statement.reset() }
        guard try statement.step() else { throw SQLiteError(code: 0, message: "store_state row missing") }
        return StoreState(currentRevision: statement.int64(0), compactRevision: statement.int64(1),
                          appliedIndex: UInt64(statement.int64(2)))
    }

    func save(_ connection: SQLiteConnection) throws {
        let statement = try connection.prepared("UPDATE store_state SET current_rev = ?1, compact_rev = ?2, applied_index = ?3 WHERE id = 1")
        statement.bind(1, currentRevision)
        statement.bind(2, compactRevision)
        statement.bind(3, Int64(appliedIndex))
        try statement.run()
    }
}
