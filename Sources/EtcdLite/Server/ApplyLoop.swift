import Foundation
import Logging
import Raft
import Synchronization
import EtcdLiteProto

/// The write path, driving the Raft core: proposals go to Raft; each Ready is handled in order —
/// its entries and hard state made durable with one fdatasync (group commit, `RaftLogStore`), its
/// committed entries applied in log order to SQLite in one transaction (which also records the
/// applied index), and only then are their proposers answered. Runs on a thread of its own because
/// SQLite and fdatasync block; the Raft core is used from this thread only.
///
/// An entry's data is `proposer member ID u64 | request ID u64 | encoded InternalRequest`: the member
/// that proposed it answers its client when it applies the entry.
final class ApplyLoop: @unchecked Sendable {
    typealias Completion = @Sendable (Result<InternalResponse, EtcdError>) -> Void

    typealias ReadCompletion = @Sendable (Result<Void, EtcdError>) -> Void
    typealias LeaseCompletion = @Sendable (Result<LeaseAnswer, EtcdError>) -> Void

    /// What only the leader's lease clocks can answer.
    enum LeaseQuestion: Sendable {
        /// A keep-alive: renew, and the TTL (0: unknown or expired).
        case renew(Int64)
        /// The time left and the granted TTL (remaining -1: unknown).
        case timeToLive(Int64)

        var lease: Int64 {
            switch self {
            case .renew(let id), .timeToLive(let id): id
            }
        }
    }

    struct LeaseAnswer: Sendable {
        var remaining: Int64
        var granted: Int64
    }

    private enum Work {
        case proposal(data: [UInt8], request: InternalRequest, completion: Completion?)
        /// A proposal only the leader makes (lease expiry): dropped, not forwarded, by a member
        /// that no longer leads — its clocks are not the cluster's.
        case leaderProposal(data: [UInt8], request: InternalRequest)
        /// Runs on the loop's thread between batches (defragment, snapshots of the writer).
        case local(() -> Void)
        /// A Raft message from a peer, or news that one could not be reached.
        case message(Message)
        case unreachable(NodeID)
        /// A linearizable read waiting to be told it may read (ReadIndex, then the apply).
        case read(ReadCompletion)
        /// Hand leadership to a voter; answered once it leads, or with a timeout.
        case transfer(NodeID, ReadCompletion)
        /// A membership change (add, remove, promote) asked of this member: proposed here when it
        /// leads, otherwise forwarded to the leader.
        case membership(InternalRequest, Completion)
        /// A question for the leader's lease clocks: answered here when this member leads,
        /// otherwise asked of the leader over the peer link (`forwarded`: asked by a peer, so
        /// never passed on again).
        case lease(LeaseQuestion, forwarded: Bool, LeaseCompletion)
        /// Bytes from a peer's server (`AppFrame`).
        case app(from: UInt64, [UInt8])
        /// A peer refused us as removed from the cluster.
        case removedByPeer
        /// A snapshot stream to a peer ended (delivered or not).
        case snapshotSent(NodeID, Bool)
    }

