import Foundation
import EtcdLiteClient
import EtcdLiteProto
import Synchronization

/// Grants `count` leases of `ttl` seconds with `window` grants in flight; returns their IDs.
func grantLeases(_ connection: GRPCClientConnection, count: Int, ttl: Int64, window: Int = 64,
                 attachKey: (@Sendable (Int) -> Data)? = nil) async throws -> [Int64] {
    let ids = Mutex([Int64](repeating: 0, count: count))
    try await windowed(count: count, window: window) { n in
        var grant = Etcdserverpb_LeaseGrantRequest()
        grant.ttl = ttl
        let response = try Etcdserverpb_LeaseGrantResponse(
            serializedBytes: try await connection.unary("/etcdserverpb.Lease/LeaseGrant", try grant.serializedBytes()))
        if let attachKey {
            var put = Etcdserverpb_PutRequest()
            put.key = attachKey(n)
            put.value = Data("attached".utf8)
            put.lease = response.id
            _ = try await connection.unary("/etcdserverpb.KV/Put", try put.serializedBytes())
        }
        ids.withLock { $0[n] = response.id }
    }
    return ids.withLock { $0 }
}

/// Runs `body` for 0..<count with at most `window` running at once.
func windowed(count: Int, window: Int, _ body: @escaping @Sendable (Int) async throws -> Void) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        var next = 0
        func add() {
            let n = next
            next += 1
            group.addTask { try await body(n) }
        }
        for _ in 0..<min(window, count) { add() }
        while try await group.next() != nil {
            if next < count { add() }
        }
    }
}

/// LeaseKeepAlive throughput: `streams` keep-alive streams over `connections` connections, each
/// with `window` requests in flight (a new one goes out as each answer arrives), for `duration`
/// seconds after a one-second warm-up.
public struct LeaseKeepAliveBench: Sendable {
    public var endpoint: Endpoint
    public var connections = 4
    public var streams = 16
    public var window = 32
    public var leases = 1_000
    public var duration = 10.0

    public init(endpoint: Endpoint) { self.endpoint = endpoint }

    public struct Result: Sendable, Codable {
        public var keepAlives: Int
        public var seconds: Double
        public var perSecond: Double
        public var latency: LatencySummary
        public var zeroTTL: Int
        public var errors: [String: Int]
    }

    final class StreamDriver: ClientCallObserver, @unchecked Sendable {
        var call: ClientCall?
        let requests: [[UInt8]]
        var next = 0
        var sent: [UInt64] = []
        var sentHead = 0
        var measuring = false
        var stopped = false
        var answered = 0
        var zeroTTL = 0
        var latencies: [UInt64] = []
        var status: ClientStatus?

        init(requests: [[UInt8]]) { self.requests = requests }

        func sendOne() {
            sent.append(monotonicNanos())
            call?.send(requests[next % requests.count])
            next += 1
        }

        func received(_ message: [UInt8]) {
            let now = monotonicNanos()
            let started = sent[sentHead]
            sentHead += 1
            if sentHead > 4_096 {
                sent.removeFirst(sentHead)
                sentHead = 0
            }
            if measuring {
                answered += 1
                latencies.append(now &- started)
                if let response = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: message), response.ttl <= 0 { zeroTTL += 1 }
            }
            if !stopped { sendOne() }
        }

        func closed(_ status: ClientStatus) { self.status = status }
    }

    public func run() async throws -> Result {
        var conns: [GRPCClientConnection] = []
        for _ in 0..<connections { conns.append(try await endpoint.connect()) }
        defer {
            let all = conns
            Task { for connection in all { await connection.close() } }
        }
        let ids = try await grantLeases(conns[0], count: leases, ttl: 600)
        var drivers: [(StreamDriver, GRPCClientConnection)] = []
        for s in 0..<streams {
            // Each stream renews its own share of the leases, round robin.
            let mine = stride(from: s % ids.count, to: ids.count, by: streams).map { id -> [UInt8] in
                var request = Etcdserverpb_LeaseKeepAliveRequest()
                request.id = ids[id]
                return try! request.serializedBytes()
            }
            let driver = StreamDriver(requests: mine.isEmpty ? [try Etcdserverpb_LeaseKeepAliveRequest().serializedBytes()] : mine)
            let connection = conns[s % conns.count]
            try await connection.eventLoop.submit {
                driver.call = connection.start("/etcdserverpb.Lease/LeaseKeepAlive", messages: [], endRequest: false, observer: driver)
                for _ in 0..<window { driver.sendOne() }
            }.get()
            drivers.append((driver, connection))
        }
        try await Task.sleep(for: .seconds(1))
        for (driver, connection) in drivers { try await connection.eventLoop.submit { driver.measuring = true }.get() }
        let started = monotonicNanos()
        try await Task.sleep(for: .seconds(duration))
        for (driver, connection) in drivers { try await connection.eventLoop.submit { driver.measuring = false; driver.stopped = true }.get() }
        let seconds = Double(monotonicNanos() - started) / 1e9
        var total = 0
        var zero = 0
        let recorder = LatencyRecorder()
        let errors = ErrorCounter()
        for (driver, connection) in drivers {
            let (answered, zeroTTL, latencies, status) = try await connection.eventLoop.submit {
                driver.call?.cancel()
                return (driver.answered, driver.zeroTTL, driver.latencies, driver.status)
            }.get()
            total += answered
            zero += zeroTTL
            recorder.record(contentsOf: latencies)
            if let status, status.code != 0, status.code != 1 { errors.add(status.message) }
        }
        return Result(keepAlives: total, seconds: seconds, perSecond: Double(total) / seconds, latency: recorder.summary(),
                      zeroTTL: zero, errors: errors.all)
    }
}

