import Foundation
import SwiftProtobuf
import EtcdLiteProto

/// etcd's JSON gateway: each `/v3/...` path calls a gRPC method of the same member (the same
/// handler the gRPC port runs), converting JSON to protobuf on the way in and back on the way out,
/// as etcd 3.4/3.5's grpc-gateway does (jsonpb with the proto's own field names, 64-bit integers as
/// strings, bytes as base64, enums as names, zero fields left out).
struct GatewayRoute: Sendable {
    /// The gRPC method, `/package.Service/Method`.
    let method: String
    /// One JSON request object → the request's protobuf encoding.
    let decode: @Sendable (Data) throws -> [UInt8]
    /// A response's protobuf encoding → its JSON object.
    let encode: @Sendable ([UInt8]) throws -> String

    static let decodingOptions: JSONDecodingOptions = {
        var options = JSONDecodingOptions()
        options.ignoreUnknownFields = true
        return options
    }()

    static let encodingOptions: JSONEncodingOptions = {
        var options = JSONEncodingOptions()
        options.preserveProtoFieldNames = true
        return options
    }()

    static func make<Request: Message, Response: Message>(_ method: String, _: Request.Type, _: Response.Type) -> GatewayRoute {
        GatewayRoute(method: method, decode: { json in
            let request: Request
            do {
                request = try Request(jsonUTF8Data: json, options: decodingOptions)
            } catch {
                throw EtcdError(.invalidArgument, GatewayRoute.describe(error))
            }
            return try request.serializedBytes()
        }, encode: { bytes in
            try Response(serializedBytes: bytes).jsonString(options: encodingOptions)
        })
    }

    /// A JSON decoding error in words a client can act on (Go's wording where there is one).
    static func describe(_ error: any Error) -> String {
        switch error {
        case JSONDecodingError.truncated: "unexpected EOF"
        case JSONDecodingError.malformedString: "invalid JSON: malformed string (or invalid base64 for bytes)"
        case JSONDecodingError.malformedNumber: "invalid JSON: malformed number"
        case JSONDecodingError.numberRange: "invalid JSON: number out of range"
        case JSONDecodingError.unrecognizedEnumValue: "invalid JSON: unknown enum value"
        case JSONDecodingError.illegalNull: "invalid JSON: illegal null"
        default: "invalid JSON: \(error)"
        }
    }