    private let condition = NSCondition()
    private var queue: [Work] = []
    /// 1 while `queue` holds work (read without the lock by the spin before sleeping).
    private let queued = Atomic<Int>(0)
    static let spinNanoseconds: UInt64 = 200_000
    /// How long the loop waited for work, on average over the last few batches.
    private var averageIdleNanoseconds: UInt64 = 1_000_000_000
    /// Runs the log's fdatasync while this thread applies (started on first use).
    private var logSyncerThread: LogSyncer?
    private var logSyncer: LogSyncer {
        if let logSyncerThread { return logSyncerThread }
        let syncer = LogSyncer()
        logSyncerThread = syncer
        return syncer
    }
    private var stopping = false
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)

    private let machine: StateMachine
    private let store: RaftLogStore
    private let raft: RaftNode<SystemRaftRandom>
    private let memberID: UInt64
    /// Proposals of this member waiting for their entry to be applied, by request ID (with the
    /// decoded request, so that applying it needs no decoding).
    private var waiters: [UInt64: (request: InternalRequest, completion: Completion?)] = [:]
    /// Request IDs start at random so that an entry proposed before a restart (and committed
    /// after it) never meets a waiter of the same ID.
    private var nextRequestID = UInt64.random(in: 1...(UInt64.max >> 1))
    /// When each waiting proposal was made: unanswered after `requestTimeout`, it fails with
    /// etcd's `request timed out` (its entry may have been lost with a leader).
    private var proposedAt: [UInt64: Date] = [:]
    let requestTimeout: TimeInterval
    /// The cluster's members as last applied (for MemberList and the request path).
    let members: Mutex<Membership>
    /// The connections to the other members.
    let transport: PeerTransport
    /// Membership changes this leader has been asked for and could not propose yet (another change
    /// is pending): proposed one at a time as the earlier ones apply.
    private var queuedMembership: [(proposer: UInt64, requestID: UInt64, request: InternalRequest, deadline: Date)] = []
    /// When each peer was last heard from (etcd's strict reconfiguration check wants the voters
    /// connected before a change).
    private var lastHeard: [UInt64: Date] = [:]
    /// Set when this member learned it was removed; it stops 10 ticks later (as etcd does).
    private var removedSince: Date?
    private var reportedRemoved = false
    private let onRemoved: @Sendable () -> Void
    /// The Raft configuration after each applied change (the last one before the snapshot point
    /// first): compacting the log through an index records the configuration at that index.
    private var confHistory: [(index: LogIndex, conf: ConfState)] = []
    /// Entries kept behind the applied index when the log is compacted, so that a follower a
    /// little behind catches up from the log rather than from a snapshot (etcd keeps 5000).
    private let catchUpEntries: Int
    /// Peers a snapshot is being streamed to.
    private var sendingSnapshot: Set<NodeID> = []
    /// Received snapshot images not installed (yet): removed after the batch that delivered them.
    private var receivedImages: [String] = []
    private let onInstalled: @Sendable (Int64) -> Void
    private let strictReconfigCheck: Bool
    /// Reads waiting for their ReadIndex answer, by context; then for the apply to reach it.
    private var readsByContext: [UInt64: (reads: [ReadCompletion], asked: Date)] = [:]
    /// Lease questions sent to the leader, by request ID.
    private var leaseQuestions: [UInt64: (completion: LeaseCompletion, asked: Date)] = [:]
    private var readsWaitingForApply: [(index: LogIndex, reads: [ReadCompletion])] = []
    private var nextReadContext: UInt64 = 1
    /// Leadership transfers under way: the target, when to give up, who waits.
    private var transfers: [(target: NodeID, deadline: Date, completion: ReadCompletion)] = []
    private let electionTimeout: TimeInterval
    private var knownLeader: NodeID = .none
    private let tickInterval: TimeInterval
    private var nextTick = Date()
    /// Entries and their bytes applied since the Raft log was last compacted: the log is compacted
    /// after `compactionInterval` entries or `compactionBytes` bytes (it is held in memory).
    private var appliedSinceCompaction = 0
    private var appliedBytesSinceCompaction = 0
    private var appliedSinceWALCheck = 0
    private let compactionInterval: Int
    private let compactionBytes = 4 << 20
    private let logger: Logger
    private let onBatch: @Sendable (StoreStatus) -> Void
    /// Receives each committed batch's events and the revision the batch ended at.
    private let onEvents: @Sendable ([Mvccpb_Event], Int64) -> Void
    private let metrics: MemberMetrics

    /// `initialMembers`: the members of a new cluster (this one included), empty when joining a
    /// running one; `transport` reaches the others.
    init(machine: StateMachine, store: RaftLogStore, memberID: UInt64, initialMembers: [Etcdserverpb_Member], transport: PeerTransport,
         config: MemberConfig, logger: Logger, metrics: MemberMetrics,
         onBatch: @escaping @Sendable (StoreStatus) -> Void, onEvents: @escaping @Sendable ([Mvccpb_Event], Int64) -> Void,
         onRemoved: @escaping @Sendable () -> Void, onInstalled: @escaping @Sendable (Int64) -> Void) throws {
        if store.lastIndex == .zero && store.hardState == HardState() && !initialMembers.isEmpty {
            // A new log starts as etcd's does: the initial members added by committed entries of
            // term 1 (the same entries on every member), so the first election is term 2. Each
            // carries the member (ID, name, peer URLs) for the membership tables.
            let adds = try initialMembers.sorted { $0.id < $1.id }.enumerated().map { position, member in
                var context = ByteWriter()
                context.u64(0)
                context.u64(0)
                context.bytes += try InternalRequest.memberAdd(member).encoded()
                let set = ConfChangeSet([ConfChange(.addVoter, NodeID(member.id))], context: context.bytes)
                return Entry(term: 1, index: LogIndex(UInt64(position + 1)), kind: .configChange, data: set.encoded)
            }
            try store.save(hardState: HardState(term: 1, vote: .none, commit: LogIndex(UInt64(adds.count))), entries: adds)
        }
        self.transport = transport
        self.onRemoved = onRemoved
        self.onInstalled = onInstalled
        strictReconfigCheck = config.strictReconfigCheck
        members = Mutex(machine.membership)
        requestTimeout = 5 + 2 * Double(config.electionTimeoutMilliseconds) / 1000
        electionTimeout = Double(config.electionTimeoutMilliseconds) / 1000
        self.metrics = metrics
        self.machine = machine
        self.store = store
        self.memberID = memberID
        self.logger = logger
        self.onBatch = onBatch
        self.onEvents = onEvents
        tickInterval = Double(config.heartbeatIntervalMilliseconds) / 1000
        compactionInterval = Int(max(1, min(config.snapshotCount, 10_000)))
        catchUpEntries = min(5_000, compactionInterval)
        confHistory = [(store.firstIndex.previous, store.initialState().1)]
        var raftConfig = RaftConfig(id: NodeID(memberID))
        raftConfig.heartbeatTicks = 1
        raftConfig.electionTicks = max(2, config.electionTimeoutMilliseconds / config.heartbeatIntervalMilliseconds)
        // The core hands out every committed entry after the snapshot point again: membership
        // changes rebuild its configuration, and `apply` skips what the store already holds (it
        // may even be ahead of the commit index the log last synced).
        raftConfig.applied = store.firstIndex.previous
        raftConfig.maxUncommittedEntriesBytes = 1 << 30
        raft = RaftNode(config: raftConfig, storage: store, random: SystemRaftRandom())
    }

    /// Applies what the log holds beyond the store (entries that were durable in the log but not yet
    /// applied when the member stopped) and, when this member is the only voter, elects it. With
    /// peers, the election comes from ticks once the loop runs.
    func bootstrap() throws {
        let before = machine.state.appliedIndex
        var rounds = 0
        // What is committed first (the initial membership among it), then, for the only voter, an
        // election; others wait for ticks once the loop runs.
        while raft.appliedIndex < raft.commitIndex && rounds < 1_000 {
            try handleReadies()
            rounds += 1
        }
        syncMembership()
        guard raft.confState.voters == [raft.id] else {
            _ = machine.takeEvents()
            logger.info("raft log replayed", metadata: ["term": "\(raft.term)", "applied-index": "\(machine.state.appliedIndex)",
                                                        "replayed": "\(machine.state.appliedIndex - before)"])
            return
        }
        rounds = 0
        repeat {
            // No campaign while a committed membership change is unapplied: apply it, then campaign.
            if raft.role == .follower { raft.campaign() }
            try handleReadies()
            rounds += 1
            guard rounds < 100 else { throw BootstrapError(reason: "this member could not elect itself") }
        } while raft.role != .leader || raft.appliedIndex < raft.commitIndex
        _ = machine.takeEvents()  // nobody watches yet
        logger.info("raft log replayed", metadata: ["term": "\(raft.term)", "applied-index": "\(machine.state.appliedIndex)",
                                                    "replayed": "\(machine.state.appliedIndex - before)"])
    }

    /// The Raft term this member leads in.
    var term: UInt64 { raft.term.value }

    func start() {
        onBatch(status())
        let thread = Thread { [self] in run() }
        thread.name = "etcdlite-apply"
        thread.stackSize = 8 << 20
        self.thread = thread
        thread.start()
    }

    /// Appends `request` (already encoded as `data`) and waits until it is durable and applied.
    func propose(_ request: InternalRequest, data: [UInt8]) async -> Result<InternalResponse, EtcdError> {
        await withCheckedContinuation { continuation in
            enqueue(.proposal(data: data, request: request, completion: { continuation.resume(returning: $0) }))
        }
    }

    /// Appends `request` and calls `completion` on the loop's thread once it is durable and applied.
    func propose(_ request: InternalRequest, data: [UInt8], completion: @escaping Completion) {
        enqueue(.proposal(data: data, request: request, completion: completion))
    }

    /// Proposes without waiting for the outcome (alarms raised by the member itself).
    func proposeDetached(_ request: InternalRequest) {
        guard let data = try? request.encoded() else { return }
        enqueue(.proposal(data: data, request: request, completion: nil))
    }

    /// Proposes without waiting, only if this member still leads when the loop takes it up.
    func proposeAsLeader(_ request: InternalRequest) {
        guard let data = try? request.encoded() else { return }
        enqueue(.leaderProposal(data: data, request: request))
    }

    /// Runs `body` on the loop's thread, with the writer connection, after earlier proposals.
    func onLoop<T: Sendable>(_ body: @escaping (StateMachine) throws -> T) async throws -> T {
        try await withCheckedThrowingContinuation { continuation in
            enqueue(.local { [self] in
                let result = Result { try body(machine) }
                // Local work (defragment) changes the sizes that status and the quota check read.
                onBatch(status())
                continuation.resume(with: result)
            })
        }
    }

    private func enqueue(_ work: Work) {
        condition.lock()
        if stopping {
            condition.unlock()
            if case .proposal(_, _, let completion?) = work { completion(.failure(.stopped)) }
            if case .membership(_, let completion) = work { completion(.failure(.stopped)) }
            if case .local(let body) = work { body() }
            if case .read(let completion) = work { completion(.failure(.stopped)) }
            if case .transfer(_, let completion) = work { completion(.failure(.stopped)) }
            if case .lease(_, _, let completion) = work { completion(.failure(.stopped)) }
            return
        }
        queue.append(work)
        queued.store(1, ordering: .relaxed)
        condition.signal()
        condition.unlock()
    }

    /// Finishes what is queued, then stops the thread.
    func stop() {
        condition.lock()
        let wasRunning = thread != nil && !stopping
        stopping = true
        condition.signal()
        condition.unlock()
        if wasRunning { done.wait() }
        logSyncerThread?.stop()
        store.close()
    }

    private func run() {
        while true {
            // When work has lately come back within a client's round trip of the last answer,
            // look for it a little while before sleeping: a sleeping thread takes tens of µs to
            // wake here, which a single client's puts paid on every request (A/B in
            // BENCHMARKS.md (s)). A member whose work arrives further apart (or not at all) does
            // not spin.
            let idleSince = DispatchTime.now().uptimeNanoseconds
            if averageIdleNanoseconds < Self.spinNanoseconds {
                let spinUntil = idleSince + Self.spinNanoseconds
                while queued.load(ordering: .relaxed) == 0 && DispatchTime.now().uptimeNanoseconds < spinUntil {
                    sched_yield()
                }
            }
            condition.lock()
            while queue.isEmpty && !stopping {
                if !condition.wait(until: nextTick) { break }
            }
            if queue.isEmpty && stopping {
                condition.unlock()
                break
            }
            let batch = queue
            queue.removeAll(keepingCapacity: true)
            queued.store(0, ordering: .relaxed)
            condition.unlock()
            let idle = DispatchTime.now().uptimeNanoseconds - idleSince
            averageIdleNanoseconds = (averageIdleNanoseconds * 7 + min(idle, 1_000_000_000)) / 8
            process(batch)
        }
        // Nobody will answer these any more.
        for (_, question) in leaseQuestions { question.completion(.failure(.stopped)) }
        leaseQuestions.removeAll()
        for (_, waiting) in readsByContext { for read in waiting.reads { read(.failure(.stopped)) } }
        readsByContext.removeAll()
        for waiting in readsWaitingForApply { for read in waiting.reads { read(.failure(.stopped)) } }
        readsWaitingForApply.removeAll()
        done.signal()
    }

    private typealias Proposal = (data: [UInt8], request: InternalRequest, completion: Completion?)

    /// Proposes `proposals` to the core together (a follower forwards them in one message). An
    /// entry is `proposer u64 | request ID u64 | request`.
    private func proposeAll(_ proposals: [Proposal]) {
        guard !proposals.isEmpty else { return }
        var entries: [[UInt8]] = []
        entries.reserveCapacity(proposals.count)
        let firstID = nextRequestID
        for proposal in proposals {
            var entry = ByteWriter()
            entry.u64(memberID)
            entry.u64(nextRequestID)
            nextRequestID += 1
            entry.bytes += proposal.data
            entries.append(entry.bytes)
        }
        do {
            try raft.propose(batch: entries)
            let now = hasPeers ? Date() : nil
            for (offset, proposal) in proposals.enumerated() {
                let id = firstID + UInt64(offset)
                waiters[id] = (proposal.request, proposal.completion)
                if let now { proposedAt[id] = now }
            }
            metrics.proposalsPending.record(Double(proposals.count))
        } catch {
            for proposal in proposals { proposal.completion?(.failure(.noLeader)) }
        }
    }

    private func process(_ batch: [Work]) {
        var locals: [() -> Void] = []
        var reads: [ReadCompletion] = []
        var proposals: [Proposal] = []
        let received = Date()
        func propose(_ data: [UInt8], _ request: InternalRequest, _ completion: Completion?) {
            proposals.append((data, request, completion))
        }
        for work in batch {
            switch work {
            case .message(let m):
                lastHeard[m.from.value] = received
                if m.kind == .snapshot, let data = m.snapshot?.data, !data.isEmpty { receivedImages.append(String(decoding: data, as: UTF8.self)) }
                raft.step(m)
            case .snapshotSent(let peer, let delivered):
                sendingSnapshot.remove(peer)
                raft.reportSnapshot(peer, success: delivered)
            case .unreachable(let peer):
                raft.reportUnreachable(peer)
            case .read(let completion):
                reads.append(completion)
            case .transfer(let target, let completion):
                guard raft.role == .leader else {
                    completion(.failure(.notLeader))
                    continue
                }
                if target == raft.id {
                    completion(.success(()))
                    continue
                }
                raft.transferLeadership(to: target)
                transfers.append((target, Date().addingTimeInterval(2 * electionTimeout), completion))
            case .leaderProposal(let data, let request):
                guard raft.role == .leader else { continue }
                propose(data, request, nil)
            case .proposal(let data, let request, let completion):
                // Removed from the cluster: nothing proposed here can be committed (etcd answers
                // "server stopped" as it shuts down).
                if removedSince != nil {
                    completion?(.failure(.stopped))
                    continue
                }
                propose(data, request, completion)
            case .local(let body):
                locals.append(body)
            case .membership(let request, let completion):
                askMembershipChange(request, completion)
            case .app(let from, let bytes):
                receiveApp(from: from, bytes)
            case .lease(let question, let forwarded, let completion):
                if raft.role == .leader {
                    answerAsLeader(question, forwarded: forwarded, completion, reads: &reads)
                } else if forwarded {
                    completion(.failure(.notLeader))
                } else if raft.leader != .none {
                    let requestID = nextRequestID
                    nextRequestID += 1
                    leaseQuestions[requestID] = (completion, received)
                    var frame = ByteWriter()
                    frame.u8(AppFrame.leaseQuestion)
                    frame.u64(requestID)
                    if case .renew = question { frame.u8(0) } else { frame.u8(1) }
                    frame.u64(UInt64(bitPattern: question.lease))
                    transport.sendApp(to: raft.leader.value, frame.bytes)
                } else {
                    completion(.failure(.noLeader))
                }
            case .removedByPeer:
                if removedSince == nil { removedSince = .distantPast }
            }
        }
        proposeAll(proposals)
        if !reads.isEmpty {
            // One ReadIndex round for every read of the batch.
            let context = nextReadContext
            nextReadContext += 1
            // The leader keys pending reads by context: the member ID makes ours unlike any
            // other member's.
            var w = ByteWriter()
            w.u64(memberID)
            w.u64(context)
            readsByContext[context] = (reads, Date())
            raft.readIndex(context: w.bytes)
        }
        let now = Date()
        if now >= nextTick {
            raft.tick()
            nextTick = now.addingTimeInterval(tickInterval)
            expireWaiting(now: now)
        }
        do {
            try handleReadies()
            if !queuedMembership.isEmpty {
                proposeQueuedMembership()
                try handleReadies()
            }
        } catch let error as SnapshotCorruptionError {
            // Nothing of the image was installed; the member stops rather than serve from it.
            logger.critical("snapshot image corrupted; stopping", metadata: ["file": "\(error.file)", "offset": "\(error.offset)", "error": "\(error)"])
            fatalError("etcdlite: \(error)")
        } catch {
            // The log or the database failed under us: nothing more can be made durable.
            logger.critical("write path failed; stopping", metadata: ["error": "\(error)"])
            fatalError("etcdlite: write path failed: \(error)")
        }
        for body in locals { body() }
        // An image the core did not take (it had the entries after all) is not kept.
        for path in receivedImages { SnapshotImage.remove(path) }
        receivedImages.removeAll()
        if removedSince != nil && !waiters.isEmpty {
            // Removed: what was proposed through this member and is not applied yet will not be
            // (the others send a removed member nothing more). Its clients hear it now, as from
            // a stopping etcd, rather than at their deadline; the outcome is unknown to them, as
            // with any unavailable answer.
            for (_, waiter) in waiters { waiter.completion?(.failure(.stopped)) }
            waiters.removeAll()
            proposedAt.removeAll()
        }
        if let since = removedSince, !reportedRemoved, now.timeIntervalSince(since) >= 10 * tickInterval {
            reportedRemoved = true
            logger.warning("the member has been permanently removed from the cluster")
            onRemoved()
        }
    }

    /// Whether any other member exists (or none is known yet: a member joining a cluster).
    private var hasPeers: Bool {
        let conf = raft.confState
        return conf.voters.union(conf.learners) != [raft.id]
    }

    /// Handles Readies until the core is quiet: persist (one fdatasync), apply, answer, advance.
    private func handleReadies() throws {
        var pulls = 0
        while raft.hasReady {
            let ready = raft.ready()
            if let snapshot = ready.snapshot { try install(snapshot) }
            // Appends and heartbeats leave while we persist; acknowledgements and votes after.
            // Snapshots stream on connections of their own.
            if ready.messages.contains(where: { $0.kind == .snapshot }) {
                for m in ready.messages where m.kind == .snapshot { sendSnapshot(m) }
                transport.send(ready.messages.filter { $0.kind != .snapshot })
            } else {
                transport.send(ready.messages)
            }
            let syncStart = DispatchTime.now().uptimeNanoseconds
            var applied: Result<Bool, Error>?
            var syncEnd: UInt64 = 0
            if let written = try store.write(hardState: ready.hardState, entries: ready.entries, installed: ready.snapshot) {
                if mayApplyWhileSyncing(ready) {
                    // What was committed before and this Ready's entries go into one transaction
                    // while the disk syncs; it commits, and its proposers hear, after the sync.
                    logSyncer.begin(written)
                    let batch = Result { () throws -> AppliedBatch in
                        try machine.begin()
                        var batch = AppliedBatch()
                        try applyEntries(ready.committedEntries, to: &batch)
                        try applyEntries(ready.entries, to: &batch)
                        return batch
                    }
                    syncEnd = try logSyncer.wait()
                    applied = Result { try commit(batch.get()) }
                } else if ready.committedEntries.count >= Self.overlapMinimum && ready.snapshot == nil && ready.messagesAfterPersist.isEmpty {
                    // The committed entries were made durable by earlier Readies: they are applied
                    // (and answered) while the disk makes this Ready's entries durable. (Not when
                    // acknowledgements wait for the sync: they leave as soon as it is done.)
                    logSyncer.begin(written)
                    applied = Result { try apply(ready.committedEntries) }
                    syncEnd = try logSyncer.wait()
                } else {
                    try RecordSegments.sync(written)
                    syncEnd = DispatchTime.now().uptimeNanoseconds
                }
                try store.finishSync()
                if !ready.entries.isEmpty {
                    metrics.walFsync.recordNanoseconds(Int64(syncEnd - syncStart))
                }
            }
            transport.send(ready.messagesAfterPersist)
            // The log is not written while a sync runs: compaction comes after it.
            if try applied?.get() ?? apply(ready.committedEntries) { try compactLog() }
            for read in ready.readStates {
                var reader = ByteReader(read.context)
                guard (try? reader.u64()) == memberID, let context = try? reader.u64(),
                      let waiting = readsByContext.removeValue(forKey: context) else { continue }
                readsWaitingForApply.append((read.index, waiting.reads))
            }
            releaseReads()
            if let soft = ready.softState { leadershipChanged(soft) }
            raft.advance(ready)
            // A member alone commits what it persisted at once: proposals that arrived meanwhile
            // join the next Ready, so that their sync overlaps this Ready's apply (bounded, so
            // that ticks and other work are not held up).
            if raft.hasReady && !hasPeers && removedSince == nil && pulls < 32 && pullQueuedProposals() { pulls += 1 }
        }
    }

    /// Moves the proposals waiting in the queue into the core (other work keeps its place).
    private func pullQueuedProposals() -> Bool {
        condition.lock()
        guard queue.contains(where: { if case .proposal = $0 { true } else { false } }) else {
            condition.unlock()
            return false
        }
        var proposals: [Proposal] = []
        queue.removeAll { work in
            guard case .proposal(let data, let request, let completion) = work else { return false }
            proposals.append((data, request, completion))
            return true
        }
        condition.unlock()
        proposeAll(proposals)
        return true
    }

    /// What a transaction of applied entries owes once it commits: answers, counts, news.
    private struct AppliedBatch {
        var answered: [(Completion?, Result<InternalResponse, EtcdError>)] = []
        var requests = 0
        var entries = 0
        var membershipChanged = false
    }

    /// Applies committed entries in one transaction and answers their proposers; true when the
    /// log is due for compaction.
    private func apply(_ entries: [Entry]) throws -> Bool {
        guard !entries.isEmpty else { return false }
        // Entries a member alone applied while they were being synced come back committed: no
        // transaction for them.
        if entries.allSatisfy({ $0.kind == .normal && $0.index.value <= machine.state.appliedIndex }) { return false }
        try machine.begin()
        var batch = AppliedBatch()
        try applyEntries(entries, to: &batch)
        return try commit(batch)
    }

    /// Applies `entries` in the open transaction (what the store already holds is skipped).
    private func applyEntries(_ entries: [Entry], to batch: inout AppliedBatch) throws {
        batch.entries += entries.count
        for entry in entries {
            if entry.kind == .configChange {
                if let answer = try applyConfChange(entry) { batch.answered.append(answer) }
                batch.membershipChanged = true
                continue
            }
            if entry.index.value <= machine.state.appliedIndex { continue }  // applied before a restart, or ahead of the commit
            var reader = ByteReader(entry.data)
            guard entry.data.count >= 16, let proposer = try? reader.u64(), let requestID = try? reader.u64() else {
                machine.state.appliedIndex = entry.index.value  // a leader's empty entry
                continue
            }
            appliedBytesSinceCompaction += entry.data.count
            let waiter = proposer == memberID ? waiters.removeValue(forKey: requestID) : nil
            let request = try waiter?.request ?? InternalRequest(encoded: reader.rest())
            if request.changesMembers { batch.membershipChanged = true }
            let result = try machine.apply(request, index: entry.index.value)
            if let waiter {
                proposedAt[requestID] = nil
                batch.answered.append((waiter.completion, result))
            }
            batch.requests += 1
        }
    }

    /// Commits the transaction, then publishes and answers what it applied.
    private func commit(_ batch: AppliedBatch) throws -> Bool {
        let commitStart = DispatchTime.now().uptimeNanoseconds
        try machine.commit()
        metrics.backendCommit.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - commitStart))
        metrics.proposalsCommitted.increment(by: Int64(batch.requests))
        metrics.proposalsApplied.increment(by: Int64(batch.requests))
        metrics.proposalsPending.record(0)
        if batch.membershipChanged { syncMembership() }
        onBatch(status())
        let events = machine.takeEvents()
        if !events.isEmpty { onEvents(events, machine.state.currentRevision) }
        for (completion, result) in batch.answered { completion?(result) }
        appliedSinceCompaction += batch.entries
        appliedSinceWALCheck += batch.entries
        if appliedSinceWALCheck >= 1_000 {
            appliedSinceWALCheck = 0
            try? machine.backend.restartWALIfLarge()  // an optimization: a failure leaves the WAL as it was
        }
        // Not while a snapshot is on its way: the entries after it must still be there when the
        // peer has installed it (etcd holds compaction for in-flight snapshots too).
        return sendingSnapshot.isEmpty && (appliedSinceCompaction >= compactionInterval || appliedBytesSinceCompaction >= compactionBytes)
    }

    /// Fewer entries than this are applied after the sync, on this thread: handing the sync to
    /// another thread and back costs more than applying a few entries (measured: a single
    /// client's put took ~35 µs longer with the hand-off).
    static let overlapMinimum = 4

    /// Whether this Ready's new entries may be applied while they are being synced: a leader
    /// alone commits exactly what it persists, so they will be committed once the sync returns
    /// (a failed sync stops the member before the transaction commits). Only ordinary requests of
    /// its own proposers: membership changes wait for the commit, as the core must hear of them.
    private func mayApplyWhileSyncing(_ ready: Ready) -> Bool {
        guard ready.entries.count + ready.committedEntries.count >= Self.overlapMinimum, ready.snapshot == nil, ready.messagesAfterPersist.isEmpty,
              raft.role == .leader, !hasPeers, removedSince == nil else { return false }
        return ready.entries.allSatisfy { entry in
            guard entry.kind == .normal, entry.index.value > machine.state.appliedIndex else { return false }
            if entry.data.isEmpty { return true }
            var reader = ByteReader(entry.data)
            guard entry.data.count >= 16, (try? reader.u64()) == memberID, let requestID = try? reader.u64(),
                  let waiter = waiters[requestID] else { return false }
            return !waiter.request.changesMembers
        }
    }

    /// Once the store holds the applied entries durably, the Raft log before them can go — but
    /// for `catchUpEntries` when there are peers (a follower behind the rest gets a snapshot).
    private func compactLog() throws {
        appliedSinceCompaction = 0
        appliedBytesSinceCompaction = 0
        let applied = min(LogIndex(machine.state.appliedIndex), raft.appliedIndex)
        let keep = hasPeers ? UInt64(catchUpEntries) : 0
        guard applied.value > keep else { return }
        let through = LogIndex(applied.value - keep)
        guard through >= store.firstIndex, let conf = confHistory.last(where: { $0.index <= through })?.conf else { return }
        try machine.backend.syncCommitted()
        try store.compact(through: through, confState: conf)
        confHistory.removeAll { $0.index < through }
        confHistory.insert((through, conf), at: 0)
    }

    /// Installs the leader's image of the store (received by the transport, its path in the
    /// snapshot's data), then records the snapshot in the log (see `StateMachine.install`).
    private func install(_ snapshot: Snapshot) throws {
        let path = String(decoding: snapshot.data, as: UTF8.self)
        // The image was checked on arrival; read it once more against its checksums (the disk may
        // have damaged it since), then let SQLite check its structure, before anything of it is used.
        Failpoints.beforeSnapshotInstall(path)
        try SnapshotImage.verify(path)
        try machine.install(imageAt: path, minimumAppliedIndex: snapshot.index.value)
        SnapshotImage.remove(path)
        receivedImages.removeAll { $0 == path }
        confHistory = [(snapshot.index, snapshot.confState)]
        logger.info("installed a snapshot from the leader", metadata: ["index": "\(snapshot.index)", "applied-index": "\(machine.state.appliedIndex)",
                                                                       "revision": "\(machine.state.currentRevision)"])
        syncMembership()
        onInstalled(machine.state.currentRevision)
    }

    /// Streams the store to a peer behind the log's start: a consistent copy (at an applied index
    /// at or past the snapshot's), sent by a thread of its own; the core hears how it went.
    private func sendSnapshot(_ message: Message) {
        guard !sendingSnapshot.contains(message.to) else { return }
        guard transport.hasAddress(for: message.to.value) else {
            raft.reportSnapshot(message.to, success: false)
            return
        }
        sendingSnapshot.insert(message.to)
        let backend = machine.backend
        let transport = self.transport
        let directory = URL(fileURLWithPath: backend.path).deletingLastPathComponent()
        let logger = self.logger
        let retryDelay = 2 * electionTimeout
        Thread.detachNewThread { [weak self] in
            let image = directory.appendingPathComponent("outgoing-\(message.to.value)-\(UInt64.random(in: 1...UInt64.max)).db")
            defer { try? FileManager.default.removeItem(at: image) }
            var delivered = false
            do {
                try backend.copy(to: image.path)
                delivered = transport.sendSnapshot(message, image: image)
            } catch {
                logger.warning("could not copy the store for a snapshot", metadata: ["error": "\(error)"])
            }
            logger.info("sent a snapshot", metadata: ["to": "\(String(message.to.value, radix: 16))", "index": "\(message.snapshot?.index ?? .zero)",
                                                      "delivered": "\(delivered)"])
            // A peer that could not take it is not sent another copy of the store at once.
            if !delivered { Thread.sleep(forTimeInterval: retryDelay) }
            self?.enqueue(.snapshotSent(message.to, delivered))
        }
    }

    /// A new leader or role: metrics, lease clocks, transfers, and the published status.
    private func leadershipChanged(_ soft: SoftState) {
        if soft.leader != knownLeader {
            knownLeader = soft.leader
            metrics.hasLeader.record(soft.leader == .none ? 0 : 1)
            if soft.leader != .none { metrics.leaderChanges.increment() }
            // A new leader restarts every lease's clock (the old leader's clocks are not ours).
            if soft.leader == raft.id { machine.lessor.renewAll() }
        }
        metrics.isLeader.record(soft.role == .leader ? 1 : 0)
        transfers.removeAll { transfer in
            guard soft.leader == transfer.target else { return false }
            transfer.completion(.success(()))
            return true
        }
        onBatch(status())
    }

    /// Hands leadership to `target` and waits until it leads (etcd's MoveLeader).
    func transferLeadership(to target: UInt64) async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, Error>) in
            enqueue(.transfer(NodeID(target)) { result in continuation.resume(with: result.mapError { $0 }) })
        }
    }

    /// Before a planned stop: if this member leads, hands leadership to another voter and waits
    /// (at most two election timeouts) so that the cluster does not wait for an election.
    func handOverLeadership() {
        let done = DispatchSemaphore(value: 0)
        enqueue(.local { [self] in
            guard removedSince == nil, raft.role == .leader, hasPeers, let target = raft.confState.voters.filter({ $0 != raft.id }).sorted().first else {
                done.signal()
                return
            }
            raft.transferLeadership(to: target)
            transfers.append((target, Date().addingTimeInterval(2 * electionTimeout), { _ in done.signal() }))
        })
        _ = done.wait(timeout: .now() + 2 * electionTimeout + 0.5)
    }

    /// Reads whose index the store has reached may go ahead.
    private func releaseReads() {
        guard !readsWaitingForApply.isEmpty else { return }
        let applied = LogIndex(machine.state.appliedIndex)
        readsWaitingForApply.removeAll { waiting in
            guard waiting.index <= applied else { return false }
            for read in waiting.reads { read(.success(())) }
            return true
        }
    }

    /// Fails proposals and reads that waited longer than etcd's request timeout.
    private func expireWaiting(now: Date) {
        let deadline = now.addingTimeInterval(-requestTimeout)
        for (id, at) in proposedAt where at < deadline {
            proposedAt[id] = nil
            waiters.removeValue(forKey: id)?.completion?(.failure(.requestTimedOut))
        }
        queuedMembership.removeAll { queued in
            guard queued.deadline < now else { return false }
            answerMembership(queued.proposer, queued.requestID, .requestTimedOut)
            return true
        }
        for (id, question) in leaseQuestions where question.asked < deadline {
            leaseQuestions[id] = nil
            question.completion(.failure(.requestTimedOut))
        }
        for (context, waiting) in readsByContext where waiting.asked < deadline {
            readsByContext[context] = nil
            for read in waiting.reads { read(.failure(.requestTimedOut)) }
        }
        transfers.removeAll { transfer in
            guard transfer.deadline < now else { return false }
            transfer.completion(.failure(.leaderTransferTimeout))
            return true
        }
    }

    /// Waits until this member may serve a linearizable read: the leader confirmed the commit index
    /// (ReadIndex) and the store has applied it.
    func linearizableRead() async throws {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, Error>) in
            enqueue(.read { result in continuation.resume(with: result.mapError { $0 }) })
        }
    }

    /// Asks the leader's lease clocks (here, or over the peer link), which answer once a quorum
    /// confirmed that this leader still leads: a renewal is never promised, nor a lease declared
    /// gone, but by the leader whose clocks count (etcd's followers forward keep-alives and
    /// TimeToLive to it too).
    func askLeader(_ question: LeaseQuestion) async throws -> LeaseAnswer {
        try await withCheckedThrowingContinuation { continuation in
            enqueue(.lease(question, forwarded: false) { continuation.resume(with: $0.mapError { $0 }) })
        }
    }

    /// The leader's answer. A renewal is made first and confirmed after (ReadIndex), which puts
    /// any later leader's election, and its restart of every clock, after it. A lease this leader
    /// does not know yet (its apply was behind) is asked about again once the apply caught up.
    private func answerAsLeader(_ question: LeaseQuestion, forwarded: Bool, _ completion: @escaping LeaseCompletion,
                                reads: inout [ReadCompletion]) {
        let lessor = machine.lessor
        switch question {
        case .renew(let lease):
            let ttl = lessor.renew(lease) ?? 0
            guard hasPeers else { return completion(.success(LeaseAnswer(remaining: ttl, granted: ttl))) }
            reads.append { [self] result in
                switch result {
                case .failure(let error): completion(.failure(error))
                case .success where ttl > 0: completion(.success(LeaseAnswer(remaining: ttl, granted: ttl)))
                case .success where lessor.renew(lease) != nil: enqueue(.lease(question, forwarded: forwarded, completion))
                case .success: completion(.success(LeaseAnswer(remaining: 0, granted: 0)))
                }
            }
        case .timeToLive(let lease):
            @Sendable func answer() -> LeaseAnswer {
                guard let clock = lessor.timeToLive(lease) else { return LeaseAnswer(remaining: -1, granted: 0) }
                return LeaseAnswer(remaining: clock.remaining, granted: clock.granted)
            }
            guard hasPeers else { return completion(.success(answer())) }
            reads.append { completion($0.map { answer() }) }
        }
    }

    func receive(_ message: Message) { enqueue(.message(message)) }
    func receiveApp(from peer: UInt64, bytes: [UInt8]) { enqueue(.app(from: peer, bytes)) }
    func removedByPeer() { enqueue(.removedByPeer) }

    /// Asks for a membership change (add, remove or promote) and waits until it is applied here.
    func changeMembership(_ request: InternalRequest) async -> Result<InternalResponse, EtcdError> {
        await withCheckedContinuation { continuation in
            enqueue(.membership(request, { continuation.resume(returning: $0) }))
        }
    }
    func peerUnreachable(_ peer: NodeID) { enqueue(.unreachable(peer)) }

    func status() -> StoreStatus {
        let sizes = (try? machine.backend.sizes()) ?? (size: 0, inUse: 0)
        return StoreStatus(state: machine.state, logIndex: raft.lastIndex.value, dbSize: sizes.size, dbSizeInUse: sizes.inUse,
                           alarms: machine.alarms, raftTerm: raft.term.value, leader: raft.leader.value,
                           alone: !hasPeers, isLearner: raft.confState.learners.contains(raft.id))
    }
}

