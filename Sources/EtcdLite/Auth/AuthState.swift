import EtcdLiteProto
import Foundation

/// A key interval a permission covers: `[start, end)`, `end == nil` meaning no upper bound.
struct KeyInterval: Sendable, Equatable {
    var start: [UInt8]
    var end: [UInt8]?

    /// etcd's reading of a (key, range_end) pair: an empty end is the key alone, `"\0"` every key
    /// from `key` on.
    init(key: [UInt8], rangeEnd: [UInt8]) {
        start = key
        if rangeEnd.isEmpty {
            end = key + [0]
        } else if rangeEnd == [0] {
            end = nil
        } else {
            end = rangeEnd
        }
    }
}

/// One kind of access (READ or WRITE) of a user: the union of the intervals of all their roles,
/// merged so that overlapping and adjacent intervals are one. A request is allowed when one merged
/// interval covers the whole range it touches (etcd's contiguity rule).
struct IntervalSet: Sendable, Equatable {
    private(set) var intervals: [KeyInterval] = []

    init(_ intervals: [KeyInterval]) {
        var merged: [KeyInterval] = []
        for interval in intervals.sorted(by: { $0.start.lexicographicallyPrecedes($1.start) }) {
            // Overlapping or touching the last one (`interval.start <= last.end`): one interval.
            if let last = merged.last, last.end.map({ !$0.lexicographicallyPrecedes(interval.start) }) ?? true {
                merged[merged.count - 1].end = Self.later(last.end, interval.end)
            } else {
                merged.append(interval)
            }
        }
        self.intervals = merged
    }

    /// The later of two ends (nil: no end).
    private static func later(_ a: [UInt8]?, _ b: [UInt8]?) -> [UInt8]? {
        guard let a, let b else { return nil }
        return a.lexicographicallyPrecedes(b) ? b : a
    }

    /// The last merged interval starting at or before `key`: the only one that can contain it.
    private func candidate<Key: Collection<UInt8>>(for key: Key) -> KeyInterval? {
        var low = 0
        var high = intervals.count
        while low < high {
            let mid = (low + high) / 2
            if key.lexicographicallyPrecedes(intervals[mid].start) { high = mid } else { low = mid + 1 }
        }
        return low > 0 ? intervals[low - 1] : nil
    }

    /// Whether one merged interval contains `key` (the request `[key, key+"\0")`): no copies of
    /// the key, for the common single-key request.
    func contains<Key: Collection<UInt8>>(_ key: Key) -> Bool {
        guard let candidate = candidate(for: key) else { return false }
        guard let end = candidate.end else { return true }
        return key.lexicographicallyPrecedes(end)
    }

    /// Whether one merged interval contains all of `request`.
    func covers(_ request: KeyInterval) -> Bool {
        guard let candidate = candidate(for: request.start) else { return false }
        guard let candidateEnd = candidate.end else { return true }
        guard let requestEnd = request.end else { return false }
        // The start must lie inside, and the end must not pass the interval's.
        return request.start.lexicographicallyPrecedes(candidateEnd) && !candidateEnd.lexicographicallyPrecedes(requestEnd)
    }
}

/// What a user may do: everything (role root), or the merged READ and WRITE intervals.
struct UserPermissions: Sendable {
    var isRoot: Bool
    var read: IntervalSet
    var write: IntervalSet
}

enum AccessKind: Sendable {
    case read, write
}

/// Who a request comes from, as the API layer found it: the user and the auth revision at that
/// moment. An empty name (revision 0) is a request without credentials.
struct AuthInfo: Sendable, Equatable {
    var user: String
    var revision: UInt64

    static let anonymous = AuthInfo(user: "", revision: 0)
    /// A request the member itself, or the program it is embedded in, makes: never refused.
    static let `internal` = AuthInfo(user: "", revision: .max)
    var isInternal: Bool { self == .internal }
}

/// The replicated auth state (etcd's auth store): users, roles, whether auth is on, and the auth
/// revision, which grows with every change of users or roles. A value: the apply loop makes a new
/// one per change and publishes it to request handlers.
struct AuthState: Sendable {
    var enabled = false
    var revision: UInt64 = 1
    private(set) var users: [String: Authpb_User] = [:]
    private(set) var roles: [String: Authpb_Role] = [:]
    /// Each user's merged permissions, rebuilt whenever users or roles change.
    private(set) var permissions: [String: UserPermissions] = [:]

    init() {}

    init(enabled: Bool, revision: UInt64, users: [Authpb_User], roles: [Authpb_Role]) {
        self.enabled = enabled
        self.revision = revision
        for user in users { self.users[String(decoding: user.name, as: UTF8.self)] = user }
        for role in roles { self.roles[String(decoding: role.name, as: UTF8.self)] = role }
        rebuild()
    }

    mutating func setUser(_ name: String, _ user: Authpb_User?) {
        users[name] = user
        rebuild()
    }

    mutating func setRole(_ name: String, _ role: Authpb_Role?) {
        roles[name] = role
        rebuild()
    }

