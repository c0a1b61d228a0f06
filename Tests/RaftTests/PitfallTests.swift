import Testing
@testable import Raft

/// One named scenario per known Raft pitfall (those not covered in the other suites).
@Suite struct PitfallTests {
    /// A partitioned node comes back: with pre-vote it never raised its term, so it disturbs no
    /// one; even a node that did raise its term (no pre-vote) is refused while the leader is alive.
    @Test func aPartitionedNodeRejoiningWithAHigherTermDoesNotDepose() {
        let cluster = TestCluster(3, preVote: false, checkQuorum: true)
        cluster.raft(1).campaign()
        cluster.stabilize()
        cluster.cut = [3]
        cluster.tick(60)
        #expect(cluster.raft(3).term > 1, "without pre-vote the isolated node campaigns")
        cluster.cut = []
        // Its vote requests meet a live leader's lease: refused without a term change.
        cluster.raft(3).campaign()
        cluster.stabilize()
        #expect(cluster.raft(1).role == .leader || cluster.leaders.count == 1)
        cluster.tick(20)
        #expect(cluster.leaders.count == 1)
        let leader = cluster.leaders[0]
        #expect(cluster.ids.allSatisfy { cluster.raft($0).leader == leader })
    }

    /// Pre-vote + check-quorum under a partial partition (1 and 2 cannot talk; 3 reaches both):
    /// node 2 cannot disrupt the leader (its pre-votes fail against 3's live leader), and the
    /// leader keeps committing with 3.
    @Test func preVoteAndCheckQuorumStayLiveUnderAPartialPartition() throws {
        let cluster = TestCluster.elected()
        cluster.blockedLinks = [[1, 2], [2, 1]]
        cluster.tick(60)
        #expect(cluster.leaders == [1] && cluster.raft(1).term == 1)
        #expect(cluster.raft(2).term == 1, "pre-vote kept node 2's term")
        try cluster.raft(1).propose([1])
        cluster.stabilize()
        #expect(cluster.raft(1).commitIndex == 2 && cluster.raft(3).commitIndex == 2)
        cluster.blockedLinks = []
        cluster.raft(1).reportUnreachable(2)  // the transport saw the link down
        cluster.tick(3)
        #expect(cluster.raft(2).commitIndex == 2 && cluster.leaders == [1])
    }

    /// A vote is sent only after the hard state holding it is persisted: a node that crashes before
    /// persisting has not voted, and after restart it votes as if it never had.
    @Test func aVoteLeavesOnlyAfterItIsPersisted() {
        let storage = MemoryStorage(members: [1, 2, 3])
        let node = RaftNode(config: RaftConfig(id: 2), storage: storage, random: SeededRandom(seed: 2))
        node.step(Message(kind: .vote, from: 1, to: 2, term: 1, logTerm: 0, index: 0))
        let ready = node.ready()
        #expect(ready.messages.isEmpty, "nothing may leave before the persist")
        #expect(ready.messagesAfterPersist.map(\.kind) == [.voteResponse] && ready.hardState?.vote == 1)
        // Crash here: the vote was never persisted, nor sent. The restarted node still can vote.
        let restarted = RaftNode(config: RaftConfig(id: 2), storage: storage, random: SeededRandom(seed: 2))
        #expect(restarted.vote == .none && restarted.term == 0)
        restarted.step(Message(kind: .vote, from: 3, to: 2, term: 1, logTerm: 0, index: 0))
        #expect(restarted.ready().messagesAfterPersist.first?.reject == false)
    }

    /// A delayed, stale AppendEntries must not truncate entries that do not conflict.
    @Test func aStaleAppendDoesNotTruncateMatchingEntries() throws {
        let storage = MemoryStorage(members: [1, 2])
        let follower = RaftNode(config: RaftConfig(id: 2), storage: storage, random: SeededRandom(seed: 2))
        let e = { (i: UInt64) in Entry(term: 1, index: LogIndex(i), data: [UInt8(i)]) }
        follower.step(Message(kind: .append, from: 1, to: 2, term: 1, logTerm: 0, index: 0, entries: [e(1), e(2), e(3)], commit: 0))
        // The older message (only entry 1) arrives late.
        follower.step(Message(kind: .append, from: 1, to: 2, term: 1, logTerm: 0, index: 0, entries: [e(1)], commit: 0))
        #expect(follower.lastIndex == 3, "entries 2 and 3 match the leader's log and stay")
        let ready = follower.ready()
        #expect(ready.entries.map(\.index) == [1, 2, 3])
        #expect(ready.messagesAfterPersist.filter { $0.kind == .appendResponse }.map(\.index) == [3, 1])
    }

    /// A follower that crashes while installing a snapshot (before persisting it) comes back as it
    /// was, and the leader sends the snapshot again.
    @Test func aFollowerCrashingDuringSnapshotInstallGetsItAgain() throws {
        let cluster = TestCluster.elected()
        cluster.cut = [3]
        for n in 0..<10 { try cluster.raft(1).propose([UInt8(n)]) }
        cluster.stabilize()
        let leaderStorage = cluster.nodes[1]!.storage
        try leaderStorage.createSnapshot(at: cluster.raft(1).appliedIndex, confState: cluster.raft(1).confState, data: [42])
        cluster.cut = []
        cluster.raft(1).reportUnreachable(3)
        // The leader finds 3's next entries compacted and sends the snapshot. Node 3 takes it in
        // but crashes before its Ready (with the snapshot) is persisted.
        try cluster.raft(1).propose([99])  // the next append to 3 finds its entries compacted
        cluster.stabilize(holding: [3])
        #expect(cluster.raft(3).log.pendingSnapshot?.data == [42])
        let durable = cluster.nodes[3]!.storage.copy()
        cluster.nodes[3] = (RaftNode(config: RaftConfig(id: 3), storage: durable, random: SeededRandom(seed: 3)), durable)
        #expect(durable.snapshot() == nil, "nothing of the install survived the crash")
        cluster.raft(1).reportSnapshot(3, success: false)
        cluster.tick(3)
        #expect(cluster.nodes[3]!.storage.snapshot()?.data == [42], "the snapshot was sent again and installed")
        #expect(cluster.raft(3).commitIndex == cluster.raft(1).commitIndex)
    }
}
