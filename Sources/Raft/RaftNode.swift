public struct RaftConfig: Sendable {
    public var id: NodeID
    /// Ticks without hearing from a leader before campaigning (randomized in [n, 2n)).
    public var electionTicks = 10
    public var heartbeatTicks = 1
    /// Campaign first in a pre-vote round that changes no terms (§9.6).
    public var preVote = true
    /// A leader without recent contact from a quorum steps down; votes are refused while a leader
    /// is known to be alive (§4.2.3, disruptive servers).
    public var checkQuorum = true
    public var maxMessageBytes = 1 << 20
    public var maxInflightMessages = 256
    public var maxApplyBytes = 64 << 20
    /// A leader refuses proposals while its uncommitted entries hold more than this many bytes of
    /// data (0: no limit); an entry that alone exceeds it is still taken when nothing is pending.
    public var maxUncommittedEntriesBytes = 0
    /// The last index the application had applied before this start.
    public var applied: LogIndex = .zero

    public init(id: NodeID) { self.id = id }
}

/// What the application does next, in this order: persist `hardState` and `entries`; send
/// `messages` at any time (the leader's appends and heartbeats: the leader persists in parallel);
/// send `messagesAfterPersist` only once the persist is durable; apply `committedEntries`; then call
/// `advance(_:)` with this Ready.
public struct Ready: Sendable {
    public var softState: SoftState?
    public var hardState: HardState?
    /// A snapshot from the leader: persist it, install it in the state machine (before the
    /// entries that follow), then advance.
    public var snapshot: Snapshot?
    public var entries: [Entry]
    public var committedEntries: [Entry]
    public var messages: [Message]
    public var messagesAfterPersist: [Message]
    /// Linearizable reads that may be served once `index` is applied.
    public var readStates: [ReadState]
}

/// One Raft peer: a deterministic state machine. No I/O, clocks or system randomness: inputs are
/// `tick`, `step`, `propose` and `campaign`; outputs come out as `Ready`.
public final class RaftNode<Random: RaftRandom> {
    public let id: NodeID
    let config: RaftConfig
    var random: Random

    public internal(set) var term: Term = .zero
    public internal(set) var vote: NodeID = .none
    public internal(set) var role = Role.follower
    public internal(set) var leader: NodeID = .none
    var log: RaftLog
    var progress = ProgressMap()
    var quorum: Quorum
    var learners: Set<NodeID> = []
    /// Voters of the outgoing configuration that become learners when it is left.
    var learnersNext: Set<NodeID> = []
    var autoLeave = false
    /// The index of the last configuration change proposed; the next waits until it is applied.
    var pendingConfIndex: LogIndex = .zero
    /// Set on a leader that applied its own removal (at this index).
    var removedAt: LogIndex?
    /// Data bytes of the leader's entries not yet applied (for `maxUncommittedEntriesBytes`).
    var uncommittedBytes = 0
    var votes: [NodeID: Bool] = [:]
    /// The candidate's vote for itself counts once the hard state holding it is durable.
    var selfVotePending = false

    var electionElapsed = 0
    var heartbeatElapsed = 0
    var randomizedElectionTimeout = 0

    var messages: [Message] = []
    var messagesAfterPersist: [Message] = []
    var readOnly = ReadOnly()
    /// Reads that arrived before this leader committed an entry of its own term.
    var pendingReads: [Message] = []
    var readStates: [ReadState] = []
    /// The peer leadership is being handed to; proposals are refused meanwhile.
    public internal(set) var leadTransferee: NodeID = .none
    private var lastSoftState: SoftState
    private var lastHardState: HardState

    public init(config: RaftConfig, storage: LogStorage, random: Random) {
        id = config.id
        self.config = config
        self.random = random
        let (hard, conf) = storage.initialState()
        log = RaftLog(storage: storage, committed: hard.commit, applied: config.applied, maxApplyBytes: config.maxApplyBytes)
        quorum = Quorum(incoming: conf.voters, outgoing: conf.outgoingVoters)
        learners = conf.learners
        learnersNext = conf.learnersNext
        autoLeave = conf.autoLeave
        lastSoftState = SoftState(leader: .none, role: .follower)
        lastHardState = hard
        becomeFollower(term: hard.term, leader: .none)
        vote = hard.vote
    }

