/// The log as the core sees it: durable entries in storage, then entries not yet persisted
/// (`unstable`, which may replace a suffix of storage), the commit index and the applied index.
struct RaftLog {
    let storage: LogStorage
    /// Entries not yet acknowledged as durable, starting at `unstableOffset`.
    private(set) var unstable: [Entry] = []
    private(set) var unstableOffset: LogIndex
    private(set) var committed: LogIndex
    var applied: LogIndex
    /// A snapshot from the leader, to be persisted and installed by the application.
    private(set) var pendingSnapshot: Snapshot?
    let maxApplyBytes: Int

    init(storage: LogStorage, committed: LogIndex, applied: LogIndex, maxApplyBytes: Int) {
        self.storage = storage
        unstableOffset = storage.lastIndex.next
        self.committed = committed
        self.applied = max(applied, storage.firstIndex.previous)
        self.maxApplyBytes = maxApplyBytes
    }

    var firstIndex: LogIndex { pendingSnapshot.map { $0.index.next } ?? storage.firstIndex }
    var lastIndex: LogIndex { unstable.last?.index ?? unstableOffset.previous }
    /// The last index known durable here.
    var persistedIndex: LogIndex { unstableOffset.previous }
    var lastTerm: Term { term(at: lastIndex) ?? .zero }

    func term(at index: LogIndex) -> Term? {
        if let snapshot = pendingSnapshot, index <= snapshot.index {
            return index == snapshot.index ? snapshot.term : nil
        }
        if index >= unstableOffset {
            let position = Int(index.value - unstableOffset.value)
            return position < unstable.count ? unstable[position].term : nil
        }
        return try? storage.term(at: index)
    }

    func matchTerm(_ index: LogIndex, _ term: Term) -> Bool { self.term(at: index) == term }

    /// A candidate's log is at least as up to date as ours (§5.4.1).
    func isUpToDate(lastIndex index: LogIndex, lastTerm term: Term) -> Bool {
        term > lastTerm || (term == lastTerm && index >= lastIndex)
    }

    /// Entries [low, lastIndex], at most `maxBytes` (at least one).
    func entries(from low: LogIndex, maxBytes: Int) throws -> [Entry] {
        guard low <= lastIndex else { return [] }
        return try slice(low, lastIndex.next, maxBytes: maxBytes)
    }

    func slice(_ low: LogIndex, _ high: LogIndex, maxBytes: Int) throws -> [Entry] {
        guard low < high else { return [] }
        if low < firstIndex { throw RaftError.compacted }
        if let snapshot = pendingSnapshot, low <= snapshot.index { throw RaftError.compacted }
        var result: [Entry] = []
        var bytes = 0
        if low < unstableOffset {
            result = try storage.entries(from: low, to: min(high, unstableOffset), maxBytes: maxBytes)
            bytes = result.reduce(0) { $0 + $1.size }
            // Storage stopped early on the byte limit: do not go on into the unstable entries.
            if let last = result.last, last.index.next < min(high, unstableOffset) { return result }
        }
        if high > unstableOffset {
            let start = Int(max(low, unstableOffset).value - unstableOffset.value)
            let end = min(unstable.count, Int(high.value - unstableOffset.value))
            if start < end {
                for entry in unstable[start..<end] {
                    bytes += entry.size
                    if !result.isEmpty && bytes > maxBytes { break }
                    result.append(entry)
                }
            }
        }
        return result
    }

    /// Appends entries that follow our log or replace a suffix of it.
    mutating func append(_ entries: [Entry]) {
        guard let first = entries.first else { return }
        precondition(first.index > committed, "overwriting committed entries")
        if first.index == lastIndex.next {
            if unstable.isEmpty { unstableOffset = first.index }
            unstable += entries
        } else if first.index <= unstableOffset {
            // Replaces entries that storage holds: the application truncates them on persist.
            unstableOffset = first.index
            unstable = entries
        } else {
            unstable = Array(unstable[..<Int(first.index.value - unstableOffset.value)]) + entries
        }
    }

    /// The first of `entries` whose term differs from ours at its index (or that we lack).
    func findConflict(_ entries: [Entry]) -> LogIndex? {
        for entry in entries where !matchTerm(entry.index, entry.term) { return entry.index }
        return nil
    }

    /// A follower's append: when our entry at `prevIndex` has `prevTerm`, keep what matches, append
    /// the rest, advance the commit index; returns the last index the leader's entries cover.
    mutating func maybeAppend(prevIndex: LogIndex, prevTerm: Term, commit: LogIndex, entries: [Entry]) -> LogIndex? {
        guard matchTerm(prevIndex, prevTerm) else { return nil }
        let lastNew = prevIndex + UInt64(entries.count)
        if let conflict = findConflict(entries) {
            precondition(conflict > committed, "conflict with a committed entry at \(conflict)")
            append(Array(entries[Int(conflict.value - prevIndex.value - 1)...]))
        }
        self.commit(to: min(commit, lastNew))
        return lastNew
    }

    mutating func commit(to index: LogIndex) {
        guard index > committed else { return }
        precondition(index <= lastIndex, "commit \(index) beyond the last index \(lastIndex)")
        committed = index
    }

    /// The leader's rule (§5.4.2): only an entry of the current term commits by counting.
    mutating func maybeCommit(_ index: LogIndex, term: Term) -> Bool {
        guard index > committed, self.term(at: index) == term else { return false }
        commit(to: index)
        return true
    }

    var hasEntriesToApply: Bool { pendingSnapshot == nil && min(committed, persistedIndex) > applied }

    /// Entries to apply: committed, not yet applied, and durable here.
    func entriesToApply() -> [Entry] {
        let high = min(committed, persistedIndex)
        guard high > applied else { return [] }
        return (try? slice(applied.next, high.next, maxBytes: maxApplyBytes)) ?? []
    }

    /// Replaces the log with a snapshot from the leader (persisted and installed via Ready).
    mutating func restore(_ snapshot: Snapshot) {
        pendingSnapshot = snapshot
        unstable = []
        unstableOffset = snapshot.index.next
        committed = max(committed, snapshot.index)
    }

    /// The application persisted and installed the pending snapshot.
    mutating func snapshotInstalled(_ snapshot: Snapshot) {
        guard pendingSnapshot == snapshot else { return }
        pendingSnapshot = nil
        applied = max(applied, snapshot.index)
    }

    /// The application persisted entries up to `index` (whose term is `term`).
    mutating func stable(to index: LogIndex, term: Term) {
        guard index >= unstableOffset, self.term(at: index) == term else { return }
        let count = Int(index.value - unstableOffset.value) + 1
        unstable.removeFirst(count)
        unstableOffset = index.next
    }
}
