import Foundation
import NIOCore
import Synchronization
import EtcdLiteProto

/// Every watcher of every Watch stream on the member. The apply loop publishes each committed
/// batch's events here; synced watchers get them queued on their stream at once, in revision
/// order. A watcher that starts in the past, or whose stream's queue is full (a slow reader), is
/// unsynced: its stream reads its events from the history in SQLite until it has caught up, so
/// writers never wait for watchers and a slow stream holds a bounded queue.
///
/// One lock guards all of it: publishing, creating, cancelling and catching up are short steps,
/// and one lock makes each step atomic across watchers and streams.
final class WatchHub: Sendable {
    struct Watcher: Sendable {
        let id: Int64
        let range: KeyRange
        let noPut: Bool
        let noDelete: Bool
        let prevKV: Bool
        let fragment: Bool
        let progressNotify: Bool
        /// Events below this revision are not sent (a start revision in the future).
        let minRevision: Int64
        var synced: Bool
        /// For an unsynced watcher: the first revision it has not been sent.
        var nextRevision: Int64
        /// Whether events went out since the last progress notification.
        var sentSinceProgress = false

        func wants(_ event: Mvccpb_Event) -> Bool {
            if event.type == .put ? noPut : noDelete { return false }
            return event.kv.modRevision >= minRevision && range.contains(event.kv.key)
        }

        /// The event as this watcher receives it.
        func shaped(_ event: Mvccpb_Event) -> Mvccpb_Event {
            guard !prevKV && event.hasPrevKv else { return event }
            var event = event
            event.clearPrevKv()
            return event
        }
    }

    /// A response waiting to be written: a message (that may be fragmented), or the encoded
    /// bytes of an event response shared by every watcher that gets the same events.
    enum Outbound: Sendable {
        case message(Etcdserverpb_WatchResponse, fragment: Bool)
        case encoded([UInt8])
    }

    /// Watchers that receive the same events with the same shape get the same response bytes
    /// but for their watch ID: encoded once per batch.
    private struct SharedBody: Hashable {
        let prevKV: Bool
        let events: [Int]
    }

    /// History an unsynced watcher needs next: its next revision through `through`.
    struct CatchUp: Sendable {
        let watcher: Watcher
        let through: Int64
        var from: Int64 { watcher.nextRevision }
    }

    /// What a stream's sender does next.
    enum Work {
        case send([Outbound])
        case catchUp([CatchUp])
        case wait
        case closed
    }

    fileprivate struct Stream {
        var watchers: [Int64: Watcher] = [:]
        var queue = CircularBuffer<Outbound>()
        var queuedBytes = 0
        var waiter: CheckedContinuation<Void, Never>?
        /// The waiter to resume once the lock is released (`signal`).
        var wake: CheckedContinuation<Void, Never>?
        var signaled = false
        var closed = false
        /// A progress request waits until every watcher has caught up.
        var progressPending = false
        var nextAutoID: Int64 = 0

        var allSynced: Bool { watchers.values.allSatisfy(\.synced) }

        mutating func enqueue(_ response: Etcdserverpb_WatchResponse, fragment: Bool = false, bytes: Int = 64) {
            enqueue(.message(response, fragment: fragment), bytes: bytes)
        }

        /// Answers a create as refused: watch ID -1, canceled, with etcd's reason.
        mutating func refuse(_ created: Etcdserverpb_WatchResponse, reason: String) {
            var response = created
            response.watchID = -1
            response.canceled = true
            response.cancelReason = reason
            enqueue(response)
        }

        mutating func enqueue(_ outbound: Outbound, bytes: Int) {
            queue.append(outbound)
            queuedBytes += bytes
            signal()
        }

        /// Wakes the sender: its waiter is resumed by `withStream`/`withStreams` after the lock.
        mutating func signal() {
            signaled = true
            if let waiter {
                self.waiter = nil
                wake = waiter
            }
        }
    }