/// Mass expiry: `leases` leases of `ttl` seconds, each with one key, granted as fast as the
/// server takes them; meanwhile one writer puts at `rate` per second (open loop). Reports the
/// write latency while the leases expire and how long the expiry took.
public struct LeaseExpiryBench: Sendable {
    public var endpoint: Endpoint
    public var leases = 10_000
    public var ttl: Int64 = 10
    public var rate = 200

    public init(endpoint: Endpoint) { self.endpoint = endpoint }

    public struct Result: Sendable, Codable {
        public var leases: Int
        public var grantSeconds: Double
        /// From the first lease key gone to the last.
        public var expirySeconds: Double
        public var writesDuringExpiry: LatencySummary
        public var writesOverall: LatencySummary
        public var keysLeft: Int
        public var errors: [String: Int]
    }

    public func run() async throws -> Result {
        let setup = try await endpoint.connect()
        let writer = try await endpoint.connect()
        let monitor = try await endpoint.connect()
        defer { Task { for c in [setup, writer, monitor] { await c.close() } } }
        let prefix = "bench/expiry/"
        let grantStart = monotonicNanos()
        _ = try await grantLeases(setup, count: leases, ttl: ttl, window: 128) { Data("\(prefix)\($0)".utf8) }
        let grantSeconds = Double(monotonicNanos() - grantStart) / 1e9

        // Writes from now until the keys are gone (bounded: TTL + 60 s).
        let errors = ErrorCounter()
        let timeline = Timeline()
        let stop = StopFlag()
        let writes = Task {
            let start = monotonicNanos()
            let interval = 1_000_000_000 / UInt64(rate)
            var i: UInt64 = 0
            while !stop.value.load(ordering: .relaxed) {
                let intended = start + i * interval
                i += 1
                await sleep(until: intended)
                var put = Etcdserverpb_PutRequest()
                put.key = Data("bench/expiry-writer/\(i % 1000)".utf8)
                put.value = Data(repeating: 120, count: 64)
                let observer = TimedCall(intended: intended, errors: errors) { intended, latency in
                    timeline.samples.withLock { $0.append((intended, latency)) }
                }
                _ = writer.start("/etcdserverpb.KV/Put", messages: [try put.serializedBytes()], endRequest: true, observer: observer)
            }
        }
        var countRequest = Etcdserverpb_RangeRequest()
        countRequest.key = Data(prefix.utf8)
        countRequest.rangeEnd = Data("bench/expiry0".utf8)
        countRequest.countOnly = true
        let countBytes: [UInt8] = try countRequest.serializedBytes()
        var firstGone: UInt64?
        var allGone: UInt64?
        var left = leases
        let deadline = monotonicNanos() + UInt64(ttl + 60) * 1_000_000_000
        while monotonicNanos() < deadline {
            let response = try Etcdserverpb_RangeResponse(serializedBytes: try await monitor.unary("/etcdserverpb.KV/Range", countBytes))
            left = Int(response.count)
            let now = monotonicNanos()
            if left < leases && firstGone == nil { firstGone = now }
            if left == 0 {
                allGone = now
                break
            }
            try await Task.sleep(for: .milliseconds(50))
        }
        try await Task.sleep(for: .seconds(1))
        stop.value.store(true, ordering: .relaxed)
        _ = try await writes.value
        try await Task.sleep(for: .milliseconds(500))
        let samples = timeline.samples.withLock { $0 }
        let window = (firstGone ?? 0)...(allGone ?? UInt64.max)
        return Result(
            leases: leases, grantSeconds: grantSeconds,
            expirySeconds: firstGone.map { Double((allGone ?? monotonicNanos()) - $0) / 1e9 } ?? 0,
            writesDuringExpiry: LatencySummary(samples.filter { window.contains($0.intended) }.map(\.latency)),
            writesOverall: LatencySummary(samples.map(\.latency)), keysLeft: left, errors: errors.all)
    }

    /// Write latencies keyed by their intended start.
    final class Timeline: Sendable {
        let samples = Mutex<[(intended: UInt64, latency: UInt64)]>([])
    }
}

final class StopFlag: Sendable {
    let value = Atomic<Bool>(false)
}
