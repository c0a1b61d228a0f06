import GRPCCore
import EtcdLiteProto

extension EtcdError {
    var rpcError: RPCError {
        RPCError(code: RPCError.Code(Status.Code(rawValue: code.rawValue) ?? .unknown) ?? .unknown, message: message)
    }
}

/// Runs a handler and maps its failure to etcd's gRPC status at the API edge.
@inline(__always)
func mapped<T>(_ body: () async throws -> T) async throws -> T {
    do {
        return try await body()
    } catch let error as EtcdError {
        throw error.rpcError
    } catch let error as RPCError {
        throw error
    } catch {
        throw RPCError(code: .unknown, message: "\(error)")
    }
}

let unimplemented = RPCError(code: .unimplemented, message: "unknown service or method")

/// etcdserverpb.KV over gRPC: thin adapters over the server's request path.
struct KVService: Etcdserverpb_KV.SimpleServiceProtocol {
    let server: EtcdLiteServer

    func range(request: Etcdserverpb_RangeRequest, context: ServerContext) async throws -> Etcdserverpb_RangeResponse {
        try await mapped { try await server.range(request) }
    }

    func put(request: Etcdserverpb_PutRequest, context: ServerContext) async throws -> Etcdserverpb_PutResponse {
        try await mapped { try await server.put(request) }
    }

    func deleteRange(request: Etcdserverpb_DeleteRangeRequest, context: ServerContext) async throws -> Etcdserverpb_DeleteRangeResponse {
        try await mapped { try await server.deleteRange(request) }
    }

    func txn(request: Etcdserverpb_TxnRequest, context: ServerContext) async throws -> Etcdserverpb_TxnResponse {
        try await mapped { try await server.txn(request) }
    }

    func compact(request: Etcdserverpb_CompactionRequest, context: ServerContext) async throws -> Etcdserverpb_CompactionResponse {
        try await mapped { try await server.compact(request) }
    }
}

struct MaintenanceService: Etcdserverpb_Maintenance.SimpleServiceProtocol {
    let server: EtcdLiteServer

    func alarm(request: Etcdserverpb_AlarmRequest, context: ServerContext) async throws -> Etcdserverpb_AlarmResponse {
        try await mapped { try await server.alarm(request) }
    }

    func status(request: Etcdserverpb_StatusRequest, context: ServerContext) async throws -> Etcdserverpb_StatusResponse {
        server.statusResponse()
    }

    func defragment(request: Etcdserverpb_DefragmentRequest, context: ServerContext) async throws -> Etcdserverpb_DefragmentResponse {
        try await mapped { try await server.defragment() }
    }

    func hash(request: Etcdserverpb_HashRequest, context: ServerContext) async throws -> Etcdserverpb_HashResponse {
        try await mapped { try server.hash() }
    }

    func hashKV(request: Etcdserverpb_HashKVRequest, context: ServerContext) async throws -> Etcdserverpb_HashKVResponse {
        try await mapped { try server.hashKV(request) }
    }

    func snapshot(request: Etcdserverpb_SnapshotRequest, response: RPCWriter<Etcdserverpb_SnapshotResponse>, context: ServerContext) async throws {
        try await mapped { try await server.snapshotChunks { try await response.write($0) } }
    }

    func moveLeader(request: Etcdserverpb_MoveLeaderRequest, context: ServerContext) async throws -> Etcdserverpb_MoveLeaderResponse {
        // One member leads itself: moving leadership to itself is a no-op, to anyone else an unknown member.
        if request.targetID == server.memberID {
            var response = Etcdserverpb_MoveLeaderResponse()
            response.header = server.header()
            return response
        }
        throw EtcdError(.failedPrecondition, "etcdserver: bad leader transferee").rpcError
    }

    func downgrade(request: Etcdserverpb_DowngradeRequest, context: ServerContext) async throws -> Etcdserverpb_DowngradeResponse {
        throw unimplemented  // not registered: see EtcdServices
    }
}

struct ClusterService: Etcdserverpb_Cluster.SimpleServiceProtocol {
    let server: EtcdLiteServer

    func memberList(request: Etcdserverpb_MemberListRequest, context: ServerContext) async throws -> Etcdserverpb_MemberListResponse {
        server.memberList()
    }

    // Membership changes need Raft; until the cluster issue lands they are not served.
    func memberAdd(request: Etcdserverpb_MemberAddRequest, context: ServerContext) async throws -> Etcdserverpb_MemberAddResponse { throw unimplemented }
    func memberRemove(request: Etcdserverpb_MemberRemoveRequest, context: ServerContext) async throws -> Etcdserverpb_MemberRemoveResponse { throw unimplemented }
    func memberUpdate(request: Etcdserverpb_MemberUpdateRequest, context: ServerContext) async throws -> Etcdserverpb_MemberUpdateResponse { throw unimplemented }
    func memberPromote(request: Etcdserverpb_MemberPromoteRequest, context: ServerContext) async throws -> Etcdserverpb_MemberPromoteResponse { throw unimplemented }
}
