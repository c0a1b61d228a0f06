import Testing
@testable import Raft

/// A cluster driven by hand: deliver everything until quiet, with optional partitions.
final class TestCluster {
    var nodes: [NodeID: (raft: RaftNode<SeededRandom>, storage: MemoryStorage)] = [:]
    var cut: Set<NodeID> = []
    var dropKinds: Set<Message.Kind> = []
    /// Single links cut one way: [from, to].
    var blockedLinks: Set<[UInt64]> = []
    var ids: [NodeID]
    var initialIDs: [NodeID] = []
    var reads: [NodeID: [ReadState]] = [:]

    init(_ size: Int, preVote: Bool = true, checkQuorum: Bool = true) {
        ids = (1...UInt64(size)).map { NodeID($0) }
        initialIDs = ids
        for id in ids {
            let storage = MemoryStorage(members: ids)
            var config = RaftConfig(id: id)
            config.preVote = preVote
            config.checkQuorum = checkQuorum
            nodes[id] = (RaftNode(config: config, storage: storage, random: SeededRandom(seed: id.value)), storage)
        }
    }

    func raft(_ id: NodeID) -> RaftNode<SeededRandom> { nodes[id]!.raft }

    /// A cluster whose node 1 has been elected.
    static func elected(_ size: Int = 3) -> TestCluster {
        let cluster = TestCluster(size)
        cluster.raft(1).campaign()
        cluster.stabilize()
        return cluster
    }

    /// A new node with an empty log and the bootstrap configuration; it learns every later change
    /// from the log.
    func addNode(_ id: NodeID) {
        let storage = MemoryStorage(confState: ConfState(voters: Set(initialIDs)))
        nodes[id] = (RaftNode(config: RaftConfig(id: id), storage: storage, random: SeededRandom(seed: id.value)), storage)
        ids.append(id)
    }

    /// Processes Readies and delivers messages (except across the cut) until nothing moves;
    /// the Readies of `holding` are left unprocessed (a node about to crash).
    func stabilize(holding: Set<NodeID> = []) {
        var moved = true
        while moved {
            moved = false
            for id in ids where !holding.contains(id) {
                let (raft, storage) = nodes[id]!
                guard raft.hasReady else { continue }
                moved = true
                let ready = raft.ready()
                if let snapshot = ready.snapshot { storage.applySnapshot(snapshot) }
                storage.append(ready.entries)
                if let hard = ready.hardState { storage.setHardState(hard) }
                reads[id, default: []] += ready.readStates
                for entry in ready.committedEntries where entry.kind == .configChange {
                    storage.confState = raft.applyConfChange(ConfChangeSet(encoded: entry.data)!)
                }
                for m in ready.messages + ready.messagesAfterPersist {
                    if cut.contains(m.from) != cut.contains(m.to) || dropKinds.contains(m.kind)
                        || blockedLinks.contains([m.from.value, m.to.value]) { continue }
                    nodes[m.to]?.raft.step(m)
                }
                raft.advance(ready)
            }
        }
    }

    func tick(_ times: Int) {
        for _ in 0..<times {
            for id in ids { raft(id).tick() }
            stabilize()
        }
    }

    var leaders: [NodeID] { ids.filter { raft($0).role == .leader } }

    /// Crashes `id` (whatever it had not persisted is lost) and starts it again from its durable
    /// hard state, log and snapshot, having applied through `applied`.
    func restart(_ id: NodeID, applied: LogIndex = .zero, preVote: Bool = true) {
        let durable = nodes[id]!.storage.copy()
        var config = RaftConfig(id: id)
        config.applied = applied
        config.preVote = preVote
        nodes[id] = (RaftNode(config: config, storage: durable, random: SeededRandom(seed: id.value &+ 100)), durable)
    }
}

@Suite struct ElectionTests {
    @Test func aCampaignWinsAndTheLeaderCommitsAnEntryOfItsTerm() {
        let cluster = TestCluster(3)
        cluster.raft(1).campaign()
        cluster.stabilize()
        #expect(cluster.leaders == [1])
        #expect(cluster.ids.allSatisfy { cluster.raft($0).term == 1 && cluster.raft($0).commitIndex == 1 },
                "\(cluster.ids.map { (cluster.raft($0).term, cluster.raft($0).commitIndex, cluster.raft($0).lastIndex) })")
    }

    @Test func electionTimeoutsElectExactlyOneLeader() {
        let cluster = TestCluster(5)
        cluster.tick(30)
        #expect(cluster.leaders.count == 1)
        let term = cluster.raft(cluster.leaders[0]).term
        #expect(cluster.ids.allSatisfy { cluster.raft($0).term == term })
    }

    @Test func aVoteNeedsALogAtLeastAsUpToDate() throws {
        let cluster = TestCluster(3)
        cluster.raft(1).campaign()
        cluster.stabilize()
        // Node 3 misses an entry; it cannot win against two nodes that have it.
        cluster.cut = [3]
        try cluster.raft(1).propose([1])
        cluster.stabilize()
        cluster.cut = []
        let before = cluster.raft(1).term
        cluster.raft(3).step(Message(kind: .hup, from: 3))
        cluster.stabilize()
        #expect(cluster.raft(3).role != .leader)
        #expect(cluster.leaders == [1] && cluster.raft(1).term == before, "pre-vote failed: nobody's term moved")
    }

    @Test func anIsolatedNodeWithPreVoteDoesNotRaiseItsTerm() {
        let cluster = TestCluster(3)
        cluster.raft(1).campaign()
        cluster.stabilize()
        cluster.cut = [3]
        cluster.tick(50)
        #expect(cluster.raft(3).term == 1, "pre-vote keeps the partitioned node's term")
        cluster.cut = []
        cluster.tick(5)
        #expect(cluster.leaders == [1] && cluster.raft(1).term == 1, "rejoining disturbs nobody")
    }

    @Test func anIsolatedLeaderStepsDownWithCheckQuorum() {
        let cluster = TestCluster(3)
        cluster.raft(1).campaign()
        cluster.stabilize()
        cluster.cut = [1]
        cluster.tick(40)
        #expect(cluster.raft(1).role != .leader, "no quorum heard: step down")
        #expect(cluster.leaders.count == 1 && cluster.leaders[0] != 1)
        cluster.cut = []
        cluster.tick(5)
        #expect(cluster.leaders.count == 1 && cluster.raft(1).leader == cluster.leaders[0])
    }

    @Test func followersForwardProposals() throws {
        let cluster = TestCluster(3)
        cluster.raft(1).campaign()
        cluster.stabilize()
        try cluster.raft(2).propose(Array("via follower".utf8))
        cluster.stabilize()
        #expect(cluster.ids.allSatisfy { cluster.raft($0).commitIndex == 2 })
    }
}

