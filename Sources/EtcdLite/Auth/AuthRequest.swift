import EtcdLiteProto
import Foundation
import SwiftProtobuf
import Synchronization

/// A change of the auth state, as one log entry carries it. Passwords travel only as hashes (the
/// member that took the request hashed them).
enum AuthRequest: Sendable {
    case enable
    case disable
    /// A password checked by the proposing member at auth revision `checkedRevision`; applying it
    /// makes the token `<tokenPrefix>.<log index>` on every member.
    case authenticate(name: String, tokenPrefix: String, checkedRevision: UInt64)
    case userAdd(Etcdserverpb_AuthUserAddRequest)
    case userDelete(Etcdserverpb_AuthUserDeleteRequest)
    case userChangePassword(Etcdserverpb_AuthUserChangePasswordRequest)
    case userGrantRole(Etcdserverpb_AuthUserGrantRoleRequest)
    case userRevokeRole(Etcdserverpb_AuthUserRevokeRoleRequest)
    case roleAdd(Etcdserverpb_AuthRoleAddRequest)
    case roleDelete(Etcdserverpb_AuthRoleDeleteRequest)
    case roleGrantPermission(Etcdserverpb_AuthRoleGrantPermissionRequest)
    case roleRevokePermission(Etcdserverpb_AuthRoleRevokePermissionRequest)

    /// A sub-tag byte, then the request's protobuf encoding (for `authenticate`: the revision,
    /// then an AuthenticateRequest whose password field holds the prefix).
    func encoded() throws -> [UInt8] {
        switch self {
        case .enable: return [1]
        case .disable: return [2]
        case .authenticate(let name, let prefix, let revision):
            var request = Etcdserverpb_AuthenticateRequest()
            request.name = name
            request.password = prefix
            var w = ByteWriter()
            w.u8(3)
            w.u64(revision)
            w.bytes += try request.serializedBytes()
            return w.bytes
        case .userAdd(let r): return [4] + (try r.serializedBytes())
        case .userDelete(let r): return [5] + (try r.serializedBytes())
        case .userChangePassword(let r): return [6] + (try r.serializedBytes())
        case .userGrantRole(let r): return [7] + (try r.serializedBytes())
        case .userRevokeRole(let r): return [8] + (try r.serializedBytes())
        case .roleAdd(let r): return [9] + (try r.serializedBytes())
        case .roleDelete(let r): return [10] + (try r.serializedBytes())
        case .roleGrantPermission(let r): return [11] + (try r.serializedBytes())
        case .roleRevokePermission(let r): return [12] + (try r.serializedBytes())
        }
    }

    init(encoded bytes: ArraySlice<UInt8>) throws {
        guard let tag = bytes.first else { throw EntryDecodingError(message: "empty auth entry") }
        let body = bytes.dropFirst()
        switch tag {
        case 1: self = .enable
        case 2: self = .disable
        case 3:
            var reader = ByteReader(Array(body))
            guard let revision = try? reader.u64() else { throw EntryDecodingError(message: "short authenticate entry") }
            let request = try Etcdserverpb_AuthenticateRequest(serializedBytes: reader.rest())
            self = .authenticate(name: request.name, tokenPrefix: request.password, checkedRevision: revision)
        case 4: self = .userAdd(try .init(serializedBytes: body))
        case 5: self = .userDelete(try .init(serializedBytes: body))
        case 6: self = .userChangePassword(try .init(serializedBytes: body))
        case 7: self = .userGrantRole(try .init(serializedBytes: body))
        case 8: self = .userRevokeRole(try .init(serializedBytes: body))
        case 9: self = .roleAdd(try .init(serializedBytes: body))
        case 10: self = .roleDelete(try .init(serializedBytes: body))
        case 11: self = .roleGrantPermission(try .init(serializedBytes: body))
        case 12: self = .roleRevokePermission(try .init(serializedBytes: body))
        default: throw EntryDecodingError(message: "unknown auth entry type \(tag)")
        }
    }
}

/// What applying an auth request gave.
enum AuthAnswer: Sendable {
    case done
    case token(String)
    /// Authenticate: users or roles changed after the password was checked; check again.
    case stale
}

/// The auth tables of the store: encoded users and roles, and the flag and revision.
enum AuthTables {
    static func load(_ connection: SQLiteConnection) throws -> AuthState {
        var users: [Authpb_User] = []
        let userRows = try connection.prepared("SELECT user FROM auth_users")
        while try userRows.step() { users.append(try Authpb_User(serializedBytes: userRows.bytes(0))) }
        userRows.reset()
        var roles: [Authpb_Role] = []
        let roleRows = try connection.prepared("SELECT role FROM auth_roles")
        while try roleRows.step() { roles.append(try Authpb_Role(serializedBytes: roleRows.bytes(0))) }
        roleRows.reset()
        let meta = try connection.prepared("SELECT enabled, revision FROM auth_meta WHERE id = 1")
        defer { meta.reset() }
        let (enabled, revision) = try meta.step() ? (meta.int64(0) != 0, UInt64(meta.int64(1))) : (false, 1)
        return AuthState(enabled: enabled, revision: revision, users: users, roles: roles)
    }