    public var commitIndex: LogIndex { log.committed }
    public var lastIndex: LogIndex { log.lastIndex }
    public var appliedIndex: LogIndex { log.applied }
    var isPromotable: Bool { quorum.voters.contains(id) }
    var hardState: HardState { HardState(term: term, vote: vote, commit: log.committed) }
    var softState: SoftState { SoftState(leader: leader, role: role) }

    // MARK: - Inputs

    public func tick() {
        if role == .leader {
            heartbeatElapsed += 1
            electionElapsed += 1
            if electionElapsed >= config.electionTicks {
                electionElapsed = 0
                if config.checkQuorum { step(Message(kind: .checkQuorum, from: id)) }
                // A transfer that did not finish within an election timeout is abandoned.
                if role == .leader { leadTransferee = .none }
            }
            if role == .leader && heartbeatElapsed >= config.heartbeatTicks {
                heartbeatElapsed = 0
                step(Message(kind: .beat, from: id))
            }
        } else {
            electionElapsed += 1
            if isPromotable && electionElapsed >= randomizedElectionTimeout {
                electionElapsed = 0
                step(Message(kind: .hup, from: id))
            }
        }
    }

    public func campaign() { step(Message(kind: .hup, from: id)) }

    public func propose(_ data: [UInt8]) throws {
        guard (role == .leader && leadTransferee == .none && removedAt == nil) || (role == .follower && leader != .none) else {
            throw RaftError.proposalDropped
        }
        if role == .leader && !canTakeUncommitted(data.count) { throw RaftError.proposalDropped }
        step(Message(kind: .propose, from: id, entries: [Entry(term: .zero, index: .zero, data: data)]))
    }

    /// Asks for a linearizable read; the answer comes as a `ReadState` with the same context (use a
    /// fresh context per request).
    public func readIndex(context: [UInt8]) {
        step(Message(kind: .readIndex, from: id, context: context))
    }

    /// Hands leadership to `target` (forwarded to the leader from a follower).
    public func transferLeadership(to target: NodeID) {
        step(Message(kind: .transferLeader, from: id, index: LogIndex(target.value)))
    }

    public var confState: ConfState {
        ConfState(voters: quorum.incoming, learners: learners, outgoingVoters: quorum.outgoing,
                  learnersNext: learnersNext, autoLeave: autoLeave)
    }

    /// Proposes a single membership change (see `proposeConfChange(_: ConfChangeSet)`).
    public func proposeConfChange(_ change: ConfChange) throws {
        try proposeConfChange(ConfChangeSet([change]))
    }

    /// Proposes membership changes: one simple change, or several through a joint configuration
    /// (an empty set leaves it). Refused while another change is pending (not yet applied), until
    /// this leader has committed an entry of its own term, when entering a joint configuration
    /// twice or leaving one that was not entered, and when no voter would remain.
    public func proposeConfChange(_ set: ConfChangeSet) throws {
        guard role == .leader, leadTransferee == .none, removedAt == nil, committedInCurrentTerm,
              pendingConfIndex <= log.applied, set.isLeave == quorum.isJoint,
              set.isLeave || !Self.apply(set.changes, to: quorum.incoming, learners: learners).voters.isEmpty else {
            throw RaftError.proposalDropped
        }
        appendEntries([Entry(term: term, index: .zero, kind: .configChange, data: set.encoded)])
        pendingConfIndex = log.lastIndex
        broadcastAppend()
    }

    /// Applies a committed single change (the application calls this when it applies the entry).
    @discardableResult
    public func applyConfChange(_ change: ConfChange) -> ConfState {
        applyConfChange(ConfChangeSet([change]))
    }

