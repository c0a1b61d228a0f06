import Testing
@testable import Raft

@Suite struct ConfChangeTests {
    @Test func aLearnerCatchesUpWithoutVotingThenIsPromoted() throws {
        let cluster = TestCluster.elected()
        for n in 0..<3 { try cluster.raft(1).propose([UInt8(n)]) }
        cluster.stabilize()
        cluster.addNode(4)
        try cluster.raft(1).proposeConfChange(ConfChange(.addLearner, 4))
        cluster.stabilize()
        #expect(cluster.raft(1).confState == ConfState(voters: [1, 2, 3], learners: [4]))
        #expect(cluster.raft(4).confState.learners == [4] && cluster.raft(4).commitIndex == cluster.raft(1).commitIndex)
        cluster.tick(30)
        #expect(cluster.raft(4).role == .follower && cluster.raft(4).term == 1, "a learner never campaigns")
        try cluster.raft(1).proposeConfChange(ConfChange(.addVoter, 4))
        cluster.stabilize()
        #expect(cluster.raft(1).confState == ConfState(voters: [1, 2, 3, 4]))
        // With four voters, two nodes down leave no quorum.
        cluster.cut = [3, 4]
        try cluster.raft(1).propose([9])
        cluster.stabilize()
        #expect(cluster.raft(1).commitIndex == cluster.raft(2).commitIndex && cluster.raft(1).lastIndex > cluster.raft(1).commitIndex)
    }

    @Test func oneChangeAtATimeAndNoneBeforeAnOwnTermCommit() throws {
        let cluster = TestCluster(3)
        cluster.dropKinds = [.appendResponse]
        cluster.raft(1).campaign()
        cluster.stabilize()
        #expect(throws: RaftError.proposalDropped) { try cluster.raft(1).proposeConfChange(ConfChange(.addLearner, 4)) }
        cluster.dropKinds = []
        cluster.tick(2)
        let r = cluster.raft(1)
        #expect(r.commitIndex == 1 && r.appliedIndex == 1, "\(r.role) c\(r.commitIndex) a\(r.appliedIndex) p\(r.pendingConfIndex) t\(r.term)")
        cluster.dropKinds = [.appendResponse]
        try cluster.raft(1).proposeConfChange(ConfChange(.addLearner, 4))
        cluster.stabilize()
        #expect(throws: RaftError.proposalDropped) { try cluster.raft(1).proposeConfChange(ConfChange(.addLearner, 5)) }
        // The lost acknowledgements are a broken stream the transport reports.
        cluster.dropKinds = []
        cluster.raft(1).reportUnreachable(2)
        cluster.raft(1).reportUnreachable(3)
        cluster.tick(2)
        try cluster.raft(1).proposeConfChange(ConfChange(.addLearner, 5))
    }

    @Test func removingTheLeaderHandsOverAfterTheChangeCommits() throws {
        let cluster = TestCluster.elected()
        try cluster.raft(1).proposeConfChange(ConfChange(.remove, 1))
        cluster.stabilize()
        #expect(cluster.raft(1).role == .follower, "stepped down once the others knew")
        #expect(cluster.raft(2).confState.voters == [2, 3] && cluster.raft(3).confState.voters == [2, 3])
        cluster.tick(40)
        #expect(cluster.leaders.count == 1 && cluster.leaders[0] != 1)
        let leader = cluster.leaders[0]
        try cluster.raft(leader).propose([1])
        cluster.stabilize()
        #expect(cluster.raft(2).commitIndex == cluster.raft(3).commitIndex && cluster.raft(2).commitIndex == cluster.raft(leader).lastIndex)
    }

    @Test func removingAMemberFromATwoNodeCluster() throws {
        let cluster = TestCluster.elected(2)
        try cluster.raft(1).proposeConfChange(ConfChange(.remove, 2))
        cluster.stabilize()
        #expect(cluster.raft(1).role == .leader && cluster.raft(1).confState.voters == [1])
        #expect(throws: RaftError.proposalDropped, "no voter would remain") { try cluster.raft(1).proposeConfChange(ConfChange(.remove, 1)) }
        cluster.cut = [2]
        try cluster.raft(1).propose([5])
        cluster.stabilize()
        #expect(cluster.raft(1).commitIndex == cluster.raft(1).lastIndex, "alone, the leader commits by itself")
    }

    @Test func changesTravelInEntries() {
        let change = ConfChange(.addLearner, NodeID(0x0102_0304_0506_0708))
        #expect(ConfChange(encoded: change.encoded) == change)
        #expect(ConfChange(encoded: [9]) == nil)
    }
}

