import Foundation
import Testing

/// `etcdlite bench` run as users run it (the binary, with etcd's benchmark options) against a
/// real member, and against etcd 3.4 when it is installed: every workload answers every request
/// and its statistics hang together; `--json` parses; `--compare` reports both targets.
@Suite(.serialized, .timeLimit(.minutes(5))) struct BenchTests {
    struct Result: Decodable {
        struct Latency: Decodable { var fastest, slowest, average, stddev, p50, p90, p99, p999, p9999: Double }
        struct Bucket: Decodable { var upToMs: Double; var count: UInt64 }
        var workload: String
        var requests: Int
        var succeeded: Int
        var seconds: Double
        var requestsPerSecond: Double
        var latency: Latency
        var histogram: [Bucket]
        var errors: [String: Int]
    }

    /// Starts one member of `executable` and runs `body` with its endpoint.
    static func withServer(_ executable: String, _ body: (String) throws -> Void) throws {
        let server = try ServerProcess(executable: executable)
        defer { server.stop(); server.dataDir.cleanup() }
        try body(server.endpoint)
    }

    static func bench(_ arguments: [String]) throws -> CommandResult {
        try run(etcdliteBinary(), ["bench"] + arguments, timeout: 60)
    }

    /// Runs a short workload with --json and checks what any honest run must satisfy.
    static func check(_ endpoint: String, _ workload: String, _ extra: [String], total: Int) throws -> Result? {
        let out = try bench([workload, "--endpoints", endpoint, "--json"] + extra)
        #expect(out.status == 0, "\(workload): \(out.stderr)")
        guard let result = try? JSONDecoder().decode(Result.self, from: Data(out.stdout.utf8)) else {
            Issue.record("\(workload): --json did not parse: \(out.stdout.prefix(300))")
            return nil
        }
        #expect(result.workload == workload)
        #expect(result.requests == total && result.succeeded == total && result.errors.isEmpty, "\(workload): \(result.errors)")
        let l = result.latency
        #expect(0 < l.fastest && l.fastest <= l.p50 && l.p50 <= l.p90 && l.p90 <= l.p99 && l.p99 <= l.p999 && l.p999 <= l.p9999,
                "\(workload): percentiles in order: \(l)")
        // The histogram's values are rounded to three significant digits.
        #expect(l.p9999 <= l.slowest * 1.001 && l.fastest <= l.average && l.average <= l.slowest * 1.001, "\(workload): \(l)")
        #expect(result.histogram.reduce(0) { $0 + $1.count } >= UInt64(total), "\(workload): every answer in the histogram")
        #expect(result.seconds > 0 && abs(result.requestsPerSecond - Double(total) / result.seconds) < 1, "\(workload)")
        return result
    }

    static func everyWorkload(_ endpoint: String) throws {
        _ = try check(endpoint, "put", ["--total", "400", "--clients", "8", "--conns", "2", "--key-space-size", "100", "--val-size", "64"], total: 400)
        // Requests far larger than HTTP/2's initial windows go out as the server's window updates allow.
        _ = try check(endpoint, "put", ["--total", "6", "--clients", "3", "--key-space-size", "3", "--val-size", "1000000"], total: 6)
        _ = try check(endpoint, "range", ["--total", "300", "--clients", "8", "--key-space-size", "50", "--fill"], total: 300)
        _ = try check(endpoint, "range", ["--total", "300", "--clients", "4", "--consistency", "s", "--prefix", "--key-space-size", "50"], total: 300)
        _ = try check(endpoint, "txn-put", ["--total", "200", "--clients", "4", "--sequential-keys", "--key-space-size", "1000"], total: 200)
        _ = try check(endpoint, "txn-mixed", ["--total", "200", "--clients", "4", "--read-ratio", "0.7", "--key-space-size", "10"], total: 200)
        _ = try check(endpoint, "delete", ["--total", "100", "--clients", "2", "--sequential-keys", "--key-space-size", "100"], total: 100)
        // Open loop: 200 requests at 400/s take about half a second, whatever the server does.
        if let paced = try check(endpoint, "put", ["--total", "200", "--rate", "400"], total: 200) {
            #expect(paced.seconds >= 0.45, "an open loop keeps its schedule: \(paced.seconds) s")
        }
        // A duration instead of a count: it stops by itself.
        let timed = try bench(["put", "--endpoints", endpoint, "--duration", "1", "--total", "1000000", "--clients", "4", "--json"])
        let result = try JSONDecoder().decode(Result.self, from: Data(timed.stdout.utf8))
        #expect(result.seconds >= 0.95 && result.seconds < 5 && result.requests > 0 && result.requests == result.succeeded)
    }

    /// What a --json run writes on standard error.
    func timedJSONStderr(_ endpoint: String) -> String {
        (try? Self.bench(["put", "--endpoints", endpoint, "--duration", "1.2", "--total", "1000000", "--json"]).stderr) ?? "(did not run)"
    }

    @Test func everyKVWorkloadAgainstAMember() throws {
        let member = try ServerProcess(executable: etcdliteBinary())
        defer { member.stop(); member.dataDir.cleanup() }
        try Self.everyWorkload(member.endpoint)
        // The text report: etcd's benchmark layout.
        let text = try Self.bench(["put", "--endpoints", member.endpoint, "--total", "50"])
        for line in ["Summary:", "Requests/sec:", "Response time histogram:", "Latency distribution:", "99.99% in"] {
            #expect(text.stdout.contains(line), "\(line) in \(text.stdout)")
        }
        // Progress: plain lines on a pipe, a bar redrawn in place on a terminal (script(1) gives
        // the run one), nothing with --json.
        let piped = try Self.bench(["put", "--endpoints", member.endpoint, "--duration", "1.6", "--total", "1000000", "--clients", "2"])
        #expect(piped.stderr.split(separator: "\n").contains { $0.hasPrefix("progress: ") && $0.contains("%") && $0.contains("/s") },
                "\(piped.stderr)")
        #expect(!piped.stderr.contains("\r"))
        #expect(!timedJSONStderr(member.endpoint).contains("progress"))
        if let script = which("script") {
            let command = "\(etcdliteBinary()) bench put --endpoints \(member.endpoint) --total 3000 --clients 2"
            let tty = try run(script, ["-qec", command, "/dev/null"], timeout: 60)
            #expect(tty.stdout.contains("\r[") && tty.stdout.contains("100%  3000/3000"), "\(tty.stdout.prefix(400).debugDescription)")
        }
        // An error is counted by its message, and the run goes on.
        let refused = try Self.bench(["put", "--endpoints", member.endpoint, "--total", "20", "--key-size", "1", "--val-size", "2000000", "--json"])
        let errors = try JSONDecoder().decode(Result.self, from: Data(refused.stdout.utf8))
        #expect(errors.succeeded == 0 && errors.errors == ["etcdserver: request is too large": 20], "\(errors.errors)")
    }

    @Test(.enabled(if: etcdInstalled, "needs etcd (apt-get install etcd-server)"))
    func everyKVWorkloadAgainstEtcdAndACompare() throws {
        let etcd = try ServerProcess(executable: which("etcd")!)
        defer { etcd.stop(); etcd.dataDir.cleanup() }
        try Self.everyWorkload(etcd.endpoint)
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let compare = try Self.bench(["put", "--endpoints", etcd.endpoint, "--compare", lite.endpoint, "--rounds", "2",
                                      "--total", "200", "--clients", "4"])
        #expect(compare.status == 0, "\(compare.stderr)")
        let lines = compare.stdout.split(separator: "\n")
        #expect(lines.contains { $0.hasPrefix("requests/s") && $0.hasSuffix("x") }, "\(compare.stdout)")
        #expect(lines.filter { $0.hasPrefix("round ") }.count == 2, "\(compare.stdout)")
        #expect(compare.stdout.contains("errors: A 0, B 0"))
        // --target-leader finds the (only) member as the leader.
        let leader = try Self.bench(["put", "--endpoints", "\(lite.endpoint),\(etcd.endpoint)", "--target-leader", "--total", "10", "--json"])
        #expect(leader.status == 0 && leader.stdout.contains("\"endpoints\":[\"\(lite.endpoint)\"]"), "\(leader.stdout) \(leader.stderr)")
    }
}

