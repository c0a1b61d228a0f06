import EtcdLiteProto
import Foundation
import SwiftProtobuf

/// Who sends each request and what they may do (etcd's auth store as the API layer uses it), and
/// the Auth service.
extension EtcdLiteServer {
    enum CallerLookup {
        case caller(AuthInfo)
        /// A simple token naming a log index this member has not applied yet.
        case waitForApply
    }

    /// etcd's AuthInfoFromCtx: while auth is off nobody is asked (anonymous, and nothing is
    /// checked); otherwise the `token` metadata (else `authorization`), else the CN of the client's
    /// certificate, else no user. A token that is not valid is refused, whatever else the call
    /// carries.
    func lookupCaller(_ context: CallContext) throws(EtcdError) -> CallerLookup {
        guard authBox.enabled else { return .caller(.anonymous) }
        let revision = authBox.revision
        if let token = context.metadata("token") ?? context.metadata("authorization") {
            if let jwt {
                guard let info = jwt.verify(token) else { throw .invalidAuthToken }
                return .caller(info)
            }
            if let user = tokens.user(of: token) { return .caller(AuthInfo(user: user, revision: revision)) }
            if let index = SimpleTokens.index(of: token), index > status.state.appliedIndex { return .waitForApply }
            throw .invalidAuthToken
        }
        if let name = context.commonName { return .caller(AuthInfo(user: name, revision: revision)) }
        return .caller(.anonymous)
    }

    /// The caller; a simple token from an Authenticate this member has not applied yet is waited
    /// for (etcd waits for its applied index to reach the token's).
    func caller(_ context: CallContext) async throws -> AuthInfo {
        if case .waitForApply = try lookupCaller(context) { try await loop.linearizableRead() }
        guard case .caller(let info) = try lookupCaller(context) else { throw EtcdError.invalidAuthToken }
        return info
    }

    /// `caller` for calls started on an event loop: answers at once unless it has to wait.
    func withCaller(_ context: CallContext, failure: @escaping @Sendable (any Error) -> Void,
                    _ body: @escaping @Sendable (AuthInfo) -> Void) {
        do {
            switch try lookupCaller(context) {
            case .caller(let info): body(info)
            case .waitForApply:
                Task {
                    do { body(try await self.caller(context)) } catch { failure(error) }
                }
            }
        } catch {
            failure(error)
        }
    }

    /// A client's request as it goes into the log: while auth is on, with its sender, whose
    /// permission the apply step checks.
    func entry(_ request: InternalRequest, from caller: AuthInfo) -> InternalRequest {
        authBox.enabled ? .authorized(caller, request) : request
    }

    /// etcd's requireAuthInfo: some user (any) when auth is on.
    func requireUser(_ caller: AuthInfo) throws(EtcdError) {
        if authBox.enabled && !caller.isInternal && caller.user.isEmpty { throw .userEmpty }
    }

    func requireAdmin(_ caller: AuthInfo) throws(EtcdError) {
        guard authBox.enabled else { return }
        try authBox.current.checkAdmin(caller)
    }

    /// Defragment, Hash, HashKV and Snapshot give auth errors unmapped (code Unknown, "auth: ..."),
    /// as etcd's maintenance server returns them.
    func requireAdminUnmapped(_ context: CallContext) async throws {
        do {
            try requireAdmin(try await caller(context))
        } catch let error as EtcdError {
            throw error.unmapped
        }
    }

    func checkRead(_ caller: AuthInfo, key: Data, rangeEnd: Data) throws(EtcdError) {
        guard authBox.enabled, !caller.isInternal else { return }
        try authBox.current.checkAccess(caller, .read, key: key, rangeEnd: rangeEnd)
    }

    /// A read served here was checked against the auth state of one revision; when users or roles
    /// changed meanwhile, etcd answers that the caller's revision is old.
    func checkAuthUnchanged(_ caller: AuthInfo) throws(EtcdError) {
        guard caller.revision != 0, !caller.isInternal, authBox.enabled else { return }
        if authBox.revision != caller.revision { throw .authOldRevision }
    }

    /// What a read-only txn reads: every compare and every range, in nested txns too.
    func checkReadOnlyTxn(_ txn: Etcdserverpb_TxnRequest, _ caller: AuthInfo) throws(EtcdError) {
        guard authBox.enabled, !caller.isInternal else { return }
        try authBox.current.checkTxn(txn, caller) { _ throws(EtcdError) in }  // it has no puts
    }

