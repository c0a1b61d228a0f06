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
        let client = KubeClient(host: "127.0.0.1", port: server.port, token: server.token)
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
                                 client: KubeClient(host: "127.0.0.1", port: server.port, token: server.token, timeout: .seconds(1)),
                                 namespace: "kube-system", clusterName: "etcdlite")
        await #expect(throws: (any Error).self) { try await rebooted.pass() }
        #expect(FileManager.default.contents(atPath: manifests + "/etcdlite-member-1.json") == written)
    }
}
