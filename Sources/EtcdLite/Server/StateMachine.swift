import Foundation
import EtcdLiteProto

/// Applies log entries to the store: the replicated state machine. Used only by the apply loop's
/// thread. `state` is written in the same SQLite transaction as the changes of each batch.
final class StateMachine {
    let backend: Backend
    var state: StoreState
    var applier = Applier()
    /// Active alarms, mirrored from the `alarms` table.
    private(set) var alarms: [Etcdserverpb_AlarmMember] = []
    /// Which leases exist (mirrored from the `leases` table) and their clocks.
    let lessor: Lessor
    /// The cluster's members, mirrored from the `members` tables.
    private(set) var membership: Membership
    /// Events of the writes applied since the last `takeEvents()`, in revision order.
    private var events: [Mvccpb_Event] = []
    /// Users, roles and the auth flag, mirrored from the auth tables and published to `authBox`.
    var auth: AuthState
    let authBox: AuthBox
    /// This member's simple tokens: made when an Authenticate entry is applied.
    let tokens: SimpleTokens

    init(backend: Backend, lessor: Lessor, authBox: AuthBox = AuthBox(), tokens: SimpleTokens = SimpleTokens(ttl: .seconds(300))) throws {
        self.backend = backend
        self.lessor = lessor
        self.authBox = authBox
        self.tokens = tokens
        state = try StoreState.load(backend.writer)
        membership = try Membership.load(backend.writer)
        auth = try AuthTables.load(backend.writer)
        authBox.publish(auth)
        applier.leaseExists = { lessor.contains($0) }
        try loadLeasesAndAlarms()
    }

    /// Mirrors the `leases` and `alarms` tables in memory.
    private func loadLeasesAndAlarms() throws {
        var granted: [Int64: Int64] = [:]
        let leases = try backend.writer.prepared("SELECT id, ttl FROM leases")
        while try leases.step() { granted[leases.int64(0)] = leases.int64(1) }
        leases.reset()
        lessor.replaceAll(granted)
        alarms = []
        let statement = try backend.writer.prepared("SELECT member_id, alarm FROM alarms ORDER BY member_id, alarm")
        while try statement.step() {
            var alarm = Etcdserverpb_AlarmMember()
            alarm.memberID = UInt64(bitPattern: statement.int64(0))
            alarm.alarm = Etcdserverpb_AlarmType(rawValue: Int(statement.int64(1))) ?? .none
            alarms.append(alarm)
        }
        statement.reset()
    }

    /// The replicated tables: what a snapshot of the store carries (not `member_meta`, which is
    /// this member's own).
    static let replicatedTables = ["revs", "latest", "store_state", "alarms", "leases", "members", "members_removed",
                                          "auth_users", "auth_roles", "auth_meta"]

