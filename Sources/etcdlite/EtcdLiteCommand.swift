import ArgumentParser
import EtcdLite
import Foundation
import Logging

@main
struct EtcdLiteCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "etcdlite",
        abstract: "An etcd-compatible key-value store: etcd's v3 API on SQLite.",
        subcommands: [Serve.self, Bench.self, Verify.self, Bootstrap.self, Snapshot.self, Operator.self, Recover.self, NodeAgentCommand.self, SelfHostDemo.self, Version.self],
        defaultSubcommand: Serve.self)

    /// Go's flag package accepts `-flag` and `--flag=true`; ArgumentParser wants `--flag`.
    static func main() async {
        var arguments = Array(CommandLine.arguments.dropFirst())
        arguments = arguments.flatMap(GoFlags.normalize)
        do {
            var command = try parseAsRoot(arguments)
            if var command = command as? AsyncParsableCommand {
                try await command.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }
}

struct Version: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Print the etcd API version this build answers as.")
    func run() {
        print("etcdlite (etcd API \(EtcdLiteServer.apiVersion))")
    }
}

enum GoFlags {
    /// Flags whose value is a Go boolean.
    static let booleans: Set<String> = [
        "client-cert-auth", "peer-client-cert-auth", "auto-tls", "peer-auto-tls", "enable-v2", "enable-pprof",
        "strict-reconfig-check", "experimental-initial-corrupt-check", "force-new-cluster", "debug",
        "enable-grpc-gateway", "experimental-enable-lease-checkpoint", "experimental-enable-distributed-tracing",
        "experimental-memory-mlock", "socket-reuse-port", "socket-reuse-address", "pre-vote",
    ]

    /// Boolean flags that etcd turns on by default.
    static let trueByDefault: Set<String> = ["strict-reconfig-check"]

    static func normalize(_ argument: String) -> [String] {
        guard argument.hasPrefix("-"), argument != "-", argument != "--" else { return [argument] }
        var flag = argument.drop { $0 == "-" }
        var value: Substring? = nil
        if let equals = flag.firstIndex(of: "=") {
            value = flag[flag.index(after: equals)...]
            flag = flag[..<equals]
        }
        if booleans.contains(String(flag)) {
            switch value?.lowercased() {
            case nil, "true", "1", "t": return ["--\(flag)"]
            // A flag that defaults to true is turned off by its --no- form.
            default: return trueByDefault.contains(String(flag)) ? ["--no-\(flag)"] : []
            }
        }
        if flag.count == 1 { return [argument] }
        return value.map { ["--\(flag)=\($0)"] } ?? ["--\(flag)"]
    }
}
