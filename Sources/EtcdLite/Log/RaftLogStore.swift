import Foundation
import Raft

/// The member's durable Raft log: entries, hard state and snapshot points in checksummed,
/// append-only segment files (`RecordSegments`), made durable by one fdatasync per `save` (group
/// commit: one per Ready, however many entries it holds). The entries after the last snapshot
/// point are also kept in memory, from where the Raft core reads them (`LogStorage`).
///
/// Records (the first payload byte is the kind):
/// - entry: term, index, kind, data. An entry at or below the last index replaces the log from
///   there on (a leader overwrote uncommitted entries).
/// - hard state: term, vote, commit. The last one wins.
/// - snapshot point: index, term, configuration, and whether the log before it was discarded (a
///   snapshot installed from the leader: every entry so far is gone) or compacted (entries up to
///   the index dropped, the rest kept).
///
/// Every segment starts with the snapshot point and hard state of its creation, so deleting old
/// segments (all of whose entries are compacted) never loses either. Recovery reads every segment,
/// takes the highest snapshot point as the base and replays the rest in order; a torn tail of the
/// last segment is cut off, any other damage refuses to start with the file and offset.
public final class RaftLogStore: LogStorage {
    enum Kind: UInt8 { case entry = 1, hardState = 2, snapshot = 3 }

    public struct Point: Equatable, Sendable {
        public var index: LogIndex
        public var term: Term
        public var confState: ConfState
    }

    let directory: URL
    let segmentLimit: Int
    public private(set) var hardState = HardState()
    /// The latest snapshot point: entries up to it are compacted.
    public private(set) var point: Point
    /// The entries after `point`, in order.
    private var log: [Entry] = []
    /// Segments oldest first, with the highest entry index each holds.
    private var segments: [(sequence: UInt64, path: String, maxIndex: LogIndex)] = []
    private var segment: FileHandle
    private var segmentSize = 0
    private var pending: [UInt8] = []

    /// Opens (or creates) the log in `directory`; a new log starts from `initial`, the bootstrap
    /// configuration.
    public init(directory: URL, initial: ConfState, segmentLimit: Int = 64 << 20) throws {
        self.directory = directory
        self.segmentLimit = segmentLimit
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let names = try FileManager.default.contentsOfDirectory(atPath: directory.path).filter { $0.hasSuffix(".log") }.sorted()
        point = Point(index: .zero, term: .zero, confState: initial)
        var found: [(UInt64, String)] = []
        for name in names {
            guard let sequence = UInt64(name.dropLast(4), radix: 16) else { continue }
            found.append((sequence, directory.appendingPathComponent(name).path))
        }
        if found.isEmpty {
            let path = directory.appendingPathComponent(RecordSegments.segmentName(1)).path
            _ = FileManager.default.createFile(atPath: path, contents: nil)
            segment = try FileHandle(forUpdating: URL(fileURLWithPath: path))
            segments = [(1, path, .zero)]
            try RecordSegments.preallocate(segment.fileDescriptor, size: segmentLimit)
            writeHeader()
            try sync()
            try RecordSegments.syncDirectory(directory.path)
            return
        }
        // Read everything first: the base is the highest snapshot point anywhere.
        var parsed: [(path: String, records: [RecordSegments.Record])] = []
        var end = 0
        for (position, (sequence, path)) in found.enumerated() {
            let (records, validEnd) = try RecordSegments.read(path: path, isLast: position == found.count - 1)
            parsed.append((path, records))
            segments.append((sequence, path, .zero))
            end = validEnd
        }
        let last = segments[segments.count - 1]
        segment = try FileHandle(forUpdating: URL(fileURLWithPath: last.path))
        for (path, records) in parsed {
            for record in records where record.payload.first == Kind.snapshot.rawValue {
                let (candidate, _) = try Self.decodeSnapshot(record, path)
                if candidate.index >= point.index { point = candidate }
            }
        }
        for (position, (path, records)) in parsed.enumerated() {
            for record in records {
                try replay(record, path: path, segment: position)
            }
        }
        // Zero what followed the valid data (a torn write) so the next recovery ends here too.
        try segment.truncate(atOffset: UInt64(end))
        try RecordSegments.preallocate(segment.fileDescriptor, size: segmentLimit)
        try segment.synchronize()
        try segment.seek(toOffset: UInt64(end))
        segmentSize = end
    }

    /// One record of a segment, decoded.
    enum LogRecord {
        case entry(Entry)
        case hardState(HardState)
        case snapshot(Point, discarded: Bool)
    }