    private mutating func rebuild() {
        var result: [String: UserPermissions] = [:]
        for (name, user) in users {
            var read: [KeyInterval] = []
            var write: [KeyInterval] = []
            for roleName in user.roles {
                // A role the user holds that does not exist as an object (an implicit root) adds
                // no intervals.
                guard let role = roles[roleName] else { continue }
                for permission in role.keyPermission {
                    let interval = KeyInterval(key: Array(permission.key), rangeEnd: Array(permission.rangeEnd))
                    switch permission.permType {
                    case .read: read.append(interval)
                    case .write: write.append(interval)
                    case .readwrite:
                        read.append(interval)
                        write.append(interval)
                    case .UNRECOGNIZED: break
                    }
                }
            }
            result[name] = UserPermissions(isRoot: user.roles.contains("root"), read: IntervalSet(read), write: IntervalSet(write))
        }
        permissions = result
    }

    /// etcd's IsAdminPermitted: no revision check; an unknown user is "not found".
    func checkAdmin(_ info: AuthInfo) throws(EtcdError) {
        guard enabled, !info.isInternal else { return }
        guard !info.user.isEmpty else { throw .userEmpty }
        guard let permissions = permissions[info.user] else { throw .userNotFound }
        guard permissions.isRoot else { throw .permissionDenied }
    }

    /// etcd's isOpPermitted for the range `[key, rangeEnd)` (rangeEnd as in requests).
    func checkAccess<Key: Collection<UInt8>, End: Collection<UInt8>>(_ info: AuthInfo, _ kind: AccessKind, key: Key, rangeEnd: End) throws(EtcdError) {
        guard enabled, !info.isInternal else { return }
        if !rangeEnd.isEmpty {
            return try checkAccess(info, kind, Self.requestInterval(key: Array(key), rangeEnd: Array(rangeEnd)))
        }
        try checkAccess(info, kind, key: key)
    }

    /// The request for the single key `key`.
    func checkAccess<Key: Collection<UInt8>>(_ info: AuthInfo, _ kind: AccessKind, key: Key) throws(EtcdError) {
        guard enabled, !info.isInternal else { return }
        try checkUser(info) { permissions in
            switch kind {
            case .read: permissions.read.contains(key)
            case .write: permissions.write.contains(key)
            }
        }
    }

    func checkAccess(_ info: AuthInfo, _ kind: AccessKind, _ interval: KeyInterval) throws(EtcdError) {
        guard enabled, !info.isInternal else { return }
        try checkUser(info) { permissions in
            switch kind {
            case .read: permissions.read.covers(interval)
            case .write: permissions.write.covers(interval)
            }
        }
    }

    /// The order of etcd's checks: a user, a current revision, a known user; root may do all.
    private func checkUser(_ info: AuthInfo, _ allowed: (UserPermissions) -> Bool) throws(EtcdError) {
        guard info.revision != 0 else { throw .userEmpty }
        guard info.revision >= revision else { throw .authOldRevision }
        guard let permissions = permissions[info.user] else { throw .permissionDenied }
        if permissions.isRoot { return }
        guard allowed(permissions) else { throw .permissionDenied }
    }

    /// etcd's check of a DeleteRange: READ for `prev_kv`, WRITE on the range.
    func checkDelete(_ delete: Etcdserverpb_DeleteRangeRequest, _ sender: AuthInfo) throws(EtcdError) {
        if delete.prevKv { try checkAccess(sender, .read, key: delete.key, rangeEnd: delete.rangeEnd) }
        try checkAccess(sender, .write, key: delete.key, rangeEnd: delete.rangeEnd)
    }

    /// etcd's checkTxnAuth: every compare, and the ops of both branches whichever runs, nested
    /// txns included. `checkPut` checks a put (its lease's keys are the store's business).
    func checkTxn(_ txn: Etcdserverpb_TxnRequest, _ sender: AuthInfo,
                  checkPut: (Etcdserverpb_PutRequest) throws(EtcdError) -> Void) throws(EtcdError) {
        for compare in txn.compare { try checkAccess(sender, .read, key: compare.key, rangeEnd: compare.rangeEnd) }
        for op in txn.success + txn.failure {
            switch op.request {
            case .requestRange(let range): try checkAccess(sender, .read, key: range.key, rangeEnd: range.rangeEnd)
            case .requestPut(let put): try checkPut(put)
            case .requestDeleteRange(let delete): try checkDelete(delete, sender)
            case .requestTxn(let nested): try checkTxn(nested, sender, checkPut: checkPut)
            case nil: break
            }
        }
    }

    /// A request's key range as permissions see it: a range end before the key (which reads
    /// nothing) is checked as the key alone.
    static func requestInterval(key: [UInt8], rangeEnd: [UInt8]) -> KeyInterval {
        if !rangeEnd.isEmpty && rangeEnd != [0] && !key.lexicographicallyPrecedes(rangeEnd) {
            return KeyInterval(key: key, rangeEnd: [])
        }
        return KeyInterval(key: key, rangeEnd: rangeEnd)
    }

    /// Names in etcd's order (Go compares strings byte by byte).
    static func byteOrder(_ a: String, _ b: String) -> Bool { a.utf8.lexicographicallyPrecedes(b.utf8) }

    /// etcd 3.4.25's rule for a granted range: a key, and no end, an end after the key, or "\0".
    static func isValidPermissionRange(key: [UInt8], rangeEnd: [UInt8]) -> Bool {
        if key.isEmpty { return false }
        if rangeEnd.isEmpty || rangeEnd == [0] { return true }
        return key.lexicographicallyPrecedes(rangeEnd)
    }
}
