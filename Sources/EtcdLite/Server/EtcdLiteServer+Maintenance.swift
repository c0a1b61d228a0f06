import Crypto
import Foundation
import EtcdLiteProto

extension EtcdLiteServer {
    public func statusResponse() -> Etcdserverpb_StatusResponse {
        let status = self.status
        var response = Etcdserverpb_StatusResponse()
        response.header = header(revision: status.state.currentRevision)
        response.version = Self.apiVersion
        response.dbSize = status.dbSize
        response.dbSizeInUse = status.dbSizeInUse
        response.leader = status.leader
        response.raftIndex = status.logIndex
        response.raftTerm = status.raftTerm
        response.raftAppliedIndex = status.state.appliedIndex
        response.isLearner = status.isLearner
        response.errors = status.alarms.map { "memberID:\($0.memberID) alarm:\(Self.alarmName($0.alarm)) " }
        return response
    }

    static func alarmName(_ alarm: Etcdserverpb_AlarmType) -> String {
        switch alarm {
        case .none: "NONE"
        case .nospace: "NOSPACE"
        case .corrupt: "CORRUPT"
        case .UNRECOGNIZED(let n): "\(n)"
        }
    }

    public func alarm(_ request: Etcdserverpb_AlarmRequest) async throws -> Etcdserverpb_AlarmResponse {
        var response: Etcdserverpb_AlarmResponse
        if request.action == .get {
            response = Etcdserverpb_AlarmResponse()
            response.alarms = status.alarms
        } else {
            guard case .alarm(let applied) = try await propose(.alarm(request)) else {
                throw EtcdError(.internal, "etcdserver: unexpected response type")
            }
            response = applied
        }
        // etcd 3.4 answers alarms without a header.
        response.clearHeader()
        return response
    }

    /// Rewrites the database without free pages (SQLite VACUUM), between apply batches.
    public func defragment() async throws -> Etcdserverpb_DefragmentResponse {
        try await loop.onLoop { machine in
            try machine.backend.writer.execute("VACUUM")
            try machine.backend.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        }
        // etcd 3.4 answers a defragment with an empty message.
        return Etcdserverpb_DefragmentResponse()
    }

    /// A CRC-32C over every stored revision: equal stores give equal hashes.
    public func hash() throws -> Etcdserverpb_HashResponse {
        var response = Etcdserverpb_HashResponse()
        let (hash, revision) = try backend.read { view in
            (try Self.hashRevisions(view.connection, upTo: Int64.max), view.readRevision)
        }
        response.hash = hash
        response.header = header(revision: revision)
        return response
    }

    /// etcd's HashKV: a hash of the key-value history up to `revision` (0 = current).
    public func hashKV(_ request: Etcdserverpb_HashKVRequest) throws -> Etcdserverpb_HashKVResponse {
        try backend.read { view in
            if request.revision > view.readRevision { throw EtcdError.futureRevision }
            let revision = request.revision <= 0 ? view.readRevision : request.revision
            if revision < view.compactRevision { throw EtcdError.compacted }
            var response = Etcdserverpb_HashKVResponse()
            response.hash = try Self.hashRevisions(view.connection, upTo: revision)
            response.compactRevision = view.compactRevision
            response.hashRevision = revision
            response.header = header(revision: view.readRevision)
            return response
        }
    }

    private static func hashRevisions(_ connection: SQLiteConnection, upTo revision: Int64) throws -> UInt32 {
        let statement = try connection.prepared("SELECT key, mod_rev, sub, tombstone, value FROM revs WHERE mod_rev <= ?1 ORDER BY mod_rev, sub")
        statement.bind(1, revision)
        defer { statement.reset() }
        var crc: UInt32 = 0
        while try statement.step() {
            var record = [UInt8](statement.data(0))
            for column: Int32 in 1...3 {
                let value = statement.int64(column)
                for shift in stride(from: 0, to: 64, by: 8) { record.append(UInt8(truncatingIfNeeded: value >> Int64(shift))) }
            }
            record += statement.data(4)
            crc = CRC32C.checksum(record, seed: crc)
        }
        return crc
    }

    /// Writes a consistent copy of the store to a new file and returns its path. The caller
    /// deletes it.
    public func snapshotFile() throws -> URL {
        let url = URL(fileURLWithPath: config.effectiveDataDir).appendingPathComponent("member")
            .appendingPathComponent("snapshot-\(UUID().uuidString).db")
        try backend.copy(to: url.path)
        return url
    }

