import Testing
@testable import Raft

@Suite struct ReadIndexTests {
    @Test func theLeaderAnswersAtItsCommitIndexAfterAQuorumHeartbeat() throws {
        let cluster = TestCluster.elected()
        try cluster.raft(1).propose([7])
        cluster.stabilize()
        cluster.raft(1).readIndex(context: [1])
        cluster.stabilize()
        #expect(cluster.reads[1] == [ReadState(index: 2, context: [1])])
    }

    @Test func aFollowerForwardsAndGetsTheLeadersIndex() throws {
        let cluster = TestCluster.elected()
        try cluster.raft(1).propose([7])
        cluster.stabilize()
        cluster.raft(3).readIndex(context: [2])
        cluster.stabilize()
        #expect(cluster.reads[3] == [ReadState(index: 2, context: [2])])
        #expect(cluster.reads[1, default: []].isEmpty)
    }

    @Test func aDeposedLeaderNeverServesAStaleRead() throws {
        let cluster = TestCluster.elected()
        cluster.cut = [1]
        cluster.tick(40)  // the others elect a new leader
        let newLeader = cluster.leaders.first { $0 != 1 }!
        try cluster.raft(newLeader).propose([9])
        cluster.stabilize()
        // The old leader stepped down (check-quorum); even if asked, it cannot confirm a quorum.
        cluster.raft(1).readIndex(context: [3])
        cluster.tick(3)
        #expect(cluster.reads[1, default: []].isEmpty)
    }

    @Test func noReadBeforeTheLeaderCommitsAnEntryOfItsTerm() {
        let cluster = TestCluster(3)
        cluster.dropKinds = [.appendResponse]
        cluster.raft(1).campaign()
        cluster.stabilize()
        #expect(cluster.raft(1).role == .leader && cluster.raft(1).commitIndex == 0)
        cluster.raft(1).readIndex(context: [4])
        cluster.stabilize()
        #expect(cluster.reads[1, default: []].isEmpty, "nothing of this term is committed yet")
        cluster.dropKinds = []
        cluster.tick(2)
        #expect(cluster.reads[1] == [ReadState(index: 1, context: [4])])
    }

    @Test func aContextFromAnOldTermIsNotConfirmedByTheNewOne() {
        let cluster = TestCluster.elected()
        cluster.dropKinds = [.heartbeatResponse]
        cluster.raft(1).readIndex(context: [5])
        cluster.stabilize()
        // Leadership changes hands before the read is confirmed.
        cluster.dropKinds = []
        cluster.raft(1).transferLeadership(to: 2)
        cluster.stabilize()
        #expect(cluster.leaders == [2])
        cluster.tick(3)
        #expect(cluster.reads[1, default: []].isEmpty, "the old term's pending read was dropped with it")
    }
}

@Suite struct TransferTests {
    @Test func leadershipMovesToAnUpToDateFollower() throws {
        let cluster = TestCluster(3)
        cluster.raft(1).campaign()
        cluster.stabilize()
        cluster.raft(1).transferLeadership(to: 3)
        cluster.stabilize()
        #expect(cluster.leaders == [3] && cluster.raft(3).term == 2)
    }

    @Test func aLaggingTargetIsCaughtUpFirstAndProposalsWaitMeanwhile() throws {
        let cluster = TestCluster(3)
        cluster.raft(1).campaign()
        cluster.stabilize()
        cluster.cut = [3]
        for n in 0..<5 { try cluster.raft(1).propose([UInt8(n)]) }
        cluster.stabilize()
        cluster.cut = []
        cluster.raft(1).reportUnreachable(3)  // as the transport does when the link was down
        cluster.dropKinds = [.appendResponse]
        cluster.raft(1).transferLeadership(to: 3)
        #expect(throws: RaftError.proposalDropped) { try cluster.raft(1).propose([99]) }
        cluster.stabilize()
        cluster.dropKinds = []
        cluster.tick(2)
        #expect(cluster.leaders == [3])
        #expect(cluster.raft(3).lastIndex >= 6 && cluster.raft(3).commitIndex >= 6)
    }

    @Test func aTransferThatCannotFinishIsAbandoned() {
        let cluster = TestCluster(3)
        cluster.raft(1).campaign()
        cluster.stabilize()
        cluster.dropKinds = [.timeoutNow]
        cluster.raft(1).transferLeadership(to: 2)
        cluster.stabilize()
        #expect(cluster.raft(1).leadTransferee == 2)
        cluster.tick(12)
        #expect(cluster.raft(1).leadTransferee == .none && cluster.leaders == [1])
        #expect(throws: Never.self) { try cluster.raft(1).propose([1]) }
    }
}
