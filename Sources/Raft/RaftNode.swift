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
    /// Appends in flight to one follower (replicate state), and their entry bytes (0: no bound).
    public var maxInflightMessages = 256
    public var maxInflightBytes = 0
    public var maxApplyBytes = 64 << 20
    /// A leader refuses proposals while its uncommitted entries hold more than this many bytes of
    /// data (0: no limit); an entry that alone exceeds it is still taken when nothing is pending.
    public var maxUncommittedEntriesBytes = 0
    /// The last index the application had applied before this start.
    public var applied: LogIndex = .zero

    public init(id: NodeID) { self.id = id }
}

/// What the core asks of the application. Handle a Ready in this order, then call `advance(_:)`
/// with it; the next Ready is taken only after that.
public struct Ready: Sendable {
    /// Who leads and our role, when they changed. Display only: nothing to persist.
    public var softState: SoftState?
    /// Term, vote and commit index to persist, when they changed. Durable (with `entries` and
    /// `snapshot`, in one write) before any of `messagesAfterPersist` leaves.
    public var hardState: HardState?
    /// A snapshot from the leader: persist it and install it in the state machine before applying
    /// `committedEntries` (which follow it). Durable before `messagesAfterPersist` leave.
    public var snapshot: Snapshot?
    /// Entries to append to the durable log, replacing any entries from the first one's index on.
    /// Durable before `messagesAfterPersist` leave.
    public var entries: [Entry]
    /// Entries to apply to the state machine, in order. They are committed and durable here
    /// already (never from this Ready's `entries`), so they may be applied while the persist runs.
    public var committedEntries: [Entry]
    /// May leave at once, before or while this Ready's persist runs: appends and heartbeats (the
    /// leader persists in parallel and counts itself only after `advance`), vote requests (the
    /// candidate's own vote counts only after `advance`), snapshots, forwarded requests.
    public var messages: [Message]
    /// May leave only after `hardState`, `entries` and `snapshot` of this Ready are durable: append
    /// acknowledgements and vote answers, which promise what is on disk.
    public var messagesAfterPersist: [Message]
    /// Linearizable reads: each may be served once the state machine has applied its `index`.
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
    /// Proposals appended since the last Ready: their appends are sent when it is taken.
    var appendsPending = false
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
        try propose(batch: [data])
    }

    /// Proposes several entries at once: a follower forwards them to the leader in one message;
    /// the leader takes all of them or none (the uncommitted limit counts the whole batch).
    public func propose(batch: [[UInt8]]) throws {
        guard !batch.isEmpty else { return }
        guard (role == .leader && leadTransferee == .none && removedAt == nil) || (role == .follower && leader != .none) else {
            throw RaftError.proposalDropped
        }
        if role == .leader && !canTakeUncommitted(batch.reduce(0) { $0 + $1.count }) { throw RaftError.proposalDropped }
        step(Message(kind: .propose, from: id, entries: batch.map { Entry(term: .zero, index: .zero, data: $0) }))
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

    // MARK: - Ready

    public var hasReady: Bool {
        softState != lastSoftState || hardState != lastHardState || !log.unstable.isEmpty
            || !messages.isEmpty || !messagesAfterPersist.isEmpty || log.hasEntriesToApply || !readStates.isEmpty
            || log.pendingSnapshot != nil
    }

    public func ready() -> Ready {
        if appendsPending {
            appendsPending = false
            if role == .leader { broadcastAppend() }
        }
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

}
