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

    func isPaused(maxInflight: Int) -> Bool {
        switch state {
        case .probe: probeSent
        case .replicate: inflights.count >= maxInflight
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

    /// An append with entries up to `last` went out.
    func sent(through last: LogIndex, entries: Int) {
        switch state {
        case .replicate:
            if entries > 0 {
                next = last.next
                inflights.append(last)
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

/// The last index of each unacknowledged append, oldest first: a queue whose acknowledged prefix
/// is dropped by moving a start offset (no shifting per acknowledgement).
struct Inflights {
    private var buffer: [LogIndex] = []
    private var start = 0

    var count: Int { buffer.count - start }

    mutating func append(_ index: LogIndex) { buffer.append(index) }

    mutating func removeAll() {
        buffer.removeAll(keepingCapacity: true)
        start = 0
    }

    mutating func removeFirst() {
        guard start < buffer.count else { return }
        start += 1
        compactIfNeeded()
    }

    /// Frees every append up to `index` (appends are in index order).
    mutating func free(through index: LogIndex) {
        while start < buffer.count && buffer[start] <= index { start += 1 }
        compactIfNeeded()
    }

    private mutating func compactIfNeeded() {
        if start == buffer.count {
            removeAll()
        } else if start > 256 && start * 2 > buffer.count {
            buffer.removeFirst(start)
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

/// Who must agree: a majority of `incoming`, and — while in a joint configuration — also a
/// majority of `outgoing` (§6 of the Raft dissertation).
struct Quorum {
    let incoming: Set<NodeID>
    let outgoing: Set<NodeID>

    init(voters: Set<NodeID>) {
        incoming = voters
        outgoing = []
    }

    init(incoming: Set<NodeID>, outgoing: Set<NodeID>) {
        self.incoming = incoming
        self.outgoing = outgoing
    }

    var voters: Set<NodeID> { incoming.union(outgoing) }
    var isJoint: Bool { !outgoing.isEmpty }

    /// The highest index both majorities have.
    func committedIndex(_ match: (NodeID) -> LogIndex) -> LogIndex {
        min(Self.majorityIndex(incoming, match), Self.majorityIndex(outgoing, match))
    }

    private static func majorityIndex(_ voters: Set<NodeID>, _ match: (NodeID) -> LogIndex) -> LogIndex {
        guard !voters.isEmpty else { return LogIndex(UInt64.max) }
        let sorted = voters.map(match).sorted(by: >)
        return sorted[voters.count / 2]
    }

    enum VoteResult { case pending, won, lost }

    func result(_ votes: [NodeID: Bool]) -> VoteResult {
        let results = [Self.majorityResult(incoming, votes), Self.majorityResult(outgoing, votes)]
        if results.contains(.lost) { return .lost }
        if results.allSatisfy({ $0 == .won }) { return .won }
        return .pending
    }

    private static func majorityResult(_ voters: Set<NodeID>, _ votes: [NodeID: Bool]) -> VoteResult {
        guard !voters.isEmpty else { return .won }
        let size = voters.count / 2 + 1
        var granted = 0
        var rejected = 0
        for voter in voters {
            switch votes[voter] {
            case true?: granted += 1
            case false?: rejected += 1
            case nil: break
            }
        }
        if granted >= size { return .won }
        if voters.count - rejected < size { return .lost }
        return .pending
    }

    /// Whether `members` hold a majority of each half.
    func hasQuorum(_ members: Set<NodeID>) -> Bool {
        result(Dictionary(uniqueKeysWithValues: members.map { ($0, true) })) == .won
    }
}
