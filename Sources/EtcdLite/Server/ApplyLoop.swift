import Foundation
import Logging
import Synchronization
import EtcdLiteProto

/// The write path: proposals are appended to the log, made durable together with one fdatasync
/// (group commit), applied in log order to SQLite in one transaction per batch (which also records
/// the applied index), and only then answered. Runs on a thread of its own because SQLite and
/// fdatasync block. The Raft issue replaces what orders the log; this shape stays.
final class ApplyLoop: @unchecked Sendable {
    typealias Completion = @Sendable (Result<InternalResponse, EtcdError>) -> Void

    private enum Work {
        case proposal(data: [UInt8], request: InternalRequest, completion: Completion?)
        /// Runs on the loop's thread between batches (defragment, snapshots of the writer).
        case local(() -> Void)
    }

    private let condition = NSCondition()
    private var queue: [Work] = []
    private var stopping = false
    private var thread: Thread?
    private let done = DispatchSemaphore(value: 0)

    private let machine: StateMachine
    private let log: WriteAheadLog
    private let logger: Logger
    private let onBatch: @Sendable (StoreStatus) -> Void
    /// Receives each committed batch's events and the revision the batch ended at.
    private let onEvents: @Sendable ([Mvccpb_Event], Int64) -> Void
    private let metrics: MemberMetrics

    init(machine: StateMachine, log: WriteAheadLog, logger: Logger, metrics: MemberMetrics,
         onBatch: @escaping @Sendable (StoreStatus) -> Void, onEvents: @escaping @Sendable ([Mvccpb_Event], Int64) -> Void) {
        self.metrics = metrics
        self.machine = machine
        self.log = log
        self.logger = logger
        self.onBatch = onBatch
        self.onEvents = onEvents
    }

    /// Re-applies entries that were durable in the log but not yet in the store.
    func replay(_ entries: [LogEntry]) throws {
        guard !entries.isEmpty else { return }
        try machine.begin()
        for entry in entries {
            _ = try machine.apply(try InternalRequest(encoded: entry.data), index: entry.index)
        }
        try machine.commit()
        _ = machine.takeEvents()  // nobody watches yet
        logger.info("replayed log entries", metadata: ["count": "\(entries.count)", "applied-index": "\(machine.state.appliedIndex)"])
    }

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
        log.close()
    }

    private func run() {
        while true {
            condition.lock()
            while queue.isEmpty && !stopping { condition.wait() }
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
        var applied: [(Completion?, Result<InternalResponse, EtcdError>)] = []
        var proposals: [(UInt64, InternalRequest, Completion?)] = []
        var locals: [() -> Void] = []
        for work in batch {
            switch work {
            case .proposal(let data, let request, let completion):
                proposals.append((log.append(data), request, completion))
            case .local(let body):
                locals.append(body)
            }
        }
        if !proposals.isEmpty {
            metrics.proposalsPending.record(Double(proposals.count))
            do {
                let syncStart = DispatchTime.now().uptimeNanoseconds
                try log.sync()
                let applyStart = DispatchTime.now().uptimeNanoseconds
                metrics.walFsync.recordNanoseconds(Int64(applyStart - syncStart))
                metrics.proposalsCommitted.increment(by: Int64(proposals.count))
                try machine.begin()
                for (index, request, completion) in proposals {
                    applied.append((completion, try machine.apply(request, index: index)))
                }
                let commitStart = DispatchTime.now().uptimeNanoseconds
                try machine.commit()
                metrics.backendCommit.recordNanoseconds(Int64(DispatchTime.now().uptimeNanoseconds - commitStart))
                metrics.proposalsApplied.increment(by: Int64(proposals.count))
                metrics.proposalsPending.record(0)
            } catch {
                // The log or the database failed under us: nothing more can be made durable.
                logger.critical("write path failed; stopping", metadata: ["error": "\(error)"])
                fatalError("etcdlite: write path failed: \(error)")
            }
            let status = status()
            onBatch(status)
            let events = machine.takeEvents()
            if !events.isEmpty { onEvents(events, machine.state.currentRevision) }
            for (completion, result) in applied { completion?(result) }
            maintainLog()
        }
        for body in locals { body() }
    }

    /// Rotates a full segment and drops segments whose entries the store holds durably.
    private func maintainLog() {
        guard log.needsRotation else { return }
        do {
            try log.rotate()
            try machine.backend.syncCommitted()
            try log.release(through: machine.state.appliedIndex)
        } catch {
            logger.critical("log maintenance failed", metadata: ["error": "\(error)"])
            fatalError("etcdlite: log maintenance failed: \(error)")
        }
    }

    func status() -> StoreStatus {
        let sizes = (try? machine.backend.sizes()) ?? (size: 0, inUse: 0)
        return StoreStatus(state: machine.state, logIndex: log.lastIndex, dbSize: sizes.size, dbSizeInUse: sizes.inUse,
                           alarms: machine.alarms)
    }
}

/// What the apply loop publishes after each batch for status, headers and quota checks.
struct StoreStatus: Sendable {
    var state: StoreState
    var logIndex: UInt64
    var dbSize: Int64
    var dbSizeInUse: Int64
    var alarms: [Etcdserverpb_AlarmMember]
}
