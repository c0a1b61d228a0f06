import EtcdLiteClient
import EtcdLiteProto
import Foundation
import Histogram
import SwiftProtobuf
import Synchronization

/// KV workloads in the spirit of etcd's benchmark tool, against any etcd endpoint: `clients`
/// requests in flight over `conns` connections (closed loop), or `rate` requests per second sent
/// on schedule whatever the answers do (open loop: each latency counts from the request's intended
/// send time, so queueing in the server is not hidden by a client that waits).
public struct KVBench: Sendable {
    public enum Workload: String, CaseIterable, Sendable, Codable {
        case put, range, delete
        case txnPut = "txn-put"
        /// Txns that read (a range) or write (a put), `readRatio` of them reads.
        case txnMixed = "txn-mixed"
    }

    public var workload: Workload
    public var endpoints: [Endpoint]
    public var conns = 1
    public var clients = 1
    /// Requests to send; with `duration`, the cap on them.
    public var total = 10_000
    /// Seconds to run (nil: until `total` are answered).
    public var duration: Double?
    /// Requests per second, all clients together (0: closed loop).
    public var rate = 0
    public var keySize = 8
    public var valSize = 8
    public var keySpaceSize = 1
    public var sequentialKeys = false
    /// Range: serializable (`--consistency s`) rather than linearizable.
    public var serializable = false
    /// Range: the whole key space as one prefix range instead of one key.
    public var prefix = false
    public var readRatio = 0.5
    /// Called about twice a second with the answered count (progress display).
    public var progress: (@Sendable (Int) -> Void)?
    /// Seeds the run's draws (key choice, read or write): drawn per request from it without a
    /// system call (the system generator costs a getrandom per call on Linux).
    public var seed = UInt64.random(in: 0...UInt64.max)

    public init(workload: Workload, endpoints: [Endpoint]) {
        self.workload = workload
        self.endpoints = endpoints
    }

    public struct Result: Sendable, Codable {
        public var workload: Workload
        public var endpoints: [String]
        public var requests: Int
        public var succeeded: Int
        public var seconds: Double
        public var requestsPerSecond: Double
        public var latency: LatencyStats
        public var histogram: [Bucket]
        public var errors: [String: Int]
    }

    /// Milliseconds.
    public struct LatencyStats: Sendable, Codable {
        public var fastest: Double
        public var slowest: Double
        public var average: Double
        public var stddev: Double
        public var p50: Double
        public var p90: Double
        public var p99: Double
        public var p999: Double
        public var p9999: Double
    }

    /// Answers with a latency at or below `upToMs` (and above the previous bucket's).
    public struct Bucket: Sendable, Codable {
        public var upToMs: Double
        public var count: UInt64
    }

    /// The key of operation `n` (exactly `keySize` bytes: the key index as a varint, zero-padded,
    /// as etcd's benchmark makes them).
    func key(_ n: Int) -> Data {
        let index = sequentialKeys ? n % keySpaceSize : Int(draw(n, 1) % UInt64(keySpaceSize))
        var bytes = [UInt8](repeating: 0, count: keySize)
        var v = UInt64(bitPattern: Int64(index) << 1)  // zig-zag, as Go's PutVarint
        var i = 0
        while i < keySize {
            bytes[i] = UInt8(v & 0x7F) | (v >= 0x80 ? 0x80 : 0)
            v >>= 7
            i += 1
            if v == 0 { break }
        }
        return Data(bytes)
    }

