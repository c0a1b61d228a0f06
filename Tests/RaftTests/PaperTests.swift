import Testing
@testable import Raft

/// The Raft paper's rules (Ongaro & Ousterhout, "In Search of an Understandable Consensus
/// Algorithm", extended version, §5 and Figures 2–3), one test per sentence, each quoted. The
/// nodes run without pre-vote and check-quorum, as the paper describes them.
@Suite struct PaperTests {
    /// A node with a log whose entries have `terms` (index 1, 2, ...), at `term`.
    static func node(_ id: NodeID, peers: [NodeID] = [1, 2, 3], log terms: [UInt64] = [], term: UInt64? = nil,
                     seed: UInt64? = nil, checkQuorum: Bool = false) -> (RaftNode<SeededRandom>, MemoryStorage) {
        let storage = MemoryStorage(members: peers)
        storage.append(terms.enumerated().map { Entry(term: Term($1), index: LogIndex(UInt64($0 + 1)), data: [UInt8($0)]) })
        storage.setHardState(HardState(term: Term(term ?? terms.last ?? 0)))
        var config = RaftConfig(id: id)
        config.preVote = false
        config.checkQuorum = checkQuorum
        return (RaftNode(config: config, storage: storage, random: SeededRandom(seed: seed ?? id.value)), storage)
    }

    /// Node 1 elected leader of `peers` at term 1 by votes handed to it.
    static func leader(peers: [NodeID] = [1, 2, 3]) -> (RaftNode<SeededRandom>, MemoryStorage) {
        let (n, storage) = node(1, peers: peers)
        n.campaign()
        drain(n, storage)
        for peer in peers.dropFirst() { n.step(Message(kind: .voteResponse, from: peer, to: 1, term: n.term)) }
        drain(n, storage)
        return (n, storage)
    }

    // MARK: - §5.1

    /// "When servers start up, they begin as followers." (§5.2)
    @Test func serversStartAsFollowers() {
        let (n, _) = Self.node(1)
        #expect(n.role == .follower && n.term == 0)
    }

    /// "If one server's current term is smaller than the other's, then it updates its current term
    /// to the larger value. If a candidate or leader discovers that its term is out of date, it
    /// immediately reverts to follower state." (§5.1)
    @Test(arguments: [Role.follower, .candidate, .leader])
    func aHigherTermUpdatesTheTermAndRevertsToFollower(_ role: Role) {
        let (n, storage) = role == .leader ? Self.leader() : Self.node(1)
        if role == .candidate { n.campaign() }
        drain(n, storage)
        #expect(n.role == role)
        n.step(Message(kind: .append, from: 2, to: 1, term: 7, logTerm: 0, index: 0))
        #expect(n.term == 7 && n.role == .follower && n.leader == 2)
    }

    /// "If a server receives a request with a stale term number, it rejects the request." (§5.1)
    /// (Without check-quorum or pre-vote a stale append is dropped unanswered; with them the node
    /// answers with its term, as here, so that a deposed leader learns it.)
    @Test func aRequestWithAStaleTermIsRejected() {
        let (n, storage) = Self.node(1, log: [1, 2], term: 2, checkQuorum: true)
        n.step(Message(kind: .append, from: 2, to: 1, term: 1, logTerm: 2, index: 2,
                       entries: [Entry(term: 1, index: 3)], commit: 3))
        let sent = drain(n, storage)
        #expect(n.lastIndex == 2 && n.commitIndex == 0, "nothing of the stale request was taken")
        #expect(sent.map(\.kind) == [.appendResponse] && sent[0].term == 2, "the answer carries the current term: \(sent)")
        n.step(Message(kind: .vote, from: 3, to: 1, term: 1, logTerm: 2, index: 9))
        #expect(drain(n, storage).allSatisfy { $0.kind != .voteResponse || $0.reject })
        #expect(n.vote == .none && storage.hardState.vote == .none)
    }

    // MARK: - §5.2 Leader election