/// The apiserver mix against etcdlite and etcd: every kind of request answered, and the shared
/// watch sees exactly the writes that succeeded.
@Suite(.serialized, .timeLimit(.minutes(3))) struct ApiserverBenchTests {
    struct Result: Decodable {
        struct PerKind: Decodable { var kind: String; var requests: Int }
        var operations: Int
        var kinds: [PerKind]
        var watchEvents: Int
        var writes: Int
        var errors: [String: Int]
    }

    static func check(_ endpoint: String) throws {
        let out = try BenchTests.bench(["apiserver", "--endpoints", endpoint, "--duration", "2", "--objects", "100", "--clients", "8", "--json"])
        #expect(out.status == 0, "\(out.stderr)")
        let result = try JSONDecoder().decode(Result.self, from: Data(out.stdout.utf8))
        #expect(result.errors.isEmpty, "\(result.errors)")
        #expect(Set(result.kinds.map(\.kind)) == ["create", "update", "get", "list", "count", "event"], "\(result.kinds)")
        #expect(result.writes > 0 && result.watchEvents == result.writes, "watch \(result.watchEvents) of \(result.writes) writes")
    }

    @Test func againstAMember() throws { try BenchTests.withServer(etcdliteBinary(), Self.check) }

    @Test(.enabled(if: etcdInstalled, "needs etcd (apt-get install etcd-server)"))
    func againstEtcd() throws { try BenchTests.withServer(which("etcd")!, Self.check) }
}

