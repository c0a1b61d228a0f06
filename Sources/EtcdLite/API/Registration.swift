import GRPCCore
import GRPCProtobuf
import SwiftProtobuf
import EtcdLiteProto

/// Decodes requests as etcd's grpc-go server does: a message over the receive limit fails with
/// ResourceExhausted and grpc-go's message, an undecodable one with Internal.
struct EtcdDeserializer<Message: SwiftProtobuf.Message>: MessageDeserializer {
    let limit: Int

    func deserialize<Bytes: GRPCContiguousBytes>(_ bytes: Bytes) throws -> Message {
        if bytes.count > limit {
            throw RPCError(code: .resourceExhausted, message: "grpc: received message larger than max (\(bytes.count) vs. \(limit))")
        }
        do {
            return try bytes.withUnsafeBytes { try Message(serializedBytes: Array($0)) }
        } catch {
            throw RPCError(code: .internalError, message: "grpc: error unmarshalling request: \(error)")
        }
    }
}

extension RPCRouter {
    fileprivate mutating func register<Input: SwiftProtobuf.Message, Output: SwiftProtobuf.Message>(
        _ descriptor: MethodDescriptor, limit: Int,
        _ handler: @Sendable @escaping (StreamingServerRequest<Input>, ServerContext) async throws -> StreamingServerResponse<Output>
    ) {
        registerHandler(forMethod: descriptor, deserializer: EtcdDeserializer<Input>(limit: limit),
                        serializer: ProtobufSerializer<Output>(), handler: handler)
    }
}

/// Every service the member serves, registered with etcd's request decoding. Methods not
/// registered answer Unimplemented.
struct EtcdServices: RegistrableRPCService {
    let server: EtcdLiteServer
    /// etcd's gRPC receive limit: --max-request-bytes plus 512 KiB of overhead.
    var limit: Int { server.config.maxRequestBytes + 512 * 1024 }

    func registerMethods<Transport: ServerTransport>(with router: inout RPCRouter<Transport>) {
        let kv = KVService(server: server)
        router.register(Etcdserverpb_KV.Method.Range.descriptor, limit: limit) { try await kv.range(request: $0, context: $1) }
        router.register(Etcdserverpb_KV.Method.Put.descriptor, limit: limit) { try await kv.put(request: $0, context: $1) }
        router.register(Etcdserverpb_KV.Method.DeleteRange.descriptor, limit: limit) { try await kv.deleteRange(request: $0, context: $1) }
        router.register(Etcdserverpb_KV.Method.Txn.descriptor, limit: limit) { try await kv.txn(request: $0, context: $1) }
        router.register(Etcdserverpb_KV.Method.Compact.descriptor, limit: limit) { try await kv.compact(request: $0, context: $1) }

        let maintenance = MaintenanceService(server: server)
        router.register(Etcdserverpb_Maintenance.Method.Alarm.descriptor, limit: limit) { try await maintenance.alarm(request: $0, context: $1) }
        router.register(Etcdserverpb_Maintenance.Method.Status.descriptor, limit: limit) { try await maintenance.status(request: $0, context: $1) }
        router.register(Etcdserverpb_Maintenance.Method.Defragment.descriptor, limit: limit) { try await maintenance.defragment(request: $0, context: $1) }
        router.register(Etcdserverpb_Maintenance.Method.Hash.descriptor, limit: limit) { try await maintenance.hash(request: $0, context: $1) }
        router.register(Etcdserverpb_Maintenance.Method.HashKV.descriptor, limit: limit) { try await maintenance.hashKV(request: $0, context: $1) }
        router.register(Etcdserverpb_Maintenance.Method.Snapshot.descriptor, limit: limit) { try await maintenance.snapshot(request: $0, context: $1) }
        router.register(Etcdserverpb_Maintenance.Method.MoveLeader.descriptor, limit: limit) { try await maintenance.moveLeader(request: $0, context: $1) }

        let cluster = ClusterService(server: server)
        router.register(Etcdserverpb_Cluster.Method.MemberList.descriptor, limit: limit) { try await cluster.memberList(request: $0, context: $1) }
    }
}