    /// Replaces the replicated state with the image at `path` (a copy of the leader's store) in one
    /// transaction, made durable before it returns: the caller records the snapshot in the Raft
    /// log only afterwards, so a crash in between leaves the old state or the new one, whole.
    func install(imageAt path: String, minimumAppliedIndex: UInt64) throws {
        let writer = backend.writer
        let attach = try writer.prepared("ATTACH DATABASE ?1 AS image")
        attach.bind(1, path)
        try attach.run()
        defer { try? writer.execute("DETACH DATABASE image") }
        // SQLite's own check of the image's pages and indexes (the checksums matched what the
        // leader read; this catches an image that was bad there already).
        let check = try writer.prepared("PRAGMA image.quick_check(1)")
        let verdict = try check.step() ? check.text(0) : "no answer"
        check.reset()
        guard verdict == "ok" else {
            let page = verdict.firstMatch(of: /[Pp]age (\d+)/).flatMap { Int($0.1) }
            let pageSize = try writer.prepared("PRAGMA image.page_size")
            let size = try pageSize.step() ? Int(pageSize.int64(0)) : 4096
            pageSize.reset()
            throw SnapshotCorruptionError(file: path, offset: page.map { ($0 - 1) * size } ?? 0, reason: "SQLite quick_check: \(verdict)")
        }
        // An image older than the snapshot it came with would move the store backwards.
        let applied = try writer.prepared("SELECT applied_index FROM image.store_state WHERE id = 1")
        let imageApplied = try applied.step() ? UInt64(applied.int64(0)) : 0
        applied.reset()
        guard imageApplied >= minimumAppliedIndex else {
            throw SQLiteError(code: 0, message: "snapshot image at applied index \(imageApplied) is older than the snapshot (\(minimumAppliedIndex))")
        }
        try writer.execute("BEGIN IMMEDIATE")
        do {
            for table in Self.replicatedTables {
                try writer.execute("DELETE FROM main.\(table)")
                try writer.execute("INSERT INTO main.\(table) SELECT * FROM image.\(table)")
            }
            try writer.execute("COMMIT")
        } catch {
            try? writer.execute("ROLLBACK")
            throw error
        }
        try backend.syncCommitted()
        state = try StoreState.load(writer)
        membership = try Membership.load(writer)
        try loadLeasesAndAlarms()
        auth = try AuthTables.load(writer)
        authBox.publish(auth)
        tokens.removeAll()
        events.removeAll()
    }

    var noSpace: Bool { alarms.contains { $0.alarm == .nospace } }

    func begin() throws { try backend.writer.prepared("BEGIN IMMEDIATE").run() }

    func commit() throws {
        try state.save(backend.writer)
        try backend.writer.prepared("COMMIT").run()
    }

    /// Applies one entry. Errors that belong to the client come back as a failure; SQLite errors
    /// are thrown (the member cannot go on).
    func apply(_ request: InternalRequest, index: UInt64) throws -> Result<InternalResponse, EtcdError> {
        defer { state.appliedIndex = index }
        do {
            return .success(try applyRequest(request, sender: nil, index: index))
        } catch let error as EtcdError {
            return .failure(error)
        }
    }

    /// `sender`: who proposed a client's request while auth was on. While auth is on, a client's
    /// write without one was sent before auth was turned on and has no user (etcd: "user name is
    /// empty"); entries the members make themselves (a lease's expiry, an alarm, a member's
    /// attributes) are not checked.
    private func applyRequest(_ request: InternalRequest, sender: AuthInfo?, index: UInt64) throws -> InternalResponse {
        switch request {
        case .authorized(let info, let inner):
            return try applyRequest(inner, sender: info, index: index)
        case .auth(let r):
            return .auth(try applyAuth(r, by: sender ?? .anonymous, index: index))
        case .put(let r):
            if auth.enabled { try checkPut(r, sender ?? .anonymous) }
            if noSpace { throw EtcdError.noSpace }
            // A put checks everything before it writes; it needs no savepoint.
            return .put(try write(savepoint: false) { try applier.put(r, $0) })
        case .deleteRange(let r):
            if auth.enabled { try auth.checkDelete(r, sender ?? .anonymous) }
            return .deleteRange(try write { try applier.deleteRange(r, $0) })
        case .txn(let r):
            if auth.enabled { try checkTxn(r, sender ?? .anonymous) }
            if noSpace && RequestValidation.hasPuts(r) { throw EtcdError.noSpace }
            return .txn(try write { try applier.txn(r, $0) })
        case .compaction(let r):
            try compact(to: r.revision)
            var response = Etcdserverpb_CompactionResponse()
            response.header.revision = state.currentRevision
            return .compaction(response)
        case .alarm(let r):
            return .alarm(try alarm(r))
        case .leaseGrant(let r):
            if noSpace { throw EtcdError.noSpace }
            return .leaseGrant(try grant(r))
        case .leaseRevoke(let r):
            if auth.enabled, let sender { try checkLeaseKeys(r.id, sender, .write) }
            return .leaseRevoke(try revoke(r))
        case .memberAttributes(let m):
            try membership.change(m.id, backend.writer) { member in
                member.name = m.name
                member.clientUrls = m.clientUrls
            }
            return .memberAttributes
        case .memberUpdate(let m):
            guard membership[m.id] != nil else { throw EtcdError.memberNotFound }
            if membership.peerURLsInUse(m.peerUrls, except: m.id) { throw EtcdError.peerURLExists }
            try membership.change(m.id, backend.writer) { $0.peerUrls = m.peerUrls }
            return .membership(member: membership[m.id]!, members: membership.sorted)
        case .memberAdd, .memberRemove, .memberPromote:
            // These travel only as configuration changes (`applyMembershipChange`).
            throw EtcdError(.internal, "etcdserver: membership change outside a configuration change")
        case .leaseRenew(let r):
            var response = Etcdserverpb_LeaseKeepAliveResponse()
            response.id = r.id
            response.ttl = lessor.renew(r.id) ?? 0
            return .leaseRenew(response)
        }
    }