/// `watch-get`: every get answered while every watcher receives the whole history.
@Suite(.serialized, .timeLimit(.minutes(3))) struct WatchGetBenchTests {
    struct Result: Decodable {
        var eventsExpected: Int
        var eventsReceived: Int
        var gets: Int
        var errors: [String: Int]
    }

    static func check(_ endpoint: String) throws {
        let out = try BenchTests.bench(["watch-get", "--endpoints", endpoint, "--watchers", "50", "--streams", "2",
                                        "--revisions", "100", "--gets", "200", "--json"])
        #expect(out.status == 0, "\(out.stderr)")
        let result = try JSONDecoder().decode(Result.self, from: Data(out.stdout.utf8))
        #expect(result.gets == 200 && result.errors.isEmpty, "\(result.errors)")
        #expect(result.eventsExpected == 5_000 && result.eventsReceived == 5_000, "\(result.eventsReceived) events")
    }

    @Test func againstAMember() throws { try BenchTests.withServer(etcdliteBinary(), Self.check) }

    @Test(.enabled(if: etcdInstalled, "needs etcd (apt-get install etcd-server)"))
    func againstEtcd() throws { try BenchTests.withServer(which("etcd")!, Self.check) }
}

/// `etcdlite bench txn-mixed --check` against real members: etcdlite's and etcd's histories are
/// linearizable (the checker itself is tested on histories that are not).
@Suite(.serialized, .timeLimit(.minutes(3))) struct LinearizabilityCheckTests {
    @Test func aMembersHistoryIsLinearizable() throws {
        let member = try ServerProcess(executable: etcdliteBinary())
        defer { member.stop(); member.dataDir.cleanup() }
        let out = try BenchTests.bench(["txn-mixed", "--check", "--endpoints", member.endpoint, "--clients", "8", "--duration", "2", "--key-space-size", "3"])
        #expect(out.status == 0 && out.stdout.hasPrefix("linearizable: "), "\(out.stdout) \(out.stderr)")
        let count = Int(out.stdout.dropFirst("linearizable: ".count).prefix { $0.isNumber }) ?? 0
        #expect(count > 100, "a history worth checking: \(out.stdout)")
    }

    @Test func aThreeMemberClusterHistoryIsLinearizable() throws {
        let members = try ClusterTests.startCluster(3)
        defer { for m in members { m.stop() } }
        let endpoints = members.map(\.endpoint).joined(separator: ",")
        let out = try BenchTests.bench(["txn-mixed", "--check", "--endpoints", endpoints, "--clients", "9", "--duration", "3", "--key-space-size", "3"])
        #expect(out.status == 0 && out.stdout.hasPrefix("linearizable: "), "\(out.stdout) \(out.stderr)")
    }
}
