import Foundation
import Testing
import Raft
@testable import EtcdLite

/// The member's durable Raft log on real files: what is saved comes back after a reopen; overwrites,
/// compaction and installed snapshots survive it; a torn tail is cut off and damage elsewhere
/// refuses to open, naming the file and offset.
@Suite struct RaftLogStoreTests {
    static let conf = ConfState(voters: [1, 2, 3])

    static func entries(_ range: ClosedRange<UInt64>, term: UInt64, size: Int = 10) -> [Entry] {
        range.map { Entry(term: Term(term), index: LogIndex($0), data: [UInt8](repeating: UInt8($0 % 251), count: size)) }
    }

    static func all(_ store: RaftLogStore) throws -> [Entry] {
        store.lastIndex < store.firstIndex ? [] : try store.entries(from: store.firstIndex, to: store.lastIndex.next, maxBytes: .max)
    }

    @Test func whatIsSavedComesBackAfterAReopen() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let store = try RaftLogStore(directory: dir.url, initial: Self.conf)
        try store.save(hardState: HardState(term: 2, vote: 1, commit: 3), entries: Self.entries(1...5, term: 2))
        store.close()
        let reopened = try RaftLogStore(directory: dir.url, initial: ConfState())
        #expect(reopened.hardState == HardState(term: 2, vote: 1, commit: 3))
        #expect(try Self.all(reopened) == Self.entries(1...5, term: 2))
        #expect(reopened.initialState().1 == Self.conf, "the bootstrap configuration was recorded")
        #expect(try reopened.term(at: 0) == 0 && reopened.firstIndex == 1 && reopened.lastIndex == 5)
    }

    /// A leader of a later term replaced uncommitted entries: the replacement wins after a reopen.
    @Test func overwrittenEntriesStayReplaced() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let store = try RaftLogStore(directory: dir.url, initial: Self.conf)
        try store.save(hardState: HardState(term: 1, vote: 1, commit: 2), entries: Self.entries(1...6, term: 1))
        try store.save(hardState: HardState(term: 2, vote: 2, commit: 2), entries: Self.entries(4...5, term: 2))
        #expect(try Self.all(store).map(\.term) == [1, 1, 1, 2, 2])
        store.close()
        let reopened = try RaftLogStore(directory: dir.url, initial: Self.conf)
        #expect(try Self.all(reopened) == Self.entries(1...3, term: 1) + Self.entries(4...5, term: 2))
        #expect(reopened.hardState.term == 2 && reopened.hardState.vote == 2)
    }

    /// Compaction drops entries and whole segments; after a reopen the log starts after the
    /// snapshot point, with its term and configuration.
    @Test func compactionDropsSegmentsAndSurvivesAReopen() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let store = try RaftLogStore(directory: dir.url, initial: Self.conf, segmentLimit: 4_096)
        for batch in 0..<20 {
            let low = UInt64(batch * 10 + 1)
            try store.save(hardState: HardState(term: 3, vote: 1, commit: LogIndex(low + 9)), entries: Self.entries(low...low + 9, term: 3, size: 100))
        }
        let before = store.segmentCount
        #expect(before > 3)
        let later = ConfState(voters: [1, 2, 3], learners: [4])
        try store.compact(through: 150, confState: later)
        #expect(store.segmentCount < before)
        #expect(throws: RaftError.compacted) { try store.term(at: 149) }
        store.close()
        let reopened = try RaftLogStore(directory: dir.url, initial: ConfState())
        #expect(reopened.firstIndex == 151 && reopened.lastIndex == 200)
        #expect(try reopened.term(at: 150) == 3)
        #expect(reopened.initialState().1 == later)
        #expect(reopened.snapshot()?.index == 150)
        #expect(try Self.all(reopened) == Self.entries(151...200, term: 3, size: 100))
        #expect(reopened.hardState.commit == 200)
        // It keeps appending where it stopped.
        try reopened.save(hardState: nil, entries: Self.entries(201...201, term: 4))
        #expect(reopened.lastIndex == 201)
    }

    /// A snapshot installed from the leader discards every entry written before it, also those
    /// after its index (they came from another leader).
    @Test func anInstalledSnapshotDiscardsTheOldLog() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let store = try RaftLogStore(directory: dir.url, initial: Self.conf)
        try store.save(hardState: HardState(term: 1, vote: 1, commit: 2), entries: Self.entries(1...10, term: 1))
        let snapshot = Snapshot(index: 8, term: 2, confState: ConfState(voters: [1, 2]), data: [])
        try store.save(hardState: HardState(term: 2, vote: 0, commit: 8), entries: [], installed: snapshot)
        #expect(store.firstIndex == 9 && store.lastIndex == 8)
        try store.save(hardState: nil, entries: Self.entries(9...9, term: 2))
        store.close()
        let reopened = try RaftLogStore(directory: dir.url, initial: Self.conf)
        #expect(reopened.firstIndex == 9 && reopened.lastIndex == 9)
        #expect(try reopened.term(at: 8) == 2 && reopened.term(at: 9) == 2)
        #expect(reopened.initialState().1 == ConfState(voters: [1, 2]))
        #expect(reopened.hardState == HardState(term: 2, vote: 0, commit: 8))
    }

    /// A write torn by a crash (a record cut short at the end of the last segment) is cut off: the
    /// log opens with everything before it, and appends after it survive the next reopen.
    @Test func aTornTailIsCutOff() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let store = try RaftLogStore(directory: dir.url, initial: Self.conf)
        try store.save(hardState: HardState(term: 1, vote: 1, commit: 3), entries: Self.entries(1...3, term: 1))
        store.close()
        let segment = try Self.segments(dir).last!
        let end = try Self.dataEnd(segment)
        // Half a record: a header announcing 100 bytes, and only 5 of them.
        try Self.write([100, 0, 0, 0, 0xAB, 0xCD, 0xEF, 0x01, 1, 2, 3, 4, 5], into: segment, at: end)
        let reopened = try RaftLogStore(directory: dir.url, initial: Self.conf)
        #expect(try Self.all(reopened) == Self.entries(1...3, term: 1))
        try reopened.save(hardState: nil, entries: Self.entries(4...4, term: 1))
        reopened.close()
        let again = try RaftLogStore(directory: dir.url, initial: Self.conf)
        #expect(again.lastIndex == 4)
    }

    /// Damage before valid data is not a torn write: the log refuses to open and says where.
    @Test func corruptionInTheMiddleRefusesToOpen() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let store = try RaftLogStore(directory: dir.url, initial: Self.conf)
        for n in 0..<5 { try store.save(hardState: nil, entries: Self.entries(UInt64(n + 1)...UInt64(n + 1), term: 1)) }
        store.close()
        let segment = try Self.segments(dir).last!
        // Flip a byte inside the data of an early record (the header records come first).
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: segment))
        try handle.seek(toOffset: 120)
        let byte = try handle.read(upToCount: 1)![0]
        try handle.seek(toOffset: 120)
        try handle.write(contentsOf: [byte ^ 0xFF])
        try handle.close()
        do {
            _ = try RaftLogStore(directory: dir.url, initial: Self.conf)
            Issue.record("a corrupted log opened")
        } catch let error as LogCorruptionError {
            #expect(error.file == segment && error.offset > 0 && error.offset <= 120)
            #expect(error.description.contains(segment) && error.description.contains("checksum mismatch"), "\(error)")
        }
    }

    /// The Raft core runs on the store: a single node elects itself and commits; restarted from the
    /// same directory it has its term, vote, log and commit index.
    @Test func aRaftNodeRestartsFromTheStore() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        func run(_ store: RaftLogStore, _ node: RaftNode<SeededRandom>) throws {
            while node.hasReady {
                let ready = node.ready()
                try store.save(hardState: ready.hardState, entries: ready.entries, installed: ready.snapshot)
                node.advance(ready)
            }
        }
        let store = try RaftLogStore(directory: dir.url, initial: ConfState(voters: [1]))
        let node = RaftNode(config: RaftConfig(id: 1), storage: store, random: SeededRandom(seed: 1))
        node.campaign()
        try run(store, node)
        for n in 0..<10 { try node.propose([UInt8(n)]) }
        try run(store, node)
        #expect(node.role == .leader && node.commitIndex == 11)
        store.close()
        let reopened = try RaftLogStore(directory: dir.url, initial: ConfState())
        var config = RaftConfig(id: 1)
        config.applied = 11
        let restarted = RaftNode(config: config, storage: reopened, random: SeededRandom(seed: 2))
        // Term, vote and entries were synced; a Ready that only moved the commit index was not
        // (etcd's rule), so the commit index may come back lower: it is learned again.
        #expect(restarted.term == 1 && restarted.vote == 1 && restarted.lastIndex == 11 && restarted.commitIndex <= 11)
        restarted.campaign()
        try run(reopened, restarted)
        #expect(restarted.role == .leader && restarted.term == 2)
        try restarted.propose([42])
        try run(reopened, restarted)
        #expect(restarted.commitIndex == 13)
    }

    /// A save that only moves the commit index is not synced; the next synced save carries it.
    @Test func aCommitOnlyHardStateRidesWithTheNextSyncedWrite() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let store = try RaftLogStore(directory: dir.url, initial: Self.conf)
        try store.save(hardState: HardState(term: 1, vote: 1, commit: 0), entries: Self.entries(1...2, term: 1))
        try store.save(hardState: HardState(term: 1, vote: 1, commit: 2), entries: [])
        // Reopened from what reached the file: the commit-only record is still in memory.
        let early = try RaftLogStore(directory: dir.url, initial: Self.conf)
        #expect(early.hardState.commit == 0 && early.lastIndex == 2)
        early.close()
        try store.save(hardState: nil, entries: Self.entries(3...3, term: 1))
        store.close()
        let later = try RaftLogStore(directory: dir.url, initial: Self.conf)
        #expect(later.hardState.commit == 2 && later.lastIndex == 3)
    }

    // MARK: - Helpers

    static func segments(_ dir: TempDir) throws -> [String] {
        try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".log") }.sorted()
            .map { dir.url.appendingPathComponent($0).path }
    }

    /// Where the records of a (preallocated) segment end.
    static func dataEnd(_ path: String) throws -> Int {
        try RecordSegments.read(path: path, isLast: true).end
    }

    static func write(_ bytes: [UInt8], into path: String, at offset: Int) throws {
        let handle = try FileHandle(forUpdating: URL(fileURLWithPath: path))
        try handle.seek(toOffset: UInt64(offset))
        try handle.write(contentsOf: bytes)
        try handle.close()
    }
}