    /// Records a membership change that Raft accepted (the caller checked it against the Raft
    /// configuration), at log index `index`.
    func applyMembershipChange(_ request: InternalRequest, index: UInt64) throws -> Result<InternalResponse, EtcdError> {
        defer { state.appliedIndex = index }
        let id: UInt64
        switch request {
        case .memberAdd(let m):
            try membership.add(m, backend.writer)
            id = m.id
        case .memberRemove(let m):
            let gone = membership[m.id] ?? m
            try membership.remove(m.id, backend.writer)
            return .success(.membership(member: gone, members: membership.sorted))
        case .memberPromote(let m):
            try membership.change(m.id, backend.writer) { $0.isLearner = false }
            id = m.id
        default:
            return .failure(EtcdError(.internal, "etcdserver: not a membership change"))
        }
        return .success(.membership(member: membership[id] ?? Etcdserverpb_Member(), members: membership.sorted))
    }

    /// Runs one write request, inside a savepoint unless it cannot fail part-way: a request that
    /// fails leaves nothing.
    private func write<T>(savepoint: Bool = true, _ body: (WriteTxn) throws -> T) throws -> T {
        let writer = backend.writer
        guard savepoint else {
            let txn = WriteTxn(connection: writer, state: state)
            let result = try body(txn)
            finish(txn)
            return result
        }
        try writer.prepared("SAVEPOINT request").run()
        let txn = WriteTxn(connection: writer, state: state)
        do {
            let result = try body(txn)
            try writer.prepared("RELEASE request").run()
            finish(txn)
            return result
        } catch {
            try writer.prepared("ROLLBACK TO request").run()
            try writer.prepared("RELEASE request").run()
            throw error
        }
    }

    private func finish(_ txn: WriteTxn) {
        guard txn.changed else { return }
        state.currentRevision = txn.writeRevision
        events += txn.events
    }

    /// The events applied since the last call (for watchers, after the batch commits).
    func takeEvents() -> [Mvccpb_Event] {
        defer { events.removeAll(keepingCapacity: true) }
        return events
    }

    // MARK: - Leases

    private func grant(_ request: Etcdserverpb_LeaseGrantRequest) throws -> Etcdserverpb_LeaseGrantResponse {
        if lessor.contains(request.id) { throw EtcdError.leaseExists }
        let insert = try backend.writer.prepared("INSERT INTO leases(id, ttl) VALUES (?1, ?2)")
        insert.bind(1, request.id)
        insert.bind(2, request.ttl)
        try insert.run()
        lessor.granted(request.id, ttl: request.ttl)
        var response = Etcdserverpb_LeaseGrantResponse()
        response.id = request.id
        response.ttl = request.ttl
        response.header.revision = state.currentRevision
        return response
    }

