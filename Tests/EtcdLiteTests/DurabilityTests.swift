import Foundation
import Raft
import Testing
@testable import EtcdLite
import EtcdLiteProto

@Suite struct DurabilityTests {
    func walDir(_ dir: TempDir) -> URL { dir.url.appendingPathComponent("member/raft") }

    func segment(_ dir: TempDir) throws -> URL {
        let name = try FileManager.default.contentsOfDirectory(atPath: walDir(dir).path).filter { $0.hasSuffix(".log") }.sorted().last!
        return walDir(dir).appendingPathComponent(name)
    }

    @Test func dataSurvivesRestart() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var server = try makeServer(dir)
        for i in 0..<20 { _ = try await server.put(put("k\(i)", "v\(i)")) }
        let before = try await server.range(range("k", "l"))
        let term = before.header.raftTerm
        server.close()
        server = try makeServer(dir); defer { server.close() }
        let after = try await server.range(range("k", "l"))
        #expect(after.kvs == before.kvs && after.header.revision == 21)
        #expect(after.header.raftTerm == term + 1, "each start is a new term")
        #expect(after.header.memberID == before.header.memberID && after.header.clusterID == before.header.clusterID)
    }

    @Test func entriesAfterTheAppliedIndexAreReplayed() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var server = try makeServer(dir)
        _ = try await server.put(put("a", "1"))
        let applied = server.status.state.appliedIndex
        server.close()
        // An entry that reached the log but not the store (a crash between fsync and apply): not
        // even known committed yet. The member elects itself again, which commits it.
        let log = try RaftLogStore(directory: walDir(dir), initial: ConfState())
        var data = ByteWriter()
        data.u64(server.memberID)
        data.u64(99)
        data.bytes += try InternalRequest.put(put("b", "2")).encoded()
        try log.save(hardState: nil, entries: [Entry(term: Term(log.hardState.term.value), index: log.lastIndex.next, data: data.bytes)])
        log.close()
        server = try makeServer(dir); defer { server.close() }
        let b = try await server.range(range("b"))
        #expect(b.kvs.first?.value == Data("2") && b.header.revision == 3)
        // Applied: the entry, and the empty entry of the new term that committed it.
        #expect(server.status.state.appliedIndex == applied + 2)
    }

    @Test func aTornTailIsTruncated() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var server = try makeServer(dir)
        _ = try await server.put(put("a", "1"))
        server.close()
        // Half a record after the last one: a header that promises more bytes than were written.
        let url = try segment(dir)
        var bytes = try [UInt8](Data(contentsOf: url))
        let end = try RecordSegments.read(path: url.path, isLast: true).end
        let torn: [UInt8] = [200, 0, 0, 0, 1, 2, 3, 4, 9, 0, 0, 0, 7, 7]
        bytes.replaceSubrange(end..<(end + torn.count), with: torn)
        try Data(bytes).write(to: url)
        server = try makeServer(dir)
        // The torn bytes are gone: the segment reads as a segment that is not the last one must
        // (no torn tail tolerated), and its records now run past where the torn write began.
        let repaired = try RecordSegments.read(path: url.path, isLast: false)
        #expect(repaired.end > end)
        #expect(try await server.range(range("a")).kvs.count == 1)
        _ = try await server.put(put("b", "2"))
        server.close()
        // The repaired log opens again with both writes.
        server = try makeServer(dir); defer { server.close() }
        let all = try await server.range(range("a", "c"))
        #expect(keys(all) == ["a", "b"] && all.header.revision == 3)
    }

    @Test func corruptionInTheMiddleRefusesToStart() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        var server = try makeServer(dir)
        _ = try await server.put(put("a", "first"))
        _ = try await server.put(put("b", "second"))
        server.close()
        // Damage the first record: every record is read at start, applied or not.
        let path = try segment(dir).path
        var bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: path)))
        bytes[20] ^= 0xFF
        try Data(bytes).write(to: URL(fileURLWithPath: path))
        #expect {
            server = try makeServer(dir)
        } throws: { error in
            guard let corruption = error as? LogCorruptionError else { return false }
            return corruption.file == path && corruption.offset == 0 && corruption.description.contains("checksum mismatch")
        }
    }

    @Test func quotaRaisesNoSpaceUntilDisarmed() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir) { $0.quotaBackendBytes = 256 * 1024 }; defer { server.close() }
        let big = String(repeating: "x", count: 16 * 1024)
        var rejected = false
        for i in 0..<64 {
            do {
                _ = try await server.put(put("k\(i)", big))
            } catch let error as EtcdError {
                #expect(error == .noSpace)
                rejected = true
                break
            }
        }
        #expect(rejected)
        // The alarm is raised through the log; wait for it to apply.
        var get = Etcdserverpb_AlarmRequest()
        get.action = .get
        var alarms: [Etcdserverpb_AlarmMember] = []
        for _ in 0..<100 where alarms.isEmpty {
            alarms = try await server.alarm(get).alarms
            if alarms.isEmpty { try await Task.sleep(for: .milliseconds(10)) }
        }
        #expect(alarms.map(\.alarm) == [.nospace] && alarms[0].memberID == server.memberID)
        #expect(server.statusResponse().errors.first?.contains("NOSPACE") == true)
        // While the alarm is active even small puts fail; reads and deletes work.
        #expect(await expectEtcdError(.noSpace) { _ = try await server.put(put("small", "1")) })
        _ = try await server.range(range("k0"))
        _ = try await server.deleteRange(deleteRange("k", "l"))
        var compact = Etcdserverpb_CompactionRequest()
        compact.revision = server.status.state.currentRevision
        _ = try await server.compact(compact)
        _ = try await server.defragment()
        var disarm = Etcdserverpb_AlarmRequest()
        disarm.action = .deactivate
        disarm.memberID = server.memberID
        disarm.alarm = .nospace
        #expect(try await server.alarm(disarm).alarms.count == 1)
        #expect(try await server.alarm(get).alarms.isEmpty)
        _ = try await server.put(put("small", "1"))
    }
}
