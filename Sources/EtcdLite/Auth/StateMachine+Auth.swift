import EtcdLiteProto
import Foundation

/// Permission checks of client writes and the auth requests, at apply time (etcd's
/// authApplierV3): the auth state and the keys attached to leases are those of that moment.
extension StateMachine {
    func checkPut(_ put: Etcdserverpb_PutRequest, _ sender: AuthInfo) throws(EtcdError) {
        try auth.checkAccess(sender, .write, key: put.key)
        if put.lease != 0 { try checkLeaseKeys(put.lease, sender, .write) }
        if put.prevKv { try auth.checkAccess(sender, .read, key: put.key) }
    }

    func checkTxn(_ txn: Etcdserverpb_TxnRequest, _ sender: AuthInfo) throws(EtcdError) {
        try auth.checkTxn(txn, sender) { (put) throws(EtcdError) in try checkPut(put, sender) }
    }

    /// A lease's attached keys must all allow `kind` to a sender who is not an admin (etcd's
    /// checkLeasePuts); a lease that does not exist passes (its own error comes later).
    func checkLeaseKeys(_ lease: Int64, _ sender: AuthInfo, _ kind: AccessKind) throws(EtcdError) {
        guard lessor.contains(lease), !auth.isAdmin(sender) else { return }
        let keys: [Data]
        do { keys = try Self.attachedKeys(lease, backend.writer) } catch { throw EtcdError(.internal, "etcdserver: \(error)") }
        for key in keys { try auth.checkAccess(sender, kind, key: key) }
    }

    /// Applies a change of the auth state (etcd's auth store operations, with its checks in its
    /// order); an admin is needed for all but Authenticate.
    func applyAuth(_ request: AuthRequest, by sender: AuthInfo, index: UInt64) throws -> AuthAnswer {
        if case .authenticate = request {} else { try auth.checkAdmin(sender) }
        let writer = backend.writer
        var next = auth
        var changed = true
        switch request {
        case .enable:
            if auth.enabled { return .done }
            guard let root = auth.users["root"] else { throw EtcdError.rootUserNotExist }
            guard root.roles.contains("root") else { throw EtcdError.rootRoleNotExist }
            next.enabled = true
            changed = false
        case .disable:
            if !auth.enabled { return .done }
            next.enabled = false
            tokens.removeAll()
        case .authenticate(let name, let prefix, let checkedRevision):
            guard auth.enabled else { throw EtcdError.authNotEnabled }
            guard auth.users[name] != nil else { throw EtcdError.authFailed }
            guard checkedRevision == auth.revision else { return .stale }
            // JWT: the proposer signs the token; members keep nothing.
            if prefix.isEmpty { return .done }
            let token = "\(prefix).\(index)"
            tokens.assign(token, to: name)
            return .token(token)
        case .userAdd(let r):
            guard !r.name.isEmpty else { throw EtcdError.userEmpty }
            guard auth.users[r.name] == nil else { throw EtcdError.userAlreadyExist }
            var user = Authpb_User()
            user.name = Data(r.name.utf8)
            user.password = r.options.noPassword ? Data() : Data(r.hashedPassword.utf8)
            user.options = r.options
            next.setUser(r.name, user)
            try AuthTables.save(user: user, writer)
        case .userDelete(let r):
            if auth.enabled && r.name == "root" { throw EtcdError.invalidAuthManagement }
            guard auth.users[r.name] != nil else { throw EtcdError.userNotFound }
            next.setUser(r.name, nil)
            try AuthTables.delete(user: r.name, writer)
            tokens.invalidate(user: r.name)
        case .userChangePassword(let r):
            guard var user = auth.users[r.name] else { throw EtcdError.userNotFound }
            user.password = Data(r.hashedPassword.utf8)
            next.setUser(r.name, user)
            try AuthTables.save(user: user, writer)
            tokens.invalidate(user: r.name)
        case .userGrantRole(let r):
            guard var user = auth.users[r.user] else { throw EtcdError.userNotFound }
            if r.role != "root" && auth.roles[r.role] == nil { throw EtcdError.roleNotFound }
            if user.roles.contains(r.role) { return .done }
            user.roles.append(r.role)
            user.roles.sort(by: AuthState.byteOrder)
            next.setUser(r.user, user)
            try AuthTables.save(user: user, writer)
        case .userRevokeRole(let r):
            if auth.enabled && r.name == "root" && r.role == "root" { throw EtcdError.invalidAuthManagement }
            guard var user = auth.users[r.name] else { throw EtcdError.userNotFound }
            guard let position = user.roles.firstIndex(of: r.role) else { throw EtcdError.roleNotGranted }
            user.roles.remove(at: position)
            next.setUser(r.name, user)
            try AuthTables.save(user: user, writer)
        case .roleAdd(let r):
            guard !r.name.isEmpty else { throw EtcdError.roleEmpty }
            guard auth.roles[r.name] == nil else { throw EtcdError.roleAlreadyExist }
            var role = Authpb_Role()
            role.name = Data(r.name.utf8)
            next.setRole(r.name, role)
            try AuthTables.save(role: role, writer)
        case .roleDelete(let r):
            if auth.enabled && r.role == "root" { throw EtcdError.invalidAuthManagement }
            guard auth.roles[r.role] != nil else { throw EtcdError.roleNotFound }
            next.setRole(r.role, nil)
            try AuthTables.delete(role: r.role, writer)
            for (name, var user) in auth.users where user.roles.contains(r.role) {
                user.roles.removeAll { $0 == r.role }
                next.setUser(name, user)
                try AuthTables.save(user: user, writer)
            }
        case .roleGrantPermission(let r):
            guard r.hasPerm else { throw EtcdError.permissionNotGiven }
            guard AuthState.isValidPermissionRange(key: Array(r.perm.key), rangeEnd: Array(r.perm.rangeEnd)) else {
                throw EtcdError.invalidAuthManagement
            }
            guard var role = auth.roles[r.name] else { throw EtcdError.roleNotFound }
            if let same = role.keyPermission.firstIndex(where: { $0.key == r.perm.key && $0.rangeEnd == r.perm.rangeEnd }) {
                role.keyPermission[same].permType = r.perm.permType
            } else {
                // Kept sorted by key; after the grants on the same key.
                let position = role.keyPermission.firstIndex { r.perm.key.lexicographicallyPrecedes($0.key) } ?? role.keyPermission.endIndex
                role.keyPermission.insert(r.perm, at: position)
            }
            next.setRole(r.name, role)
            try AuthTables.save(role: role, writer)
        case .roleRevokePermission(let r):
            guard var role = auth.roles[r.role] else { throw EtcdError.roleNotFound }
            let before = role.keyPermission.count
            role.keyPermission.removeAll { $0.key == r.key && $0.rangeEnd == r.rangeEnd }
            guard role.keyPermission.count < before else { throw EtcdError.permissionNotGranted }
            next.setRole(r.role, role)
            try AuthTables.save(role: role, writer)
        }
        if changed { next.revision += 1 }
        try AuthTables.saveMeta(next, writer)
        auth = next
        authBox.publish(next)
        return .done
    }
}

extension AuthState {
    /// Whether the sender holds role root (with auth off, everyone may do everything).
    func isAdmin(_ info: AuthInfo) -> Bool {
        (try? checkAdmin(info)) != nil
    }
}