/// The Raft log's fdatasync on a thread of its own: the apply loop hands it a descriptor, applies
/// what was committed before, then waits for the sync (etcd's raft loop and apply loop overlap
/// the same way). One sync at a time.
final class LogSyncer: @unchecked Sendable {
    private let condition = NSCondition()
    private var request: Int32?
    /// The outcome, and when the sync returned (uptime nanoseconds).
    private var result: Result<UInt64, Error>?
    private var stopping = false

    init() {
        let thread = Thread { [self] in run() }
        thread.name = "etcdlite-log-sync"
        thread.start()
    }

    func begin(_ fd: Int32) {
        condition.lock()
        request = fd
        result = nil
        condition.broadcast()
        condition.unlock()
    }

    /// The outcome of the sync `begin` asked for: when it returned (uptime nanoseconds).
    func wait() throws -> UInt64 {
        condition.lock()
        while result == nil { condition.wait() }
        let outcome = result!
        result = nil
        condition.unlock()
        return try outcome.get()
    }

    func stop() {
        condition.lock()
        stopping = true
        condition.broadcast()
        condition.unlock()
    }

    private func run() {
        while true {
            condition.lock()
            while request == nil && !stopping { condition.wait() }
            guard let fd = request else {
                condition.unlock()
                return
            }
            request = nil
            condition.unlock()
            let outcome = Result { () throws -> UInt64 in
                try RecordSegments.sync(fd)
                return DispatchTime.now().uptimeNanoseconds
            }
            condition.lock()
            result = outcome
            condition.broadcast()
            condition.unlock()
        }
    }
}