    /// Paths under `/v3/` (and `/v3beta/`), etcd 3.4's set.
    static let table: [String: GatewayRoute] = {
        var t: [String: GatewayRoute] = [:]
        func add<Request: Message, Response: Message>(_ paths: [String], _ method: String, _ request: Request.Type, _ response: Response.Type) {
            for path in paths { t[path] = make(method, request, response) }
        }
        add(["kv/range"], "/etcdserverpb.KV/Range", Etcdserverpb_RangeRequest.self, Etcdserverpb_RangeResponse.self)
        add(["kv/put"], "/etcdserverpb.KV/Put", Etcdserverpb_PutRequest.self, Etcdserverpb_PutResponse.self)
        add(["kv/deleterange"], "/etcdserverpb.KV/DeleteRange", Etcdserverpb_DeleteRangeRequest.self, Etcdserverpb_DeleteRangeResponse.self)
        add(["kv/txn"], "/etcdserverpb.KV/Txn", Etcdserverpb_TxnRequest.self, Etcdserverpb_TxnResponse.self)
        add(["kv/compaction"], "/etcdserverpb.KV/Compact", Etcdserverpb_CompactionRequest.self, Etcdserverpb_CompactionResponse.self)
        add(["watch"], "/etcdserverpb.Watch/Watch", Etcdserverpb_WatchRequest.self, Etcdserverpb_WatchResponse.self)
        add(["lease/grant"], "/etcdserverpb.Lease/LeaseGrant", Etcdserverpb_LeaseGrantRequest.self, Etcdserverpb_LeaseGrantResponse.self)
        add(["lease/revoke", "kv/lease/revoke"], "/etcdserverpb.Lease/LeaseRevoke", Etcdserverpb_LeaseRevokeRequest.self, Etcdserverpb_LeaseRevokeResponse.self)
        add(["lease/keepalive"], "/etcdserverpb.Lease/LeaseKeepAlive", Etcdserverpb_LeaseKeepAliveRequest.self, Etcdserverpb_LeaseKeepAliveResponse.self)
        add(["lease/timetolive", "kv/lease/timetolive"], "/etcdserverpb.Lease/LeaseTimeToLive",
            Etcdserverpb_LeaseTimeToLiveRequest.self, Etcdserverpb_LeaseTimeToLiveResponse.self)
        add(["lease/leases", "kv/lease/leases"], "/etcdserverpb.Lease/LeaseLeases", Etcdserverpb_LeaseLeasesRequest.self, Etcdserverpb_LeaseLeasesResponse.self)
        add(["cluster/member/add"], "/etcdserverpb.Cluster/MemberAdd", Etcdserverpb_MemberAddRequest.self, Etcdserverpb_MemberAddResponse.self)
        add(["cluster/member/remove"], "/etcdserverpb.Cluster/MemberRemove", Etcdserverpb_MemberRemoveRequest.self, Etcdserverpb_MemberRemoveResponse.self)
        add(["cluster/member/update"], "/etcdserverpb.Cluster/MemberUpdate", Etcdserverpb_MemberUpdateRequest.self, Etcdserverpb_MemberUpdateResponse.self)
        add(["cluster/member/list"], "/etcdserverpb.Cluster/MemberList", Etcdserverpb_MemberListRequest.self, Etcdserverpb_MemberListResponse.self)
        add(["cluster/member/promote"], "/etcdserverpb.Cluster/MemberPromote", Etcdserverpb_MemberPromoteRequest.self, Etcdserverpb_MemberPromoteResponse.self)
        add(["maintenance/alarm"], "/etcdserverpb.Maintenance/Alarm", Etcdserverpb_AlarmRequest.self, Etcdserverpb_AlarmResponse.self)
        add(["maintenance/status"], "/etcdserverpb.Maintenance/Status", Etcdserverpb_StatusRequest.self, Etcdserverpb_StatusResponse.self)
        add(["maintenance/defragment"], "/etcdserverpb.Maintenance/Defragment", Etcdserverpb_DefragmentRequest.self, Etcdserverpb_DefragmentResponse.self)
        add(["maintenance/hash"], "/etcdserverpb.Maintenance/Hash", Etcdserverpb_HashRequest.self, Etcdserverpb_HashResponse.self)
        add(["maintenance/hashkv"], "/etcdserverpb.Maintenance/HashKV", Etcdserverpb_HashKVRequest.self, Etcdserverpb_HashKVResponse.self)
        add(["maintenance/snapshot"], "/etcdserverpb.Maintenance/Snapshot", Etcdserverpb_SnapshotRequest.self, Etcdserverpb_SnapshotResponse.self)
        add(["maintenance/transfer-leadership"], "/etcdserverpb.Maintenance/MoveLeader", Etcdserverpb_MoveLeaderRequest.self, Etcdserverpb_MoveLeaderResponse.self)
        add(["auth/enable"], "/etcdserverpb.Auth/AuthEnable", Etcdserverpb_AuthEnableRequest.self, Etcdserverpb_AuthEnableResponse.self)
        add(["auth/disable"], "/etcdserverpb.Auth/AuthDisable", Etcdserverpb_AuthDisableRequest.self, Etcdserverpb_AuthDisableResponse.self)
        add(["auth/authenticate"], "/etcdserverpb.Auth/Authenticate", Etcdserverpb_AuthenticateRequest.self, Etcdserverpb_AuthenticateResponse.self)
        add(["auth/user/add"], "/etcdserverpb.Auth/UserAdd", Etcdserverpb_AuthUserAddRequest.self, Etcdserverpb_AuthUserAddResponse.self)
        add(["auth/user/get"], "/etcdserverpb.Auth/UserGet", Etcdserverpb_AuthUserGetRequest.self, Etcdserverpb_AuthUserGetResponse.self)
        add(["auth/user/list"], "/etcdserverpb.Auth/UserList", Etcdserverpb_AuthUserListRequest.self, Etcdserverpb_AuthUserListResponse.self)
        add(["auth/user/delete"], "/etcdserverpb.Auth/UserDelete", Etcdserverpb_AuthUserDeleteRequest.self, Etcdserverpb_AuthUserDeleteResponse.self)
        add(["auth/user/changepw"], "/etcdserverpb.Auth/UserChangePassword",
            Etcdserverpb_AuthUserChangePasswordRequest.self, Etcdserverpb_AuthUserChangePasswordResponse.self)
        add(["auth/user/grant"], "/etcdserverpb.Auth/UserGrantRole", Etcdserverpb_AuthUserGrantRoleRequest.self, Etcdserverpb_AuthUserGrantRoleResponse.self)
        add(["auth/user/revoke"], "/etcdserverpb.Auth/UserRevokeRole", Etcdserverpb_AuthUserRevokeRoleRequest.self, Etcdserverpb_AuthUserRevokeRoleResponse.self)
        add(["auth/role/add"], "/etcdserverpb.Auth/RoleAdd", Etcdserverpb_AuthRoleAddRequest.self, Etcdserverpb_AuthRoleAddResponse.self)
        add(["auth/role/get"], "/etcdserverpb.Auth/RoleGet", Etcdserverpb_AuthRoleGetRequest.self, Etcdserverpb_AuthRoleGetResponse.self)
        add(["auth/role/list"], "/etcdserverpb.Auth/RoleList", Etcdserverpb_AuthRoleListRequest.self, Etcdserverpb_AuthRoleListResponse.self)
        add(["auth/role/delete"], "/etcdserverpb.Auth/RoleDelete", Etcdserverpb_AuthRoleDeleteRequest.self, Etcdserverpb_AuthRoleDeleteResponse.self)
        add(["auth/role/grant"], "/etcdserverpb.Auth/RoleGrantPermission",
            Etcdserverpb_AuthRoleGrantPermissionRequest.self, Etcdserverpb_AuthRoleGrantPermissionResponse.self)
        add(["auth/role/revoke"], "/etcdserverpb.Auth/RoleRevokePermission",
            Etcdserverpb_AuthRoleRevokePermissionRequest.self, Etcdserverpb_AuthRoleRevokePermissionResponse.self)
        return t
    }()

