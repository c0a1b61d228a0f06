@testable import EtcdOperator
import Foundation
import Testing

/// The node agent: member records in, static pod manifests (and data directories) on the node out.
@Suite(.serialized) struct NodeAgentTests {
    static func temp() -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-agent-\(UUID().uuidString)")
        try? FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    static func record(_ name: String, node: String, dataName: String, image: String = "etcdlite:1", started: Bool = true) -> MemberRecord {
        var record = MemberRecord(name: name, id: 1, clientURL: "http://10.0.0.1:2379", peerURL: "http://10.0.0.1:2380", binary: image,
                                  initialCluster: "x", initialClusterState: "existing", clusterToken: "t", started: started, node: node,
                                  dataName: dataName)
        record.manifest = "{\"kind\":\"Pod\",\"image\":\"\(image)\",\"name\":\"\(name)\",\"data\":\"\(dataName)\"}"
        return record
    }

    @Test func manifestsFollowTheRecordsAndDataGoesOnlyWhenNothingHoldsIt() throws {
        let root = Self.temp()
        defer { try? FileManager.default.removeItem(at: root) }
        let manifests = root.appendingPathComponent("manifests").path
        let host = root.appendingPathComponent("data").path
        let agent = NodeAgent(node: "cp-a", manifestsDir: manifests, hostPath: host, client: nil, namespace: "kube-system", clusterName: "etcdlite")
        let fm = FileManager.default

        // Only this node's started members.
        var records = [Self.record("member-0", node: "cp-a", dataName: "member-0-aa"), Self.record("member-1", node: "cp-b", dataName: "member-1-bb"),
                       Self.record("member-2", node: "cp-a", dataName: "member-2-cc", started: false)]
        #expect(try agent.apply(records, bootRemoved: false) == ["wrote member-0"])
        #expect(try fm.contentsOfDirectory(atPath: manifests) == ["etcdlite-member-0.json"])
        #expect(try agent.apply(records, bootRemoved: false).isEmpty, "nothing to do twice")

        // An upgrade rewrites it (no temporary file left where the kubelet reads).
        records[0] = Self.record("member-0", node: "cp-a", dataName: "member-0-aa", image: "etcdlite:2")
        #expect(try agent.apply(records, bootRemoved: false) == ["wrote member-0"])
        #expect(String(decoding: fm.contents(atPath: manifests + "/etcdlite-member-0.json") ?? Data(), as: UTF8.self).contains("etcdlite:2"))
        #expect(try fm.contentsOfDirectory(atPath: manifests) == ["etcdlite-member-0.json"])

        // Removed while its process still holds the data directory: the manifest goes at once,
        // the data only once the lock is free.
        let memberDir = host + "/member-0-aa/member"
        try fm.createDirectory(atPath: memberDir, withIntermediateDirectories: true)
        // The lock a running member holds.
        let lock = open(memberDir + "/lock", O_RDWR | O_CREAT, 0o600)
        #expect(lock >= 0 && flock(lock, LOCK_EX | LOCK_NB) == 0)
        records.removeFirst()
        #expect(try agent.apply(records, bootRemoved: false) == ["removed the manifest of member-0"])
        #expect(fm.fileExists(atPath: host + "/member-0-aa"))
        close(lock)
        #expect(try agent.apply(records, bootRemoved: false) == ["moved the data of member-0 aside (member-0-aa)"])
        #expect(!fm.fileExists(atPath: host + "/member-0-aa"))
        #expect(try fm.contentsOfDirectory(atPath: host + "/.removed").contains { $0.hasPrefix("member-0-aa-") })

        // Replaced under a new identity on the same node: the new manifest, the old data deleted.
        records.append(Self.record("member-3", node: "cp-a", dataName: "member-3-dd"))
        _ = try agent.apply(records, bootRemoved: false)
        try fm.createDirectory(atPath: host + "/member-3-dd/member", withIntermediateDirectories: true)
        records[records.count - 1] = Self.record("member-3", node: "cp-a", dataName: "member-3-ee")
        let replaced = try agent.apply(records, bootRemoved: false)
        #expect(replaced == ["wrote member-3", "moved the data of member-3 aside (member-3-dd)"])
        #expect(fm.fileExists(atPath: manifests + "/etcdlite-member-3.json"))

        // The boot member's manifest goes once the operator says it left.
        try Data("{}".utf8).write(to: URL(fileURLWithPath: manifests + "/" + NodeAgent.bootManifest))
        #expect(try agent.apply(records, bootRemoved: false).isEmpty)
        #expect(try agent.apply(records, bootRemoved: true) == ["removed the boot member's manifest"])
        #expect(try fm.contentsOfDirectory(atPath: manifests).sorted() == ["etcdlite-member-3.json"])
    }

