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

    private enum Work {
        case proposal(data: [UInt8], request: InternalRequest, completion: Completion?)
        /// Runs on the loop's thread between batches (defragment, snapshots of the writer).
        case local(() -> Void)
        /// A Raft message from a peer, or news that one could not be reached.
        case message(Message)
        case unreachable(NodeID)
        /// A linearizable read waiting to be told it may read (ReadIndex, then the apply).
        case read(ReadCompletion)
        /// Hand leadership to a voter; answered once it leads, or with a timeout.
        case transfer(NodeID, ReadCompletion)
    }

    private let condition = NSCondition()
    private var queue: [Work] = []
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
    private var nextRequestID: UInt64 = 1
    /// When each waiting proposal was made: unanswered after `requestTimeout`, it fails with
    /// etcd's `request timed out` (its entry may have been lost with a leader).
    private var proposedAt: [UInt64: Date] = [:]
    private let requestTimeout: TimeInterval
    /// Names and client URLs the members published through the log, by member ID.
    let memberAttributes = Mutex<[UInt64: Etcdserverpb_Member]>([:])
    /// Peers, when there are any (nil: this member is alone).
    let transport: PeerTransport?
    /// Reads waiting for their ReadIndex answer, by context; then for the apply to reach it.
    private var readsByContext: [UInt64: (reads: [ReadCompletion], asked: Date)] = [:]
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
    private let compactionInterval: Int
    private let compactionBytes = 4 << 20
    private let logger: Logger
    private let onBatch: @Sendable (StoreStatus) -> Void
    /// Receives each committed batch's events and the revision the batch ended at.
    private let onEvents: @Sendable ([Mvccpb_Event], Int64) -> Void
    private let metrics: MemberMetrics

    /// `members`: the initial members' IDs (this one included); `transport` reaches the others.
    init(machine: StateMachine, store: RaftLogStore, memberID: UInt64, members: [UInt64], transport: PeerTransport?,
         config: MemberConfig, logger: Logger, metrics: MemberMetrics,
         onBatch: @escaping @Sendable (StoreStatus) -> Void, onEvents: @escaping @Sendable ([Mvccpb_Event], Int64) -> Void) throws {
        if store.lastIndex == .zero && store.hardState == HardState() {
            // A new log starts as etcd's does: the initial members added by committed entries of
            // term 1 (the same entries on every member), so the first election is term 2.
            let adds = members.sorted().enumerated().map { position, id in
                Entry(term: 1, index: LogIndex(UInt64(position + 1)), kind: .configChange, data: ConfChange(.addVoter, NodeID(id)).encoded)
            }
            try store.save(hardState: HardState(term: 1, vote: .none, commit: LogIndex(UInt64(adds.count))), entries: adds)
        }
        self.transport = transport
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
        compactionInterval = Int(min(config.snapshotCount, 10_000))
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
        if transport != nil {
            while raft.appliedIndex < raft.commitIndex && rounds < 1_000 {
                try handleReadies()
                rounds += 1
            }
            _ = machine.takeEvents()
            logger.info("raft log replayed", metadata: ["term": "\(raft.term)", "applied-index": "\(machine.state.appliedIndex)",
                                                        "replayed": "\(machine.state.appliedIndex - before)"])
            return
        }
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
            if case .local(let body) = work { body() }
            if case .read(let completion) = work { completion(.failure(.stopped)) }
            if case .transfer(_, let completion) = work { completion(.failure(.stopped)) }
            return
        }
        queue.append(work)
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
        store.close()
    }

    private func run() {
        while true {
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
            condition.unlock()
            process(batch)
        }
        done.signal()
    }

    private func process(_ batch: [Work]) {
        var locals: [() -> Void] = []
        var proposed = 0
        var reads: [ReadCompletion] = []
        var entries: [[UInt8]] = []
        var proposals: [(id: UInt64, request: InternalRequest, completion: Completion?)] = []
        for work in batch {
            switch work {
            case .message(let m):
                raft.step(m)
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
            case .proposal(let data, let request, let completion):
                let requestID = nextRequestID
                nextRequestID += 1
                var entry = ByteWriter()
                entry.u64(memberID)
                entry.u64(requestID)
                entry.bytes += data
                entries.append(entry.bytes)
                proposals.append((requestID, request, completion))
            case .local(let body):
                locals.append(body)
            }
        }
        if !entries.isEmpty {
            // The batch's proposals go to Raft together: a follower forwards them in one message.
            do {
                try raft.propose(batch: entries)
                let now = transport != nil ? Date() : nil
                for proposal in proposals {
                    waiters[proposal.id] = (proposal.request, proposal.completion)
                    if let now { proposedAt[proposal.id] = now }
                }
                proposed = proposals.count
            } catch {
                for proposal in proposals { proposal.completion?(.failure(.noLeader)) }
            }
        }
        if proposed > 0 { metrics.proposalsPending.record(Double(proposed)) }
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
        } catch {
            // The log or the database failed under us: nothing more can be made durable.
            logger.critical("write path failed; stopping", metadata: ["error": "\(error)"])
            fatalError("etcdlite: write path failed: \(error)")
        }
        for body in locals { body() }
    }

    /// Handles Readies until the core is quiet: persist (one fdatasync), apply, answer, advance.
    private func handleReadies() throws {
        while raft.hasReady {
            let ready = raft.ready()
            if let snapshot = ready.snapshot {
                // Installing the leader's state machine image arrives with snapshot streaming; until
                // then no member compacts its log while it has peers, so none is ever sent. Recording
                // it in the log without the image would make the store diverge: stop first.
                logger.critical("a snapshot from the leader cannot be installed yet", metadata: ["index": "\(snapshot.index)"])
                fatalError("etcdlite: snapshot install is not implemented")
            }
            // Appends and heartbeats leave while we persist; acknowledgements and votes after.
            transport?.send(ready.messages)
            let syncStart = DispatchTime.now().uptimeNanoseconds
            try store.save(hardState: ready.hardState, entries: ready.entries, installed: ready.snapshot)
            if !ready.entries.isEmpty {
                metrics.walFsync.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - syncStart))
            }
            transport?.send(ready.messagesAfterPersist)
            for read in ready.readStates {
                var reader = ByteReader(read.context)
                guard (try? reader.u64()) == memberID, let context = try? reader.u64(),
                      let waiting = readsByContext.removeValue(forKey: context) else { continue }
                readsWaitingForApply.append((read.index, waiting.reads))
            }
            try apply(ready.committedEntries)
            releaseReads()
            if let soft = ready.softState { leadershipChanged(soft) }
            raft.advance(ready)
        }
    }

    private func apply(_ entries: [Entry]) throws {
        guard !entries.isEmpty else { return }
        var answered: [(Completion?, Result<InternalResponse, EtcdError>)] = []
        var requests = 0
        try machine.begin()
        for entry in entries {
            if entry.kind == .configChange {
                if let set = ConfChangeSet(encoded: entry.data) { raft.applyConfChange(set) }
                machine.state.appliedIndex = max(machine.state.appliedIndex, entry.index.value)
                continue
            }
            // Member attributes live in memory: they are taken from every entry handed out,
            // also those the store applied before a restart.
            if entry.data.count > 16 && entry.data[16] == InternalRequest.memberAttributesTag,
               case .memberAttributes(let member)? = try? InternalRequest(encoded: Array(entry.data[16...])) {
                memberAttributes.withLock { $0[member.id] = member }
            }
            if entry.index.value <= machine.state.appliedIndex { continue }  // applied before a restart
            var reader = ByteReader(entry.data)
            guard entry.data.count >= 16, let proposer = try? reader.u64(), let requestID = try? reader.u64() else {
                machine.state.appliedIndex = entry.index.value  // a leader's empty entry
                continue
            }
            appliedBytesSinceCompaction += entry.data.count
            if proposer == memberID, let waiter = waiters.removeValue(forKey: requestID) {
                proposedAt[requestID] = nil
                answered.append((waiter.completion, try machine.apply(waiter.request, index: entry.index.value)))
            } else {
                _ = try machine.apply(try InternalRequest(encoded: reader.rest()), index: entry.index.value)
            }
            requests += 1
        }
        let commitStart = DispatchTime.now().uptimeNanoseconds
        try machine.commit()
        metrics.backendCommit.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - commitStart))
        metrics.proposalsCommitted.increment(by: Int64(requests))
        metrics.proposalsApplied.increment(by: Int64(requests))
        metrics.proposalsPending.record(0)
        onBatch(status())
        let events = machine.takeEvents()
        if !events.isEmpty { onEvents(events, machine.state.currentRevision) }
        for (completion, result) in answered { completion?(result) }
        appliedSinceCompaction += entries.count
        // With peers the log is kept whole for now: a follower behind a compaction would need a
        // snapshot of the store, which is not streamed yet.
        if transport == nil && (appliedSinceCompaction >= compactionInterval || appliedBytesSinceCompaction >= compactionBytes) {
            try compactLog()
        }
    }

    /// Once the store holds the applied entries durably, the Raft log before them can go.
    private func compactLog() throws {
        appliedSinceCompaction = 0
        appliedBytesSinceCompaction = 0
        try machine.backend.syncCommitted()
        try store.compact(through: min(LogIndex(machine.state.appliedIndex), raft.appliedIndex), confState: raft.confState)
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
        guard transport != nil else { return }
        let done = DispatchSemaphore(value: 0)
        enqueue(.local { [self] in
            guard raft.role == .leader, let target = raft.confState.voters.filter({ $0 != raft.id }).sorted().first else {
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

    func receive(_ message: Message) { enqueue(.message(message)) }
    func peerUnreachable(_ peer: NodeID) { enqueue(.unreachable(peer)) }

    func status() -> StoreStatus {
        let sizes = (try? machine.backend.sizes()) ?? (size: 0, inUse: 0)
        return StoreStatus(state: machine.state, logIndex: raft.lastIndex.value, dbSize: sizes.size, dbSizeInUse: sizes.inUse,
                           alarms: machine.alarms, raftTerm: raft.term.value, leader: raft.leader.value)
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