    /// "Leaders send periodic heartbeats (AppendEntries RPCs that carry no log entries) to all
    /// followers in order to maintain their authority." (§5.2)
    @Test func leadersSendPeriodicHeartbeatsToAllFollowers() {
        let (n, storage) = Self.leader()
        n.tick()
        let heartbeats = drain(n, storage).filter { $0.kind == .heartbeat }
        #expect(heartbeats.map(\.to).sorted() == [2, 3] && heartbeats.allSatisfy { $0.entries.isEmpty && $0.term == 1 })
    }

    /// "If a follower receives no communication over a period of time called the election timeout,
    /// then it assumes there is no viable leader and begins an election ... a follower increments
    /// its current term and transitions to candidate state. It then votes for itself and issues
    /// RequestVote RPCs in parallel to each of the other servers in the cluster." (§5.2)
    @Test func aFollowerWithoutContactStartsAnElection() {
        let (n, storage) = Self.node(1, log: [1], term: 1)
        for _ in 0..<20 { n.tick() }
        let sent = drain(n, storage)
        #expect(n.role == .candidate && n.term == 2 && n.vote == 1)
        #expect(storage.hardState == HardState(term: 2, vote: 1, commit: 0), "term and vote persisted")
        let votes = sent.filter { $0.kind == .vote }
        #expect(votes.map(\.to).sorted() == [2, 3] && votes.allSatisfy { $0.term == 2 && $0.index == 1 && $0.logTerm == 1 })
    }

    /// "A candidate wins an election if it receives votes from a majority of the servers in the
    /// full cluster for the same term." (§5.2) — and loses when a majority refuses.
    @Test(arguments: [
        (1, 0, 0, Role.leader), (3, 1, 0, .leader), (3, 0, 2, .follower), (3, 0, 1, .candidate),
        (5, 1, 0, .candidate), (5, 2, 0, .leader), (5, 1, 3, .follower), (5, 0, 2, .candidate),
    ])
    func aCandidateWinsWithAMajorityOfVotes(size: Int, granted: Int, rejected: Int, outcome: Role) {
        let peers = (1...UInt64(size)).map { NodeID($0) }
        let (n, storage) = Self.node(1, peers: peers)
        n.campaign()
        drain(n, storage)
        for (i, peer) in peers.dropFirst().prefix(granted + rejected).enumerated() {
            n.step(Message(kind: .voteResponse, from: peer, to: 1, term: 1, reject: i >= granted))
        }
        drain(n, storage)
        #expect(n.role == outcome)
    }

    /// "Each server will vote for at most one candidate in a given term, on a
    /// first-come-first-served basis." (§5.2)
    @Test func eachServerVotesForAtMostOneCandidatePerTerm() {
        let (n, storage) = Self.node(1)
        n.step(Message(kind: .vote, from: 2, to: 1, term: 1, logTerm: 0, index: 0))
        n.step(Message(kind: .vote, from: 3, to: 1, term: 1, logTerm: 0, index: 0))
        n.step(Message(kind: .vote, from: 2, to: 1, term: 1, logTerm: 0, index: 0))
        let answers = drain(n, storage).filter { $0.kind == .voteResponse }
        #expect(answers.map(\.to) == [2, 3, 2] && answers.map(\.reject) == [false, true, false])
        #expect(storage.hardState.vote == 2)
    }

    /// "If the leader's term (included in its RPC) is at least as large as the candidate's current
    /// term, then the candidate recognizes the leader as legitimate and returns to follower
    /// state." (§5.2)
    @Test func aCandidateRecognizesALeaderOfItsTerm() {
        let (n, storage) = Self.node(1)
        n.campaign()
        drain(n, storage)
        #expect(n.role == .candidate && n.term == 1)
        n.step(Message(kind: .append, from: 2, to: 1, term: 1, logTerm: 0, index: 0))
        #expect(n.role == .follower && n.leader == 2 && n.term == 1)
    }