/// Persists and acknowledges a lone node's Readies until it has nothing more (messages dropped).
/// Persists and advances a lone node's Readies until it is quiet; returns the messages it sent.
@discardableResult
func drain(_ node: RaftNode<SeededRandom>, _ storage: MemoryStorage) -> [Message] {
    var sent: [Message] = []
    while node.hasReady {
        let ready = node.ready()
        storage.append(ready.entries)
        if let hard = ready.hardState { storage.setHardState(hard) }
        sent += ready.messages + ready.messagesAfterPersist
        node.advance(ready)
    }
    return sent
}

/// Node 1 of [1, 2, 3], elected by votes handed to it (no peers run).
func loneLeader(_ config: RaftConfig) -> (RaftNode<SeededRandom>, MemoryStorage) {
    let storage = MemoryStorage(members: [1, 2, 3])
    let leader = RaftNode(config: config, storage: storage, random: SeededRandom(seed: 1))
    leader.campaign()
    drain(leader, storage)
    for voter: NodeID in [2, 3] { leader.step(Message(kind: .preVoteResponse, from: voter, to: 1, term: 1)) }
    drain(leader, storage)
    for voter: NodeID in [2, 3] { leader.step(Message(kind: .voteResponse, from: voter, to: 1, term: 1)) }
    drain(leader, storage)
    return (leader, storage)
}

@Suite struct FlowControlTests {
    /// A leader whose entries cannot commit stops taking proposals past the uncommitted limit, and
    /// takes them again once they commit.
    @Test func uncommittedDataIsBounded() throws {
        var config = RaftConfig(id: 1)
        config.maxUncommittedEntriesBytes = 1_000
        let (leader, storage) = loneLeader(config)
        func persist() { drain(leader, storage) }
        #expect(leader.role == .leader)
        // Nobody acknowledges: nothing commits.
        for _ in 0..<4 { try leader.propose([UInt8](repeating: 1, count: 250)) }
        #expect(throws: RaftError.proposalDropped) { try leader.propose([UInt8](repeating: 1, count: 250)) }
        persist()
        // The followers acknowledge everything: it commits and applies, and there is room again.
        for voter: NodeID in [2, 3] { leader.step(Message(kind: .appendResponse, from: voter, to: 1, term: 1, index: leader.lastIndex)) }
        persist()
        #expect(leader.appliedIndex == leader.lastIndex)
        try leader.propose([UInt8](repeating: 1, count: 250))
    }

    /// Appends pipelined to a follower in replicate state stop at the in-flight byte bound, and
    /// resume as it acknowledges.
    @Test func appendsInFlightAreBoundedInBytes() throws {
        var config = RaftConfig(id: 1)
        config.maxInflightBytes = 1_000
        let (leader, storage) = loneLeader(config)
        // Node 2 acknowledges the leader's empty entry: it moves to replicate state.
        leader.step(Message(kind: .appendResponse, from: 2, to: 1, term: 1, index: leader.lastIndex))
        drain(leader, storage)
        var appendsTo2 = 0
        for _ in 0..<10 {
            try leader.propose([UInt8](repeating: 1, count: 300))  // 324 bytes counted per entry
            appendsTo2 += drain(leader, storage).filter { $0.kind == .append && $0.to == 2 && !$0.entries.isEmpty }.count
        }
        // 3 × 324 < 1,000 ≤ 4 × 324: the fourth append fills the window.
        #expect(appendsTo2 == 4)
        leader.step(Message(kind: .appendResponse, from: 2, to: 1, term: 1, index: leader.lastIndex - 8))
        let resumed = drain(leader, storage).filter { $0.kind == .append && $0.to == 2 }
        // Two appends acknowledged free 648 bytes: room for the rest (at most 1 MiB per message).
        #expect(resumed.count == 1 && resumed[0].entries.count == 6)
    }

    /// A batch proposed on a follower travels to the leader as one message and is appended whole,
    /// in order.
    @Test func aBatchIsForwardedAsOneMessage() throws {
        let cluster = TestCluster.elected()
        try cluster.raft(2).propose(batch: [[1], [2], [3]])
        let ready = cluster.raft(2).ready()
        let forwarded = (ready.messages + ready.messagesAfterPersist).filter { $0.kind == .propose }
        #expect(forwarded.count == 1 && forwarded[0].to == 1 && forwarded[0].entries.map(\.data) == [[1], [2], [3]])
        cluster.raft(2).advance(ready)
        cluster.raft(1).step(forwarded[0])
        cluster.stabilize()
        let log = try cluster.nodes[3]!.storage.entries(from: 2, to: 5, maxBytes: .max)
        #expect(log.map(\.data) == [[1], [2], [3]] && cluster.raft(3).commitIndex == 4)
    }
}