/// What the apply loop publishes after each batch for status, headers and quota checks.
struct StoreStatus: Sendable {
    var state: StoreState
    var logIndex: UInt64
    var dbSize: Int64
    var dbSizeInUse: Int64
    var alarms: [Etcdserverpb_AlarmMember]
    var raftTerm: UInt64 = 0
    /// The leader this member knows of (0: none).
    var leader: UInt64 = 0
    /// The only member of its cluster: its committed state is linearizable without asking anyone.
    var alone = true
    var isLearner = false
}

/// The core's randomness in a member: election timeouts from the system's generator.
struct SystemRaftRandom: RaftRandom {
    var generator = SystemRandomNumberGenerator()
    mutating func next(below bound: Int) -> Int { Int.random(in: 0..<bound, using: &generator) }
}

struct BootstrapError: Error, CustomStringConvertible {
    let reason: String
    var description: String { reason }
}

// MARK: - Membership

/// Requests between the members' servers, carried in the peer transport's application frames:
/// `1 | request ID u64 | InternalRequest` (a membership change forwarded to the leader),
/// `2 | request ID u64 | code u8 | message` (the leader refused it),
/// `3 | request ID u64 | question u8 (0 renew, 1 time to live) | lease ID u64` (for the leader's
/// lease clocks) and `4 | request ID u64 | code u8 | remaining u64 | granted u64, or message`
/// (the answer: code 0 and the figures, or an error).
private enum AppFrame {
    static let forward: UInt8 = 1
    static let refused: UInt8 = 2
    static let leaseQuestion: UInt8 = 3
    static let leaseAnswer: UInt8 = 4
}