    /// "When this happens [split vote], each candidate will time out and start a new election by
    /// incrementing its term and initiating another round of RequestVote RPCs." (§5.2)
    @Test func aCandidateWithoutAWinnerStartsANewElection() {
        let (n, storage) = Self.node(1)
        n.campaign()
        drain(n, storage)
        n.step(Message(kind: .voteResponse, from: 2, to: 1, term: 1, reject: true))
        #expect(n.role == .candidate)
        for _ in 0..<20 { n.tick() }
        let sent = drain(n, storage)
        #expect(n.role == .candidate && n.term == 2 && sent.filter { $0.kind == .vote && $0.term == 2 }.count == 2)
    }

    /// "Raft uses randomized election timeouts ... election timeouts are chosen randomly from a
    /// fixed interval (e.g., 150–300ms)." (§5.2): here [electionTicks, 2 × electionTicks).
    @Test func electionTimeoutsAreRandomizedInAFixedInterval() {
        var timeouts: Set<Int> = []
        for seed in 1...50 as ClosedRange<UInt64> {
            let (n, storage) = Self.node(1, seed: seed)
            var ticks = 0
            while n.role == .follower && ticks < 100 {
                n.tick()
                ticks += 1
            }
            drain(n, storage)
            timeouts.insert(ticks)
        }
        #expect(timeouts.allSatisfy { (10..<20).contains($0) } && timeouts.count >= 5, "\(timeouts.sorted())")
    }

    // MARK: - §5.3 Log replication

    /// "The leader appends the command to its log as a new entry, then issues AppendEntries RPCs in
    /// parallel to each of the other servers to replicate the entry." (§5.3)
    @Test func theLeaderAppendsAndReplicatesInParallel() throws {
        let (n, storage) = Self.leader()
        for peer: NodeID in [2, 3] { n.step(Message(kind: .appendResponse, from: peer, to: 1, term: 1, index: 1)) }
        drain(n, storage)
        try n.propose([42])
        let sent = drain(n, storage)
        #expect(try storage.lastIndex == 2 && storage.term(at: 2) == 1)
        let appends = sent.filter { $0.kind == .append }
        #expect(appends.map(\.to).sorted() == [2, 3])
        #expect(appends.allSatisfy { $0.index == 1 && $0.logTerm == 1 && $0.entries.map(\.data) == [[42]] })
    }

    /// "A log entry is committed once the leader that created the entry has replicated it on a
    /// majority of the servers." (§5.3)
    @Test(arguments: [(3, 0, false), (3, 1, true), (5, 1, false), (5, 2, true), (5, 4, true)])
    func anEntryCommitsOnAMajority(size: Int, acks: Int, commits: Bool) throws {
        let peers = (1...UInt64(size)).map { NodeID($0) }
        let (n, storage) = Self.leader(peers: peers)
        try n.propose([1])
        drain(n, storage)
        for peer in peers.dropFirst().prefix(acks) { n.step(Message(kind: .appendResponse, from: peer, to: 1, term: 1, index: 2)) }
        drain(n, storage)
        #expect((n.commitIndex == 2) == commits)
    }

    /// "This also commits all preceding entries in the leader's log, including entries created by
    /// previous leaders." (§5.3)
    @Test func committingAnEntryCommitsThePrecedingOnes() {
        // Entries of terms 1 and 2 from earlier leaders; node 1 leads term 3.
        let (n, storage) = Self.node(1, log: [1, 2, 2], term: 2)
        n.campaign()
        drain(n, storage)
        n.step(Message(kind: .voteResponse, from: 2, to: 1, term: 3))
        drain(n, storage)
        #expect(n.role == .leader && n.lastIndex == 4)
        n.step(Message(kind: .appendResponse, from: 2, to: 1, term: 3, index: 4))
        drain(n, storage)
        #expect(n.commitIndex == 4)
    }

