@testable import EtcdOperator
import Foundation
import Testing

/// The node agents' decision to re-seed without the API server (`RecoveryPlan.decide`): only
/// when a majority of the voters' data is known lost, every node answered and no leader is left.
@Suite struct RecoveryPlanTests {
    static func record(_ name: String, node: String) -> MemberRecord {
        MemberRecord(name: name, id: 1, clientURL: "http://\(node):2379", peerURL: "http://\(node):2380", binary: "etcdlite:1",
                     initialCluster: "", initialClusterState: "existing", clusterToken: "t", started: true, node: node, dataName: name + "-1")
    }
    static let records = [record("member-0", node: "a"), record("member-1", node: "b"), record("member-2", node: "c")]
    static let voters = records.map(\.peerURL).sorted()

    static func live(_ revision: Int64, leader: UInt64 = 0, voters: [String] = voters, learners: [String] = []) -> RecoveryReport.LiveStatus {
        RecoveryReport.LiveStatus(revision: revision, leader: leader, isLearner: false, voters: voters, learners: learners)
    }

    /// Reports of nodes a, b, c: each hosts its member; `members` overrides a node's member.
    static func reports(_ members: [String: RecoveryReport.Member], checkpoints: [String: [RecoveryReport.Checkpoint]] = [:],
                        silent: Double = 120, records: [MemberRecord] = records) -> [String: RecoveryReport] {
        var reports: [String: RecoveryReport] = [:]
        for record in records {
            let node = record.node!
            var report = reports[node] ?? RecoveryReport(node: node, records: RecoveryReport.digest(records), apiSilentSeconds: silent)
            report.members.append(members[record.name] ?? .init(name: record.name, dataPresent: true, status: live(10)))
            report.checkpoints = checkpoints[node] ?? []
            reports[node] = report
        }
        return reports
    }

    static func lost(_ name: String) -> RecoveryReport.Member { .init(name: name, dataPresent: false, status: nil) }

    @Test func aQuorumOfDataLostReseedsFromTheNewestSurvivor() {
        let reports = Self.reports(["member-0": Self.lost("member-0"), "member-1": Self.lost("member-1"),
                                    "member-2": .init(name: "member-2", dataPresent: true, status: Self.live(50))],
                                   checkpoints: ["b": [.init(member: "member-1", path: "/cp/member-1.db", revision: 40)]])
        #expect(RecoveryPlan.decide(records: Self.records, reports: reports, grace: 60) == .reseed(node: "c", member: "member-2", source: nil, revision: 50))
    }

    @Test func everyMembersDataLostReseedsFromTheNewestCheckpoint() {
        let reports = Self.reports(["member-0": Self.lost("member-0"), "member-1": Self.lost("member-1"), "member-2": Self.lost("member-2")],
                                   checkpoints: ["a": [.init(member: "member-0", path: "/a.db", revision: 30)],
                                                 "b": [.init(member: "member-1", path: "/b.db", revision: 45)]])
        #expect(RecoveryPlan.decide(records: Self.records, reports: reports, grace: 60) == .reseed(node: "b", member: "member-1", source: "/b.db", revision: 45))
        // A checkpoint newer than the survivor wins; on equal revisions the survivor does.
        let newer = Self.reports(["member-0": Self.lost("member-0"), "member-1": Self.lost("member-1"),
                                  "member-2": .init(name: "member-2", dataPresent: true, status: Self.live(45))],
                                 checkpoints: ["a": [.init(member: "member-0", path: "/a.db", revision: 46)],
                                               "b": [.init(member: "member-1", path: "/b.db", revision: 45)]])
        #expect(RecoveryPlan.decide(records: Self.records, reports: newer, grace: 60) == .reseed(node: "a", member: "member-0", source: "/a.db", revision: 46))
        let equal = Self.reports(["member-0": Self.lost("member-0"), "member-1": Self.lost("member-1"),
                                  "member-2": .init(name: "member-2", dataPresent: true, status: Self.live(45))],
                                 checkpoints: ["b": [.init(member: "member-1", path: "/b.db", revision: 45)]])
        #expect(RecoveryPlan.decide(records: Self.records, reports: equal, grace: 60) == .reseed(node: "c", member: "member-2", source: nil, revision: 45))
    }

