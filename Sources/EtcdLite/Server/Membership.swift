import EtcdLiteProto
import Foundation

/// The cluster's members as the applied log made them (etcd's `members` and `members_removed`
/// buckets): ID, peer URLs, learner flag, and the name and client URLs each member publishes when
/// it starts. Kept in SQLite beside the data and changed in the apply transaction, so it travels
/// with the store (and with a snapshot of it).
struct Membership: Sendable, Equatable {
    private(set) var members: [UInt64: Etcdserverpb_Member] = [:]
    /// Members removed from the cluster: their IDs are never used again.
    private(set) var removed: Set<UInt64> = []

    static func load(_ connection: SQLiteConnection) throws -> Membership {
        var membership = Membership()
        let members = try connection.prepared("SELECT member FROM members")
        while try members.step() {
            let member = try Etcdserverpb_Member(serializedBytes: Array(members.data(0)))
            membership.members[member.id] = member
        }
        members.reset()
        let removed = try connection.prepared("SELECT id FROM members_removed")
        while try removed.step() { membership.removed.insert(UInt64(bitPattern: removed.int64(0))) }
        removed.reset()
        return membership
    }

    /// Members in ID order (etcd lists them so).
    var sorted: [Etcdserverpb_Member] { members.values.sorted { $0.id < $1.id } }

    var voters: [Etcdserverpb_Member] { sorted.filter { !$0.isLearner } }
    var learners: [Etcdserverpb_Member] { sorted.filter(\.isLearner) }

    subscript(id: UInt64) -> Etcdserverpb_Member? { members[id] }

    /// A member has started once it published its name (etcd's `IsStarted`).
    static func isStarted(_ member: Etcdserverpb_Member) -> Bool { !member.name.isEmpty }

    /// The member whose peer URLs are `urls` (in any order), if any.
    func member(withPeerURLs urls: [String]) -> Etcdserverpb_Member? {
        members.values.first { $0.peerUrls.sorted() == urls.sorted() }
    }

    /// Whether another member than `id` already uses one of `urls`.
    func peerURLsInUse(_ urls: [String], except id: UInt64 = 0) -> Bool {
        members.values.contains { $0.id != id && !Set($0.peerUrls).isDisjoint(with: urls) }
    }

    // MARK: - Changes (inside the apply transaction)

    mutating func add(_ member: Etcdserverpb_Member, _ connection: SQLiteConnection) throws {
        members[member.id] = member
        try save(member, connection)
    }

    mutating func remove(_ id: UInt64, _ connection: SQLiteConnection) throws {
        members[id] = nil
        removed.insert(id)
        let delete = try connection.prepared("DELETE FROM members WHERE id = ?1")
        delete.bind(1, Int64(bitPattern: id))
        try delete.run()
        let insert = try connection.prepared("INSERT OR IGNORE INTO members_removed(id) VALUES (?1)")
        insert.bind(1, Int64(bitPattern: id))
        try insert.run()
    }

    mutating func change(_ id: UInt64, _ connection: SQLiteConnection, _ body: (inout Etcdserverpb_Member) -> Void) throws {
        guard var member = members[id] else { return }
        body(&member)
        members[id] = member
        try save(member, connection)
    }

    private func save(_ member: Etcdserverpb_Member, _ connection: SQLiteConnection) throws {
        let statement = try connection.prepared("INSERT OR REPLACE INTO members(id, member) VALUES (?1, ?2)")
        statement.bind(1, Int64(bitPattern: member.id))
        statement.bind(2, try member.serializedBytes() as [UInt8])
        try statement.run()
    }
}

/// etcd's peer URL rules (`types.NewURLs`): http, https, unix or unixs, a host with a port, no path.
enum PeerURLs {
    static func valid(_ urls: [String]) -> Bool {
        guard !urls.isEmpty else { return false }
        return urls.allSatisfy { text in
            guard let url = URLComponents(string: text), let scheme = url.scheme,
                  ["http", "https", "unix", "unixs"].contains(scheme),
                  let host = url.host, !host.isEmpty, url.port != nil,
                  url.path.isEmpty else { return false }
            return true
        }
    }
}