    static func saveMeta(_ state: AuthState, _ connection: SQLiteConnection) throws {
        let statement = try connection.prepared("INSERT OR REPLACE INTO auth_meta(id, enabled, revision) VALUES (1, ?1, ?2)")
        statement.bind(1, Int64(state.enabled ? 1 : 0))
        statement.bind(2, Int64(state.revision))
        try statement.run()
    }

    static func save(user: Authpb_User, _ connection: SQLiteConnection) throws {
        let statement = try connection.prepared("INSERT OR REPLACE INTO auth_users(name, user) VALUES (?1, ?2)")
        statement.bind(1, user.name)
        statement.bind(2, try user.serializedBytes() as [UInt8])
        try statement.run()
    }

    static func save(role: Authpb_Role, _ connection: SQLiteConnection) throws {
        let statement = try connection.prepared("INSERT OR REPLACE INTO auth_roles(name, role) VALUES (?1, ?2)")
        statement.bind(1, role.name)
        statement.bind(2, try role.serializedBytes() as [UInt8])
        try statement.run()
    }

    static func delete(user name: String, _ connection: SQLiteConnection) throws {
        let statement = try connection.prepared("DELETE FROM auth_users WHERE name = ?1")
        statement.bind(1, Data(name.utf8))
        try statement.run()
    }

    static func delete(role name: String, _ connection: SQLiteConnection) throws {
        let statement = try connection.prepared("DELETE FROM auth_roles WHERE name = ?1")
        statement.bind(1, Data(name.utf8))
        try statement.run()
    }
}

/// The auth state request handlers read: published by the apply loop after each change.
final class AuthBox: Sendable {
    private let state: Mutex<AuthState>
    /// Whether auth is on and the auth revision, readable without the lock.
    private let on = Atomic<Bool>(false)
    private let currentRevision = Atomic<UInt64>(1)

    init(_ state: AuthState = AuthState()) {
        self.state = Mutex(state)
        on.store(state.enabled, ordering: .relaxed)
        currentRevision.store(state.revision, ordering: .relaxed)
    }

    var current: AuthState { state.withLock { $0 } }
    var enabled: Bool { on.load(ordering: .acquiring) }
    var revision: UInt64 { currentRevision.load(ordering: .acquiring) }

    func publish(_ new: AuthState) {
        state.withLock { $0 = new }
        currentRevision.store(new.revision, ordering: .releasing)
        on.store(new.enabled, ordering: .releasing)
    }
}

/// etcd's simple tokens: `<16 letters>.<log index>`, known to each member from applying the
/// Authenticate entry, valid for `ttl` after their last use on that member.
final class SimpleTokens: Sendable {
    /// A token's user and when it expires (nanoseconds of the monotonic clock), renewed by each
    /// use without taking the table's lock for writing.
    private final class Entry: Sendable {
        let user: String
        let expiry: Atomic<UInt64>
        init(user: String, expiry: UInt64) {
            self.user = user
            self.expiry = Atomic(expiry)
        }
    }

    private let ttlNanos: UInt64
    private let tokens = Mutex<[String: Entry]>([:])

    init(ttl: Duration) {
        ttlNanos = UInt64(ttl.components.seconds) * 1_000_000_000 + UInt64(ttl.components.attoseconds / 1_000_000_000)
    }

    private static func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds }

    static func randomPrefix() -> String {
        let letters = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
        var generator = SystemRandomNumberGenerator()
        return String((0..<16).map { _ in letters[Int(generator.next(upperBound: UInt(letters.count)))] })
    }

    /// The log index a token names (etcd's format check), or nil when it is not a simple token.
    static func index(of token: String) -> UInt64? {
        let parts = token.split(separator: ".", omittingEmptySubsequences: false)
        guard parts.count == 2 else { return nil }
        return UInt64(parts[1])
    }

    func assign(_ token: String, to user: String) {
        let now = Self.now()
        tokens.withLock { tokens in
            tokens = tokens.filter { $0.value.expiry.load(ordering: .relaxed) > now }
            tokens[token] = Entry(user: user, expiry: now + ttlNanos)
        }
    }

    /// The token's user; a use extends its life on this member.
    func user(of token: String) -> String? {
        let now = Self.now()
        guard let entry = tokens.withLock({ $0[token] }) else { return nil }
        guard entry.expiry.load(ordering: .relaxed) > now else {
            tokens.withLock { tokens in
                if tokens[token]?.expiry.load(ordering: .relaxed) ?? .max <= now { tokens[token] = nil }
            }
            return nil
        }
        entry.expiry.store(now + ttlNanos, ordering: .relaxed)
        return entry.user
    }

    func invalidate(user: String) {
        tokens.withLock { tokens in tokens = tokens.filter { $0.value.user != user } }
    }

    func removeAll() {
        tokens.withLock { $0.removeAll() }
    }
}