    /// "The leader keeps track of the highest index it knows to be committed, and it includes that
    /// index in future AppendEntries RPCs (including heartbeats) so that the other servers
    /// eventually find out. Once a follower learns that a log entry is committed, it applies the
    /// entry to its local state machine (in log order)." (§5.3)
    @Test func followersLearnTheCommitIndexAndApplyInOrder() {
        let (n, storage) = Self.node(2, log: [1, 1, 1], term: 1)
        n.step(Message(kind: .append, from: 1, to: 2, term: 1, logTerm: 1, index: 3, commit: 2))
        let first = n.ready()
        #expect(first.committedEntries.map(\.index) == [1, 2])
        storage.setHardState(first.hardState!)
        n.advance(first)
        n.step(Message(kind: .heartbeat, from: 1, to: 2, term: 1, commit: 3))
        let second = n.ready()
        #expect(second.committedEntries.map(\.index) == [3])
        n.advance(second)
    }

    /// "When sending an AppendEntries RPC, the leader includes the index and term of the entry in
    /// its log that immediately precedes the new entries. If the follower does not find an entry in
    /// its log with the same index and term, then it refuses the new entries." (§5.3)
    @Test(arguments: [(UInt64(3), UInt64(1), true), (3, 2, false), (4, 1, false), (2, 1, true), (0, 0, true)])
    func theConsistencyCheckRefusesEntriesAfterAMismatch(prevIndex: UInt64, prevTerm: UInt64, accepted: Bool) {
        let (n, storage) = Self.node(2, log: [1, 1, 1], term: 2)
        n.step(Message(kind: .append, from: 1, to: 2, term: 2, logTerm: Term(prevTerm), index: LogIndex(prevIndex),
                       entries: [Entry(term: 2, index: LogIndex(prevIndex + 1))]))
        let answer = drain(n, storage).first { $0.kind == .appendResponse }
        #expect(answer?.reject == !accepted)
        #expect((storage.lastIndex == LogIndex(prevIndex + 1)) == accepted)
    }

    /// "If an existing entry conflicts with a new one (same index but different terms), delete the
    /// existing entry and all that follow it" (Figure 2) — and keep entries that do not conflict.
    @Test func conflictingEntriesAreReplacedAndMatchingOnesKept() throws {
        let (n, storage) = Self.node(2, log: [1, 1, 2, 2], term: 3)
        n.step(Message(kind: .append, from: 1, to: 2, term: 3, logTerm: 1, index: 1,
                       entries: [Entry(term: 1, index: 2, data: [1]), Entry(term: 3, index: 3, data: [9])]))
        drain(n, storage)
        let log = try storage.entries(from: 1, to: storage.lastIndex.next, maxBytes: .max)
        #expect(log.map(\.term) == [1, 1, 3], "index 3 of term 2 and what followed it are gone")
        // A stale copy of the first append must not cut off what came after it.
        n.step(Message(kind: .append, from: 1, to: 2, term: 3, logTerm: 1, index: 1, entries: [Entry(term: 1, index: 2, data: [1])]))
        drain(n, storage)
        #expect(storage.lastIndex == 3)
    }

    /// "The leader handles inconsistencies by forcing the followers' logs to duplicate its own ...
    /// After a rejection, the leader decrements nextIndex and retries the AppendEntries RPC.
    /// Eventually nextIndex will reach a point where the leader and follower logs match." (§5.3,
    /// the follower logs of Figure 7).
    @Test(arguments: [
        [1, 1, 1, 4, 4, 5, 5, 6, 6],              // (a) missing entries
        [1, 1, 1, 4],                             // (b)
        [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 6],        // (c) extra uncommitted entries
        [1, 1, 1, 4, 4, 5, 5, 6, 6, 6, 7, 7],     // (d)
        [1, 1, 1, 4, 4, 4, 4],                    // (e) missing and extra
        [1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3],        // (f)
    ] as [[UInt64]])
    func theLeaderForcesFollowersToDuplicateItsLog(followerLog: [UInt64]) throws {
        let leaderLog: [UInt64] = [1, 1, 1, 4, 4, 5, 5, 6, 6, 6]
        let (leader, leaderStorage) = Self.node(1, peers: [1, 2, 3], log: leaderLog, term: 7)
        let (follower, followerStorage) = Self.node(2, peers: [1, 2, 3], log: followerLog, term: 7)
        leader.campaign()
        drain(leader, leaderStorage)
        leader.step(Message(kind: .voteResponse, from: 3, to: 1, term: 8))
        var toLeader = drain(leader, leaderStorage).filter { $0.to == 2 }
        for _ in 0..<50 where !toLeader.isEmpty {
            for m in toLeader { follower.step(m) }
            let answers = drain(follower, followerStorage)
            for m in answers { leader.step(m) }
            toLeader = drain(leader, leaderStorage).filter { $0.to == 2 }
        }
        let a = try leaderStorage.entries(from: 1, to: leaderStorage.lastIndex.next, maxBytes: .max)
        let b = try followerStorage.entries(from: 1, to: followerStorage.lastIndex.next, maxBytes: .max)
        #expect(a == b && a.count == 11)
    }

