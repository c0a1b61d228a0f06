import ArgumentParser
import EtcdLiteVerify
import Foundation

/// `etcdlite verify`: a cluster of this binary under faults, checked for linearizability,
/// durability, watch and lease semantics.
struct Verify: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run members on loopback under faults and check what clients saw.",
        discussion: """
            Starts --members etcdlite members (this binary), each in a network namespace of its own when \
            run as root with iproute2 (partitions as blackhole routes, delay/loss/reordering with tc netem \
            where the kernel has it, a narrow link with tc tbf), otherwise on 127.0.0.1 behind a \
            fault-injecting TCP proxy on its peer URL; runs concurrent clients (put, linearizable and serializable get, \
            delete, compare-and-swap Txn), two watchers that move between members, and leases (short ones \
            that must expire, one kept alive); injects one fault at a time, heals it, and at the end checks \
            the recorded history. Exit status 1 when any check fails.
            """)

    @Option(help: "Members in the cluster.") var members = 3
    @Option(help: "Seconds of load and faults.") var duration = 60.0
    @Option(help: "Comma-separated faults: \(Verifier.Fault.allCases.map(\.rawValue).joined(separator: ",")), or all.")
    var faults = "all"
    @Option(help: "Seed for the choices of faults, members and operations.") var seed: UInt64 = 1
    @Option(help: "Concurrent KV clients.") var clients = 6
    @Option(help: "Operations per second per client (at most).") var rate = 60
    @Option(help: "The etcdlite binary to run as members (default: this one).") var binary: String?
    @Option(help: "Directory for the members' data (default: a new one under the temporary directory).") var dataDir: String?
    @Option(help: "Where members run: netns (network namespaces, root only), proxy (127.0.0.1 behind TCP proxies), or auto.")
    var network = "auto"
    @Flag(help: "Print the report as one JSON object.") var json = false

    func run() async throws {
        var verifier = Verifier(binary: try binary ?? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"))
        verifier.members = members
        verifier.duration = duration
        verifier.seed = seed
        verifier.clients = clients
        verifier.rate = rate
        verifier.directory = dataDir.map { URL(fileURLWithPath: $0) }
        guard let network = Verifier.Network(rawValue: network) else {
            throw ValidationError("--network: \(network) is not one of \(Verifier.Network.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        verifier.network = network
        if faults != "all" {
            verifier.faults = try faults.split(separator: ",").map { name in
                guard let fault = Verifier.Fault(rawValue: String(name)) else { throw ValidationError("unknown fault \(name)") }
                return fault
            }
        }
        let quiet = json
        verifier.log = { line in
            if !quiet { FileHandle.standardError.write(Data("verify: \(line)\n".utf8)) }
        }
        let report = try await verifier.run()
        if json {
            print(try report.json())
        } else {
            print(report.text)
        }
        if !report.passed { throw ExitCode(1) }
    }
}