extension ApplyLoop {
    /// Applies a configuration change entry: to Raft when it is valid against the Raft
    /// configuration at this point of the log (the same decision on every member and on every
    /// replay), and, the first time, to the membership tables. Returns the proposer's answer.
    fileprivate func applyConfChange(_ entry: Entry) throws -> (Completion?, Result<InternalResponse, EtcdError>)? {
        let fresh = entry.index.value > machine.state.appliedIndex
        defer { machine.state.appliedIndex = max(machine.state.appliedIndex, entry.index.value) }
        guard let set = ConfChangeSet(encoded: entry.data) else { return nil }
        var reader = ByteReader(set.context)
        guard let proposer = try? reader.u64(), let requestID = try? reader.u64(),
              let request = try? InternalRequest(encoded: reader.rest()) else {
            confHistory.append((entry.index, raft.applyConfChange(set)))  // a change without a member
            return nil
        }
        let conf = raft.confState
        let known = conf.voters.union(conf.learners)
        var refusal: EtcdError?
        switch request {
        case .memberAdd(let m): if known.contains(NodeID(m.id)) { refusal = .memberExists }
        case .memberRemove(let m): if !known.contains(NodeID(m.id)) { refusal = .memberNotFound }
        case .memberPromote(let m):
            if !known.contains(NodeID(m.id)) { refusal = .memberNotFound } else if !conf.learners.contains(NodeID(m.id)) { refusal = .memberNotLearner }
        default: refusal = EtcdError(.internal, "etcdserver: not a membership change")
        }
        if refusal == nil {
            confHistory.append((entry.index, raft.applyConfChange(set)))
        }
        guard fresh else { return nil }
        let result: Result<InternalResponse, EtcdError>
        if let refusal {
            result = .failure(refusal)
        } else {
            result = try machine.applyMembershipChange(request, index: entry.index.value)
            if case .memberRemove(let m) = request, m.id == memberID, removedSince == nil { removedSince = Date() }
            logger.info("membership changed", metadata: ["change": "\(request.membershipDescription)", "index": "\(entry.index)"])
        }
        guard proposer == memberID, let waiter = waiters.removeValue(forKey: requestID) else { return nil }
        proposedAt[requestID] = nil
        return (waiter.completion, result)
    }