    /// Applies a committed change entry's set and returns the configuration to persist with the
    /// applied state.
    @discardableResult
    public func applyConfChange(_ set: ConfChangeSet) -> ConfState {
        if set.isLeave {
            guard quorum.isJoint else { return confState }
            quorum = Quorum(voters: quorum.incoming)
            learners.formUnion(learnersNext)
            learnersNext = []
            autoLeave = false
        } else if set.isSimple && !quorum.isJoint {
            let next = Self.apply(set.changes, to: quorum.incoming, learners: learners)
            quorum = Quorum(voters: next.voters)
            learners = next.learners
        } else if !quorum.isJoint {
            // Enter the joint configuration: the old voters must agree too until it is left.
            let outgoing = quorum.incoming
            var next = Self.apply(set.changes, to: quorum.incoming, learners: learners, demote: true)
            // Voters demoted to learners stay voters of the outgoing half until the leave.
            learnersNext = next.learners.intersection(outgoing)
            next.learners.subtract(learnersNext)
            quorum = Quorum(incoming: next.voters, outgoing: outgoing)
            learners = next.learners
            autoLeave = !set.explicitLeave
        }
        if role == .leader { leaderAppliedConfChange() }
        return confState
    }

    /// The voters and learners after `changes`.
    static func apply(_ changes: [ConfChange], to voters: Set<NodeID>, learners: Set<NodeID>, demote: Bool = false)
        -> (voters: Set<NodeID>, learners: Set<NodeID>) {
        var voters = voters
        var learners = learners
        for change in changes {
            switch change.kind {
            case .addVoter:
                voters.insert(change.node)
                learners.remove(change.node)
            case .addLearner:
                // Demoting a voter takes a joint change.
                guard demote || !voters.contains(change.node) else { continue }
                voters.remove(change.node)
                learners.insert(change.node)
            case .remove:
                voters.remove(change.node)
                learners.remove(change.node)
            }
        }
        return (voters, learners)
    }

    private func leaderAppliedConfChange() {
        let members = quorum.voters.union(learners).union(learnersNext)
        for gone in progress.keys where !members.contains(gone) { progress[gone] = nil }
        for new in members.sorted() where progress[new] == nil { progress[new] = Progress(next: log.lastIndex.next) }
        if !quorum.voters.contains(id) {
            // Removed: keep leading until the remaining voters know the change committed (they
            // may need our appends to learn it), then step down (see `stepDownIfRemoved`).
            removedAt = log.applied.next
            broadcastAppend(sendIfEmpty: true)
            stepDownIfRemoved()
        } else if maybeCommit() {
            broadcastAppend(sendIfEmpty: true)
        } else {
            broadcastAppend()
        }
    }

    /// A leader in a joint configuration that should be left by itself proposes the leave once the
    /// entering change is applied.
    func maybeAutoLeave() {
        guard role == .leader, quorum.isJoint, autoLeave, pendingConfIndex <= log.applied, committedInCurrentTerm,
              leadTransferee == .none, removedAt == nil else { return }
        appendEntries([Entry(term: term, index: .zero, kind: .configChange, data: ConfChangeSet.leaveJoint.encoded)])
        pendingConfIndex = log.lastIndex
        broadcastAppend()
    }

    func canTakeUncommitted(_ bytes: Int) -> Bool {
        let limit = config.maxUncommittedEntriesBytes
        return limit == 0 || uncommittedBytes == 0 || uncommittedBytes + bytes <= limit
    }

    /// A removed leader steps down once every remaining voter has been told the removal committed.
    func stepDownIfRemoved() {
        guard role == .leader, let index = removedAt else { return }
        let told = quorum.voters.allSatisfy { voter in
            guard let p = progress[voter] else { return true }
            return p.match >= index && p.sentCommit >= index
        }
        if told { becomeFollower(term: term, leader: .none) }
    }

    /// How sending a snapshot to `peer` ended (the transport reports it).
    public func reportSnapshot(_ peer: NodeID, success: Bool) {
        guard role == .leader, let p = progress[peer], p.state == .snapshot else { return }
        if !success { p.pendingSnapshot = .zero }
        p.becomeProbe()
        // After a failure wait for the next heartbeat; after success probe at once.
        p.probeSent = !success
        if success { sendAppend(to: peer) }
    }

