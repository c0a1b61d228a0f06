import ArgumentParser
import EtcdLiteVerify
import EtcdOperator
import Foundation
import Logging

/// `etcdlite operator`: keeps a cluster's membership in step with its spec.
struct Operator: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run the operator: grow a cluster from a boot member, scale, replace, upgrade, back up and recover its members.")
    @Option(help: "local (members as processes on this machine), kubernetes (self-hosted members as static pods) or statefulset (the pods of a plain StatefulSet).") var platform = "local"
    @Option(help: "The StatefulSet whose pods are the members (statefulset).") var statefulset = "etcdlite"
    @Option(help: "The local platform's configuration file (JSON; read again on every pass).") var config: String?
    @Option(help: "Namespace of the EtcdLiteCluster (kubernetes).") var namespace = "kube-system"
    @Option(help: "Name of the EtcdLiteCluster (kubernetes).") var cluster = "etcdlite"
    @Option(help: "Stop after this many passes (0: run until SIGTERM).") var passes = 0
    @Option(help: "Log level: debug, info, warn, error.") var logLevel = "info"
    @Option(help: "Serve /metrics (Prometheus text) and /healthz over HTTP on HOST:PORT (none when empty).") var metricsAddress = ""

    /// The metrics endpoint, when --metrics-address asks for one; it follows `reconciler`.
    func serveMetrics(_ reconciler: Reconciler, snapshot: (@Sendable (String) -> String?)? = nil) async throws -> MetricsServer? {
        guard !metricsAddress.isEmpty else { return nil }
        guard let colon = metricsAddress.lastIndex(of: ":"), let port = Int(metricsAddress[metricsAddress.index(after: colon)...]) else {
            throw ValidationError("--metrics-address must be HOST:PORT")
        }
        let server = try await MetricsServer.start(host: String(metricsAddress[..<colon]), port: port, snapshot: snapshot)
        server.update(reconciler.status)
        reconciler.published = { server.update($0) }
        return server
    }

    func run() async throws {
        LoggingSystem.bootstrap { JSONLogHandler(logLevel: JSONLogHandler.level(logLevel) ?? .info, label: $0) }
        if platform == "kubernetes" || platform == "statefulset" {
            let client = try KubeClient.inCluster()
            let node = ProcessInfo.processInfo.environment["NODE_NAME"]
            let members: any MemberPlatform
            let kubernetes: KubernetesPlatform
            var offered: (@Sendable (String) -> String?)?
            if platform == "statefulset" {
                let set = StatefulSetPlatform(client: client, namespace: namespace, clusterName: cluster, setName: statefulset, operatorNode: node)
                // Member 0 downloads a re-seed's snapshot from this pod's metrics server.
                if let ip = ProcessInfo.processInfo.environment["POD_IP"], let port = metricsAddress.split(separator: ":").last.flatMap({ Int($0) }) {
                    set.snapshotBaseURL = "http://\(ip.contains(":") ? "[\(ip)]" : ip):\(port)"
                }
                offered = { set.offeredSnapshot($0) }
                members = set
                kubernetes = set.base
            } else {
                kubernetes = KubernetesPlatform(client: client, namespace: namespace, clusterName: cluster, operatorNode: node)
                members = kubernetes
            }
            // One active operator: the others stand by until the lease lapses.
            let lease = LeaderLease(client: client, namespace: namespace, name: "\(cluster)-operator",
                                    identity: ProcessInfo.processInfo.environment["POD_NAME"] ?? ProcessInfo.processInfo.hostName)
            let reconciler = Reconciler(platform: members)
            let metrics = try await serveMetrics(reconciler, snapshot: offered)
            let stop = StopFlag()
            let signals = ShutdownSignals { _ in stop.set() }
            defer { signals.cancel() }
            async let watching: Void = kubernetes.watch(shouldStop: { stop.isSet }, changed: { reconciler.nudge() })
            await reconciler.run(passes: passes, shouldStop: { stop.isSet }, gate: { await lease.acquireOrRenew() })
            stop.set()
            await watching
            await metrics?.close()
            return
        }
        guard platform == "local" else { throw ValidationError("--platform must be local, kubernetes or statefulset") }
        guard let config else { throw ValidationError("--platform local needs --config FILE") }
        let local = try LocalPlatform(configPath: config)
        try local.lockOperator()
        let reconciler = Reconciler(platform: local, resuming: local.savedStatus())
        let metrics = try await serveMetrics(reconciler)
        let stop = StopFlag()
        let signals = ShutdownSignals { _ in stop.set() }
        defer { signals.cancel() }
        await reconciler.run(passes: passes, shouldStop: { stop.isSet })
        await metrics?.close()
    }
}

