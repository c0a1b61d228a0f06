import Foundation
import EtcdLiteProto

/// etcd evaluates the compares of a txn and of every nested txn on the chosen branches against
/// the state before the txn writes anything; `TxnPath` records those outcomes in pre-order.
struct TxnPath {
    private(set) var outcomes: [Bool] = []

    init(_ request: Etcdserverpb_TxnRequest, view: some KVView) throws {
        try visit(request, view)
    }

    private mutating func visit(_ request: Etcdserverpb_TxnRequest, _ view: some KVView) throws {
        let succeeded = try request.compare.allSatisfy { try Compares.holds($0, view) }
        outcomes.append(succeeded)
        for op in succeeded ? request.success : request.failure {
            if case .requestTxn(let nested)? = op.request {
                try visit(nested, view)
            }
        }
    }
}

enum Compares {
    static func holds(_ compare: Etcdserverpb_Compare, _ view: some KVView) throws -> Bool {
        let kvs = try view.range(KeyRange(key: compare.key, rangeEnd: compare.rangeEnd)).kvs
        if kvs.isEmpty {
            // A missing value cannot be told from an empty one, so VALUE compares on missing keys fail.
            if compare.target == .value { return false }
            return holds(compare, on: Mvccpb_KeyValue())
        }
        return kvs.allSatisfy { holds(compare, on: $0) }
    }

    static func holds(_ compare: Etcdserverpb_Compare, on kv: Mvccpb_KeyValue) -> Bool {
        let order: Int
        switch compare.target {
        case .value:
            var wanted = Data()
            if case .value(let value)? = compare.targetUnion { wanted = value }
            order = kv.value == wanted ? 0 : (kv.value.lexicographicallyPrecedes(wanted) ? -1 : 1)
        case .create:
            var wanted: Int64 = 0
            if case .createRevision(let v)? = compare.targetUnion { wanted = v }
            order = compareInts(kv.createRevision, wanted)
        case .mod:
            var wanted: Int64 = 0
            if case .modRevision(let v)? = compare.targetUnion { wanted = v }
            order = compareInts(kv.modRevision, wanted)
        case .version:
            var wanted: Int64 = 0
            if case .version(let v)? = compare.targetUnion { wanted = v }
            order = compareInts(kv.version, wanted)
        case .lease:
            var wanted: Int64 = 0
            if case .lease(let v)? = compare.targetUnion { wanted = v }
            order = compareInts(kv.lease, wanted)
        case .UNRECOGNIZED:
            order = 0
        }
        switch compare.result {
        case .equal: return order == 0
        case .notEqual: return order != 0
        case .greater: return order > 0
        case .less: return order < 0
        case .UNRECOGNIZED: return true
        }
    }

    private static func compareInts(_ a: Int64, _ b: Int64) -> Int {
        a < b ? -1 : (a > b ? 1 : 0)
    }
}