    /// Decodes a record's payload; a record that is not one of ours names the file and offset.
    static func decode(_ record: RecordSegments.Record, path: String) throws -> LogRecord {
        var reader = ByteReader(record.payload)
        func corrupt(_ reason: String) -> LogCorruptionError { LogCorruptionError(file: path, offset: record.offset, reason: reason) }
        do {
            switch Kind(rawValue: try reader.u8()) {
            case .entry:
                let term = Term(try reader.u64())
                let index = LogIndex(try reader.u64())
                guard let kind = Entry.Kind(rawValue: try reader.u8()) else { throw corrupt("unknown entry kind") }
                return .entry(Entry(term: term, index: index, kind: kind, data: reader.rest()))
            case .hardState:
                return .hardState(HardState(term: Term(try reader.u64()), vote: NodeID(try reader.u64()), commit: LogIndex(try reader.u64())))
            case .snapshot:
                let (point, discarded) = try decodeSnapshot(record, path)
                return .snapshot(point, discarded: discarded)
            case nil:
                throw corrupt("unknown record kind \(record.payload.first ?? 0)")
            }
        } catch is ByteReader.Truncated {
            throw corrupt("record too short for its kind")
        }
    }

    private func replay(_ record: RecordSegments.Record, path: String, segment position: Int) throws {
        switch try Self.decode(record, path: path) {
        case .entry(let entry):
            let index = entry.index
            segments[position].maxIndex = max(segments[position].maxIndex, index)
            guard index > point.index else { return }  // compacted
            if index > lastIndex.next {
                throw LogCorruptionError(file: path, offset: record.offset, reason: "entry \(index) after \(lastIndex): entries are missing")
            }
            if index <= lastIndex { log.removeSubrange(Int(index.value - point.index.value - 1)...) }
            log.append(entry)
        case .hardState(let state):
            hardState = state
        case .snapshot(_, let discarded):
            // A snapshot installed from the leader replaced every entry written before it.
            if discarded { log.removeAll() }
        }
    }

    private static func decodeSnapshot(_ record: RecordSegments.Record, _ path: String) throws -> (Point, discarded: Bool) {
        var reader = ByteReader(record.payload)
        do {
            _ = try reader.u8()
            let index = LogIndex(try reader.u64())
            let term = Term(try reader.u64())
            let discarded = try reader.u8() == 1
            return (Point(index: index, term: term, confState: try reader.confState()), discarded)
        } catch {
            throw LogCorruptionError(file: path, offset: record.offset, reason: "snapshot record too short")
        }
    }

    // MARK: - Writing

    private func buffer(entry: Entry) {
        var w = ByteWriter()
        w.u8(Kind.entry.rawValue)
        w.u64(entry.term.value)
        w.u64(entry.index.value)
        w.u8(entry.kind.rawValue)
        w.bytes += entry.data
        RecordSegments.append(w.bytes, to: &pending)
        segments[segments.count - 1].maxIndex = max(segments[segments.count - 1].maxIndex, entry.index)
    }

    private func buffer(hardState state: HardState) {
        var w = ByteWriter()
        w.u8(Kind.hardState.rawValue)
        w.u64(state.term.value)
        w.u64(state.vote.value)
        w.u64(state.commit.value)
        RecordSegments.append(w.bytes, to: &pending)
    }

    private func buffer(point: Point, discarded: Bool) {
        var w = ByteWriter()
        w.u8(Kind.snapshot.rawValue)
        w.u64(point.index.value)
        w.u64(point.term.value)
        w.u8(discarded ? 1 : 0)
        w.confState(point.confState)
        RecordSegments.append(w.bytes, to: &pending)
    }

    /// The first records of every segment: where the log stands.
    private func writeHeader() {
        buffer(point: point, discarded: false)
        buffer(hardState: hardState)
    }

    /// Persists what a Ready asks for — a snapshot installed from the leader, entries (replacing
    /// any from the first one's index on), the hard state — with one fdatasync. A Ready that only
    /// moves the commit index is written without one (as etcd's WAL does): a lost commit index is
    /// learned again, and the record goes to disk with the next synced write.
    public func save(hardState newHardState: HardState?, entries: [Entry], installed snapshot: Snapshot? = nil) throws {
        guard let written = try write(hardState: newHardState, entries: entries, installed: snapshot) else { return }
        try RecordSegments.sync(written)
        try finishSync()
    }

