/// The leader's view of one follower's log (§5.3, etcd-io/raft's progress states). A class: the
/// leader updates it in place on every acknowledgement, without copying its in-flight queue.
final class Progress {
    enum State: Hashable {
        /// One append at a time until the follower's match point is found.
        case probe
        /// Appends pipelined optimistically, bounded by in-flight messages.
        case replicate
        /// A snapshot is on its way; nothing else until it is reported or acknowledged.
        case snapshot
    }

    /// The index of the snapshot in flight (snapshot state).
    var pendingSnapshot: LogIndex = .zero

    var match: LogIndex = .zero
    var next: LogIndex
    var state = State.probe
    /// Probe: an append is out and unanswered (paused until a response or a heartbeat).
    var probeSent = false
    /// Replicate: the last index of each unacknowledged append, oldest first.
    var inflights = Inflights()
    /// Heard from since the last check-quorum round.
    var recentActive = false
    /// The highest commit index sent to the follower (it may need telling about a newer one).
    var sentCommit: LogIndex = .zero

    init(next: LogIndex) { self.next = next }

    /// Nothing more may be sent now. In replicate state the pipeline is bounded by the number of
    /// appends in flight and by their entry bytes (`maxBytes` 0: no byte bound).
    func isPaused(maxInflight: Int, maxBytes: Int) -> Bool {
        switch state {
        case .probe: probeSent
        case .replicate: inflights.count >= maxInflight || (maxBytes > 0 && inflights.bytes >= maxBytes)
        case .snapshot: true
        }
    }

    func becomeProbe() {
        // After a snapshot, resume after it rather than from an older match.
        next = state == .snapshot ? max(match, pendingSnapshot).next : match.next
        state = .probe
        pendingSnapshot = .zero
        probeSent = false
        inflights.removeAll()
    }

    func becomeReplicate() {
        state = .replicate
        next = match.next
        inflights.removeAll()
    }

    /// An append with `entries` entries (`bytes` in all) up to `last` went out.
    func sent(through last: LogIndex, entries: Int, bytes: Int) {
        switch state {
        case .replicate:
            if entries > 0 {
                next = last.next
                inflights.append(last, bytes: bytes)
            }
        case .probe:
            probeSent = true
        case .snapshot:
            break
        }
    }

    func becomeSnapshot(_ index: LogIndex) {
        state = .snapshot
        pendingSnapshot = index
        inflights.removeAll()
    }

    /// The follower has everything through `index`; false when that is old news.
    func maybeUpdate(_ index: LogIndex) -> Bool {
        var updated = false
        if match < index {
            match = index
            updated = true
            probeSent = false
        }
        next = max(next, index.next)
        inflights.free(through: index)
        return updated
    }

    /// The follower rejected an append at `rejected`; its last index is `hint`. False when the
    /// rejection is stale.
    func maybeDecrease(rejected: LogIndex, hint: LogIndex) -> Bool {
        if state == .replicate {
            // Stale unless it rejects exactly what follows our match.
            guard rejected > match else { return false }
            next = match.next
            return true
        }
        guard next.previous == rejected else { return false }
        next = max(min(rejected, hint.next), LogIndex(1))
        probeSent = false
        return true
    }
}

/// The unacknowledged appends to one follower, oldest first (last index and bytes of each): a
/// queue whose acknowledged prefix is dropped by moving a start offset (no shifting per
/// acknowledgement).
struct Inflights {
    private var indexes: [LogIndex] = []
    private var sizes: [Int] = []
    private var start = 0
    /// Entry bytes of the appends in flight.
    private(set) var bytes = 0

    var count: Int { indexes.count - start }

    mutating func append(_ index: LogIndex, bytes size: Int) {
        indexes.append(index)
        sizes.append(size)
        bytes += size
    }

    mutating func removeAll() {
        indexes.removeAll(keepingCapacity: true)
        sizes.removeAll(keepingCapacity: true)
        start = 0
        bytes = 0
    }

    mutating func removeFirst() {
        guard start < indexes.count else { return }
        bytes -= sizes[start]
        start += 1
        compactIfNeeded()
    }

    /// Frees every append up to `index` (appends are in index order).
    mutating func free(through index: LogIndex) {
        while start < indexes.count && indexes[start] <= index {
            bytes -= sizes[start]
            start += 1
        }
        compactIfNeeded()
    }

    private mutating func compactIfNeeded() {
        if start == indexes.count {
            removeAll()
        } else if start > 256 && start * 2 > indexes.count {
            indexes.removeFirst(start)
            sizes.removeFirst(start)
            start = 0
        }
    }
}

/// Progress by member: a handful of members, so a linear search beats hashing NodeIDs.
struct ProgressMap: Sequence {
    private var ids: [NodeID] = []
    private var values: [Progress] = []

    subscript(id: NodeID) -> Progress? {
        get {
            guard let i = ids.firstIndex(of: id) else { return nil }
            return values[i]
        }
        set {
            if let i = ids.firstIndex(of: id) {
                if let newValue { values[i] = newValue } else {
                    ids.remove(at: i)
                    values.remove(at: i)
                }
            } else if let newValue {
                ids.append(id)
                values.append(newValue)
            }
        }
    }

    var keys: [NodeID] { ids }

    func makeIterator() -> Zip2Sequence<[NodeID], [Progress]>.Iterator { zip(ids, values).makeIterator() }
}