@Suite struct JointConsensusTests {
    /// Replacing a voter in one step: both the old and the new majority must agree while joint.
    @Test func replacingAVoterThroughAJointConfigurationLeavesByItself() throws {
        let cluster = TestCluster.elected()
        cluster.addNode(4)
        try cluster.raft(1).proposeConfChange(ConfChangeSet([ConfChange(.addVoter, 4), ConfChange(.remove, 3)]))
        cluster.stabilize()
        #expect(cluster.raft(1).confState == ConfState(voters: [1, 2, 4]), "entered and left by itself")
        #expect(cluster.raft(4).confState.voters == [1, 2, 4] && cluster.raft(2).confState.voters == [1, 2, 4], "\(cluster.raft(4).confState) \(cluster.raft(4).commitIndex) \(cluster.raft(1).commitIndex)")
        cluster.cut = [3]
        try cluster.raft(1).propose([1])
        cluster.stabilize()
        #expect(cluster.raft(4).commitIndex == cluster.raft(1).lastIndex)
    }

    @Test func anExplicitLeaveWaitsAndBothMajoritiesCount() throws {
        let cluster = TestCluster.elected()
        cluster.addNode(4)
        cluster.addNode(5)
        try cluster.raft(1).proposeConfChange(ConfChangeSet([ConfChange(.addVoter, 4), ConfChange(.addVoter, 5),
                                                             ConfChange(.remove, 2), ConfChange(.remove, 3)], explicitLeave: true))
        cluster.stabilize()
        #expect(cluster.raft(1).confState == ConfState(voters: [1, 4, 5], outgoingVoters: [1, 2, 3]))
        // While joint, the new majority alone (1, 4, 5) cannot commit: the old one must agree too.
        cluster.cut = [2, 3]
        try cluster.raft(1).propose([7])
        cluster.stabilize()
        #expect(cluster.raft(1).commitIndex < cluster.raft(1).lastIndex)
        #expect(throws: RaftError.proposalDropped) { try cluster.raft(1).proposeConfChange(ConfChange(.addLearner, 6)) }
        cluster.cut = []
        cluster.raft(1).reportUnreachable(2)
        cluster.raft(1).reportUnreachable(3)
        cluster.tick(2)
        #expect(cluster.raft(1).commitIndex == cluster.raft(1).lastIndex)
        try cluster.raft(1).proposeConfChange(ConfChangeSet.leaveJoint)
        cluster.stabilize()
        #expect(cluster.raft(1).confState == ConfState(voters: [1, 4, 5]))
    }

    @Test func aDemotedVoterBecomesALearnerWhenTheJointConfigurationIsLeft() throws {
        let cluster = TestCluster.elected()
        try cluster.raft(1).proposeConfChange(ConfChangeSet([ConfChange(.addLearner, 3)], explicitLeave: true))
        cluster.stabilize()
        #expect(cluster.raft(1).confState == ConfState(voters: [1, 2], outgoingVoters: [1, 2, 3], learnersNext: [3]))
        try cluster.raft(1).proposeConfChange(ConfChangeSet.leaveJoint)
        cluster.stabilize()
        #expect(cluster.raft(1).confState == ConfState(voters: [1, 2], learners: [3]))
        #expect(cluster.raft(3).confState == ConfState(voters: [1, 2], learners: [3]))
    }

    @Test func setsTravelInEntries() {
        let set = ConfChangeSet([ConfChange(.addVoter, 4), ConfChange(.remove, 1)], explicitLeave: true)
        #expect(ConfChangeSet(encoded: set.encoded) == set)
        #expect(ConfChangeSet(encoded: ConfChangeSet.leaveJoint.encoded) == ConfChangeSet.leaveJoint)
        #expect(ConfChangeSet(encoded: ConfChange(.addLearner, 2).encoded) == ConfChangeSet([ConfChange(.addLearner, 2)]))
        // The application's context travels with simple and joint changes alike.
        let simple = ConfChangeSet([ConfChange(.addLearner, 7)], context: Array("member 7".utf8))
        #expect(ConfChangeSet(encoded: simple.encoded) == simple)
        #expect(ConfChangeSet(encoded: simple.encoded)?.isSimple == true)
        let joint = ConfChangeSet([ConfChange(.addVoter, 4), ConfChange(.remove, 1)], explicitLeave: true, context: [0, 1, 2])
        #expect(ConfChangeSet(encoded: joint.encoded) == joint)
        #expect(ConfChangeSet(encoded: [0xFE, 0, 2] + ConfChange(.remove, 1).encoded) == nil)  // a change short
    }
}