    /// `save` in two steps, so that the fdatasync can run on another thread while this one goes on:
    /// takes what a Ready asks to persist and writes it to the file (the page cache), returning the
    /// descriptor to fdatasync, or nil when nothing needs a sync (only the commit index moved).
    /// Until `finishSync` is called after that sync, nothing else may be written to the log.
    public func write(hardState newHardState: HardState?, entries: [Entry], installed snapshot: Snapshot? = nil) throws -> Int32? {
        let mustSync = snapshot != nil || !entries.isEmpty
            || newHardState.map { $0.term != hardState.term || $0.vote != hardState.vote } == true
        if let snapshot {
            point = Point(index: snapshot.index, term: snapshot.term, confState: snapshot.confState)
            log.removeAll()
            buffer(point: point, discarded: true)
        }
        if let first = entries.first {
            precondition(first.index > point.index && first.index <= lastIndex.next, "entries \(first.index) do not follow \(lastIndex)")
            if first.index <= lastIndex { log.removeSubrange(Int(first.index.value - point.index.value - 1)...) }
            for entry in entries { buffer(entry: entry) }
            log += entries
        }
        if let newHardState, newHardState != hardState {
            hardState = newHardState
            buffer(hardState: newHardState)
        }
        if let snapshot, hardState.commit < snapshot.index {
            hardState.commit = snapshot.index
            buffer(hardState: hardState)
        }
        guard mustSync, !pending.isEmpty else { return nil }
        try RecordSegments.write(pending, to: segment.fileDescriptor)
        segmentSize += pending.count
        pending.removeAll(keepingCapacity: true)
        return segment.fileDescriptor
    }

    /// After the sync of what `write` wrote: a full segment is closed and a new one started.
    public func finishSync() throws {
        if segmentSize >= segmentLimit { try rotate() }
    }

    /// Drops the entries up to `index` (applied and held by the state machine's snapshot), whose
    /// configuration then was `confState`, and deletes segments that hold only such entries.
    public func compact(through index: LogIndex, confState: ConfState) throws {
        guard index > point.index else { return }
        guard index <= lastIndex else { throw RaftError.unavailable }
        let term = try term(at: index)
        log.removeFirst(Int(index.value - point.index.value))
        point = Point(index: index, term: term, confState: confState)
        buffer(point: point, discarded: false)
        try sync()
        var removed = false
        while segments.count > 1, segments[0].maxIndex <= index {
            try FileManager.default.removeItem(atPath: segments[0].path)
            segments.removeFirst()
            removed = true
        }
        if removed { try RecordSegments.syncDirectory(directory.path) }
    }

    private func sync() throws {
        guard !pending.isEmpty else { return }
        try RecordSegments.writeAndSync(pending, to: segment.fileDescriptor)
        segmentSize += pending.count
        pending.removeAll(keepingCapacity: true)
    }

    private func rotate() throws {
        try segment.close()
        let sequence = segments[segments.count - 1].sequence + 1
        let path = directory.appendingPathComponent(RecordSegments.segmentName(sequence)).path
        _ = FileManager.default.createFile(atPath: path, contents: nil)
        segment = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        segmentSize = 0
        segments.append((sequence, path, .zero))
        try RecordSegments.preallocate(segment.fileDescriptor, size: segmentLimit)
        writeHeader()
        try sync()
        try RecordSegments.syncDirectory(directory.path)
    }

    public func close() {
        try? segment.close()
    }

    var segmentCount: Int { segments.count }

    // MARK: - LogStorage

    public func initialState() -> (HardState, ConfState) { (hardState, point.confState) }

    public var firstIndex: LogIndex { point.index.next }
    public var lastIndex: LogIndex { point.index + UInt64(log.count) }

    public func term(at index: LogIndex) throws -> Term {
        if index < point.index { throw RaftError.compacted }
        if index == point.index { return point.term }
        guard index <= lastIndex else { throw RaftError.unavailable }
        return log[Int(index.value - point.index.value - 1)].term
    }

    public func entries(from low: LogIndex, to high: LogIndex, maxBytes: Int) throws -> [Entry] {
        if low <= point.index { throw RaftError.compacted }
        guard high <= lastIndex.next else { throw RaftError.unavailable }
        var result: [Entry] = []
        var bytes = 0
        for position in Int(low.value - point.index.value - 1)..<Int(high.value - point.index.value - 1) {
            let entry = log[position]
            bytes += entry.data.count + 24
            if !result.isEmpty && bytes > maxBytes { break }
            result.append(entry)
        }
        return result
    }

    /// The snapshot point as the core sees it; the state machine's image travels beside it.
    public func snapshot() -> Snapshot? {
        point.index == .zero ? nil : Snapshot(index: point.index, term: point.term, confState: point.confState, data: [])
    }
}
