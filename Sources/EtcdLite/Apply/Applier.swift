import EtcdLiteProto

/// Applies committed entries to the MVCC store, as etcd's applier does. Every check that can fail
/// runs before the first write, so a failed request changes nothing.
struct Applier {
    /// Whether a lease exists; leases arrive with the Lease issue, until then none does.
    var leaseExists: (Int64) -> Bool = { _ in false }

    func put(_ request: Etcdserverpb_PutRequest, _ txn: WriteTxn) throws -> Etcdserverpb_PutResponse {
        if request.lease != 0 && !leaseExists(request.lease) { throw EtcdError.leaseNotFound }
        var previous: Mvccpb_KeyValue?
        if request.ignoreValue || request.ignoreLease || request.prevKv {
            previous = try txn.get(request.key)
        }
        if (request.ignoreValue || request.ignoreLease) && previous == nil { throw EtcdError.keyNotFound }
        let value = request.ignoreValue ? previous!.value : request.value
        let lease = request.ignoreLease ? previous!.lease : request.lease
        var response = Etcdserverpb_PutResponse()
        response.header.revision = try txn.put(key: request.key, value: value, lease: lease)
        if request.prevKv, let previous { response.prevKv = previous }
        return response
    }

    func deleteRange(_ request: Etcdserverpb_DeleteRangeRequest, _ txn: WriteTxn) throws -> Etcdserverpb_DeleteRangeResponse {
        let deleted = try txn.deleteRange(KeyRange(key: request.key, rangeEnd: request.rangeEnd))
        var response = Etcdserverpb_DeleteRangeResponse()
        response.header.revision = txn.readRevision
        response.deleted = Int64(deleted.count)
        if request.prevKv { response.prevKvs = deleted }
        return response
    }

    /// Range as etcd's applier runs it: filters and sorting need the whole range, otherwise one key
    /// more than the limit tells whether there are more.
    static func range(_ request: Etcdserverpb_RangeRequest, _ view: some KVView) throws -> Etcdserverpb_RangeResponse {
        let needsAll = request.sortOrder != .none || request.minModRevision != 0 || request.maxModRevision != 0
            || request.minCreateRevision != 0 || request.maxCreateRevision != 0
        var limit = needsAll ? 0 : Int(clamping: request.limit)
        if limit > 0 { limit += 1 }
        let result = try view.range(
            KeyRange(key: request.key, rangeEnd: request.rangeEnd), revision: request.revision,
            limit: limit, countOnly: request.countOnly, keysOnly: request.keysOnly)
        var kvs = result.kvs
        if request.maxModRevision != 0 { kvs.removeAll { $0.modRevision > request.maxModRevision } }
        if request.minModRevision != 0 { kvs.removeAll { $0.modRevision < request.minModRevision } }
        if request.maxCreateRevision != 0 { kvs.removeAll { $0.createRevision > request.maxCreateRevision } }
        if request.minCreateRevision != 0 { kvs.removeAll { $0.createRevision < request.minCreateRevision } }

        var order = request.sortOrder
        if request.sortTarget != .key && order == .none { order = .ascend }
        if order != .none {
            let ascending: (Mvccpb_KeyValue, Mvccpb_KeyValue) -> Bool
            switch request.sortTarget {
            case .key, .UNRECOGNIZED: ascending = { $0.key.lexicographicallyPrecedes($1.key) }
            case .version: ascending = { $0.version < $1.version }
            case .create: ascending = { $0.createRevision < $1.createRevision }
            case .mod: ascending = { $0.modRevision < $1.modRevision }
            case .value: ascending = { $0.value.lexicographicallyPrecedes($1.value) }
            }
            if order == .descend {
                kvs = kvs.stableSorted { ascending($1, $0) }
            } else {
                kvs = kvs.stableSorted(by: ascending)
            }
        }
        var response = Etcdserverpb_RangeResponse()
        if request.limit > 0 && kvs.count > request.limit {
            kvs.removeLast(kvs.count - Int(request.limit))
            response.more = true
        }
        response.header.revision = view.headerRevision
        response.count = Int64(result.count)
        response.kvs = kvs
        return response
    }

    func txn(_ request: Etcdserverpb_TxnRequest, _ txn: WriteTxn) throws -> Etcdserverpb_TxnResponse {
        let path = try TxnPath(request, view: txn).outcomes
        try check(request, path: path, view: txn)
        var cursor = 0
        var response = try execute(request, path: path, cursor: &cursor, txn)
        response.header = Etcdserverpb_ResponseHeader()
        response.header.revision = txn.readRevision
        return response
    }