    /// Deletes the lease's keys in one revision (DELETE events with their previous values), then
    /// the lease.
    private func revoke(_ request: Etcdserverpb_LeaseRevokeRequest) throws -> Etcdserverpb_LeaseRevokeResponse {
        guard lessor.contains(request.id) else { throw EtcdError.leaseNotFound }
        let keys = try Self.attachedKeys(request.id, backend.writer)
        if !keys.isEmpty {
            try write { txn in
                for key in keys { _ = try txn.deleteRange(.single(key)) }
            }
        }
        let delete = try backend.writer.prepared("DELETE FROM leases WHERE id = ?1")
        delete.bind(1, request.id)
        try delete.run()
        lessor.revoked(request.id)
        var response = Etcdserverpb_LeaseRevokeResponse()
        response.header.revision = state.currentRevision
        return response
    }

    /// `lease != 0` lets SQLite use the partial index `revs_by_lease` (a bound parameter alone
    /// does not prove the index's condition; without it every revoke scanned all of `revs`).
    static let attachedKeysSQL =
        "SELECT r.key FROM revs r JOIN latest l ON l.key = r.key AND l.id = r.id WHERE r.lease = ?1 AND r.lease != 0 ORDER BY r.key"

    /// The live keys attached to lease `id`, in key order.
    static func attachedKeys(_ id: Int64, _ connection: SQLiteConnection) throws -> [Data] {
        let statement = try connection.prepared(attachedKeysSQL)
        statement.bind(1, id)
        defer { statement.reset() }
        var keys: [Data] = []
        while try statement.step() { keys.append(statement.data(0)) }
        return keys
    }

    /// Drops every revision that no read at or after `revision` can see.
    func compact(to revision: Int64) throws {
        if revision <= state.compactRevision { throw EtcdError.compacted }
        if revision > state.currentRevision { throw EtcdError.futureRevision }
        let superseded = try backend.writer.prepared("""
            DELETE FROM revs WHERE id IN (
              SELECT o.id FROM revs n JOIN revs o ON o.key = n.key AND o.mod_rev < n.mod_rev
              WHERE n.mod_rev > ?1 AND n.mod_rev <= ?2)
            """)
        superseded.bind(1, state.compactRevision)
        superseded.bind(2, revision)
        try superseded.run()
        // What is left at or below the compaction point is the newest version of each key; a
        // tombstone there means the key did not exist at that revision.
        let tombstones = try backend.writer.prepared("DELETE FROM revs WHERE mod_rev > ?1 AND mod_rev <= ?2 AND tombstone = 1")
        tombstones.bind(1, state.compactRevision)
        tombstones.bind(2, revision)
        try tombstones.run()
        state.compactRevision = revision
    }

    private func alarm(_ request: Etcdserverpb_AlarmRequest) throws -> Etcdserverpb_AlarmResponse {
        var response = Etcdserverpb_AlarmResponse()
        var member = Etcdserverpb_AlarmMember()
        member.memberID = request.memberID
        member.alarm = request.alarm
        switch request.action {
        case .activate:
            guard request.alarm != .none else { break }
            if !alarms.contains(member) {
                let insert = try backend.writer.prepared("INSERT OR IGNORE INTO alarms VALUES (?1, ?2)")
                insert.bind(1, Int64(bitPattern: member.memberID))
                insert.bind(2, Int64(member.alarm.rawValue))
                try insert.run()
                alarms.append(member)
            }
            response.alarms = [member]
        case .deactivate:
            guard alarms.contains(member) else { break }
            let delete = try backend.writer.prepared("DELETE FROM alarms WHERE member_id = ?1 AND alarm = ?2")
            delete.bind(1, Int64(bitPattern: member.memberID))
            delete.bind(2, Int64(member.alarm.rawValue))
            try delete.run()
            alarms.removeAll { $0 == member }
            response.alarms = [member]
        case .get, .UNRECOGNIZED:
            response.alarms = alarms
        }
        return response
    }
}