    /// etcd's snapshot stream: the file in 32 KiB chunks, each with the bytes still to come, then
    /// the SHA-256 of the whole file.
    public func snapshotChunks(_ body: (Etcdserverpb_SnapshotResponse) async throws -> Void) async throws {
        let url = try snapshotFile()
        defer { try? FileManager.default.removeItem(at: url) }
        let handle = try FileHandle(forReadingFrom: url)
        defer { try? handle.close() }
        let total = try handle.seekToEnd()
        try handle.seek(toOffset: 0)
        var sent: UInt64 = 0
        var sha = SHA256()
        // Chunks as etcd 3.4 sends them: remaining bytes and the blob, no header.
        while let chunk = try handle.read(upToCount: 32 * 1024), !chunk.isEmpty {
            sha.update(data: chunk)
            sent += UInt64(chunk.count)
            var response = Etcdserverpb_SnapshotResponse()
            response.remainingBytes = total - sent
            response.blob = chunk
            try await body(response)
        }
        var last = Etcdserverpb_SnapshotResponse()
        last.blob = Data(sha.finalize())
        try await body(last)
    }

    /// etcd's MemberList: every member in ID order; a member added but not started yet has no
    /// name or client URLs. `linearizable` first confirms this member's view with the leader.
    public func memberList(_ request: Etcdserverpb_MemberListRequest = .init()) async throws -> Etcdserverpb_MemberListResponse {
        if request.linearizable && !status.alone { try await loop.linearizableRead() }
        var response = Etcdserverpb_MemberListResponse()
        response.header = header()
        response.members = loop.members.withLock { $0.sorted }
        return response
    }

    /// etcd's MemberAdd: a new member (voter or learner) with a fresh ID; it starts with
    /// `--initial-cluster-state existing`.
    public func memberAdd(_ request: Etcdserverpb_MemberAddRequest) async throws -> Etcdserverpb_MemberAddResponse {
        guard PeerURLs.valid(request.peerUrls) else { throw EtcdError.memberBadURLs }
        var member = Etcdserverpb_Member()
        // As etcd: from the peer URLs and the Unix time in seconds, so re-adding the same URLs later
        // gives a new ID (within the same second, `member ID already exist`).
        member.id = ClusterIdentity.memberID(peerURLs: request.peerUrls, token: String(Int64(Date().timeIntervalSince1970)))
        member.peerUrls = request.peerUrls
        member.isLearner = request.isLearner
        let (added, members) = try await changeMembership(.memberAdd(member))
        var response = Etcdserverpb_MemberAddResponse()
        response.header = header()
        response.member = added
        response.members = members
        return response
    }

    public func memberRemove(_ request: Etcdserverpb_MemberRemoveRequest) async throws -> Etcdserverpb_MemberRemoveResponse {
        var response = Etcdserverpb_MemberRemoveResponse()
        response.members = try await changeMembership(.memberRemove(Self.member(request.id))).members
        response.header = header()
        return response
    }

    public func memberPromote(_ request: Etcdserverpb_MemberPromoteRequest) async throws -> Etcdserverpb_MemberPromoteResponse {
        var response = Etcdserverpb_MemberPromoteResponse()
        response.members = try await changeMembership(.memberPromote(Self.member(request.id))).members
        response.header = header()
        return response
    }

    private static func member(_ id: UInt64) -> Etcdserverpb_Member {
        var member = Etcdserverpb_Member()
        member.id = id
        return member
    }

    /// etcd's MemberUpdate: new peer URLs for a member (a normal entry: Raft's membership is
    /// unchanged).
    public func memberUpdate(_ request: Etcdserverpb_MemberUpdateRequest) async throws -> Etcdserverpb_MemberUpdateResponse {
        guard PeerURLs.valid(request.peerUrls) else { throw EtcdError.memberBadURLs }
        var member = Etcdserverpb_Member()
        member.id = request.id
        member.peerUrls = request.peerUrls
        guard case .membership(_, let members) = try await propose(.memberUpdate(member)) else { throw unexpected() }
        var response = Etcdserverpb_MemberUpdateResponse()
        response.header = header()
        response.members = members
        return response
    }

    private func changeMembership(_ request: InternalRequest) async throws -> (member: Etcdserverpb_Member, members: [Etcdserverpb_Member]) {
        guard case .membership(let member, let members) = try await loop.changeMembership(request).get() else { throw unexpected() }
        return (member, members)
    }

    /// Publishes this member's name and client URLs through the log once a leader is known (etcd
    /// does so on every start), so that every member's MemberList shows them. Nothing to publish
    /// when the membership already shows them.
    func publishAttributes() async {
        while !Task.isCancelled {
            let mine = selfMember()
            let recorded = loop.members.withLock { $0[memberID] }
            if let recorded, recorded.name == mine.name, recorded.clientUrls == mine.clientUrls { return }
            if hasLeader, recorded != nil, (try? await propose(.memberAttributes(mine))) != nil { return }
            try? await Task.sleep(for: .milliseconds(200))
        }
    }

    func selfMember() -> Etcdserverpb_Member {
        var member = Etcdserverpb_Member()
        member.id = memberID
        member.name = config.name
        member.peerUrls = config.initialAdvertisePeerURLs
        member.clientUrls = config.advertiseClientURLs
        return member
    }
}