    /// Publishes the applied membership and points the transport at the members' peer URLs.
    fileprivate func syncMembership() {
        let membership = machine.membership
        members.withLock { $0 = membership }
        transport.removed.withLockedValue { $0 = membership.removed }
        for member in membership.members.values where member.id != memberID { transport.setPeer(member) }
        for id in membership.removed { transport.removePeer(id) }
    }

    /// A membership change asked of this member: proposed if it leads, else sent to the leader.
    fileprivate func askMembershipChange(_ request: InternalRequest, _ completion: @escaping Completion) {
        let requestID = nextRequestID
        nextRequestID += 1
        // Checked on the member asked, as etcd does, before any leader is needed; what only the
        // leader knows (connections, a learner's progress) the leader checks when it proposes.
        if raft.role == .leader {
            if let error = proposeMembership(request, proposer: memberID, requestID: requestID) { return completion(.failure(error)) }
        } else if let error = checkMembership(request, leaderChecks: false) {
            return completion(.failure(error))
        } else if raft.leader != .none, let body = try? request.encoded() {
            var frame = ByteWriter()
            frame.u8(AppFrame.forward)
            frame.u64(requestID)
            frame.bytes += body
            transport.sendApp(to: raft.leader.value, frame.bytes)
        } else {
            return completion(.failure(.noLeader))
        }
        waiters[requestID] = (request, completion)
        proposedAt[requestID] = Date()
    }

