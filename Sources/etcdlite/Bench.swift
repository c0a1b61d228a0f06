import ArgumentParser
import EtcdLiteBench
import Foundation

/// `etcdlite bench <workload>`: load against any etcd-compatible endpoint.
struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure latency and throughput of an etcd-compatible endpoint.",
        subcommands: [WatchLatency.self, LeaseKeepAlive.self, LeaseExpiry.self])

    struct Common: ParsableArguments {
        @Option(help: "Endpoint to load (host:port).") var endpoints = "127.0.0.1:2379"
        @Flag(help: "Print the result as one JSON object.") var json = false

        func endpoint() throws -> Endpoint {
            try Endpoint(String(endpoints.split(separator: ",").first ?? ""))
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
            commandName: "watch-latency", abstract: "Put-to-event latency with many watchers of one key.")
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
            let r = try await bench.run()
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
            let r = try await bench.run()
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
            let r = try await bench.run()
            try common.report(r, text: String(format: """
                lease-expiry: %d leases (TTL %d s) granted with keys in %.2f s; expired over %.2f s; %d keys left
                writes during expiry: %@
                writes overall: %@
                errors: %@
                """, r.leases, ttl, r.grantSeconds, r.expirySeconds, r.keysLeft, r.writesDuringExpiry.text, r.writesOverall.text, "\(r.errors)"))
        }
    }
}
