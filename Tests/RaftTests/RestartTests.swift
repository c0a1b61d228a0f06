import Testing
@testable import Raft

/// A node started again from what it persisted: hard state, log and snapshot.
@Suite struct RestartTests {
    /// Term, vote and commit index come back from the hard state; the log from storage; entries
    /// already applied are not handed out again, the others are.
    @Test func aNodeComesBackWithItsHardStateAndLog() throws {
        let cluster = TestCluster.elected()
        for n in 0..<5 { try cluster.raft(1).propose([UInt8(n)]) }
        cluster.stabilize()
        let before = cluster.raft(2)
        let (term, vote, commit, last) = (before.term, before.vote, before.commitIndex, before.lastIndex)
        #expect(commit == 6 && last == 6 && vote == 1)
        cluster.restart(2, applied: 4)
        let after = cluster.raft(2)
        #expect(after.term == term && after.vote == vote && after.commitIndex == commit && after.lastIndex == last)
        #expect(after.role == .follower && after.leader == .none)
        let ready = after.ready()
        #expect(ready.committedEntries.map(\.index) == [5, 6], "applied 4 before the crash: 5 and 6 remain")
        #expect(ready.hardState == nil, "nothing new to persist")
        after.advance(ready)
    }

    /// A vote persisted before a crash binds the node after it: no second vote in that term.
    @Test func aPersistedVoteIsNotGivenTwice() {
        let cluster = TestCluster(3, preVote: false, checkQuorum: false)
        let node = cluster.raft(3)
        node.step(Message(kind: .vote, from: 1, to: 3, term: 5, logTerm: 0, index: 0))
        drain(node, cluster.nodes[3]!.storage)
        cluster.restart(3, preVote: false)
        let restarted = cluster.raft(3)
        #expect(restarted.term == 5 && restarted.vote == 1)
        restarted.step(Message(kind: .vote, from: 2, to: 3, term: 5, logTerm: 0, index: 0))
        let answers = drain(restarted, cluster.nodes[3]!.storage)
        #expect(answers.map(\.kind) == [.voteResponse] && answers[0].reject, "\(answers)")
        restarted.step(Message(kind: .vote, from: 1, to: 3, term: 5, logTerm: 0, index: 0))
        #expect(drain(restarted, cluster.nodes[3]!.storage).map(\.reject) == [false], "the same candidate may ask again")
    }

    /// After a compaction the node restarts from its snapshot: the configuration comes from the
    /// snapshot, the log resumes after it, and only entries after the snapshot are applied.
    @Test func aNodeComesBackFromItsSnapshotAndTheLogAfterIt() throws {
        let cluster = TestCluster.elected()
        for n in 0..<6 { try cluster.raft(1).propose([UInt8(n)]) }
        cluster.stabilize()
        let storage = cluster.nodes[2]!.storage
        try storage.createSnapshot(at: 5, confState: cluster.raft(2).confState, data: [5])
        cluster.restart(2, applied: 5)
        let node = cluster.raft(2)
        #expect(node.commitIndex == 7 && node.lastIndex == 7 && node.appliedIndex == 5)
        #expect(node.confState.voters == [1, 2, 3])
        let ready = node.ready()
        #expect(ready.committedEntries.map(\.index) == [6, 7])
        node.advance(ready)
        // It keeps replicating after the restart.
        try cluster.raft(1).propose([42])
        cluster.stabilize()
        #expect(cluster.raft(2).commitIndex == 8 && cluster.raft(2).appliedIndex == 8)
    }

    /// Every node crashes at once (nothing lost that was persisted): the cluster elects a leader
    /// again from the durable state, keeps every committed entry and commits new ones.
    @Test func aWholeClusterRestartsWithoutLosingCommittedEntries() throws {
        let cluster = TestCluster.elected()
        for n in 0..<20 { try cluster.raft(1).propose([UInt8(n)]) }
        cluster.stabilize()
        let committed = try cluster.nodes[1]!.storage.entries(from: 1, to: 22, maxBytes: .max)
        for id in cluster.ids { cluster.restart(id, applied: 21) }
        cluster.tick(40)
        #expect(cluster.leaders.count == 1)
        let leader = cluster.leaders[0]
        try cluster.raft(leader).propose([99])
        cluster.stabilize()
        for id in cluster.ids {
            let entries = try cluster.nodes[id]!.storage.entries(from: 1, to: 22, maxBytes: .max)
            #expect(entries == committed, "node \(id) kept every committed entry")
            #expect(cluster.raft(id).commitIndex == cluster.raft(leader).lastIndex)
        }
        #expect(cluster.raft(leader).term > 1)
    }

    /// A leader that crashes with entries it never persisted does not have them after the restart,
    /// and they were never acknowledged: the cluster goes on without them.
    @Test func unpersistedEntriesAreGoneAfterACrashAndWereNeverCommitted() throws {
        let cluster = TestCluster.elected()
        cluster.cut = [1]
        try cluster.raft(1).propose([7])
        // The leader crashes before persisting its Ready (the cut kept anything from leaving).
        cluster.restart(1, applied: 1)
        #expect(cluster.raft(1).lastIndex == 1)
        cluster.cut = []
        cluster.tick(40)
        #expect(cluster.leaders.count == 1)
        for id in cluster.ids {
            let entries = try cluster.nodes[id]!.storage.entries(from: 1, to: cluster.nodes[id]!.storage.lastIndex.next, maxBytes: .max)
            #expect(!entries.contains { $0.data == [7] })
        }
    }
}
