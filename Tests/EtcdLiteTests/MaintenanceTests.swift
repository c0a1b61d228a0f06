import Crypto
import Foundation
import Testing
@testable import EtcdLite
import EtcdLiteProto

@Suite struct MaintenanceTests {
    @Test func identityMatchesEtcd() {
        // IDs etcd 3.4.23 reported for the same flags.
        let single = ClusterIdentity.memberID(peerURLs: ["http://localhost:2380"], token: "etcd-cluster")
        #expect(single == 10_276_657_743_932_975_437)
        #expect(ClusterIdentity.clusterID(memberIDs: [single]) == 14_841_639_068_965_178_418)
        let e1 = ClusterIdentity.memberID(peerURLs: ["http://127.0.0.1:23800"], token: "etcd-cluster")
        #expect(e1 == 3_319_814_642_761_637_952)
        #expect(ClusterIdentity.clusterID(memberIDs: [e1]) == 324_952_591_200_643_719)
    }

    @Test func statusHashesAndSnapshot() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        for i in 0..<10 { _ = try await server.put(put("k\(i)", "v\(i)")) }
        let status = server.statusResponse()
        #expect(status.version == EtcdLiteServer.apiVersion && status.leader == server.memberID)
        // The log: the bootstrap membership entry, the leader's empty entry, then the ten writes.
        #expect(status.header.revision == 11 && status.raftAppliedIndex == 12 && status.raftIndex == 12 && status.raftTerm == 2)
        #expect(status.dbSize > 0 && status.dbSizeInUse > 0 && status.dbSizeInUse <= status.dbSize && status.errors.isEmpty)

        var request = Etcdserverpb_HashKVRequest()
        request.revision = 6
        let at6 = try server.hashKV(request)
        #expect(at6.hashRevision == 6 && at6.compactRevision == 0)
        _ = try await server.put(put("k0", "changed"))
        #expect(try server.hashKV(request).hash == at6.hash, "history up to 6 did not change")
        request.revision = 0
        #expect(try server.hashKV(request).hash != at6.hash)
        request.revision = 100
        #expect(throws: EtcdError.futureRevision) { try server.hashKV(request) }
        #expect(try server.hash().hash != 0)

        var chunks: [Etcdserverpb_SnapshotResponse] = []
        try await server.snapshotChunks { chunks.append($0) }
        let body = chunks.dropLast().reduce(Data()) { $0 + $1.blob }
        #expect(chunks.dropLast().allSatisfy { $0.blob.count <= 32 * 1024 })
        #expect(chunks.last!.remainingBytes == 0 && chunks.last!.blob == Data(SHA256.hash(data: body)))
        #expect(chunks.dropLast().last!.remainingBytes == 0 && chunks.first!.remainingBytes == UInt64(body.count - chunks.first!.blob.count))
        // The snapshot is a database holding the same keys.
        let copy = dir.url.appendingPathComponent("copy.db")
        try body.write(to: copy)
        let connection = try SQLiteConnection(path: copy.path)
        #expect(try connection.pragmaInt("user_version") == 0)
        let count = try connection.prepared("SELECT count(*) FROM latest")
        #expect(try count.step() && count.int64(0) == 10)
        count.reset()

        // Deleting everything and defragmenting shrinks the database, and status shows it at once.
        _ = try await server.deleteRange(deleteRange("\0", "\0"))
        var compactAll = Etcdserverpb_CompactionRequest()
        compactAll.revision = server.status.state.currentRevision
        _ = try await server.compact(compactAll)
        let before = server.statusResponse().dbSize
        let defrag = try await server.defragment()
        #expect(!defrag.hasHeader, "etcd 3.4 answers a defragment with an empty message")
        #expect(server.statusResponse().dbSize <= before)
        #expect(server.statusResponse().dbSizeInUse == server.statusResponse().dbSize, "no free pages after VACUUM")
        let members = try await server.memberList().members
        #expect(members.count == 1 && members[0].id == server.memberID && members[0].name == "default")
    }
}

@Suite struct AutoCompactorTests {
    @Test func revisionModeKeepsTheLastRevisions() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        for i in 0..<10 { _ = try await server.put(put("k", "\(i)")) }  // revisions 2...11
        let compactor = AutoCompactor(server: server, retention: .revisions(3), revisionCheck: .milliseconds(20))
        let task = Task { await compactor.run() }
        for _ in 0..<200 where server.status.state.compactRevision == 0 {
            try await Task.sleep(for: .milliseconds(10))
        }
        task.cancel()
        await task.value
        #expect(server.status.state.compactRevision == 8)
        #expect(await expectEtcdError(.compacted) { _ = try await server.range(range("k", revision: 7)) })
        #expect(try await server.range(range("k", revision: 8)).kvs.first?.value == Data("6"))
    }
}
