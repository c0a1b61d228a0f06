@testable import EtcdOperator
import Foundation
import NIOConcurrencyHelpers
import Testing

/// A node's kubelet as far as static pods go: it runs each manifest in its directory (init
/// containers to completion, then the container), restarts what exits (at most every 2 s), and
/// stops a pod whose manifest changed or went. `etcdlite` in a command is the binary under test.
final class TestKubelet: @unchecked Sendable {
    let manifests: String
    let logs: String
    private var pods: [String: (manifest: Data, process: Process?, started: Date)] = [:]

    init(manifests: String, logs: String) {
        self.manifests = manifests
        self.logs = logs
        try? FileManager.default.createDirectory(atPath: logs, withIntermediateDirectories: true)
    }

    func sync() {
        let files = ((try? FileManager.default.contentsOfDirectory(atPath: manifests)) ?? []).filter { !$0.hasPrefix(".") && $0.hasSuffix(".json") }
        for (file, pod) in pods where !files.contains(file) {
            Self.stop(pod.process)
            pods[file] = nil
        }
        for file in files {
            guard let manifest = FileManager.default.contents(atPath: manifests + "/" + file) else { continue }
            if let pod = pods[file], pod.manifest == manifest {
                if pod.process?.isRunning != true && Date().timeIntervalSince(pod.started) > 2 {
                    pods[file] = (manifest, start(file, manifest), Date())
                }
                continue
            }
            Self.stop(pods[file]?.process)
            pods[file] = (manifest, start(file, manifest), Date())
        }
    }

