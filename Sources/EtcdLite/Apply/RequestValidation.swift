import Foundation
import EtcdLiteProto

/// The checks etcd's API layer makes before a request is proposed or read (v3rpc/key.go).
enum RequestValidation {
    static func check(_ request: Etcdserverpb_RangeRequest) throws {
        if request.key.isEmpty { throw EtcdError.emptyKey }
        if case .UNRECOGNIZED = request.sortOrder { throw EtcdError.invalidSortOption }
        if case .UNRECOGNIZED = request.sortTarget { throw EtcdError.invalidSortOption }
    }

    static func check(_ request: Etcdserverpb_PutRequest) throws {
        if request.key.isEmpty { throw EtcdError.emptyKey }
        if request.ignoreValue && !request.value.isEmpty { throw EtcdError.valueProvided }
        if request.ignoreLease && request.lease != 0 { throw EtcdError.leaseProvided }
    }

    static func check(_ request: Etcdserverpb_DeleteRangeRequest) throws {
        if request.key.isEmpty { throw EtcdError.emptyKey }
    }

    static func check(_ request: Etcdserverpb_TxnRequest, maxTxnOps: Int) throws {
        let ops = max(request.compare.count, request.success.count, request.failure.count)
        if ops > maxTxnOps { throw EtcdError.tooManyOps }
        for compare in request.compare where compare.key.isEmpty { throw EtcdError.emptyKey }
        for op in request.success { try check(op, maxTxnOps: maxTxnOps - ops) }
        for op in request.failure { try check(op, maxTxnOps: maxTxnOps - ops) }
        _ = try checkIntervals(request.success)
        _ = try checkIntervals(request.failure)
    }

    private static func check(_ op: Etcdserverpb_RequestOp, maxTxnOps: Int) throws {
        switch op.request {
        case .requestRange(let r): try check(r)
        case .requestPut(let r): try check(r)
        case .requestDeleteRange(let r): try check(r)
        case .requestTxn(let r): try check(r, maxTxnOps: maxTxnOps)
        case nil: throw EtcdError.keyNotFound
        }
    }

    /// etcd's checkIntervals: within one branch a key is put at most once and never inside a range
    /// the branch deletes. The two branches of a nested txn exclude each other, so both may put the
    /// same key. Delete intervals are taken literally ([key, range_end)), as etcd does.
    private static func checkIntervals(_ ops: [Etcdserverpb_RequestOp]) throws -> (puts: Set<Data>, deletes: [KeyRange]) {
        var deletes: [KeyRange] = ops.compactMap {
            guard case .requestDeleteRange(let r)? = $0.request else { return nil }
            return r.rangeEnd.isEmpty ? .single(r.key) : .interval(r.key, r.rangeEnd)
        }
        var puts = Set<Data>()
        for op in ops {
            guard case .requestTxn(let nested)? = op.request else { continue }
            let then = try checkIntervals(nested.success)
            let otherwise = try checkIntervals(nested.failure)
            for key in then.puts {
                if puts.contains(key) || deletes.contains(where: { $0.contains(key) }) { throw EtcdError.duplicateKey }
                puts.insert(key)
            }
            for key in otherwise.puts {
                if puts.contains(key) && !then.puts.contains(key) { throw EtcdError.duplicateKey }
                if deletes.contains(where: { $0.contains(key) }) { throw EtcdError.duplicateKey }
                puts.insert(key)
            }
            deletes += then.deletes + otherwise.deletes
        }
        for op in ops {
            guard case .requestPut(let r)? = op.request else { continue }
            if puts.contains(r.key) || deletes.contains(where: { $0.contains(r.key) }) { throw EtcdError.duplicateKey }
            puts.insert(r.key)
        }
        return (puts, deletes)
    }

    static func isReadOnly(_ request: Etcdserverpb_TxnRequest) -> Bool {
        for op in request.success + request.failure {
            switch op.request {
            case .requestPut, .requestDeleteRange: return false
            case .requestTxn(let nested): if !isReadOnly(nested) { return false }
            default: break
            }
        }
        return true
    }

    static func hasPuts(_ request: Etcdserverpb_TxnRequest) -> Bool {
        for op in request.success + request.failure {
            switch op.request {
            case .requestPut: return true
            case .requestTxn(let nested): if hasPuts(nested) { return true }
            default: break
            }
        }
        return false
    }
}