    // MARK: - §5.4 Safety

    /// "the voter denies its vote if its own log is more up-to-date than that of the candidate ...
    /// If the logs have last entries with different terms, then the log with the later term is more
    /// up-to-date. If the logs end with the same term, then whichever log is longer is more
    /// up-to-date." (§5.4.1) The voter's log ends at index 2 with term 2.
    @Test(arguments: [
        (UInt64(1), UInt64(1), false), (1, 3, false), (2, 1, false), (2, 2, true), (2, 3, true), (3, 1, true), (3, 2, true),
    ])
    func aVoteIsDeniedToALessUpToDateLog(candidateLastTerm: UInt64, candidateLastIndex: UInt64, granted: Bool) {
        let (n, storage) = Self.node(1, log: [1, 2], term: 2)
        n.step(Message(kind: .vote, from: 2, to: 1, term: 3, logTerm: Term(candidateLastTerm), index: LogIndex(candidateLastIndex)))
        let answer = drain(n, storage).first { $0.kind == .voteResponse }
        #expect(answer?.reject == !granted)
    }

    /// "Raft never commits log entries from previous terms by counting replicas. Only log entries
    /// from the leader's current term are committed by counting replicas" (§5.4.2, Figure 8).
    @Test func entriesOfEarlierTermsDoNotCommitByCounting() throws {
        // Figure 8 (c): S1 leads term 4 with the term-2 entry at index 2 replicated on a majority.
        let (n, storage) = Self.node(1, peers: [1, 2, 3, 4, 5], log: [1, 2], term: 3)
        n.campaign()
        drain(n, storage)
        for voter: NodeID in [2, 3] { n.step(Message(kind: .voteResponse, from: voter, to: 1, term: 4)) }
        drain(n, storage)
        #expect(n.role == .leader && n.term == 4 && n.lastIndex == 3)
        // S2 and S3 have index 2 (term 2) but not yet the leader's own entry at 3.
        for voter: NodeID in [2, 3] { n.step(Message(kind: .appendResponse, from: voter, to: 1, term: 4, index: 2)) }
        drain(n, storage)
        #expect(n.commitIndex == 0, "a majority holds index 2, but it is of term 2")
        for voter: NodeID in [2, 3] { n.step(Message(kind: .appendResponse, from: voter, to: 1, term: 4, index: 3)) }
        drain(n, storage)
        #expect(n.commitIndex == 3, "the term-4 entry commits, and index 2 with it")
    }

    /// "Leader Append-Only: a leader never overwrites or deletes entries in its log; it only
    /// appends new entries." (Figure 3) An append from a stale leader leaves the leader's log alone.
    @Test func aLeaderNeverOverwritesItsLog() throws {
        let (n, storage) = Self.leader()
        try n.propose([1])
        drain(n, storage)
        let before = try storage.entries(from: 1, to: storage.lastIndex.next, maxBytes: .max)
        n.step(Message(kind: .append, from: 2, to: 1, term: 1, logTerm: 0, index: 0, entries: [Entry(term: 1, index: 1, data: [9])]))
        n.step(Message(kind: .append, from: 3, to: 1, term: 0, logTerm: 0, index: 0, entries: [Entry(term: 0, index: 1)]))
        drain(n, storage)
        #expect(try storage.entries(from: 1, to: storage.lastIndex.next, maxBytes: .max) == before)
        #expect(n.role == .leader)
    }
}