    /// Through the API: the operator's records become this node's manifests; with the API server
    /// gone (a power-off) a new agent changes nothing, so the kubelet starts the members from
    /// their manifests on its own.
    @Test func theOperatorsRecordsBecomeManifestsAndStayWithoutTheAPIServer() async throws {
        let server = try KubernetesPlatformTests.server()
        defer { server.stop() }
        let platform = try await KubernetesPlatformTests.withMembers(server, 2)
        let root = Self.temp()
        defer { try? FileManager.default.removeItem(at: root) }
        let manifests = root.appendingPathComponent("manifests").path
        let client = KubeClient(host: "127.0.0.1", port: server.port, token: "agent-token")
        let agent = NodeAgent(node: "cp-b", manifestsDir: manifests, hostPath: root.appendingPathComponent("data").path, client: client,
                              namespace: "kube-system", clusterName: "etcdlite")
        #expect(try await agent.pass() == ["wrote member-1"])
        let written = try #require(FileManager.default.contents(atPath: manifests + "/etcdlite-member-1.json"))
        let pod = try #require(try JSONSerialization.jsonObject(with: written) as? [String: Any])
        #expect(pod["kind"] as? String == "Pod" && (pod["metadata"] as? [String: Any])?["name"] as? String == "etcdlite-member-1")
        let command = KubernetesPlatformTests.container(pod)["command"] as? [String] ?? []
        #expect(command.contains("--initial-advertise-peer-urls") && command.contains("http://10.0.0.2:2380"))

        // The boot member removed: every agent learns it from the records.
        try Data("{}".utf8).write(to: URL(fileURLWithPath: manifests + "/" + NodeAgent.bootManifest))
        await platform.bootMemberRemoved()
        #expect(try await agent.pass() == ["removed the boot member's manifest"])

        server.stop()
        let rebooted = NodeAgent(node: "cp-b", manifestsDir: manifests, hostPath: root.appendingPathComponent("data").path,
                                 client: KubeClient(host: "127.0.0.1", port: server.port, token: "agent-token", timeout: .seconds(1)),
                                 namespace: "kube-system", clusterName: "etcdlite")
        await #expect(throws: (any Error).self) { try await rebooted.pass() }
        #expect(FileManager.default.contents(atPath: manifests + "/etcdlite-member-1.json") == written)
    }

