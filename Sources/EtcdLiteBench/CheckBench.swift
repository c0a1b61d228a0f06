import EtcdLiteClient
import EtcdLiteProto
import Foundation
import Synchronization

/// Records the history of a mixed workload (put, linearizable get, delete, compare-and-swap Txn)
/// from concurrent clients on a few keys, and checks it for linearizability.
public struct LinearizabilityBench: Sendable {
    public var endpoints: [Endpoint]
    public var clients = 8
    public var duration = 5.0
    public var keys = 4
    /// Key prefix (the keys under it are deleted first).
    public var prefix = "etcdlite-check/"

    public init(endpoints: [Endpoint]) { self.endpoints = endpoints }

    public struct Result: Sendable {
        public var history: [KVLinearizability.Operation]
        public var verdict: KVLinearizability.Verdict
        public var unknown: Int
        public var start: UInt64
    }

    public func run() async throws -> Result {
        var connections: [GRPCClientConnection] = []
        for n in 0..<max(1, min(clients, 8)) { connections.append(try await endpoints[n % endpoints.count].connect()) }
        defer { for connection in connections { Task { await connection.close() } } }
        var clear = Etcdserverpb_DeleteRangeRequest()
        clear.key = Data(prefix.utf8)
        clear.rangeEnd = Self.prefixEnd(Data(prefix.utf8))
        _ = try await connections[0].unary("/etcdserverpb.KV/DeleteRange", try clear.serializedBytes())
        let start = monotonicNanos()
        let deadline = start + UInt64(duration * 1e9)
        let history = HistoryLog()
        await withTaskGroup(of: Void.self) { group in
            for client in 0..<clients {
                let connection = connections[client % connections.count]
                group.addTask {
                    var sequence = 0
                    var lastSeen: [String: String?] = [:]
                    while monotonicNanos() < deadline {
                        sequence += 1
                        let key = "\(prefix)k\(Int.random(in: 0..<keys))"
                        let choice = Int.random(in: 0..<100)
                        let input: KVLinearizability.Input
                        switch choice {
                        case 0..<30: input = .put("c\(client)-\(sequence)")
                        case 30..<60: input = .get
                        case 60..<75: input = .delete
                        default: input = .compareAndSwap(expected: lastSeen[key] ?? nil, new: "c\(client)-\(sequence)")
                        }
                        let invoked = monotonicNanos()
                        let output = await Self.perform(input, key: key, on: connection)
                        let returned = monotonicNanos()
                        if case .value(let v) = output { lastSeen[key] = v }
                        if case .get = input, output == .unknown { continue }  // a read that failed did nothing
                        history.operations.withLock {
                            $0.append(KVLinearizability.Operation(client: client, key: key, input: input, output: output,
                                                                  invoked: invoked, returned: returned))
                        }
                    }
                }
            }
        }
        let recorded = history.operations.withLock { $0 }
        return Result(history: recorded, verdict: KVLinearizability.check(recorded),
                      unknown: recorded.filter { $0.output == .unknown }.count, start: start)
    }

    static func perform(_ input: KVLinearizability.Input, key: String, on connection: GRPCClientConnection) async -> KVLinearizability.Output {
        (try? await perform(input, key: key) { try await connection.unary($0, $1) })?.output ?? .unknown
    }

    /// One operation of the KV model as etcd requests, through `unary` (path, request → answer):
    /// its outcome and the revision of the answer's header. Errors are thrown: the caller decides
    /// what an unknown outcome is.
    public static func perform(_ input: KVLinearizability.Input, key: String, serializable: Bool = false,
                               unary: (String, [UInt8]) async throws -> [UInt8]) async throws -> (output: KVLinearizability.Output, revision: Int64) {
        let k = Data(key.utf8)
        switch input {
        case .put(let v):
            var put = Etcdserverpb_PutRequest()
            put.key = k
            put.value = Data(v.utf8)
            let response = try Etcdserverpb_PutResponse(serializedBytes: try await unary("/etcdserverpb.KV/Put", try put.serializedBytes()))
            return (.ok, response.header.revision)
        case .get:
            var range = Etcdserverpb_RangeRequest()
            range.key = k
            range.serializable = serializable
            let response = try Etcdserverpb_RangeResponse(serializedBytes: try await unary("/etcdserverpb.KV/Range", try range.serializedBytes()))
            return (.value(response.kvs.first.map { String(decoding: $0.value, as: UTF8.self) }), response.header.revision)
        case .delete:
            var delete = Etcdserverpb_DeleteRangeRequest()
            delete.key = k
            let response = try Etcdserverpb_DeleteRangeResponse(serializedBytes: try await unary("/etcdserverpb.KV/DeleteRange", try delete.serializedBytes()))
            return (.deleted(Int(response.deleted)), response.header.revision)
        case .compareAndSwap(let expected, let new):
            var compare = Etcdserverpb_Compare()
            compare.key = k
            compare.result = .equal
            if let expected {
                compare.target = .value
                compare.value = Data(expected.utf8)
            } else {
                compare.target = .version
                compare.version = 0
            }
            var put = Etcdserverpb_PutRequest()
            put.key = k
            put.value = Data(new.utf8)
            var txn = Etcdserverpb_TxnRequest()
            txn.compare = [compare]
            txn.success = [Etcdserverpb_RequestOp.with { $0.requestPut = put }]
            let response = try Etcdserverpb_TxnResponse(serializedBytes: try await unary("/etcdserverpb.KV/Txn", try txn.serializedBytes()))
            return (.swapped(response.succeeded), response.header.revision)
        }
    }

    /// The recorded operations, appended from every client.
    final class HistoryLog: Sendable {
        let operations = Mutex<[KVLinearizability.Operation]>([])
    }

    /// A Watch create request for every key under `prefix` from `revision`, with prev_kv.
    public static func watchPrefix(_ prefix: String, from revision: Int64) -> [UInt8] {
        var create = Etcdserverpb_WatchRequest()
        create.createRequest.key = Data(prefix.utf8)
        create.createRequest.rangeEnd = prefixEnd(Data(prefix.utf8))
        create.createRequest.startRevision = revision
        create.createRequest.prevKv = true
        return (try? create.serializedBytes()) ?? []
    }

    public static func prefixEnd(_ key: Data) -> Data {
        var bytes = [UInt8](key)
        while let last = bytes.last {
            if last < 0xFF {
                bytes[bytes.count - 1] = last + 1
                return Data(bytes)
            }
            bytes.removeLast()
        }
        return Data([0])
    }
}
