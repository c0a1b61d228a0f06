@testable import EtcdOperator
import Foundation
import Testing

/// The node agent's recovery checkpoints: verified snapshots of this node's members on the host
/// path, the newest two kept, against a real member.
@Suite(.serialized, .timeLimit(.minutes(2))) struct NodeAgentCheckpointTests {
    @Test func checkpointsOfThisNodesMembersAreVerifiedAndTheNewestKept() async throws {
        let member = try ServerProcess(executable: etcdliteBinary())
        defer { member.stop(); member.dataDir.cleanup() }
        #expect(try member.etcdctl(["put", "checkpointed", "yes"]).status == 0)
        let host = TempDir()
        defer { host.cleanup() }
        let agent = NodeAgent(node: "cp-a", manifestsDir: host.path + "/manifests", hostPath: host.path, client: nil,
                              namespace: "kube-system", clusterName: "etcdlite")
        func record(_ name: String, node: String, url: String) -> MemberRecord {
            MemberRecord(name: name, id: 1, clientURL: url, peerURL: "http://127.0.0.1:1", binary: "etcdlite:1", initialCluster: "",
                         initialClusterState: "existing", clusterToken: "t", started: true, node: node, dataName: name + "-1",
                         restoreFrom: nil, manifest: nil)
        }
        let mine = record("member-1", node: "cp-a", url: "http://\(member.endpoint)")
        // Another node's member, and one of ours that does not answer: no checkpoint, nothing left behind.
        let elsewhere = record("member-2", node: "cp-b", url: "http://\(member.endpoint)")
        let down = record("member-3", node: "cp-a", url: "http://127.0.0.1:\(freePort())")
        let verify: (String) async -> String? = { path in
            let result = try? run(etcdliteBinary(), ["snapshot", "status", path], timeout: 30)
            return result?.status == 0 ? nil : (result?.stderr ?? "did not run")
        }
        for _ in 0..<3 {
            let done = await agent.checkpoint([mine, elsewhere, down], verify: verify)
            #expect(done.contains { $0.hasPrefix("checkpoint of member-1: ") }, "\(done)")
            #expect(done.contains { $0.hasPrefix("no checkpoint of member-3") }, "\(done)")
            try await Task.sleep(for: .milliseconds(5))
        }
        let kept = agent.checkpoints(of: "member-1")
        #expect(kept.count == NodeAgent.checkpointsKept, "\(kept)")
        #expect(agent.checkpoints(of: "member-2").isEmpty && agent.checkpoints(of: "member-3").isEmpty)
        let files = try FileManager.default.contentsOfDirectory(atPath: host.path + "/checkpoints")
        #expect(files.count == NodeAgent.checkpointsKept, "no partial files: \(files)")
        // The newest restores into a store that holds what was written.
        let memberDir = TempDir()
        let restore = try run(etcdliteBinary(), ["snapshot", "restore", kept.last!, "--data-dir", memberDir.url.appendingPathComponent("data").path],
                              timeout: 30)
        #expect(restore.status == 0, "\(restore.stderr)")
        let again = try ServerProcess(executable: etcdliteBinary(), dataDir: memberDir)
        defer { again.stop(); memberDir.cleanup() }
        #expect(try again.etcdctl(["get", "checkpointed", "--print-value-only"]).stdout == "yes\n")
    }
}
