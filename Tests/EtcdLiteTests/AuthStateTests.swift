@testable import EtcdLite
import EtcdLiteProto
import Foundation
import Testing

/// The permission rules (etcd's range_perm_cache and interval tree) as pure logic.
struct AuthStateTests {
    static func permission(_ type: Authpb_Permission.TypeEnum, _ key: String, _ end: String = "") -> Authpb_Permission {
        var permission = Authpb_Permission()
        permission.permType = type
        permission.key = Data(key.utf8)
        permission.rangeEnd = end == "\0" ? Data([0]) : Data(end.utf8)
        return permission
    }

    static func state(_ permissions: [Authpb_Permission], roles: [String] = ["r"]) -> AuthState {
        var role = Authpb_Role()
        role.name = Data("r".utf8)
        role.keyPermission = permissions
        var user = Authpb_User()
        user.name = Data("u".utf8)
        user.roles = roles
        return AuthState(enabled: true, revision: 5, users: [user], roles: [role])
    }

    static func allowed(_ state: AuthState, _ kind: AccessKind, _ key: String, _ end: String = "") -> Bool {
        let rangeEnd: [UInt8] = end == "\0" ? [0] : Array(end.utf8)
        return (try? state.checkAccess(AuthInfo(user: "u", revision: 5), kind, key: Array(key.utf8), rangeEnd: rangeEnd)) != nil
    }

    @Test func aRangeMustBeCoveredByOneMergedInterval() {
        let state = Self.state([Self.permission(.read, "a", "c")])
        #expect(Self.allowed(state, .read, "a", "c"))
        #expect(Self.allowed(state, .read, "b", "c"))
        #expect(Self.allowed(state, .read, "b"))
        #expect(!Self.allowed(state, .read, "a", "d"))
        #expect(!Self.allowed(state, .read, "a", "\0"))
        #expect(!Self.allowed(state, .read, "c"))
        #expect(!Self.allowed(state, .write, "a"))
        // Adjacent and overlapping grants chain together; a gap does not.
        let chained = Self.state([Self.permission(.readwrite, "a", "b"), Self.permission(.read, "b", "d"), Self.permission(.read, "c", "e")])
        #expect(Self.allowed(chained, .read, "a", "e"))
        #expect(!Self.allowed(chained, .write, "a", "c"))
        let gap = Self.state([Self.permission(.read, "a", "b"), Self.permission(.read, "ba", "d")])
        #expect(!Self.allowed(gap, .read, "a", "d"))
        #expect(Self.allowed(gap, .read, "ba", "c"))
    }

    @Test func singleKeysAndOpenEndedGrants() {
        let state = Self.state([Self.permission(.write, "foo"), Self.permission(.read, "z", "\0")])
        #expect(Self.allowed(state, .write, "foo"))
        #expect(!Self.allowed(state, .write, "foo0"))
        #expect(!Self.allowed(state, .write, "foo", "fop"))  // a prefix of a single-key grant
        #expect(Self.allowed(state, .write, "foo", "foo\0"))
        #expect(Self.allowed(state, .read, "z", "\0"))
        #expect(Self.allowed(state, .read, "zzzz"))
        #expect(!Self.allowed(state, .read, "y", "\0"))
    }

    @Test func checksComeInEtcdsOrder() {
        let state = Self.state([Self.permission(.read, "a")])
        #expect(throws: EtcdError.userEmpty) { try state.checkAccess(.anonymous, .read, key: Array("a".utf8)) }
        #expect(throws: EtcdError.authOldRevision) { try state.checkAccess(AuthInfo(user: "u", revision: 4), .read, key: Array("a".utf8)) }
        #expect(throws: EtcdError.permissionDenied) { try state.checkAccess(AuthInfo(user: "ghost", revision: 5), .read, key: Array("a".utf8)) }
        #expect(throws: EtcdError.userNotFound) { try state.checkAdmin(AuthInfo(user: "ghost", revision: 5)) }
        #expect(throws: EtcdError.permissionDenied) { try state.checkAdmin(AuthInfo(user: "u", revision: 5)) }
        // Role root (even without a role object) may do everything; an internal caller too.
        let root = Self.state([], roles: ["root"])
        #expect(Self.allowed(root, .write, "anything", "\0"))
        #expect((try? root.checkAdmin(AuthInfo(user: "u", revision: 1))) != nil)
        #expect((try? state.checkAccess(.internal, .write, key: Array("x".utf8))) != nil)
    }

    @Test func authorizedEntriesSurviveEncodingAndDoNotNest() throws {
        var put = Etcdserverpb_PutRequest()
        put.key = Data("k".utf8)
        let entry = InternalRequest.authorized(AuthInfo(user: "ålice", revision: 42), .put(put))
        let bytes = try entry.encoded()
        guard case .authorized(let info, .put(let decoded)) = try InternalRequest(encoded: bytes) else {
            Issue.record("not decoded as an authorized put")
            return
        }
        #expect(info == AuthInfo(user: "ålice", revision: 42) && decoded == put)
        let nested = try InternalRequest.authorized(AuthInfo(user: "a", revision: 1), entry).encoded()
        #expect(throws: EntryDecodingError.self) { try InternalRequest(encoded: nested) }
        let authenticate = try InternalRequest.auth(.authenticate(name: "u", tokenPrefix: "abcdefghijklmnop", checkedRevision: 7)).encoded()
        guard case .auth(.authenticate(let name, let prefix, let revision)) = try InternalRequest(encoded: authenticate) else {
            Issue.record("not decoded as an authenticate")
            return
        }
        #expect(name == "u" && prefix == "abcdefghijklmnop" && revision == 7)
    }

    @Test func passwordHashesAreSaltedAndChecked() throws {
        let one = try PasswordHash.make("secret")
        let two = try PasswordHash.make("secret")
        #expect(one != two)
        #expect(PasswordHash.matches("secret", one) && PasswordHash.matches("secret", two))
        #expect(!PasswordHash.matches("Secret", one))
        #expect(!PasswordHash.matches("secret", "pbkdf2-sha256$1000$AAAA$AAAA"))  // too few rounds
    }
}