    /// A read-only txn runs on a read view, outside the log.
    static func readOnlyTxn(_ request: Etcdserverpb_TxnRequest, _ view: ReadView) throws -> Etcdserverpb_TxnResponse {
        let path = try TxnPath(request, view: view).outcomes
        try checkRanges(request, path: path, cursor: 0, view: view)
        var cursor = 0
        var response = try executeReads(request, path: path, cursor: &cursor, view)
        response.header.revision = view.headerRevision
        return response
    }

    private func execute(_ request: Etcdserverpb_TxnRequest, path: [Bool], cursor: inout Int, _ txn: WriteTxn) throws -> Etcdserverpb_TxnResponse {
        let succeeded = path[cursor]
        cursor += 1
        var response = Etcdserverpb_TxnResponse()
        response.header = Etcdserverpb_ResponseHeader()
        response.succeeded = succeeded
        for op in succeeded ? request.success : request.failure {
            var result = Etcdserverpb_ResponseOp()
            switch op.request {
            case .requestRange(let r): result.responseRange = try Applier.range(r, txn)
            case .requestPut(let r): result.responsePut = try put(r, txn)
            case .requestDeleteRange(let r): result.responseDeleteRange = try deleteRange(r, txn)
            case .requestTxn(let r): result.responseTxn = try execute(r, path: path, cursor: &cursor, txn)
            case nil: break
            }
            response.responses.append(result)
        }
        return response
    }

    private static func executeReads(_ request: Etcdserverpb_TxnRequest, path: [Bool], cursor: inout Int, _ view: ReadView) throws -> Etcdserverpb_TxnResponse {
        let succeeded = path[cursor]
        cursor += 1
        var response = Etcdserverpb_TxnResponse()
        response.header = Etcdserverpb_ResponseHeader()
        response.succeeded = succeeded
        for op in succeeded ? request.success : request.failure {
            var result = Etcdserverpb_ResponseOp()
            switch op.request {
            case .requestRange(let r): result.responseRange = try range(r, view)
            case .requestTxn(let r): result.responseTxn = try executeReads(r, path: path, cursor: &cursor, view)
            case .requestPut, .requestDeleteRange, nil: break
            }
            response.responses.append(result)
        }
        return response
    }

    /// etcd's checkRequests: puts need their lease and, with ignore_*, an existing key; ranges need a
    /// revision that is neither compacted nor in the future. Returns how many txns it walked.
    private func check(_ request: Etcdserverpb_TxnRequest, path: [Bool], view: some KVView) throws {
        var cursor = 0
        try checkPuts(request, path: path, cursor: &cursor, view: view)
        _ = try Applier.checkRanges(request, path: path, cursor: 0, view: view)
    }

    private func checkPuts(_ request: Etcdserverpb_TxnRequest, path: [Bool], cursor: inout Int, view: some KVView) throws {
        let succeeded = path[cursor]
        cursor += 1
        for op in succeeded ? request.success : request.failure {
            switch op.request {
            case .requestTxn(let nested):
                try checkPuts(nested, path: path, cursor: &cursor, view: view)
            case .requestPut(let put):
                if put.ignoreValue || put.ignoreLease, try view.get(put.key) == nil { throw EtcdError.keyNotFound }
                if put.lease != 0 && !leaseExists(put.lease) { throw EtcdError.leaseNotFound }
            default: break
            }
        }
    }

    @discardableResult
    private static func checkRanges(_ request: Etcdserverpb_TxnRequest, path: [Bool], cursor start: Int, view: some KVView) throws -> Int {
        var cursor = start
        let succeeded = path[cursor]
        cursor += 1
        for op in succeeded ? request.success : request.failure {
            switch op.request {
            case .requestTxn(let nested):
                cursor = try checkRanges(nested, path: path, cursor: cursor, view: view)
            case .requestRange(let range):
                if range.revision > view.readRevision { throw EtcdError.futureRevision }
                if range.revision > 0 && range.revision < view.compactRevision { throw EtcdError.compacted }
            default: break
            }
        }
        return cursor
    }
}

extension Array {
    /// A stable sort: etcd's sort is not, so ties in tests are avoided, but ours stays deterministic.
    func stableSorted(by areInIncreasingOrder: (Element, Element) -> Bool) -> [Element] {
        enumerated().sorted { a, b in
            areInIncreasingOrder(a.element, b.element) || (!areInIncreasingOrder(b.element, a.element) && a.offset < b.offset)
        }.map(\.element)
    }
}