    /// The route for a request path: `/v3/<route>` or `/v3beta/<route>`.
    static func route(for path: String) -> GatewayRoute? {
        for prefix in ["/v3/", "/v3beta/"] where path.hasPrefix(prefix) {
            return table[String(path.dropFirst(prefix.count))]
        }
        return nil
    }
}

/// Splits a request body holding one or more JSON values (objects one after another, with or
/// without whitespace between) into the values.
enum JSONValues {
    static func split(_ body: [UInt8]) throws -> [Data] {
        var values: [Data] = []
        var index = 0
        let count = body.count
        while index < count {
            while index < count, isSpace(body[index]) { index += 1 }
            guard index < count else { break }
            let start = index
            var depth = 0
            var inString = false
            var escaped = false
            repeat {
                let byte = body[index]
                if inString {
                    if escaped { escaped = false } else if byte == UInt8(ascii: "\\") { escaped = true } else if byte == UInt8(ascii: "\"") { inString = false }
                } else if byte == UInt8(ascii: "\"") {
                    inString = true
                } else if byte == UInt8(ascii: "{") || byte == UInt8(ascii: "[") {
                    depth += 1
                } else if byte == UInt8(ascii: "}") || byte == UInt8(ascii: "]") {
                    depth -= 1
                } else if depth == 0 && isSpace(byte) {
                    break
                }
                index += 1
            } while index < count && (depth > 0 || inString || (body[index - 1] != UInt8(ascii: "}") && body[index - 1] != UInt8(ascii: "]")))
            guard depth == 0, !inString else { throw EtcdError(.invalidArgument, "invalid JSON: unexpected end of input") }
            values.append(Data(body[start..<index]))
        }
        return values
    }

    private static func isSpace(_ byte: UInt8) -> Bool {
        byte == 0x20 || byte == 0x0A || byte == 0x0D || byte == 0x09
    }
}