    /// Every key attached to `lease` must allow `kind` to a caller who is not an admin (etcd's
    /// checkLeaseRenew / LeaseTimeToLive with keys).
    func checkLeaseKeys(_ lease: Int64, _ caller: AuthInfo, _ kind: AccessKind) throws {
        guard authBox.enabled, !caller.isInternal else { return }
        let state = authBox.current
        if state.isAdmin(caller) { return }
        let keys = try backend.withReader { try StateMachine.attachedKeys(lease, $0) }
        for key in keys { try state.checkAccess(caller, kind, key: key) }
        try checkAuthUnchanged(caller)
    }

    /// Why a watch may not be created for its sender, as etcd puts it in `cancel_reason` (the full
    /// gRPC status text); nil when it may.
    func watchRefusal(_ create: Etcdserverpb_WatchCreateRequest, _ context: CallContext) async -> String? {
        guard authBox.enabled else { return nil }
        do {
            let caller = try await caller(context)
            let key = create.key.isEmpty ? Data([0]) : create.key
            try checkRead(caller, key: key, rangeEnd: create.rangeEnd)
            return nil
        } catch let error as EtcdError {
            return "rpc error: code = \(error.code.goName) desc = \(error.message)"
        } catch {
            return "rpc error: code = PermissionDenied desc = \(EtcdError.permissionDenied.message)"
        }
    }

    // MARK: - The Auth service

    /// Proposes an auth change with its sender (checked at apply).
    private func proposeAuth(_ request: AuthRequest, _ caller: AuthInfo) async throws -> AuthAnswer {
        guard case .auth(let answer) = try await propose(entry(.auth(request), from: caller)) else { throw unexpected() }
        return answer
    }

    private func answered<Response: Message & HasHeader>(_: Response.Type = Response.self) -> Response {
        var response = Response()
        fill(&response.header)
        return response
    }