    @Test func nothingHappensWhileAQuorumMayComeBack() {
        func waits(_ plan: RecoveryPlan, _ text: String) -> Bool {
            if case .wait(let reason) = plan { return reason.contains(text) }
            return false
        }
        let twoLost: [String: RecoveryReport.Member] = ["member-0": Self.lost("member-0"), "member-1": Self.lost("member-1")]
        // One voter lost of three: the other two make a quorum once they answer each other.
        #expect(waits(RecoveryPlan.decide(records: Self.records, reports: Self.reports(["member-0": Self.lost("member-0")]), grace: 60), "a quorum may come back"))
        // A node whose agent does not answer may hold the data that makes the quorum.
        var missing = Self.reports(twoLost)
        missing["b"] = nil
        #expect(waits(RecoveryPlan.decide(records: Self.records, reports: missing, grace: 60), "the agent of b does not answer"))
        // The API server answered one agent lately: the operator decides.
        var recent = Self.reports(twoLost)
        recent["a"]!.apiSilentSeconds = 10
        #expect(waits(RecoveryPlan.decide(records: Self.records, reports: recent, grace: 60), "the API server answered a's agent"))
        // A member answers with a leader.
        #expect(waits(RecoveryPlan.decide(records: Self.records, reports: Self.reports(twoLost.merging(
            ["member-2": .init(name: "member-2", dataPresent: true, status: Self.live(9, leader: 7))]) { $1 }), grace: 60), "member-2 has a leader"))
        // A member with its data that does not answer yet (starting).
        #expect(waits(RecoveryPlan.decide(records: Self.records, reports: Self.reports(twoLost.merging(
            ["member-2": .init(name: "member-2", dataPresent: true, status: nil)]) { $1 }), grace: 60), "has its data but does not answer"))
        // Agents that read other records, or that take part in a re-seed already.
        var other = Self.reports(twoLost)
        other["c"]!.records = "member-2=member-2-2"
        #expect(waits(RecoveryPlan.decide(records: Self.records, reports: other, grace: 60), "different member records"))
        var busy = Self.reports(twoLost)
        busy["c"]!.reseeding = "etcdlite-1"
        #expect(waits(RecoveryPlan.decide(records: Self.records, reports: busy, grace: 60), "takes part in a re-seed"))
        // Everything lost and nothing to re-seed from.
        #expect(waits(RecoveryPlan.decide(records: Self.records, reports: Self.reports(twoLost.merging(["member-2": Self.lost("member-2")]) { $1 }), grace: 60),
                      "no store or checkpoint"))
    }

    @Test func aNodeDeclaredLostCountsAsWithoutDataUnlessItAnswers() {
        var reports = Self.reports(["member-0": Self.lost("member-0")])
        reports["b"] = nil
        guard case .wait = RecoveryPlan.decide(records: Self.records, reports: reports, grace: 60) else {
            Issue.record("re-seeded while node b may hold the quorum's data")
            return
        }
        #expect(RecoveryPlan.decide(records: Self.records, reports: reports, grace: 60, presumedLost: ["b"])
            == .reseed(node: "c", member: "member-2", source: nil, revision: 10))
        // A node declared lost that answers after all: its report counts, not the declaration.
        let answering = Self.reports(["member-0": Self.lost("member-0")])
        guard case .wait = RecoveryPlan.decide(records: Self.records, reports: answering, grace: 60, presumedLost: ["b"]) else {
            Issue.record("the declaration overrode node b's own report")
            return
        }
    }

    @Test func aLostLearnerIsNotAVoter() {
        // Voters a, b, c; d a learner. a and d lost: b and c still make a quorum of the voters.
        let records = Self.records + [Self.record("member-3", node: "d")]
        let knows = Self.live(20, voters: Self.voters, learners: ["http://d:2380"])
        let reports = Self.reports(["member-0": Self.lost("member-0"), "member-3": Self.lost("member-3"),
                                    "member-1": .init(name: "member-1", dataPresent: true, status: knows),
                                    "member-2": .init(name: "member-2", dataPresent: true, status: knows)], records: records)
        guard case .wait(let reason) = RecoveryPlan.decide(records: records, reports: reports, grace: 60) else {
            Issue.record("re-seeded although two of three voters keep their data")
            return
        }
        #expect(reason.contains("2 of 3 voters keep their data"))
    }
}
