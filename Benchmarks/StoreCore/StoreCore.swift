import Benchmark
@_spi(Benchmarks) import EtcdLite
import EtcdLiteProto
import Foundation

// The store's hot paths, without Raft or the network: the MVCC apply of a batch of puts (one
// SQLite transaction, as the apply loop commits a batch), Range over the latest revision, and the
// protobuf encoding and decoding a request and a response cost. Allocation counts are the
// regression guard (static thresholds in Benchmarks/Thresholds/, checked with
// `swift package benchmark thresholds check --path Benchmarks/Thresholds`: p90 allocations may
// grow 5 %);
// times vary with the machine.
// Run: swift package benchmark --target StoreCore

func temporaryDirectory() -> String {
    let path = NSTemporaryDirectory() + "storecore-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try! FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}

func put(_ key: String, _ size: Int = 64) -> Etcdserverpb_PutRequest {
    var request = Etcdserverpb_PutRequest()
    request.key = Data(key.utf8)
    request.value = Data(repeating: 0x61, count: size)
    return request
}

let benchmarks: @Sendable () -> Void = {
    let metrics: [BenchmarkMetric] = [.wallClock, .throughput, .mallocCountTotal, .cpuTotal]
    // Allocation counts may not grow by more than 5 % over the stored thresholds.
    let tolerance: [BenchmarkMetric: BenchmarkThresholds] = [.mallocCountTotal: .init(relative: [.p90: 5])]

    // 100 puts of 64-byte values to 1,000 keys, one transaction per iteration.
    Benchmark("MVCCApplyBatchOf100Puts",
              configuration: .init(metrics: metrics, maxDuration: .seconds(5), maxIterations: 2_000, thresholds: tolerance)) { benchmark in
        let directory = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try StoreHarness(directory: directory)
        var n = 0
        let batches = (0..<benchmark.scaledIterations.count).map { _ in
            (0..<100).map { _ -> Etcdserverpb_PutRequest in
                n += 1
                return put("key/\(n % 1_000)")
            }
        }
        benchmark.startMeasurement()
        for batch in batches { blackHole(try store.apply(puts: batch)) }
        benchmark.stopMeasurement()
    }

    // Range of 100 keys (of 10,000) at the latest revision, values of 64 bytes.
    Benchmark("Range100KeysOf10000",
              configuration: .init(metrics: metrics, maxDuration: .seconds(5), maxIterations: 5_000, thresholds: tolerance)) { benchmark in
        let directory = temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let store = try StoreHarness(directory: directory)
        for chunk in stride(from: 0, to: 10_000, by: 500) {
            try store.apply(puts: (chunk..<chunk + 500).map { put(String(format: "range/%05d", $0)) })
        }
        var request = Etcdserverpb_RangeRequest()
        request.key = Data("range/05000".utf8)
        request.rangeEnd = Data("range/05100".utf8)
        benchmark.startMeasurement()
        for _ in benchmark.scaledIterations {
            let response = try store.range(request)
            precondition(response.kvs.count == 100)
            blackHole(response)
        }
        benchmark.stopMeasurement()
    }

    // A Txn request (compare on mod_revision, put with lease): what kube-apiserver sends per write.
    var txn = Etcdserverpb_TxnRequest()
    var compare = Etcdserverpb_Compare()
    compare.key = Data("/registry/pods/default/web-0".utf8)
    compare.target = .mod
    compare.result = .equal
    compare.modRevision = 12_345
    txn.compare = [compare]
    var leased = put("/registry/pods/default/web-0", 1_024)
    leased.lease = 7_587_870_000_001
    txn.success = [Etcdserverpb_RequestOp.with { $0.requestPut = leased }]
    txn.failure = [Etcdserverpb_RequestOp.with { $0.requestRange = Etcdserverpb_RangeRequest.with { $0.key = compare.key } }]
    let txnBytes: [UInt8] = try! txn.serializedBytes()
    Benchmark("ProtobufTxnRequest1KiBPut",
              configuration: .init(metrics: metrics, scalingFactor: .kilo, maxDuration: .seconds(5), thresholds: tolerance)) { benchmark in
        for _ in benchmark.scaledIterations {
            let decoded = try Etcdserverpb_TxnRequest(serializedBytes: txnBytes)
            let encoded: [UInt8] = try decoded.serializedBytes()
            blackHole(encoded)
        }
    }

    // A Range response of 100 key-values of 256 bytes: a page of a list.
    var page = Etcdserverpb_RangeResponse()
    page.header.revision = 99_999
    page.count = 100
    page.kvs = (0..<100).map { i in
        var kv = Mvccpb_KeyValue()
        kv.key = Data("/registry/configmaps/default/cm-\(i)".utf8)
        kv.value = Data(repeating: 0x62, count: 256)
        kv.createRevision = Int64(1_000 + i)
        kv.modRevision = Int64(2_000 + i)
        kv.version = 3
        return kv
    }
    let pageBytes: [UInt8] = try! page.serializedBytes()
    Benchmark("ProtobufRangeResponse100KVs",
              configuration: .init(metrics: metrics, maxDuration: .seconds(5), maxIterations: 20_000, thresholds: tolerance)) { benchmark in
        for _ in benchmark.scaledIterations {
            let decoded = try Etcdserverpb_RangeResponse(serializedBytes: pageBytes)
            let encoded: [UInt8] = try decoded.serializedBytes()
            blackHole(encoded)
        }
    }
}