    /// Runs a slow password hash on the reader threads, not on the task pool.
    private func hashing<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await readers.runIfActive(body)
    }

    /// etcd 3.5's AuthStatus (3.4 has only the messages): whether auth is on and its revision.
    func authStatus(_ caller: AuthInfo) async throws -> Etcdserverpb_AuthStatusResponse {
        if !status.alone { try await loop.linearizableRead() }
        try requireAdmin(caller)
        var response: Etcdserverpb_AuthStatusResponse = answered()
        let state = authBox.current
        response.enabled = state.enabled
        response.authRevision = state.revision
        return response
    }

    /// Checks the password here, then makes the token through the log so that every member knows
    /// it; when users or roles changed in between, checks again (etcd's loop).
    func authenticate(_ request: Etcdserverpb_AuthenticateRequest) async throws -> Etcdserverpb_AuthenticateResponse {
        if !status.alone { try await loop.linearizableRead() }
        for _ in 0..<5 {
            let state = authBox.current
            guard state.enabled else { throw EtcdError.authNotEnabled }
            guard let user = state.users[request.name] else { throw EtcdError.authFailed }
            if user.options.noPassword { throw EtcdError.noPasswordUser }
            if let jwt, !jwt.canSign { throw EtcdError.verifyOnlyKey }
            let stored = String(decoding: user.password, as: UTF8.self)
            let password = request.password
            guard try await hashing({ PasswordHash.matches(password, stored) }) else { throw EtcdError.authFailed }
            // A JWT is signed here once the log agreed; simple tokens are made by every member.
            let prefix = jwt == nil ? SimpleTokens.randomPrefix() : ""
            let answer = try await proposeAuth(.authenticate(name: request.name, tokenPrefix: prefix, checkedRevision: state.revision), .anonymous)
            var response: Etcdserverpb_AuthenticateResponse = answered()
            switch (answer, jwt) {
            case (.token(let token), nil):
                response.token = token
            case (.done, let jwt?):
                response.token = try jwt.sign(user: request.name, revision: state.revision)
            case (.stale, _):
                continue
            default:
                throw unexpected()
            }
            return response
        }
        throw EtcdError.requestTimedOut
    }

    func userAdd(_ request: Etcdserverpb_AuthUserAddRequest, _ caller: AuthInfo) async throws -> Etcdserverpb_AuthUserAddResponse {
        var entry = request
        if !request.options.noPassword {
            let password = request.password
            entry.hashedPassword = try await hashing { try PasswordHash.make(password) }
        }
        entry.password = ""
        _ = try await proposeAuth(.userAdd(entry), caller)
        return answered()
    }

    func userChangePassword(_ request: Etcdserverpb_AuthUserChangePasswordRequest, _ caller: AuthInfo) async throws
        -> Etcdserverpb_AuthUserChangePasswordResponse {
        var entry = request
        let password = request.password
        entry.hashedPassword = try await hashing { try PasswordHash.make(password) }
        entry.password = ""
        _ = try await proposeAuth(.userChangePassword(entry), caller)
        return answered()
    }

    /// The auth state as of now for a read (etcd sends these reads through the log).
    private func authRead() async throws -> AuthState {
        if !status.alone { try await loop.linearizableRead() }
        return authBox.current
    }

    /// A user may read themselves; others need an admin.
    func userGet(_ request: Etcdserverpb_AuthUserGetRequest, _ caller: AuthInfo) async throws -> Etcdserverpb_AuthUserGetResponse {
        let state = try await authRead()
        if state.enabled && request.name != caller.user { try state.checkAdmin(caller) }
        guard let user = state.users[request.name] else { throw EtcdError.userNotFound }
        var response: Etcdserverpb_AuthUserGetResponse = answered()
        response.roles = user.roles
        return response
    }

    func userList(_ caller: AuthInfo) async throws -> Etcdserverpb_AuthUserListResponse {
        let state = try await authRead()
        try state.checkAdmin(caller)
        var response: Etcdserverpb_AuthUserListResponse = answered()
        response.users = state.users.keys.sorted(by: AuthState.byteOrder)
        return response
    }

    /// A holder of the role may read it; others need an admin.
    func roleGet(_ request: Etcdserverpb_AuthRoleGetRequest, _ caller: AuthInfo) async throws -> Etcdserverpb_AuthRoleGetResponse {
        let state = try await authRead()
        if state.enabled && !(state.users[caller.user]?.roles.contains(request.role) ?? false) { try state.checkAdmin(caller) }
        guard let role = state.roles[request.role] else { throw EtcdError.roleNotFound }
        var response: Etcdserverpb_AuthRoleGetResponse = answered()
        response.perm = role.keyPermission
        return response
    }

    func roleList(_ caller: AuthInfo) async throws -> Etcdserverpb_AuthRoleListResponse {
        let state = try await authRead()
        try state.checkAdmin(caller)
        var response: Etcdserverpb_AuthRoleListResponse = answered()
        response.roles = state.roles.keys.sorted(by: AuthState.byteOrder)
        return response
    }

    /// The Auth service's methods.
    func addAuthMethods(_ m: inout GRPCMethods) {
        /// A change through the log whose answer is an empty response with a header.
        func change<Request: Message, Response: Message & HasHeader>(
            _ method: String, _: Response.Type, _ entry: @escaping @Sendable (Request) -> AuthRequest
        ) {
            m.unary("/etcdserverpb.Auth/\(method)") { (r: Request, c) in
                _ = try await self.proposeAuth(entry(r), try await self.caller(c))
                return self.answered(Response.self)
            }
        }
        change("AuthEnable", Etcdserverpb_AuthEnableResponse.self) { (_: Etcdserverpb_AuthEnableRequest) in .enable }
        change("AuthDisable", Etcdserverpb_AuthDisableResponse.self) { (_: Etcdserverpb_AuthDisableRequest) in .disable }
        change("UserDelete", Etcdserverpb_AuthUserDeleteResponse.self) { (r: Etcdserverpb_AuthUserDeleteRequest) in .userDelete(r) }
        change("UserGrantRole", Etcdserverpb_AuthUserGrantRoleResponse.self) { (r: Etcdserverpb_AuthUserGrantRoleRequest) in .userGrantRole(r) }
        change("UserRevokeRole", Etcdserverpb_AuthUserRevokeRoleResponse.self) { (r: Etcdserverpb_AuthUserRevokeRoleRequest) in .userRevokeRole(r) }
        change("RoleAdd", Etcdserverpb_AuthRoleAddResponse.self) { (r: Etcdserverpb_AuthRoleAddRequest) in .roleAdd(r) }
        change("RoleDelete", Etcdserverpb_AuthRoleDeleteResponse.self) { (r: Etcdserverpb_AuthRoleDeleteRequest) in .roleDelete(r) }
        change("RoleGrantPermission", Etcdserverpb_AuthRoleGrantPermissionResponse.self) { (r: Etcdserverpb_AuthRoleGrantPermissionRequest) in
            .roleGrantPermission(r)
        }
        change("RoleRevokePermission", Etcdserverpb_AuthRoleRevokePermissionResponse.self) { (r: Etcdserverpb_AuthRoleRevokePermissionRequest) in
            .roleRevokePermission(r)
        }
        m.unary("/etcdserverpb.Auth/AuthStatus") { (_: Etcdserverpb_AuthStatusRequest, c) in try await self.authStatus(try await self.caller(c)) }
        // Authenticate ignores any token the call carries (etcd 3.4.28 on).
        m.unary("/etcdserverpb.Auth/Authenticate") { (r: Etcdserverpb_AuthenticateRequest, _) in try await self.authenticate(r) }
        m.unary("/etcdserverpb.Auth/UserAdd") { (r: Etcdserverpb_AuthUserAddRequest, c) in try await self.userAdd(r, try await self.caller(c)) }
        m.unary("/etcdserverpb.Auth/UserChangePassword") { (r: Etcdserverpb_AuthUserChangePasswordRequest, c) in
            try await self.userChangePassword(r, try await self.caller(c))
        }
        m.unary("/etcdserverpb.Auth/UserGet") { (r: Etcdserverpb_AuthUserGetRequest, c) in try await self.userGet(r, try await self.caller(c)) }
        m.unary("/etcdserverpb.Auth/UserList") { (_: Etcdserverpb_AuthUserListRequest, c) in try await self.userList(try await self.caller(c)) }
        m.unary("/etcdserverpb.Auth/RoleGet") { (r: Etcdserverpb_AuthRoleGetRequest, c) in try await self.roleGet(r, try await self.caller(c)) }
        m.unary("/etcdserverpb.Auth/RoleList") { (_: Etcdserverpb_AuthRoleListRequest, c) in try await self.roleList(try await self.caller(c)) }
    }
}