    /// SIGKILL, as a power-off would (the manifest stays: the next sync starts it again).
    func kill(_ file: String) {
        guard let process = pods[file]?.process, process.isRunning else { return }
        Foundation.kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    func stopAll() {
        for pod in pods.values { Self.stop(pod.process) }
        pods = [:]
    }

    var running: [String] { pods.filter { $0.value.process?.isRunning == true }.map(\.key).sorted() }

    private func start(_ file: String, _ manifest: Data) -> Process? {
        guard let pod = try? JSONSerialization.jsonObject(with: manifest) as? [String: Any], let spec = pod["spec"] as? [String: Any],
              let container = (spec["containers"] as? [[String: Any]])?.first, let command = container["command"] as? [String] else { return nil }
        let binary = etcdliteBinary()
        let path = (binary as NSString).deletingLastPathComponent + ":" + (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin")
        for initContainer in spec["initContainers"] as? [[String: Any]] ?? [] {
            guard let initCommand = initContainer["command"] as? [String], let first = initCommand.first,
                  let result = try? run(first == "etcdlite" ? binary : "/usr/bin/env", first == "etcdlite" ? Array(initCommand.dropFirst()) : initCommand,
                                        environment: ["PATH": path], timeout: 60),
                  result.status == 0 else { return nil }
        }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: command.first == "etcdlite" ? binary : command[0])
        process.arguments = Array(command.dropFirst())
        let log = logs + "/" + file + ".log"
        if !FileManager.default.fileExists(atPath: log) { FileManager.default.createFile(atPath: log, contents: nil) }
        guard let handle = FileHandle(forWritingAtPath: log) else { return nil }
        handle.seekToEndOfFile()
        process.standardOutput = handle
        process.standardError = handle
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch { return nil }
        return process
    }

    static func stop(_ process: Process?) {
        guard let process, process.isRunning else { return }
        process.terminate()
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        if process.isRunning {
            Foundation.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}

/// The node agents re-seed a cluster that lost the quorum of its data while the API server (stored
/// in it) is gone: three "nodes" on loopback, each with its host path, its static pod directory,
/// a kubelet playing the manifests and an agent serving `/recovery`; the API server never answers.
@Suite(.serialized, .timeLimit(.minutes(4))) struct NodeAgentRecoveryTests {
    @Test func agentsReseedFromTheSurvivorWhenNoQuorumOfDataSurvives() async throws {
        // The survivor (all 100 writes) is newer than node-b's checkpoint (the first 50).
        try await reseed(losing: ["node-a", "node-b"], coordinator: "node-c", source: "member-c", keys: 100)
    }

    @Test func agentsReseedFromTheNewestCheckpointWhenEveryMembersDataIsLost() async throws {
        // Nothing survives but node-b's checkpoint: the writes after it are gone with the disks.
        try await reseed(losing: ["node-a", "node-b", "node-c"], coordinator: "node-b", source: "member-b", keys: 50)
    }

    @Test func aNodeThatNeverComesBackIsWaitedForUntilAPersonDeclaresItLost() async throws {
        // node-a's data is lost and node-b is gone (its agent never answers): the agents wait, as
        // node-b may hold the data that makes a quorum, until `etcdlite recover --agent ...
        // --presume-lost node-b`; then they re-seed from the survivor.
        try await reseed(losing: ["node-a"], gone: ["node-b"], coordinator: "node-c", source: "member-c", keys: 100)
    }

    func reseed(losing lost: [String], gone: [String] = [], coordinator: String, source: String, keys: Int) async throws {
        let nodes = ["node-a", "node-b", "node-c"]
        let hosts = Dictionary(uniqueKeysWithValues: nodes.map { ($0, TempDir()) })
        defer { for host in hosts.values { host.cleanup() } }
        let clientPorts = Dictionary(uniqueKeysWithValues: nodes.map { ($0, freePort()) })
        let peerPorts = Dictionary(uniqueKeysWithValues: nodes.map { ($0, freePort()) })
        let agentPorts = Dictionary(uniqueKeysWithValues: nodes.map { ($0, freePort()) })
        let deadAPI = freePort()
        func name(_ node: String) -> String { "member-" + node.dropFirst(5) }
        let initialCluster = nodes.map { "\(name($0))=http://127.0.0.1:\(peerPorts[$0]!)" }.joined(separator: ",")
        func records(state: String) throws -> [MemberRecord] {
            try nodes.map { node in
                var record = MemberRecord(name: name(node), id: nil, clientURL: "http://127.0.0.1:\(clientPorts[node]!)",
                                          peerURL: "http://127.0.0.1:\(peerPorts[node]!)", binary: "etcdlite:test", initialCluster: initialCluster,
                                          initialClusterState: state, clusterToken: "etcdlite", started: true, node: node, dataName: name(node) + "-1")
                record.manifest = try KubernetesPlatform.staticPodManifest(record, spec: nil, hostPath: hosts[node]!.path, namespace: "kube-system",
                                                                          clusterName: "etcdlite")
                return record
            }
        }
        var agents: [String: NodeAgent] = [:]
        var servers: [String: RouteServer] = [:]
        var kubelets: [String: TestKubelet] = [:]
        for node in nodes {
            let agent = NodeAgent(node: node, manifestsDir: hosts[node]!.path + "/manifests", hostPath: hosts[node]!.path,
                                  client: KubeClient(host: "127.0.0.1", port: deadAPI, timeout: .seconds(1)), namespace: "kube-system", clusterName: "etcdlite")
            agent.executable = etcdliteBinary()
            agent.recoveryGrace = 3
            agent.agentURL = { other, _ in "http://127.0.0.1:\(agentPorts[other]!)" }
            servers[node] = try await RouteServer.start(host: "127.0.0.1", port: agentPorts[node]!) { agent.route($0, $1, $2) }
            agents[node] = agent
            kubelets[node] = TestKubelet(manifests: agent.manifestsDir, logs: hosts[node]!.path + "/logs")
        }
        defer { for kubelet in kubelets.values { kubelet.stopAll() } }
        var down = Set<String>()
        func syncAll() { for node in nodes where !down.contains(node) { kubelets[node]!.sync() } }
        func etcdctl(_ node: String, _ arguments: [String]) throws -> CommandResult {
            try run(try etcdctlPath(), ["--endpoints=127.0.0.1:\(clientPorts[node]!)", "--dial-timeout=1s", "--command-timeout=3s"] + arguments,
                    environment: ["ETCDCTL_API": "3"])
        }
        func waitUntil(_ seconds: Double, _ condition: () throws -> Bool) async throws -> Bool {
            let deadline = Date().addingTimeInterval(seconds)
            while Date() < deadline {
                syncAll()
                if (try? condition()) == true { return true }
                try await Task.sleep(for: .milliseconds(500))
            }
            return false
        }
        // The records as the agents last read them (the operator wrote them): three members started
        // together, then (once they ran) marked as existing members, so a member that lost its data
        // is refused instead of starting a cluster of its own.
        for state in ["new", "existing"] {
            let current = try records(state: state)
            for node in nodes {
                agents[node]!.saveCache(current, spec: nil)
                _ = try agents[node]!.apply(current, bootRemoved: false)
            }
            #expect(try await waitUntil(60) { try nodes.allSatisfy { try etcdctl($0, ["endpoint", "health"]).status == 0 } }, "the members did not come up (\(state))")
        }
        let current = try records(state: "existing")
        for i in 0..<50 { #expect(try etcdctl("node-a", ["put", "key-\(i)", "value-\(i)"]).status == 0) }
        // An older checkpoint on node-b: the survivor is newer and must be chosen.
        let checkpointed = await agents["node-b"]!.checkpoint(current) { agents["node-b"]!.checkSnapshot($0) }
        #expect(checkpointed.contains { $0.hasPrefix("checkpoint of member-b") }, "\(checkpointed)")
        for i in 50..<100 { #expect(try etcdctl("node-a", ["put", "key-\(i)", "value-\(i)"]).status == 0) }
        #expect(try await waitUntil(20) { try etcdctl("node-c", ["get", "key-99", "--consistency=s", "--print-value-only"]).stdout == "value-99\n" })

        // Members lose their data (their pods keep being restarted and refused); a survivor has no
        // leader, and no API server answers.
        let disaster = Date()
        for node in lost {
            kubelets[node]!.kill("etcdlite-\(name(node)).json")
            try FileManager.default.removeItem(atPath: hosts[node]!.path + "/\(name(node))-1")
        }
        // A node gone for good: its member, kubelet and agent stop; its disk is out of reach.
        for node in gone {
            kubelets[node]!.stopAll()
            await servers[node]!.close()
            down.insert(node)
        }
        let stop = NIOLockedValueBox(false)
        let said = NIOLockedValueBox<[String]>([])
        var loops: [Task<Void, Never>] = []
        for node in nodes where !down.contains(node) {
            let agent = agents[node]!
            loops.append(Task {
                await agent.run(interval: .milliseconds(500), shouldStop: { stop.withLockedValue { $0 } },
                                onDone: { lines in said.withLockedValue { $0 += lines.map { "\(node): \($0)" } } }, onError: { _ in })
            })
        }
        defer {
            stop.withLockedValue { $0 = true }
        }
        if !gone.isEmpty {
            // Waited for: no re-seed while a node that may hold data does not answer.
            try await Task.sleep(for: .seconds(6))
            let waiting = said.withLockedValue { $0 }
            #expect(!waiting.contains { $0.contains("re-seeding as") }, "\(waiting)")
            #expect(waiting.contains { $0.contains("the agent of \(gone[0]) does not answer") }, "\(waiting)")
            // A person declares it lost, to the survivor's agent.
            let declared = try run(etcdliteBinary(), ["recover", "--agent", "http://127.0.0.1:\(agentPorts[coordinator]!)", "--presume-lost", gone[0],
                                                      "--timeout", "60"], timeout: 90)
            #expect(declared.status == 0 && declared.stdout.contains("re-seeding ("), "\(declared.stdout) \(declared.stderr)")
        }
        // Back: one member, re-seeded from the newest store, every write it held there.
        let coordinatorName = name(coordinator)
        let back = try await waitUntil(90) {
            try etcdctl(coordinator, ["member", "list"]).stdout.split(separator: "\n").count == 1
                && etcdctl(coordinator, ["get", "key-", "--prefix", "--keys-only"]).stdout.split(separator: "\n").count == keys
        }
        let log = said.withLockedValue { $0 }.joined(separator: "\n")
        print("recovery log (\(String(format: "%.1f", Date().timeIntervalSince(disaster))) s from the loss to serving, grace 3 s):\n\(log)")
        let memberLog = FileManager.default.contents(atPath: hosts[coordinator]!.path + "/logs/etcdlite-\(coordinatorName).json.log") ?? Data()
        #expect(back, "not re-seeded:\n\(log)\n\(String(decoding: memberLog, as: UTF8.self).suffix(3000))")
        #expect(log.contains("\(coordinator): re-seeding as \(coordinatorName) from \(hosts[coordinator]!.path)/checkpoints/\(source)-"), "\(log)")
        #expect(try etcdctl(coordinator, ["get", "key-\(keys - 1)", "--print-value-only"]).stdout == "value-\(keys - 1)\n")
        // The other agents followed: their members' manifests went, so their kubelets stop
        // restarting them; a survivor's old data is kept aside.
        let others = nodes.filter { $0 != coordinator && !down.contains($0) }
        #expect(try await waitUntil(20) {
            others.allSatisfy { kubelets[$0]!.running.isEmpty && !FileManager.default.fileExists(atPath: hosts[$0]!.path + "/manifests/etcdlite-\(name($0)).json") }
        }, "\(log)")
        for node in nodes where !lost.contains(node) && !down.contains(node) {
            #expect(try await waitUntil(20) { ((try? FileManager.default.contentsOfDirectory(atPath: hosts[node]!.path + "/.removed")) ?? []).contains { $0.hasPrefix("\(name(node))-1-") } })
        }
        let manifest = String(decoding: FileManager.default.contents(atPath: hosts[coordinator]!.path + "/manifests/etcdlite-\(coordinatorName).json") ?? Data(), as: UTF8.self)
        #expect(manifest.contains("\"new\"") && manifest.contains("snapshot restore"), "\(manifest)")
        // Nobody re-seeds twice: the plan stays put while the new member serves.
        try await Task.sleep(for: .seconds(3))
        #expect(said.withLockedValue { $0 }.filter { $0.contains("re-seeding as") }.count == 1)
        stop.withLockedValue { $0 = true }
        for loop in loops { await loop.value }
        for server in servers.values { await server.close() }
    }
}