    /// Counters for tests and metrics.
    struct Stats: Sendable {
        /// Times a synced watcher fell back to history because its stream's queue was full.
        var fallbacks = 0
        /// The most event bytes any stream had queued.
        var peakQueuedBytes = 0
    }

    private struct State {
        /// The last revision published: every event up to it has been offered to synced watchers.
        var revision: Int64
        var stats = Stats()
        var streams: [UInt64: Stream] = [:]
        var nextStreamID: UInt64 = 1
    }

    private let state: Mutex<State>
    /// Header fields other than the revision (the Raft term is known once the member has started).
    private let headerTemplate: Mutex<Etcdserverpb_ResponseHeader>
    /// Bytes of events a stream may have queued before its watchers fall back to history.
    let queueLimit: Int
    /// Watchers one stream may have at once (0: no limit).
    let watcherLimit: Int

    static let tooManyWatchers = "etcdlite: too many watchers on this stream"

    init(revision: Int64, header: Etcdserverpb_ResponseHeader, queueLimit: Int = 4 << 20, watcherLimit: Int = 0) {
        state = Mutex(State(revision: revision))
        headerTemplate = Mutex(header)
        self.queueLimit = queueLimit
        self.watcherLimit = watcherLimit
    }

    private func header(_ revision: Int64) -> Etcdserverpb_ResponseHeader {
        var header = headerTemplate.withLock { $0 }
        header.revision = revision
        return header
    }

    var revision: Int64 { state.withLock { $0.revision } }

    var stats: Stats { state.withLock { $0.stats } }

    /// A new Raft term for the headers of later responses.
    func setTerm(_ term: UInt64) {
        headerTemplate.withLock { $0.raftTerm = term }
    }

    /// Sets the published revision and the header before anything is published (after the log
    /// replay).
    func reset(revision: Int64, header: Etcdserverpb_ResponseHeader) {
        state.withLock { $0.revision = revision }
        headerTemplate.withLock { $0 = header }
    }

    var watcherCount: Int { state.withLock { $0.streams.values.reduce(0) { $0 + $1.watchers.count } } }

    // MARK: - Streams

    func openStream() -> UInt64 {
        state.withLock { state in
            let id = state.nextStreamID
            state.nextStreamID += 1
            state.streams[id] = Stream()
            return id
        }
    }

    func closeStream(_ id: UInt64) {
        let waiter = state.withLock { state in state.streams.removeValue(forKey: id)?.waiter }
        waiter?.resume()
    }

    /// Runs `body` under the lock, then resumes stream `id`'s sender if `body` woke it. A
    /// continuation is never resumed under the lock: resuming takes the waiting task's status
    /// lock, which a cancellation holds while its handler (`closeStream`) waits for ours.
    private func withStream(_ id: UInt64, _ body: (inout State) -> Void) {
        let wake = state.withLock { state -> CheckedContinuation<Void, Never>? in
            body(&state)
            defer { state.streams[id]?.wake = nil }
            return state.streams[id]?.wake
        }
        wake?.resume()
    }