extension Etcdserverpb_AuthEnableResponse: HasHeader {}
extension Etcdserverpb_AuthDisableResponse: HasHeader {}
extension Etcdserverpb_AuthStatusResponse: HasHeader {}
extension Etcdserverpb_AuthenticateResponse: HasHeader {}
extension Etcdserverpb_AuthUserAddResponse: HasHeader {}
extension Etcdserverpb_AuthUserGetResponse: HasHeader {}
extension Etcdserverpb_AuthUserListResponse: HasHeader {}
extension Etcdserverpb_AuthUserDeleteResponse: HasHeader {}
extension Etcdserverpb_AuthUserChangePasswordResponse: HasHeader {}
extension Etcdserverpb_AuthUserGrantRoleResponse: HasHeader {}
extension Etcdserverpb_AuthUserRevokeRoleResponse: HasHeader {}
extension Etcdserverpb_AuthRoleAddResponse: HasHeader {}
extension Etcdserverpb_AuthRoleGetResponse: HasHeader {}
extension Etcdserverpb_AuthRoleListResponse: HasHeader {}
extension Etcdserverpb_AuthRoleDeleteResponse: HasHeader {}
extension Etcdserverpb_AuthRoleGrantPermissionResponse: HasHeader {}
extension Etcdserverpb_AuthRoleRevokePermissionResponse: HasHeader {}

extension EtcdError.Code {
    /// grpc-go's name of the code, as its status text shows it.
    var goName: String {
        switch self {
        case .canceled: "Canceled"
        case .unknown: "Unknown"
        case .invalidArgument: "InvalidArgument"
        case .deadlineExceeded: "DeadlineExceeded"
        case .notFound: "NotFound"
        case .alreadyExists: "AlreadyExists"
        case .permissionDenied: "PermissionDenied"
        case .resourceExhausted: "ResourceExhausted"
        case .failedPrecondition: "FailedPrecondition"
        case .aborted: "Aborted"
        case .outOfRange: "OutOfRange"
        case .unimplemented: "Unimplemented"
        case .internal: "Internal"
        case .unavailable: "Unavailable"
        case .dataLoss: "DataLoss"
        case .unauthenticated: "Unauthenticated"
        }
    }
}