/// `etcdlite recover`: bring a local cluster back by hand after every member stopped or lost its
/// data (the operator does the same on its own); on Kubernetes, tell the node agents that a node
/// will never come back, so that they re-seed without waiting for it.
struct Recover: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Restart members on their own data from their recovery records, or re-seed from the newest snapshot, until a leader answers.",
        discussion: "Kubernetes (self-hosted): --agent http://NODE_IP:2382 --presume-lost NODE declares to that node's agent that NODE will never come back (its members' data counts as lost), then waits until an agent takes part in a re-seed.")
    @Option(help: "The local platform's configuration file.") var config: String?
    @Option(help: "Give up after this many seconds.") var timeout: Double = 120
    @Option(help: "A node agent's recovery URL (Kubernetes), to declare nodes lost to.") var agent: String?
    @Option(help: "A node that will never come back (with --agent; repeat for more).") var presumeLost: [String] = []
    @Option(help: "Re-seed from this snapshot instead (every member's data moves aside to <dataRoot>/lost/): the cluster comes back as it was when the snapshot was taken.")
    var fromSnapshot: String?

    func run() async throws {
        LoggingSystem.bootstrap { JSONLogHandler(logLevel: .info, label: $0) }
        if let agent {
            try await declareLost(agent)
            return
        }
        guard let config else { throw ValidationError("--config FILE (local), or --agent URL --presume-lost NODE (Kubernetes)") }
        let local = try LocalPlatform(configPath: config)
        try local.lockOperator()
        if let fromSnapshot {
            if let problem = local.verifySnapshot(fromSnapshot) { throw ValidationError("\(fromSnapshot) does not check out: \(problem)") }
            try local.reseed(from: fromSnapshot)
        }
        let reconciler = Reconciler(platform: local, resuming: local.savedStatus())
        guard await reconciler.recover(timeout: timeout) else {
            print("no leader after \(Int(timeout)) s; see \(local.statusPath) and the members' logs")
            throw ExitCode(1)
        }
        print("the cluster has a leader")
    }
}

extension Recover {
    /// POST /recovery/presume-lost, then the agent's report until it takes part in a re-seed (or
    /// the timeout), printing its decisions as they change.
    func declareLost(_ agent: String) async throws {
        guard !presumeLost.isEmpty else { throw ValidationError("--agent needs --presume-lost NODE") }
        guard let url = URL(string: agent), let host = url.host, let port = url.port else { throw ValidationError("--agent must be http://HOST:PORT") }
        let client = KubeClient(host: host, port: port, timeout: .seconds(5))
        do {
            try await client.send(.POST, "/recovery/presume-lost", body: ["nodes": presumeLost])
        } catch let error as KubeAPIError {
            throw ValidationError("the agent refused: \(error.message)")
        }
        print("declared lost to \(agent): \(presumeLost.joined(separator: ", "))")
        let deadline = Date().addingTimeInterval(timeout)
        var said: String?
        while Date() < deadline {
            if let object = try? await client.get("/recovery"), let data = try? JSONSerialization.data(withJSONObject: object),
               let report = try? JSONDecoder().decode(RecoveryReport.self, from: data) {
                if let plan = report.plan, plan != said {
                    print("agent: \(plan)")
                    said = plan
                }
                if let token = report.reseeding {
                    print("re-seeding (\(token))")
                    return
                }
            }
            try await Task.sleep(for: .seconds(1))
        }
        print("no re-seed after \(Int(timeout)) s")
        throw ExitCode(1)
    }
}

final class StopFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false
    func set() { lock.withLock { value = true } }
    var isSet: Bool { lock.withLock { value } }
}

