import EtcdOperator
import Foundation
import Testing

/// The operator's view of real members, through the etcd API only.
@Suite(.serialized, .timeLimit(.minutes(3))) struct OperatorObserverTests {
    @Test func theObserverSeesMembersLeaderLearnersAndLostQuorum() async throws {
        let members = try ClusterTests.startCluster(3)
        defer { for m in members { m.stop() } }
        let observer = MemberObserver(endpoints: members.map(\.endpoint), bootMemberName: "m0")
        var seen = await observer.observe() ?? []
        for _ in 0..<50 where seen.filter(\.isLeader).count != 1 {
            try await Task.sleep(for: .milliseconds(100))
            seen = await observer.observe() ?? []
        }
        #expect(Set(seen.map(\.name)) == ["m0", "m1", "m2"])
        #expect(seen.allSatisfy { $0.healthy && !$0.isLearner && $0.appliedIndex > 0 })
        #expect(seen.filter(\.isLeader).count == 1)
        #expect(seen.filter(\.isBootMember).map(\.name) == ["m0"])
        // A learner added but not started: no name, not healthy; the planner waits for it to be
        // started rather than adding another.
        let added = try members[0].etcdctl(["member", "add", "m3", "--learner", "--peer-urls=http://127.0.0.1:\(freePort())"])
        #expect(added.status == 0, "\(added.stderr)")
        let withLearner = await observer.observe() ?? []
        let learner = withLearner.first { $0.isLearner }
        #expect(withLearner.count == 4 && learner?.name == "" && learner?.healthy == false)
        // One member down: seen, unhealthy; all down: no answer at all.
        members[2].stop()
        let oneDown = await observer.observe() ?? []
        #expect(oneDown.first { $0.name == "m2" }?.healthy == false && oneDown.filter(\.healthy).count == 2)
        members[0].stop()
        members[1].stop()
        #expect(await observer.observe() == nil)
    }
}