    fileprivate func receiveApp(from peer: UInt64, _ bytes: [UInt8]) {
        var reader = ByteReader(bytes)
        guard let kind = try? reader.u8(), let requestID = try? reader.u64() else { return }
        switch kind {
        case AppFrame.forward:
            guard let request = try? InternalRequest(encoded: reader.rest()) else { return }
            if let error = proposeMembership(request, proposer: peer, requestID: requestID) {
                answerMembership(peer, requestID, error)
            }
        case AppFrame.leaseQuestion:
            guard let kind = try? reader.u8(), let raw = try? reader.u64() else { return }
            let lease = Int64(bitPattern: raw)
            let transport = self.transport
            enqueue(.lease(kind == 0 ? .renew(lease) : .timeToLive(lease), forwarded: true) { result in
                var frame = ByteWriter()
                frame.u8(AppFrame.leaseAnswer)
                frame.u64(requestID)
                switch result {
                case .success(let answer):
                    frame.u8(0)
                    frame.u64(UInt64(bitPattern: answer.remaining))
                    frame.u64(UInt64(bitPattern: answer.granted))
                case .failure(let error):
                    frame.u8(UInt8(error.code.rawValue))
                    frame.bytes += Array(error.message.utf8)
                }
                transport.sendApp(to: peer, frame.bytes)
            })
        case AppFrame.leaseAnswer:
            guard let code = try? reader.u8(), let question = leaseQuestions.removeValue(forKey: requestID) else { return }
            if code == 0, let remaining = try? reader.u64(), let granted = try? reader.u64() {
                question.completion(.success(LeaseAnswer(remaining: Int64(bitPattern: remaining), granted: Int64(bitPattern: granted))))
            } else {
                let message = String(decoding: reader.rest(), as: UTF8.self)
                question.completion(.failure(EtcdError(EtcdError.Code(rawValue: Int(code)) ?? .unknown, message)))
            }
        case AppFrame.refused:
            guard let code = try? reader.u8(), let waiter = waiters.removeValue(forKey: requestID) else { return }
            proposedAt[requestID] = nil
            let message = String(decoding: reader.rest(), as: UTF8.self)
            waiter.completion?(.failure(EtcdError(EtcdError.Code(rawValue: Int(code)) ?? .unknown, message)))
        default:
            break
        }
    }