    /// A uniformly distributed draw for operation `n` (SplitMix64 of the seed, `n` and `stream`).
    func draw(_ n: Int, _ stream: UInt64) -> UInt64 {
        var z = seed &+ UInt64(truncatingIfNeeded: n) &* 0x9E37_79B9_7F4A_7C15 &+ stream &* 0xD1B5_4A32_D192_ED03
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// The gRPC method and encoded request of operation `n`.
    func request(_ n: Int, value: Data) throws -> (String, [UInt8]) {
        switch workload {
        case .put:
            var put = Etcdserverpb_PutRequest()
            put.key = key(n)
            put.value = value
            return ("/etcdserverpb.KV/Put", try put.serializedBytes())
        case .range:
            return ("/etcdserverpb.KV/Range", try rangeRequest(n).serializedBytes())
        case .delete:
            var delete = Etcdserverpb_DeleteRangeRequest()
            delete.key = key(n)
            return ("/etcdserverpb.KV/DeleteRange", try delete.serializedBytes())
        case .txnPut:
            var put = Etcdserverpb_PutRequest()
            put.key = key(n)
            put.value = value
            var txn = Etcdserverpb_TxnRequest()
            txn.success = [Etcdserverpb_RequestOp.with { $0.requestPut = put }]
            return ("/etcdserverpb.KV/Txn", try txn.serializedBytes())
        case .txnMixed:
            var txn = Etcdserverpb_TxnRequest()
            if Double(draw(n, 2) >> 11) / Double(1 << 53) < readRatio {
                let range = rangeRequest(n)
                txn.success = [Etcdserverpb_RequestOp.with { $0.requestRange = range }]
            } else {
                var put = Etcdserverpb_PutRequest()
                put.key = key(n)
                put.value = value
                txn.success = [Etcdserverpb_RequestOp.with { $0.requestPut = put }]
            }
            return ("/etcdserverpb.KV/Txn", try txn.serializedBytes())
        }
    }

    private func rangeRequest(_ n: Int) -> Etcdserverpb_RangeRequest {
        var range = Etcdserverpb_RangeRequest()
        if prefix {
            range.key = Data([0])
            range.rangeEnd = Data([0])  // every key: the key space is all there is
        } else {
            range.key = key(n)
        }
        range.serializable = serializable
        return range
    }

    /// Writes `keySpaceSize` keys (for range workloads), 64 in flight.
    public func fill() async throws {
        let connection = try await endpoints[0].connect()
        defer { Task { await connection.close() } }
        let value = Data(repeating: 0x61, count: valSize)
        var filler = self
        filler.sequentialKeys = true
        try await windowed(count: keySpaceSize, window: 64) { [filler] n in
            var put = Etcdserverpb_PutRequest()
            put.key = filler.key(n)
            put.value = value
            _ = try await connection.unary("/etcdserverpb.KV/Put", try put.serializedBytes())
        }
    }

    public func run() async throws -> Result {
        guard !endpoints.isEmpty, conns > 0, clients > 0, keySpaceSize > 0, keySize > 0 else {
            throw BenchError("endpoints, --conns, --clients, --key-space-size and --key-size must not be empty or zero")
        }
        var connections: [GRPCClientConnection] = []
        for n in 0..<conns { connections.append(try await endpoints[n % endpoints.count].connect()) }
        defer { for connection in connections { Task { await connection.close() } } }
        let state = RunState(limit: total, deadline: duration.map { monotonicNanos() + UInt64($0 * 1e9) })
        let engine = Engine(bench: self, connections: connections, state: state)
        let reporter = progress.map { report in
            Task {
                while !Task.isCancelled {
                    try? await Task.sleep(for: .milliseconds(500))
                    report(state.answered)
                }
            }
        }
        let start = monotonicNanos()
        if rate == 0 {
            for slot in 0..<clients {
                guard let n = state.take() else { break }
                engine.issue(n, intended: monotonicNanos(), slot: slot)
            }
        } else {
            // Open loop: request n is due at start + n / rate; whatever is due goes out together.
            let interval = 1e9 / Double(rate)
            func due(_ n: Int) -> UInt64 { start + UInt64(Double(n) * interval) }
            while let n = state.peekIndex() {
                await sleep(until: due(n))
                let now = monotonicNanos()
                while let next = state.peekIndex(), due(next) <= now, let taken = state.take() {
                    engine.issue(taken, intended: due(taken), slot: taken)
                }
            }
        }
        await state.finished()
        let end = monotonicNanos()
        reporter?.cancel()
        return state.result(workload: workload, endpoints: endpoints.map { "\($0.host):\($0.port)" },
                            seconds: Double(end - start) / 1e9)
    }
}

/// Sends a run's requests: in a closed loop, each answer sends its client's next request from the
/// connection's event loop (no task per request).
private final class Engine: Sendable {
    let bench: KVBench
    let connections: [GRPCClientConnection]
    let state: RunState
    let value: Data

