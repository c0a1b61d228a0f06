import Foundation
import EtcdLiteProto

/// One write request's changes, all at revision `beginRevision + 1`, inside the apply batch's
/// SQLite transaction. Reads through it see its own earlier writes (etcd's storeTxnWrite).
final class WriteTxn: KVView {
    let connection: SQLiteConnection
    let beginRevision: Int64
    let compactRevision: Int64
    /// Events in the order the writes happened (sub-revision order).
    private(set) var events: [Mvccpb_Event] = []

    init(connection: SQLiteConnection, state: StoreState) {
        self.connection = connection
        self.beginRevision = state.currentRevision
        self.compactRevision = state.compactRevision
    }

    var changed: Bool { !events.isEmpty }
    var writeRevision: Int64 { beginRevision + 1 }
    var readRevision: Int64 { changed ? beginRevision + 1 : beginRevision }
    var headerRevision: Int64 { readRevision }

    /// Writes `key` and returns the revision it was written at.
    @discardableResult
    func put(key: Data, value: Data, lease: Int64) throws -> Int64 {
        let previous = try latestRow(key)
        var kv = Mvccpb_KeyValue()
        kv.key = key
        kv.value = value
        kv.lease = lease
        kv.modRevision = writeRevision
        kv.createRevision = previous?.createRevision ?? writeRevision
        kv.version = (previous?.version ?? 0) + 1
        let id = try insert(kv, tombstone: false)
        let upsert = try connection.prepared("INSERT INTO latest(key, id) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET id = excluded.id")
        upsert.bind(1, key)
        upsert.bind(2, id)
        try upsert.run()
        var event = Mvccpb_Event()
        event.type = .put
        event.kv = kv
        if let previous { event.prevKv = previous }
        events.append(event)
        return writeRevision
    }

    /// Deletes every live key in `range`; returns the deleted key-values.
    func deleteRange(_ range: KeyRange) throws -> [Mvccpb_KeyValue] {
        let existing = try RangeQuery.read(connection, range: range, revision: readRevision, atLatest: true, limit: 0, countOnly: false)
        guard !existing.kvs.isEmpty else { return [] }
        for previous in existing.kvs {
            var tombstone = Mvccpb_KeyValue()
            tombstone.key = previous.key
            tombstone.modRevision = writeRevision
            _ = try insert(tombstone, tombstone: true)
            var event = Mvccpb_Event()
            event.type = .delete
            event.kv = tombstone
            event.prevKv = previous
            events.append(event)
        }
        try RangeQuery.deleteLatest(connection, range: range)
        return existing.kvs
    }

    private func latestRow(_ key: Data) throws -> Mvccpb_KeyValue? {
        try RangeQuery.read(connection, range: .single(key), revision: readRevision, atLatest: true, limit: 1, countOnly: false).kvs.first
    }

    private func insert(_ kv: Mvccpb_KeyValue, tombstone: Bool) throws -> Int64 {
        let id = try RevisionID.make(revision: kv.modRevision, sub: Int64(events.count))
        let statement = try connection.prepared(
            "INSERT INTO revs(id, key, mod_rev, sub, create_rev, version, lease, value, tombstone) VALUES (?9, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)")
        statement.bind(9, id)
        statement.bind(1, kv.key)
        statement.bind(2, kv.modRevision)
        statement.bind(3, Int64(events.count))
        statement.bind(4, kv.createRevision)
        statement.bind(5, kv.version)
        statement.bind(6, kv.lease)
        statement.bind(7, kv.value)
        statement.bind(8, tombstone ? 1 : 0)
        try statement.run()
        return id
    }
}

/// The rowid of a stored revision: the main revision in the high bits, the position of the change
/// within its revision (sub-revision) in the low 24.
enum RevisionID {
    static let subBits: Int64 = 24

    static func make(revision: Int64, sub: Int64) throws -> Int64 {
        guard sub < 1 << subBits else {
            throw EtcdError(.invalidArgument, "etcdserver: too many keys changed in one revision")
        }
        return revision << subBits | sub
    }

    /// The first rowid of `revision`.
    static func first(of revision: Int64) -> Int64 { revision << subBits }
}