    /// `withStream` for a change to every stream.
    private func withStreams(_ body: (inout State) -> Void) {
        let wakes = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            body(&state)
            var wakes: [CheckedContinuation<Void, Never>] = []
            for index in state.streams.indices {
                guard let wake = state.streams.values[index].wake else { continue }
                wakes.append(wake)
                state.streams.values[index].wake = nil
            }
            return wakes
        }
        for wake in wakes { wake.resume() }
    }

    /// Answers a create that its sender may not make (etcd: watch ID -1, created and canceled,
    /// the reason in `cancel_reason`); the stream goes on.
    func reject(_ stream: UInt64, reason: String) {
        withStream(stream) { state in
            guard state.streams[stream] != nil else { return }
            var response = Etcdserverpb_WatchResponse()
            response.header = header(state.revision)
            response.created = true
            state.streams[stream]!.refuse(response, reason: reason)
        }
    }

    /// Registers a watcher, answering with `created` (and `canceled` with etcd's reason when the
    /// request cannot be served). Every create is answered, in order.
    func create(_ stream: UInt64, _ request: Etcdserverpb_WatchCreateRequest) {
        withStream(stream) { state in
            let revision = state.revision
            guard state.streams[stream] != nil else { return }
            var response = Etcdserverpb_WatchResponse()
            response.header = header(revision)
            response.created = true
            // etcd: an empty key is the smallest key, "\0" as range end means every key ≥ key.
            let key = request.key.isEmpty ? Data([0]) : request.key
            let range = KeyRange(key: key, rangeEnd: request.rangeEnd)
            if case .interval(let start, let end) = range, !start.lexicographicallyPrecedes(end) {
                state.streams[stream]!.refuse(response, reason: "mvcc: watcher range is empty")
                return
            }
            // A client cannot grow the member's memory without bound by opening watchers.
            if watcherLimit > 0 && state.streams[stream]!.watchers.count >= watcherLimit {
                state.streams[stream]!.refuse(response, reason: Self.tooManyWatchers)
                return
            }
            var id = request.watchID
            if id == 0 {
                while state.streams[stream]!.watchers[state.streams[stream]!.nextAutoID] != nil {
                    state.streams[stream]!.nextAutoID += 1
                }
                id = state.streams[stream]!.nextAutoID
                state.streams[stream]!.nextAutoID += 1
            } else if state.streams[stream]!.watchers[id] != nil {
                state.streams[stream]!.refuse(response, reason: "mvcc: duplicate watch ID provided on the WatchStream")
                return
            }
            var noPut = false
            var noDelete = false
            for filter in request.filters {
                if filter == .noput { noPut = true }
                if filter == .nodelete { noDelete = true }
            }
            let start = request.startRevision
            let synced = start == 0 || start > revision
            let watcher = Watcher(
                id: id, range: range, noPut: noPut, noDelete: noDelete, prevKV: request.prevKv,
                fragment: request.fragment, progressNotify: request.progressNotify,
                minRevision: synced ? max(revision + 1, start) : start,
                synced: synced, nextRevision: synced ? revision + 1 : max(start, 1))
            response.watchID = id
            state.streams[stream]!.watchers[id] = watcher
            state.streams[stream]!.enqueue(response)
        }
    }

    func cancel(_ stream: UInt64, watchID: Int64) {
        withStream(stream) { state in
            let revision = state.revision
            guard state.streams[stream]?.watchers.removeValue(forKey: watchID) != nil else { return }
            var response = Etcdserverpb_WatchResponse()
            response.header = header(revision)
            response.watchID = watchID
            response.canceled = true
            state.streams[stream]!.enqueue(response)
            answerPendingProgress(&state.streams[stream]!, revision: revision)
        }
    }

    /// etcd 3.5's progress request: one response with watch ID -1 and the current revision for the
    /// whole stream, sent once every watcher on it has caught up.
    func requestProgress(_ stream: UInt64) {
        withStream(stream) { state in
            guard state.streams[stream] != nil else { return }
            state.streams[stream]!.progressPending = true
            answerPendingProgress(&state.streams[stream]!, revision: state.revision)
        }
    }

    private func answerPendingProgress(_ stream: inout Stream, revision: Int64) {
        guard stream.progressPending, stream.allSynced else { return }
        stream.progressPending = false
        // With no watchers there is no one to tell (as etcd).
        guard !stream.watchers.isEmpty else { return }
        var response = Etcdserverpb_WatchResponse()
        response.header = header(revision)
        response.watchID = -1
        stream.enqueue(response)
    }

    /// The periodic notification: each synced watcher that asked for it and was sent nothing
    /// since the last one hears the current revision.
    func progressTick(_ stream: UInt64) {
        withStream(stream) { state in
            let revision = state.revision
            guard let watchers = state.streams[stream]?.watchers else { return }
            for (id, watcher) in watchers where watcher.progressNotify {
                if watcher.synced && !watcher.sentSinceProgress {
                    var response = Etcdserverpb_WatchResponse()
                    response.header = header(revision)
                    response.watchID = id
                    state.streams[stream]!.enqueue(response)
                }
                state.streams[stream]!.watchers[id]!.sentSinceProgress = false
            }
        }
    }

    // MARK: - Publishing (the apply loop)

    /// Offers a committed batch's events (in revision order, ending at `revision`) to every synced
    /// watcher. A stream over its queue limit does not grow: its watchers fall back to history.
    func publish(_ events: [Mvccpb_Event], revision: Int64) {
        withStreams { state in
            let first = state.revision + 1
            state.revision = revision
            var shared: [SharedBody: [UInt8]] = [:]
            for index in state.streams.indices {
                state.stats.fallbacks += deliver(events, first: first, revision: revision, to: &state.streams.values[index], shared: &shared)
                state.stats.peakQueuedBytes = max(state.stats.peakQueuedBytes, state.streams.values[index].queuedBytes)
            }
        }
    }

    /// The store jumped to `revision` without events (a snapshot from the leader replaced it):
    /// every synced watcher reads what it missed from the store's history (or learns it was
    /// compacted away), as a slow watcher does.
    func resync(revision: Int64) {
        withStreams { state in
            let first = state.revision + 1
            state.revision = revision
            for index in state.streams.indices {
                var changed = false
                for w in state.streams.values[index].watchers.indices where state.streams.values[index].watchers.values[w].synced {
                    let watcher = state.streams.values[index].watchers.values[w]
                    state.streams.values[index].watchers.values[w].synced = false
                    state.streams.values[index].watchers.values[w].nextRevision = max(first, watcher.minRevision)
                    changed = true
                }
                if changed { state.streams.values[index].signal() }
            }
        }
    }

    /// Returns how many watchers fell back to history.
    private func deliver(_ events: [Mvccpb_Event], first: Int64, revision: Int64, to stream: inout Stream,
                         shared: inout [SharedBody: [UInt8]]) -> Int {
        var fallbacks = 0
        var matched: [Int] = []
        for index in stream.watchers.indices {
            let watcher = stream.watchers.values[index]
            guard watcher.synced else { continue }
            matched.removeAll(keepingCapacity: true)
            var bytes = 0
            for (position, event) in events.enumerated() where watcher.wants(event) {
                matched.append(position)
                bytes += Self.size(event)
            }
            guard !matched.isEmpty else { continue }
            if stream.queuedBytes + bytes > queueLimit && !stream.queue.isEmpty {
                // A slow reader: stop queueing for it; it reads these revisions from history later.
                stream.watchers.values[index].synced = false
                stream.watchers.values[index].nextRevision = max(first, watcher.minRevision)
                stream.signal()
                fallbacks += 1
                continue
            }
            stream.watchers.values[index].sentSinceProgress = true
            if watcher.fragment {
                var response = Etcdserverpb_WatchResponse()
                response.header = header(revision)
                response.watchID = watcher.id
                response.events = matched.map { watcher.shaped(events[$0]) }
                stream.enqueue(response, fragment: true, bytes: bytes)
                continue
            }
            let key = SharedBody(prevKV: watcher.prevKV, events: matched)
            let body: [UInt8]
            if let cached = shared[key] {
                body = cached
            } else {
                var response = Etcdserverpb_WatchResponse()
                response.header = header(revision)
                response.events = matched.map { watcher.shaped(events[$0]) }
                body = (try? response.serializedBytes()) ?? []
                shared[key] = body
            }
            stream.enqueue(.encoded(Self.withWatchID(watcher.id, body)), bytes: bytes)
        }
        return fallbacks
    }

    /// A response body with the watch ID field (2, varint) in front: protobuf fields may come in
    /// any order, and proto3 leaves out an ID of 0.
    static func withWatchID(_ id: Int64, _ body: [UInt8]) -> [UInt8] {
        guard id != 0 else { return body }
        var bytes: [UInt8] = [0x10]
        bytes.reserveCapacity(body.count + 11)
        var value = UInt64(bitPattern: id)
        while value >= 0x80 {
            bytes.append(UInt8(value & 0x7F) | 0x80)
            value >>= 7
        }
        bytes.append(UInt8(value))
        bytes += body
        return bytes
    }

    static func size(_ event: Mvccpb_Event) -> Int {
        32 + event.kv.key.count + event.kv.value.count + (event.hasPrevKv ? 32 + event.prevKv.key.count + event.prevKv.value.count : 0)
    }

    // MARK: - The stream's sender

    /// What the stream's sender should do now: write what is queued first; when the queue is empty,
    /// catch up unsynced watchers (through the currently published revision); else wait.
    func next(_ stream: UInt64) -> Work {
        state.withLock { state in
            guard state.streams[stream] != nil, !state.streams[stream]!.closed else { return .closed }
            state.streams[stream]!.signaled = false
            if !state.streams[stream]!.queue.isEmpty {
                let items = Array(state.streams[stream]!.queue)
                state.streams[stream]!.queue.removeAll(keepingCapacity: true)
                state.streams[stream]!.queuedBytes = 0
                return .send(items)
            }
            let revision = state.revision
            let behind = state.streams[stream]!.watchers.values.filter { !$0.synced }.map { CatchUp(watcher: $0, through: revision) }
            return behind.isEmpty ? .wait : .catchUp(behind)
        }
    }

    /// Waits until something is queued for the stream (or it closes or the task is cancelled).
    func wait(_ stream: UInt64) async {
        await withTaskCancellationHandler {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state -> Bool in
                    guard state.streams[stream] != nil, !state.streams[stream]!.closed, !state.streams[stream]!.signaled else {
                        return true
                    }
                    state.streams[stream]!.waiter = continuation
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        } onCancel: {
            closeStream(stream)
        }
    }

    /// Hands over history read for `catchUp`: the events of revisions `from` through
    /// `readThrough`, or the compaction that makes them unreadable.
    func deliverHistory(_ stream: UInt64, _ catchUp: CatchUp, events: [Mvccpb_Event], readThrough: Int64, compactedAt: Int64?) {
        withStream(stream) { state in
            let revision = state.revision
            guard let watcher = state.streams[stream]?.watchers[catchUp.watcher.id], !watcher.synced,
                  watcher.nextRevision == catchUp.from else { return }  // cancelled or moved on meanwhile
            if let compactedAt {
                // etcd's compaction notice carries no revision in its header.
                var response = Etcdserverpb_WatchResponse()
                response.header = header(0)
                response.watchID = watcher.id
                response.canceled = true
                response.compactRevision = compactedAt
                state.streams[stream]!.watchers[watcher.id] = nil
                state.streams[stream]!.enqueue(response)
                answerPendingProgress(&state.streams[stream]!, revision: revision)
                return
            }
            if !events.isEmpty {
                var response = Etcdserverpb_WatchResponse()
                response.header = header(readThrough)
                response.watchID = watcher.id
                response.events = events
                state.streams[stream]!.watchers[watcher.id]!.sentSinceProgress = true
                state.streams[stream]!.enqueue(response, fragment: watcher.fragment, bytes: events.reduce(0) { $0 + Self.size($1) })
                state.stats.peakQueuedBytes = max(state.stats.peakQueuedBytes, state.streams[stream]!.queuedBytes)
            }
            state.streams[stream]!.watchers[watcher.id]!.nextRevision = readThrough + 1
            if readThrough >= revision {
                state.streams[stream]!.watchers[watcher.id]!.synced = true
                answerPendingProgress(&state.streams[stream]!, revision: revision)
            } else {
                state.streams[stream]!.signal()
            }
        }
    }
}