    /// The transport could not deliver to `peer` (its stream broke): appends sent optimistically
    /// may be lost, so go back to probing its match point.
    public func reportUnreachable(_ peer: NodeID) {
        guard role == .leader, peer != id, let p = progress[peer] else { return }
        if p.state == .replicate { p.becomeProbe() }
        p.probeSent = false
    }

    // MARK: - Ready

    public var hasReady: Bool {
        softState != lastSoftState || hardState != lastHardState || !log.unstable.isEmpty
            || !messages.isEmpty || !messagesAfterPersist.isEmpty || log.hasEntriesToApply || !readStates.isEmpty
            || log.pendingSnapshot != nil
    }

    public func ready() -> Ready {
        let soft = softState
        let hard = hardState
        let ready = Ready(
            softState: soft != lastSoftState ? soft : nil,
            hardState: hard != lastHardState ? hard : nil,
            snapshot: log.pendingSnapshot,
            entries: log.unstable,
            committedEntries: log.entriesToApply(),
            messages: messages,
            messagesAfterPersist: messagesAfterPersist,
            readStates: readStates)
        messages = []
        messagesAfterPersist = []
        readStates = []
        if let soft = ready.softState { lastSoftState = soft }
        return ready
    }

    /// The application persisted, sent and applied what `ready` asked for.
    public func advance(_ ready: Ready) {
        if let hard = ready.hardState { lastHardState = hard }
        if let snapshot = ready.snapshot { log.snapshotInstalled(snapshot) }
        if let last = ready.entries.last { log.stable(to: last.index, term: last.term) }
        if let applied = ready.committedEntries.last?.index { log.applied = max(log.applied, applied) }
        if role == .leader {
            let released = ready.committedEntries.reduce(0) { $0 + $1.data.count }
            uncommittedBytes = max(0, uncommittedBytes - released)
        }
        if selfVotePending, ready.hardState?.term == term, ready.hardState?.vote == id {
            selfVotePending = false
            if role == .candidate { receiveVote(from: id, granted: true) }
        }
        maybeAutoLeave()
        if role == .leader {
            // The leader counts itself only for what it has persisted.
            if progress[id]?.maybeUpdate(log.persistedIndex) == true, maybeCommit() { broadcastAppend(sendIfEmpty: true) }
        }
    }

    // MARK: - Roles

    func resetRandomizedElectionTimeout() {
        randomizedElectionTimeout = config.electionTicks + random.next(below: config.electionTicks)
    }

    func reset(term newTerm: Term) {
        if term != newTerm {
            term = newTerm
            vote = .none
        }
        leader = .none
        electionElapsed = 0
        heartbeatElapsed = 0
        resetRandomizedElectionTimeout()
        votes = [:]
        selfVotePending = false
        readOnly = ReadOnly()
        pendingReads = []
        leadTransferee = .none
        removedAt = nil
        uncommittedBytes = 0
        progress = ProgressMap()
        for member in quorum.voters.union(learners).union(learnersNext).sorted() {
            let p = Progress(next: log.lastIndex.next)
            if member == id { p.match = log.persistedIndex }
            progress[member] = p
        }
    }

    func becomeFollower(term newTerm: Term, leader newLeader: NodeID) {
        reset(term: newTerm)
        leader = newLeader
        role = .follower
    }

    func becomePreCandidate() {
        // A pre-vote changes neither term nor vote.
        votes = [:]
        selfVotePending = false
        leader = .none
        role = .preCandidate
    }

    func becomeCandidate() {
        reset(term: term.next)
        vote = id
        role = .candidate
    }

    func becomeLeader() {
        reset(term: term)
        leader = id
        role = .leader
        for member in progress.keys where member != id { progress[member]!.recentActive = true }
        // Changes in the log we have not applied may be pending: wait for them before another.
        pendingConfIndex = log.lastIndex
        // An entry of the new term: committing it commits everything before (§5.4.2).
        appendEntries([Entry(term: term, index: .zero)])
        broadcastAppend()
    }
}
