/// The durable log as the core reads it. The application writes to it (after each Ready) and the
/// core only reads; the member's durable implementation arrives with the cluster issue.
public protocol LogStorage: AnyObject {
    /// The hard state and the configuration saved last (as of the applied index).
    func initialState() -> (HardState, ConfState)
    /// Entries in [low, high), at most `maxBytes` of them (always at least one).
    func entries(from low: LogIndex, to high: LogIndex, maxBytes: Int) throws -> [Entry]
    /// The term of the entry at `index` (the snapshot's index gives the snapshot's term).
    func term(at index: LogIndex) throws -> Term
    /// The first index still in the log (after the last compaction).
    var firstIndex: LogIndex { get }
    var lastIndex: LogIndex { get }
    /// The latest snapshot (nil before the first compaction).
    func snapshot() -> Snapshot?
}

/// An in-memory log for tests and simulations.
public final class MemoryStorage: LogStorage {
    public private(set) var hardState = HardState()
    public var confState: ConfState
    /// entries[0] is a dummy holding the index and term of the compaction point.
    private var log: [Entry] = [Entry(term: .zero, index: .zero)]
    private var latestSnapshot: Snapshot?

    public func snapshot() -> Snapshot? { latestSnapshot }

    /// Records a snapshot of the application's state at `index` and drops the log before it.
    public func createSnapshot(at index: LogIndex, confState: ConfState, data: [UInt8]) throws {
        let term = try term(at: index)
        latestSnapshot = Snapshot(index: index, term: term, confState: confState, data: data)
        try compact(through: index)
    }

    /// Installs a snapshot received from the leader: the log restarts after it.
    public func applySnapshot(_ snapshot: Snapshot) {
        latestSnapshot = snapshot
        log = [Entry(term: snapshot.term, index: snapshot.index)]
        confState = snapshot.confState
        if hardState.commit < snapshot.index { hardState.commit = snapshot.index }
    }

    public init(members: [NodeID]) {
        confState = ConfState(voters: Set(members))
    }

    public init(confState: ConfState) {
        self.confState = confState
    }

    public func initialState() -> (HardState, ConfState) { (hardState, confState) }

    public var firstIndex: LogIndex { log[0].index.next }
    public var lastIndex: LogIndex { log[0].index + UInt64(log.count - 1) }

    public func term(at index: LogIndex) throws -> Term {
        let offset = log[0].index
        if index < offset { throw RaftError.compacted }
        let position = Int(index.value - offset.value)
        guard position < log.count else { throw RaftError.unavailable }
        return log[position].term
    }

    public func entries(from low: LogIndex, to high: LogIndex, maxBytes: Int) throws -> [Entry] {
        let offset = log[0].index
        if low <= offset { throw RaftError.compacted }
        guard high <= lastIndex.next else { throw RaftError.unavailable }
        var result: [Entry] = []
        var bytes = 0
        for position in Int(low.value - offset.value)..<Int(high.value - offset.value) {
            let entry = log[position]
            bytes += entry.size
            if !result.isEmpty && bytes > maxBytes { break }
            result.append(entry)
        }
        return result
    }

    public func setHardState(_ state: HardState) { hardState = state }

    /// Appends entries, replacing any conflicting suffix.
    public func append(_ entries: [Entry]) {
        guard let first = entries.first else { return }
        let offset = log[0].index
        precondition(first.index > offset, "appending compacted entries")
        let keep = Int(first.index.value - offset.value)
        precondition(keep <= log.count, "gap in the log")
        log.removeSubrange(keep...)
        log += entries
    }

    /// Drops entries up to and including `index`.
    public func compact(through index: LogIndex) throws {
        let offset = log[0].index
        guard index > offset else { throw RaftError.compacted }
        let position = Int(index.value - offset.value)
        guard position < log.count else { throw RaftError.unavailable }
        let dummy = Entry(term: log[position].term, index: index)
        log = [dummy] + log[(position + 1)...]
    }

    /// A copy of what is durable (a node restarting from disk).
    public func copy() -> MemoryStorage {
        let copy = MemoryStorage(confState: confState)
        copy.hardState = hardState
        copy.log = log
        copy.latestSnapshot = latestSnapshot
        return copy
    }
}