    init(bench: KVBench, connections: [GRPCClientConnection], state: RunState) {
        self.bench = bench
        self.connections = connections
        self.state = state
        value = Data(repeating: 0x61, count: bench.valSize)
    }

    func issue(_ n: Int, intended: UInt64, slot: Int) {
        guard let (path, body) = try? bench.request(n, value: value) else {
            state.record(latency: nil, error: "request could not be encoded")
            return
        }
        let closedLoop = bench.rate == 0
        let observer = Answer(intended: intended, state: state) { [self] in
            guard closedLoop, let next = state.take() else { return }
            issue(next, intended: monotonicNanos(), slot: slot)
        }
        _ = connections[slot % connections.count].start(path, messages: [body], endRequest: true, observer: observer)
    }
}

/// What a run shares between its event loops: the next request, the histogram, the errors.
final class RunState: Sendable {
    private struct Counts {
        var issued = 0
        var answered = 0
        var succeeded = 0
        var histogram = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var errors: [String: Int] = [:]
        var waiter: CheckedContinuation<Void, Never>?
        var stopped = false
    }
    private let counts = Mutex(Counts())
    let limit: Int
    let deadline: UInt64?

    init(limit: Int, deadline: UInt64?) {
        self.limit = limit
        self.deadline = deadline
    }

    /// The index of the next request to send, or nil when the run has sent what it may.
    func take() -> Int? { next(advance: true) }

    /// The index `take()` would return, without taking it.
    func peekIndex() -> Int? { next(advance: false) }

    private func next(advance: Bool) -> Int? {
        counts.withLock { counts in
            if counts.stopped || counts.issued >= limit { return nil }
            if let deadline, monotonicNanos() >= deadline {
                counts.stopped = true
                return nil
            }
            defer { if advance { counts.issued += 1 } }
            return counts.issued
        }
    }

    var answered: Int { counts.withLock { $0.answered } }

    func record(latency: UInt64?, error: String?) {
        let waiter = counts.withLock { counts -> CheckedContinuation<Void, Never>? in
            counts.answered += 1
            if let latency {
                counts.succeeded += 1
                _ = counts.histogram.record(max(1, latency))
            }
            if let error { counts.errors[error, default: 0] += 1 }
            guard counts.answered == counts.issued, counts.stopped || counts.issued >= limit else { return nil }
            defer { counts.waiter = nil }
            return counts.waiter
        }
        waiter?.resume()
    }

    /// Waits until every request sent has been answered and no more will be sent.
    func finished() async {
        // A duration-bound run stops sending at its deadline even if no answer comes to notice.
        if let deadline {
            while monotonicNanos() < deadline, counts.withLock({ !$0.stopped && $0.issued < limit }) {
                try? await Task.sleep(for: .milliseconds(5))
            }
            counts.withLock { $0.stopped = true }
        }
        await withCheckedContinuation { continuation in
            let done = counts.withLock { counts -> Bool in
                if counts.answered == counts.issued && (counts.stopped || counts.issued >= limit) { return true }
                counts.waiter = continuation
                return false
            }
            if done { continuation.resume() }
        }
    }

