import ArgumentParser
import EtcdLiteBench
import Foundation

/// `etcdlite bench <workload>`: load against any etcd-compatible endpoint.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure latency and throughput of an etcd-compatible endpoint.",
        subcommands: [Put.self, Range.self, TxnPut.self, TxnMixed.self, Delete.self, Apiserver.self, WatchGet.self,
                      WatchLatency.self, LeaseKeepAlive.self, LeaseExpiry.self])

    /// Runs `body` under a progress display of the time gone, or of `duration` (none with --json).
    static func withProgress<R>(json: Bool, duration: Double?, _ body: () async throws -> R) async rethrows -> R {
        let display = json ? nil : ProgressDisplay.standardError(total: nil, duration: duration)
        display?.begin()
        defer { display?.finish() }
        return try await body()
    }

    struct Common: ParsableArguments {
        @Option(help: "Endpoint to load (host:port).") var endpoints = "127.0.0.1:2379"
        @Flag(help: "Print the result as one JSON object.") var json = false

        func endpoint() throws -> Endpoint {
            try Endpoint(String(endpoints.split(separator: ",").first ?? ""))
        }

        func withProgress<R>(duration: Double?, _ body: () async throws -> R) async rethrows -> R {
            try await Bench.withProgress(json: json, duration: duration, body)
        }

        func report<R: Encodable>(_ result: R, text: String) throws {
            if json {
                let encoder = JSONEncoder()
                encoder.outputFormatting = [.sortedKeys]
                print(String(decoding: try encoder.encode(result), as: UTF8.self))
            } else {
                print(text)
            }
        }
    }

    struct WatchLatency: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "watch-latency", abstract: "Put-to-event latency with many watchers of one key.", aliases: ["watch"])
        @OptionGroup var common: Common
        @Option(help: "Watchers, spread over the streams.") var watchers = 1_000
        @Option(help: "Watch streams (one connection each).") var streams = 10
        @Option(help: "Puts of the watched key.") var puts = 1_000
        @Option(help: "Puts per second (open loop).") var rate = 100
        @Option(help: "Value size in bytes (at least 8).") var valSize = 64

        func run() async throws {
            var bench = WatchLatencyBench(endpoint: try common.endpoint())
            bench.watchers = watchers
            bench.streams = streams
            bench.puts = puts
            bench.rate = rate
            bench.valueSize = valSize
            // About puts / rate seconds of puts, after the watchers are set up.
            let r = try await common.withProgress(duration: nil) { try await bench.run() }
            try common.report(r, text: """
                watch-latency: \(r.watchers) watchers on \(r.streams) streams, \(r.puts) puts at \(rate)/s
                events: \(r.eventsReceived) of \(r.eventsExpected)
                put-to-event: \(r.latency.text)
                put: \(r.putLatency.text)
                errors: \(r.errors)
                """)
        }
    }

    struct LeaseKeepAlive: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "lease-keepalive", abstract: "LeaseKeepAlive throughput on long-lived streams.")
        @OptionGroup var common: Common
        @Option(help: "Connections.") var conns = 4
        @Option(help: "Keep-alive streams, spread over the connections.") var streams = 16
        @Option(help: "Requests in flight per stream.") var window = 32
        @Option(help: "Leases to renew.") var leases = 1_000
        @Option(help: "Measured seconds (after 1 s of warm-up).") var duration = 10.0

        func run() async throws {
            var bench = LeaseKeepAliveBench(endpoint: try common.endpoint())
            bench.connections = conns
            bench.streams = streams
            bench.window = window
            bench.leases = leases
            bench.duration = duration
            // One second of warm-up, then the measured seconds.
            let r = try await common.withProgress(duration: duration + 1) { try await bench.run() }
            try common.report(r, text: String(format: """
                lease-keepalive: %d keep-alives in %.2f s = %.0f/s (streams %d, window %d, leases %d)
                latency: %@
                zero TTL answers: %d, errors: %@
                """, r.keepAlives, r.seconds, r.perSecond, streams, window, leases, r.latency.text, r.zeroTTL, "\(r.errors)"))
        }
    }

    struct LeaseExpiry: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "lease-expiry", abstract: "Write latency while many leases with keys expire at once.")
        @OptionGroup var common: Common
        @Option(help: "Leases, one key each.") var leases = 10_000
        @Option(help: "Lease TTL in seconds.") var ttl: Int64 = 10
        @Option(help: "Writes per second during the run (open loop).") var rate = 200

        func run() async throws {
            var bench = LeaseExpiryBench(endpoint: try common.endpoint())
            bench.leases = leases
            bench.ttl = ttl
            bench.rate = rate
            let r = try await common.withProgress(duration: nil) { try await bench.run() }
            try common.report(r, text: String(format: """
                lease-expiry: %d leases (TTL %d s) granted with keys in %.2f s; expired over %.2f s; %d keys left
                writes during expiry: %@
                writes overall: %@
                errors: %@
                """, r.leases, ttl, r.grantSeconds, r.expirySeconds, r.keysLeft, r.writesDuringExpiry.text, r.writesOverall.text, "\(r.errors)"))
        }
    }

    /// Options of the KV workloads, after etcd's benchmark tool.
    struct KVOptions: ParsableArguments {
        @Option(help: "Endpoints to load (host:port, comma-separated); connections go round-robin.") var endpoints = "127.0.0.1:2379"
        @Option(help: "Connections.") var conns = 1
        @Option(help: "Requests in flight (closed loop), spread over the connections.") var clients = 1
        @Option(help: "Requests to send.") var total = 10_000
        @Option(help: "Seconds to run instead (then --total is a cap).") var duration: Double?
        @Option(help: "Requests per second, open loop (latency from each request's intended send time); 0: closed loop.") var rate = 0
        @Option(help: "Key size in bytes.") var keySize = 8
        @Option(help: "Value size in bytes.") var valSize = 8
        @Option(help: "Distinct keys.") var keySpaceSize = 1
        @Flag(help: "Keys in order instead of at random.") var sequentialKeys = false
        @Option(help: "Range consistency: l (linearizable) or s (serializable).") var consistency = "l"
        @Flag(help: "Range: one range over the whole key space instead of one key.") var prefix = false
        @Option(help: "txn-mixed: the fraction of txns that read.") var readRatio = 0.5
        @Flag(help: "Send every request to the leader (found with Status).") var targetLeader = false
        @Flag(help: "Write the key space first (for range workloads).") var fill = false
        @Option(help: "Also run the workload against these endpoints, alternating A B A B; print both and the ratio.") var compare: String?
        @Option(help: "Rounds with --compare (the median is reported).") var rounds = 3
        @Flag(help: "Print the result as JSON.") var json = false
        @Option(help: "User and password (name:password): every call carries the user's token.") var user: String?
        @Option(help: "CA certificate of the endpoints (TLS; with https:// endpoints).") var cacert: String?
        @Option(help: "Client certificate (TLS).") var cert: String?
        @Option(help: "Client certificate's key (TLS).") var key: String?
        @Flag(help: "txn-mixed: record a history of puts, gets, deletes and compare-and-swaps on --key-space-size keys for --duration seconds (default 5) and check it for linearizability.") var check = false

        func bench(_ workload: KVBench.Workload, endpoints text: String) async throws -> KVBench {
            let security = user != nil || cacert != nil || cert != nil
                ? try ClientSecurity(caFile: cacert, certFile: cert, keyFile: key, user: user) : nil
            var endpoints = try text.split(separator: ",").map { try Endpoint(String($0), security: security) }
            if targetLeader { endpoints = [try await KVBench.leader(of: endpoints)] }
            var bench = KVBench(workload: workload, endpoints: endpoints)
            bench.conns = conns
            bench.clients = clients
            bench.total = total
            bench.duration = duration
            bench.rate = rate
            bench.keySize = keySize
            bench.valSize = valSize
            bench.keySpaceSize = keySpaceSize
            bench.sequentialKeys = sequentialKeys
            guard ["l", "s"].contains(consistency) else { throw ValidationError("--consistency must be l or s") }
            bench.serializable = consistency == "s"
            bench.prefix = prefix
            bench.readRatio = readRatio
            return bench
        }

        func run(_ workload: KVBench.Workload) async throws {
            if check {
                guard workload == .txnMixed else { throw ValidationError("--check goes with txn-mixed") }
                return try await runCheck()
            }
            guard let compare else {
                var bench = try await bench(workload, endpoints: endpoints)
                if fill { try await bench.fill() }
                let display = json ? nil : ProgressDisplay.standardError(total: total, duration: duration)
                if let display { bench.progress = { @Sendable answered in display.update(done: answered) } }
                display?.begin()
                let result = try await bench.run()
                display?.update(done: result.requests)
                display?.finish()
                print(json ? try Self.json(result) : result.text)
                return
            }
            let a = try await bench(workload, endpoints: endpoints)
            let b = try await bench(workload, endpoints: compare)
            if fill {
                try await a.fill()
                try await b.fill()
            }
            // Rounds alternate between the targets: the display shows the time gone.
            let comparison = try await Bench.withProgress(json: json, duration: nil) { try await KVComparison.run(a, b, rounds: rounds) }
            print(json ? try Self.json(comparison) : comparison.text)
        }

        func runCheck() async throws {
            var bench = LinearizabilityBench(endpoints: try endpoints.split(separator: ",").map { try Endpoint(String($0)) })
            bench.clients = clients
            bench.duration = duration ?? 5
            bench.keys = keySpaceSize
            let result = try await bench.run()
            let verdict = result.verdict
            let keys = Set(result.history.map(\.key)).count
            if verdict.linearizable {
                print("linearizable: \(result.history.count) operations on \(keys) keys (\(result.unknown) with an unknown outcome)")
                return
            }
            if let key = verdict.key {
                print("NOT linearizable: key \(key); a smallest failing sub-history (\(verdict.counterexample.count) of \(result.history.count) operations):")
                for op in verdict.counterexample { print("  " + op.line(origin: result.start)) }
            } else {
                print("undecided: the search gave up on \(verdict.undecidedKeys) (too many orders); \(result.history.count) operations")
            }
            throw ExitCode(1)
        }

        static func json<T: Encodable>(_ value: T) throws -> String {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys]
            return String(decoding: try encoder.encode(value), as: UTF8.self)
        }
    }

    struct Put: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Put latency and throughput.")
        @OptionGroup var options: KVOptions
        func run() async throws { try await options.run(.put) }
    }

    struct Range: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Range of one key or of the key space (--prefix), linearizable or serializable.")
        @OptionGroup var options: KVOptions
        func run() async throws { try await options.run(.range) }
    }

    struct TxnPut: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "txn-put", abstract: "Txns of one put.")
        @OptionGroup var options: KVOptions
        func run() async throws { try await options.run(.txnPut) }
    }

    struct TxnMixed: AsyncParsableCommand {
        static let configuration = CommandConfiguration(commandName: "txn-mixed", abstract: "Txns that read or write (--read-ratio).")
        @OptionGroup var options: KVOptions
        func run() async throws { try await options.run(.txnMixed) }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "DeleteRange of single keys.")
        @OptionGroup var options: KVOptions
        func run() async throws { try await options.run(.delete) }
    }

    struct Apiserver: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "kube-apiserver's mix: creates and compare-and-swap updates through Txn, gets, paginated lists at a pinned revision, count-only ranges, events on one lease, one shared watch.")
        @Option(help: "Endpoints (host:port, comma-separated).") var endpoints = "127.0.0.1:2379"
        @Option(help: "Connections.") var conns = 2
        @Option(help: "Concurrent clients.") var clients = 16
        @Option(help: "Seconds to run.") var duration = 10.0
        @Option(help: "Objects (pods) created and updated.") var objects = 1_000
        @Option(help: "Object size in bytes.") var valSize = 1_024
        @Flag(inversion: .prefixedNo, help: "Keep one watch stream on every change open (as the apiserver's watch cache does).") var watch = true
        @Flag(help: "Print the result as JSON.") var json = false

        func run() async throws {
            var bench = ApiserverBench(endpoints: try endpoints.split(separator: ",").map { try Endpoint(String($0)) })
            bench.conns = conns
            bench.clients = clients
            bench.duration = duration
            bench.objects = objects
            bench.valueSize = valSize
            bench.watch = watch
            let result = try await Bench.withProgress(json: json, duration: duration) { try await bench.run() }
            print(json ? try KVOptions.json(result) : result.text)
        }
    }

    struct WatchGet: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "watch-get", abstract: "Gets of a key while many watchers replay its history (etcd's watch-get).")
        @OptionGroup var common: Common
        @Option(help: "Watchers, from the key's first revision.") var watchers = 1_000
        @Option(help: "Watch streams (one connection each).") var streams = 4
        @Option(help: "Revisions of the key written first.") var revisions = 1_000
        @Option(help: "Gets to time.") var gets = 1_000
        @Option(help: "Gets in flight.") var clients = 8

        func run() async throws {
            var bench = WatchGetBench(endpoint: try common.endpoint())
            bench.watchers = watchers
            bench.streams = streams
            bench.revisions = revisions
            bench.gets = gets
            bench.clients = clients
            let r = try await common.withProgress(duration: nil) { try await bench.run() }
            try common.report(r, text: String(format: """
                watch-get: %d gets (%.0f/s) while %d watchers replay %d revisions
                get: %@
                events: %d of %d; errors: %@
                """, r.gets, r.getsPerSecond, r.watchers, revisions, r.getLatency.text, r.eventsReceived, r.eventsExpected, "\(r.errors)"))
        }
    }
}
