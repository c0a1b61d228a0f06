import Foundation
import EtcdLite
import EtcdLiteProto

/// A fresh data directory under the system temp dir, removed by `cleanup()`.
struct TempDir {
    let url: URL
    init() {
        url = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-test-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
    }
    /// An existing directory (its owner removes it).
    init(url: URL) { self.url = url }
    var path: String { url.path }
    func cleanup() { try? FileManager.default.removeItem(at: url) }
}

/// An in-process member on its own data directory.
func makeServer(_ dir: TempDir, configure: (inout MemberConfig) -> Void = { _ in }) throws -> EtcdLiteServer {
    var config = MemberConfig()
    config.dataDir = dir.path
    configure(&config)
    return try EtcdLiteServer(config: config)
}

extension Data {
    init(_ text: String) { self = Data(text.utf8) }
}

func put(_ key: String, _ value: String, lease: Int64 = 0, prevKV: Bool = false) -> Etcdserverpb_PutRequest {
    var r = Etcdserverpb_PutRequest()
    r.key = Data(key)
    r.value = Data(value)
    r.lease = lease
    r.prevKv = prevKV
    return r
}

func range(_ key: String, _ end: String = "", revision: Int64 = 0, limit: Int64 = 0) -> Etcdserverpb_RangeRequest {
    var r = Etcdserverpb_RangeRequest()
    r.key = Data(key)
    r.rangeEnd = Data(end)
    r.revision = revision
    r.limit = limit
    return r
}

func deleteRange(_ key: String, _ end: String = "", prevKV: Bool = false) -> Etcdserverpb_DeleteRangeRequest {
    var r = Etcdserverpb_DeleteRangeRequest()
    r.key = Data(key)
    r.rangeEnd = Data(end)
    r.prevKv = prevKV
    return r
}

func op(_ request: Etcdserverpb_PutRequest) -> Etcdserverpb_RequestOp {
    var o = Etcdserverpb_RequestOp(); o.requestPut = request; return o
}
func op(_ request: Etcdserverpb_RangeRequest) -> Etcdserverpb_RequestOp {
    var o = Etcdserverpb_RequestOp(); o.requestRange = request; return o
}
func op(_ request: Etcdserverpb_DeleteRangeRequest) -> Etcdserverpb_RequestOp {
    var o = Etcdserverpb_RequestOp(); o.requestDeleteRange = request; return o
}
func op(_ request: Etcdserverpb_TxnRequest) -> Etcdserverpb_RequestOp {
    var o = Etcdserverpb_RequestOp(); o.requestTxn = request; return o
}

func compare(_ key: String, _ target: Etcdserverpb_Compare.CompareTarget, _ result: Etcdserverpb_Compare.CompareResult, _ value: Int64) -> Etcdserverpb_Compare {
    var c = Etcdserverpb_Compare()
    c.key = Data(key)
    c.target = target
    c.result = result
    switch target {
    case .version: c.version = value
    case .create: c.createRevision = value
    case .mod: c.modRevision = value
    case .lease: c.lease = value
    default: break
    }
    return c
}

func compareValue(_ key: String, _ result: Etcdserverpb_Compare.CompareResult, _ value: String) -> Etcdserverpb_Compare {
    var c = Etcdserverpb_Compare()
    c.key = Data(key)
    c.target = .value
    c.result = result
    c.value = Data(value)
    return c
}

func keys(_ response: Etcdserverpb_RangeResponse) -> [String] {
    response.kvs.map { String(decoding: $0.key, as: UTF8.self) }
}

/// Asserts `body` throws exactly `expected`.
func expectEtcdError(_ expected: EtcdError, _ body: () async throws -> Void) async -> Bool {
    do {
        try await body()
        return false
    } catch let error as EtcdError {
        return error == expected
    } catch {
        return false
    }
}