/// `etcdlite selfhost-demo`: the self-hosting scenario on the local platform, step by step.
struct SelfHostDemo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "selfhost-demo",
        abstract: "Boot member → 3 self-hosted → 5 → 3 → rolling upgrade → kill -9 every member → back; a writer runs throughout.",
        discussion: "Prints, for each step, the elections it caused and the longest time without an acknowledged write, then checks that every acknowledged write is there. Exit status 1 when a step is not reached or a write is missing.")
    @Option(help: "The etcdlite binary members and the operator run (default: this one).") var binary: String?
    @Option(help: "Directory for the members, the operator and their logs (default: a new one under the temporary directory).") var dir: String?
    @Option(help: "First port: the boot member takes the two below it, member-N basePort+2N and +2N+1.") var basePort = 24402
    @Flag(help: "Print the report as JSON.") var json = false

    func run() async throws {
        let directory = URL(fileURLWithPath: dir ?? NSTemporaryDirectory() + "etcdlite-selfhost-\(getpid())")
        var scenario = SelfHostScenario(binary: try binary ?? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"),
                                        directory: directory, basePort: basePort)
        scenario.log = { line in
            FileHandle.standardError.write(Data((line + "\n").utf8))
        }
        let report = try await scenario.run()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(report.table)
            print("members' data and logs: \(directory.path)")
        }
        if !report.passed { throw ExitCode(1) }
    }
}

/// `etcdlite node-agent`: writes the static pod manifests of the members on this node.
struct NodeAgentCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node-agent",
        abstract: "Keep this node's members as static pods: write their manifests from the cluster's member records, remove them (and their data) when the records go.")
    @Option(help: "This node's name (the downward API's spec.nodeName).") var node: String
    @Option(help: "Namespace of the EtcdLiteCluster.") var namespace = "kube-system"
    @Option(help: "Name of the EtcdLiteCluster.") var cluster = "etcdlite"
    @Option(help: "The kubelet's static pod directory.") var manifests = "/etc/kubernetes/manifests"
    @Option(help: "The members' host path (the EtcdLiteCluster's spec.storage.hostPath).") var hostPath = "/var/lib/etcdlite"
    @Option(help: "Seconds between passes.") var interval = 5
    @Option(help: "Seconds between recovery checkpoints (a verified snapshot of each member on this node under <host-path>/checkpoints; 0: none).")
    var checkpointInterval = 1_800
    @Option(help: "Port (on every address: the agents run on the host network) where this agent serves its recovery report to the other nodes' agents; 0: none, and no re-seed without the API server.")
    var recoveryPort = NodeAgent.recoveryPort
    @Option(help: "Seconds the API server must have been silent before the agents re-seed a cluster that lost the quorum of its data.")
    var recoveryGrace = 60

    func run() async throws {
        LoggingSystem.bootstrap { JSONLogHandler(logLevel: .info, label: $0) }
        let logger = Logger(label: "etcdlite.node-agent")
        let agent = NodeAgent(node: node, manifestsDir: manifests, hostPath: hostPath, client: try KubeClient.inCluster(),
                              namespace: namespace, clusterName: cluster)
        agent.recoveryGrace = recoveryPort > 0 ? Double(recoveryGrace) : .infinity
        let port = recoveryPort
        agent.agentURL = { _, address in "http://\(address):\(port)" }
        let server = recoveryPort > 0 ? try await RouteServer.start(host: "0.0.0.0", port: recoveryPort) { agent.route($0, $1, $2) } : nil
        let stop = StopFlag()
        let signals = ShutdownSignals { _ in stop.set() }
        defer { signals.cancel() }
        await agent.run(interval: .seconds(interval), checkpointInterval: checkpointInterval > 0 ? .seconds(checkpointInterval) : nil,
                        shouldStop: { stop.isSet }, onDone: { done in
            for line in done { logger.info("\(line)") }
        }, onError: { error in
            // The API server away (a power-off, its own restart): the manifests stay as they are.
            logger.warning("records not read; nothing changed", metadata: ["error": "\(error)"])
        })
        await server?.close()
    }
}