    /// After a re-seed without the API server, the API server comes back on the re-seeded store,
    /// whose records are the old ones: they are not followed, and the coordinator writes the
    /// re-seeded member's record; then every agent is done with the re-seed.
    @Test func aReseedsCoordinatorRewritesTheRecordsOnceTheAPIServerIsBack() async throws {
        let server = try KubernetesPlatformTests.server()
        defer { server.stop() }
        let platform = try await KubernetesPlatformTests.withMembers(server, 3)
        let old = platform.records.values.sorted { $0.name < $1.name }
        let root = Self.temp()
        defer { try? FileManager.default.removeItem(at: root) }
        func agent(_ node: String) -> NodeAgent {
            NodeAgent(node: node, manifestsDir: root.appendingPathComponent("\(node)/manifests").path, hostPath: root.appendingPathComponent("\(node)/data").path,
                      client: KubeClient(host: "127.0.0.1", port: server.port, token: "agent-token"), namespace: "kube-system", clusterName: "etcdlite")
        }
        let coordinatorNode = try #require(old[0].node)
        let followerNode = try #require(old.first { $0.node != coordinatorNode }?.node)
        let (coordinator, follower) = (agent(coordinatorNode), agent(followerNode))
        var reseeded = old[0]
        reseeded.clusterToken = "etcdlite-reseeded"
        reseeded.initialClusterState = "new"
        reseeded.dataName = "member-0-new"
        reseeded.restoreFrom = "/var/lib/etcdlite/checkpoints/member-0-0000000000000001.db"
        reseeded.manifest = try KubernetesPlatform.staticPodManifest(reseeded, spec: nil, hostPath: "/var/lib/etcdlite", namespace: "kube-system", clusterName: "etcdlite")
        let order = ReseedOrder(previous: RecoveryReport.digest(old), record: reseeded)
        for agent in [coordinator, follower] {
            var state = agent.loadState()
            state.reseed = order
            try agent.saveState(state)
        }
        // The follower first: the old records are not followed (no manifest for its old member).
        #expect(try await follower.pass().isEmpty)
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: follower.manifestsDir)) ?? []).isEmpty)
        #expect(follower.loadState().reseed == order)
        // The coordinator writes the records: the re-seeded member alone.
        let done = try await coordinator.pass()
        #expect(done == ["wrote the re-seeded member's record member-0", "wrote member-0"], "\(done)")
        try await platform.refresh()
        #expect(Array(platform.records.keys) == ["member-0"] && platform.records["member-0"]?.clusterToken == "etcdlite-reseeded")
        #expect(String(decoding: FileManager.default.contents(atPath: coordinator.manifestsDir + "/etcdlite-member-0.json") ?? Data(), as: UTF8.self)
            .contains("etcdlite snapshot restore /var/lib/etcdlite/checkpoints/member-0-0000000000000001.db"))
        // Both see the records carry it: the re-seed is over for them.
        #expect(try await follower.pass() == ["the records carry the re-seed etcdlite-reseeded"])
        #expect(follower.loadState().reseed == nil && coordinator.loadState().reseed == order)
        #expect(try await coordinator.pass() == ["the records carry the re-seed etcdlite-reseeded"])
        #expect(coordinator.loadState().reseed == nil)
        // What the agents cached for a later outage: the new records.
        #expect(follower.loadCache().records.map(\.clusterToken) == ["etcdlite-reseeded"])
    }

    /// `/recovery` and `/recovery/reseed` as other agents call them.
    @Test func theRecoveryRoutesAnswerAsDocumented() async throws {
        let root = Self.temp()
        defer { try? FileManager.default.removeItem(at: root) }
        let agent = NodeAgent(node: "cp-a", manifestsDir: root.path + "/manifests", hostPath: root.path + "/data", client: nil, namespace: "kube-system", clusterName: "etcdlite")
        #expect(agent.route(.GET, "/recovery", []).status == .serviceUnavailable)
        await agent.publishReport()
        let answer = agent.route(.GET, "/recovery", [])
        #expect(answer.status == .ok && answer.contentType == "application/json")
        let report = try JSONDecoder().decode(RecoveryReport.self, from: Data(answer.body.utf8))
        #expect(report.node == "cp-a" && report.reseeding == nil && report.members.isEmpty)
        #expect(agent.route(.POST, "/recovery/reseed", Array("nonsense".utf8)).status == .badRequest)
        #expect(agent.route(.DELETE, "/recovery", []).status == .methodNotAllowed)
        #expect(agent.route(.GET, "/elsewhere", []).status == .notFound)
        // An order is taken in, but followed only by an agent that sees the outage itself.
        let record = Self.record("member-0", node: "cp-b", dataName: "member-0-aa")
        agent.saveCache([record], spec: nil)
        let order = ReseedOrder(previous: RecoveryReport.digest([record]), record: record)
        #expect(agent.route(.POST, "/recovery/reseed", Array(try JSONEncoder().encode(order))).status == .accepted)
        #expect(agent.accepts(order, [record]) == false, "the API server answered a moment ago (the agent just started, grace 60 s)")
        agent.recoveryGrace = 0
        await agent.publishReport()
        #expect(agent.accepts(order, [record]))
        #expect(agent.accepts(ReseedOrder(previous: "other records", record: record), [record]) == false)
        // Nodes declared lost: only other nodes, only during an outage this agent sees.
        let declare = { (nodes: [String]) in agent.route(.POST, "/recovery/presume-lost", Array(try JSONSerialization.data(withJSONObject: ["nodes": nodes]))) }
        #expect(try declare(["cp-a"]).status == .badRequest, "not itself")
        #expect(try declare(["cp-b"]).status == .accepted)
        agent.recoveryGrace = 3_600
        await agent.publishReport()
        #expect(try declare(["cp-b"]).status == .conflict)
    }
}