    func result(workload: KVBench.Workload, endpoints: [String], seconds: Double) -> KVBench.Result {
        counts.withLock { counts in
            let h = counts.histogram
            func ms(_ nanos: UInt64) -> Double { Double(nanos) / 1e6 }
            let empty = h.totalCount == 0
            let stats = KVBench.LatencyStats(
                fastest: empty ? 0 : ms(h.min), slowest: empty ? 0 : ms(h.max), average: empty ? 0 : h.mean / 1e6,
                stddev: empty ? 0 : h.stdDeviation / 1e6,
                p50: ms(h.valueAtPercentile(50)), p90: ms(h.valueAtPercentile(90)), p99: ms(h.valueAtPercentile(99)),
                p999: ms(h.valueAtPercentile(99.9)), p9999: ms(h.valueAtPercentile(99.99)))
            return KVBench.Result(workload: workload, endpoints: endpoints, requests: counts.answered, succeeded: counts.succeeded,
                                  seconds: seconds, requestsPerSecond: Double(counts.succeeded) / max(seconds, 1e-9),
                                  latency: stats, histogram: Self.buckets(h), errors: counts.errors)
        }
    }

    /// Ten buckets of equal width between the fastest and the slowest answer (etcd's benchmark
    /// prints its histogram so).
    static func buckets(_ h: Histogram<UInt64>) -> [KVBench.Bucket] {
        guard h.totalCount > 0 else { return [] }
        let low = h.min, high = max(h.max, h.min + 10)
        let width = (high - low) / 10
        return (0..<10).map { i in
            let from = i == 0 ? 0 : low + width * UInt64(i) + 1
            let to = i == 9 ? high : low + width * UInt64(i + 1)
            return KVBench.Bucket(upToMs: Double(i == 9 ? high : to) / 1e6, count: h.count(within: from...to))
        }
    }
}

/// One request's answer: its latency from the intended send time, or its error.
private final class Answer: ClientCallObserver, @unchecked Sendable {
    let intended: UInt64
    let state: RunState
    let next: @Sendable () -> Void

    init(intended: UInt64, state: RunState, next: @escaping @Sendable () -> Void) {
        self.intended = intended
        self.state = state
        self.next = next
    }

    func received(_ message: [UInt8]) {}

    func closed(_ status: ClientStatus) {
        if status.code == 0 {
            state.record(latency: monotonicNanos() &- intended, error: nil)
        } else {
            state.record(latency: nil, error: status.message.isEmpty ? "grpc status \(status.code)" : status.message)
        }
        next()
    }
}

extension KVBench.Result {
    /// etcd's benchmark layout: summary, histogram, percentiles, errors.
    public var text: String {
        func s(_ ms: Double) -> String { String(format: "%.4f", ms / 1000) }
        var lines = [
            "\(workload.rawValue) against \(endpoints.joined(separator: ","))",
            "Summary:",
            "  Total:\t\(String(format: "%.4f", seconds)) secs.",
            "  Slowest:\t\(s(latency.slowest)) secs.",
            "  Fastest:\t\(s(latency.fastest)) secs.",
            "  Average:\t\(s(latency.average)) secs.",
            "  Stddev:\t\(s(latency.stddev)) secs.",
            "  Requests/sec:\t\(String(format: "%.4f", requestsPerSecond))",
            "",
            "Response time histogram:",
        ]
        let most = histogram.map(\.count).max() ?? 1
        for bucket in histogram {
            let bar = String(repeating: "∎", count: Int(40 * Double(bucket.count) / Double(max(most, 1))))
            lines.append("  \(s(bucket.upToMs)) [\(bucket.count)]\t|\(bar)")
        }
        lines += [
            "",
            "Latency distribution:",
            "  50% in \(s(latency.p50)) secs.",
            "  90% in \(s(latency.p90)) secs.",
            "  99% in \(s(latency.p99)) secs.",
            "  99.9% in \(s(latency.p999)) secs.",
            "  99.99% in \(s(latency.p9999)) secs.",
        ]
        if !errors.isEmpty {
            lines += ["", "Error distribution:"] + errors.sorted { $0.key < $1.key }.map { "  [\($0.value)]\t\($0.key)" }
        }
        return lines.joined(separator: "\n")
    }
}

extension KVBench {
    /// The endpoint whose member leads (Maintenance.Status of each).
    public static func leader(of endpoints: [Endpoint]) async throws -> Endpoint {
        for endpoint in endpoints {
            guard let connection = try? await endpoint.connect() else { continue }
            defer { Task { await connection.close() } }
            guard let bytes = try? await connection.unary("/etcdserverpb.Maintenance/Status", []),
                  let status = try? Etcdserverpb_StatusResponse(serializedBytes: bytes) else { continue }
            if status.leader != 0 && status.leader == status.header.memberID { return endpoint }
        }
        throw BenchError("no leader among \(endpoints.map { "\($0.host):\($0.port)" })")
    }
}

/// The same workload on two targets in alternating rounds (A B A B ...), medians compared.
public struct KVComparison: Sendable, Codable {
    public var rounds: [[KVBench.Result]]
    public var a: Summary
    public var b: Summary
    /// B's figure over A's, for each figure.
    public var ratio: Summary