    /// Tells the member that asked for a change that it failed.
    fileprivate func answerMembership(_ proposer: UInt64, _ requestID: UInt64, _ error: EtcdError) {
        if proposer == memberID {
            proposedAt[requestID] = nil
            waiters.removeValue(forKey: requestID)?.completion?(.failure(error))
            return
        }
        var frame = ByteWriter()
        frame.u8(AppFrame.refused)
        frame.u64(requestID)
        frame.u8(UInt8(error.code.rawValue))
        frame.bytes += Array(error.message.utf8)
        transport.sendApp(to: proposer, frame.bytes)
    }

    /// Checks a change as etcd's leader does and proposes it, or queues it behind a change still
    /// pending. Returns the refusal, if any.
    fileprivate func proposeMembership(_ request: InternalRequest, proposer: UInt64, requestID: UInt64) -> EtcdError? {
        guard raft.role == .leader else { return .leaderChanged }
        guard raft.canProposeConfChange else {
            queuedMembership.append((proposer, requestID, request, Date().addingTimeInterval(requestTimeout)))
            return nil
        }
        if let error = checkMembership(request) { return error }
        let change: ConfChange
        switch request {
        case .memberAdd(let m): change = ConfChange(m.isLearner ? .addLearner : .addVoter, NodeID(m.id))
        case .memberRemove(let m): change = ConfChange(.remove, NodeID(m.id))
        case .memberPromote(let m): change = ConfChange(.addVoter, NodeID(m.id))
        default: return EtcdError(.internal, "etcdserver: not a membership change")
        }
        var context = ByteWriter()
        context.u64(proposer)
        context.u64(requestID)
        guard let body = try? request.encoded() else { return EtcdError(.internal, "etcdserver: unencodable request") }
        context.bytes += body
        do {
            try raft.proposeConfChange(ConfChangeSet([change], context: context.bytes))
        } catch {
            // The core refuses a change that would leave no voter (the others were checked above).
            return .notEnoughStartedMembers
        }
        return nil
    }

    /// Proposes the oldest queued change once no other is pending.
    fileprivate func proposeQueuedMembership() {
        guard raft.role == .leader else {
            for queued in queuedMembership { answerMembership(queued.proposer, queued.requestID, .leaderChanged) }
            queuedMembership = []
            return
        }
        guard raft.canProposeConfChange else { return }
        let next = queuedMembership.removeFirst()
        if let error = proposeMembership(next.request, proposer: next.proposer, requestID: next.requestID) {
            answerMembership(next.proposer, next.requestID, error)
        }
    }

    /// etcd's checks before a membership change (with --strict-reconfig-check, its default):
    /// the applied membership allows it, enough members have started to keep a quorum, the voters
    /// are connected, and a learner to promote has caught up (90% of the leader's log).
    /// `leaderChecks`: also what only the leader can tell (voters connected, a learner's progress).
    private func checkMembership(_ request: InternalRequest, leaderChecks: Bool = true) -> EtcdError? {
        let membership = machine.membership
        let voters = membership.voters
        let started = voters.filter(Membership.isStarted).count
        switch request {
        case .memberAdd(let m):
            // etcd's order: the strict checks first, then the membership's own.
            if strictReconfigCheck && !m.isLearner {
                // A second member for a one-member cluster is allowed (etcd: restoring a cluster).
                let size = voters.count + 1
                if !(started == 1 && size == 2) && started < size / 2 + 1 { return .notEnoughStartedMembers }
            }
            if strictReconfigCheck && leaderChecks && !votersConnected(voters) { return .unhealthy }
            if membership.removed.contains(m.id) { return .memberNotFound }  // etcd's ErrIDRemoved
            if membership[m.id] != nil { return .memberExists }
            if membership.peerURLsInUse(m.peerUrls) { return .peerURLExists }
            if m.isLearner && membership.learners.count >= 1 { return .tooManyLearners }
        case .memberRemove(let m):
            if strictReconfigCheck && membership[m.id]?.isLearner != true {
                let rest = voters.filter { $0.id != m.id }
                if rest.filter(Membership.isStarted).count < rest.count / 2 + 1 { return .notEnoughStartedMembers }
                // Removing a member that is down costs no quorum; otherwise what stays connected
                // must still be a quorum without it.
                if leaderChecks && (m.id == memberID || isConnected(m.id)) {
                    let connected = voters.filter { $0.id == memberID || isConnected($0.id) }.count
                    if connected - 1 < 1 + (voters.count - 1) / 2 { return .unhealthy }
                }
            }
            if membership[m.id] == nil { return .memberNotFound }
        case .memberPromote(let m):
            guard let member = membership[m.id] else { return .memberNotFound }
            guard member.isLearner else { return .memberNotLearner }
            if leaderChecks {
                let leaderMatch = raft.matchIndex(of: raft.id)?.value ?? 0
                let learnerMatch = raft.matchIndex(of: NodeID(m.id))?.value ?? 0
                if Double(learnerMatch) < Double(leaderMatch) * 0.9 { return .learnerNotReady }
            }
            let size = voters.count + 1
            if strictReconfigCheck && started + 1 < size / 2 + 1 { return .notEnoughStartedMembers }
        default:
            return EtcdError(.internal, "etcdserver: not a membership change")
        }
        return nil
    }

    /// Heard from within the last five seconds (etcd's health interval).
    private func isConnected(_ id: UInt64) -> Bool {
        guard let at = lastHeard[id] else { return false }
        return Date().timeIntervalSince(at) < 5
    }

    private func votersConnected(_ voters: [Etcdserverpb_Member]) -> Bool {
        voters.allSatisfy { $0.id == memberID || isConnected($0.id) }
    }
}

extension InternalRequest {
    /// For logs: which membership change.
    var membershipDescription: String {
        switch self {
        case .memberAdd(let m): "add \(String(m.id, radix: 16))\(m.isLearner ? " as learner" : "") \(m.peerUrls)"
        case .memberRemove(let m): "remove \(String(m.id, radix: 16))"
        case .memberPromote(let m): "promote \(String(m.id, radix: 16))"
        default: "other"
        }
    }
}