    public struct Summary: Sendable, Codable {
        public var requestsPerSecond: Double
        public var p50: Double
        public var p90: Double
        public var p99: Double
        public var average: Double
        public var errors: Int
    }

    public static func run(_ a: KVBench, _ b: KVBench, rounds: Int) async throws -> KVComparison {
        var results: [[KVBench.Result]] = []
        for _ in 0..<max(1, rounds) {
            results.append([try await a.run(), try await b.run()])
        }
        func median(_ side: Int, _ figure: (KVBench.Result) -> Double) -> Double {
            let values = results.map { figure($0[side]) }.sorted()
            return values[values.count / 2]
        }
        func summary(_ side: Int) -> Summary {
            Summary(requestsPerSecond: median(side, \.requestsPerSecond), p50: median(side, \.latency.p50),
                    p90: median(side, \.latency.p90), p99: median(side, \.latency.p99), average: median(side, \.latency.average),
                    errors: results.reduce(0) { $0 + $1[side].errors.values.reduce(0, +) })
        }
        let sa = summary(0), sb = summary(1)
        func over(_ x: Double, _ y: Double) -> Double { y == 0 ? 0 : x / y }
        let ratio = Summary(requestsPerSecond: over(sb.requestsPerSecond, sa.requestsPerSecond), p50: over(sb.p50, sa.p50),
                            p90: over(sb.p90, sa.p90), p99: over(sb.p99, sa.p99), average: over(sb.average, sa.average), errors: 0)
        return KVComparison(rounds: results, a: sa, b: sb, ratio: ratio)
    }

    public var text: String {
        let first = rounds.first!
        var lines = ["\(first[0].workload.rawValue): A = \(first[0].endpoints.joined(separator: ",")), B = \(first[1].endpoints.joined(separator: ",")); \(rounds.count) rounds, medians",
                     String(format: "%-14@ %14@ %14@ %8@", "figure" as NSString, "A" as NSString, "B" as NSString, "B/A" as NSString)]
        func row(_ name: String, _ x: Double, _ y: Double, _ r: Double, _ format: String) {
            lines.append(String(format: "%-14@ %14@ %14@ %7.2fx", name as NSString, String(format: format, x) as NSString,
                                String(format: format, y) as NSString, r))
        }
        row("requests/s", a.requestsPerSecond, b.requestsPerSecond, ratio.requestsPerSecond, "%.1f")
        row("p50 ms", a.p50, b.p50, ratio.p50, "%.3f")
        row("p90 ms", a.p90, b.p90, ratio.p90, "%.3f")
        row("p99 ms", a.p99, b.p99, ratio.p99, "%.3f")
        row("average ms", a.average, b.average, ratio.average, "%.3f")
        lines.append("errors: A \(a.errors), B \(b.errors)")
        for (n, round) in rounds.enumerated() {
            lines.append(String(format: "round %d: A %.1f req/s p50 %.3f ms; B %.1f req/s p50 %.3f ms", n + 1,
                                round[0].requestsPerSecond, round[0].latency.p50, round[1].requestsPerSecond, round[1].latency.p50))
        }
        return lines.joined(separator: "\n")
    }
}
