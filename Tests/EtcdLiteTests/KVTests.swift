import Foundation
import Testing
@testable import EtcdLite
import EtcdLiteProto

@Suite struct KVTests {
    @Test func revisionsVersionsAndTombstones() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        #expect(try await server.range(range("a")).header.revision == 1)
        #expect(try await server.put(put("a", "1")).header.revision == 2)
        #expect(try await server.put(put("a", "2")).header.revision == 3)
        var kv = try await server.range(range("a")).kvs[0]
        #expect(kv.createRevision == 2 && kv.modRevision == 3 && kv.version == 2 && kv.value == Data("2"))
        // Reads and deletes of nothing leave the revision alone.
        #expect(try await server.deleteRange(deleteRange("zz")).header.revision == 3)
        #expect(try await server.deleteRange(deleteRange("a")).deleted == 1)
        #expect(try await server.put(put("a", "3")).header.revision == 5)
        kv = try await server.range(range("a")).kvs[0]
        #expect(kv.createRevision == 5 && kv.version == 1)
        // History stays readable until compaction.
        #expect(try await server.range(range("a", revision: 3)).kvs[0].value == Data("2"))
        #expect(try await server.range(range("a", revision: 4)).kvs.isEmpty)
        let header = try await server.range(range("a", revision: 2)).header
        #expect(header.revision == 5 && header.raftTerm >= 2 && header.memberID == server.memberID && header.clusterID == server.clusterID)
    }

    @Test func rangeForms() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        for key in ["a", "ab", "abc", "b", "c"] { _ = try await server.put(put(key, "v-" + key)) }
        #expect(keys(try await server.range(range("a"))) == ["a"])
        #expect(keys(try await server.range(range("a", "b"))) == ["a", "ab", "abc"])
        #expect(keys(try await server.range(range("b", "\0"))) == ["b", "c"])
        #expect(keys(try await server.range(range("\0", "\0"))) == ["a", "ab", "abc", "b", "c"])
        #expect(keys(try await server.range(range("c", "a"))).isEmpty)
        let limited = try await server.range(range("a", "\0", limit: 2))
        #expect(keys(limited) == ["a", "ab"] && limited.more && limited.count == 5)
        let exact = try await server.range(range("a", "\0", limit: 5))
        #expect(!exact.more && exact.count == 5)
        var countOnly = range("a", "b"); countOnly.countOnly = true
        let counted = try await server.range(countOnly)
        #expect(counted.kvs.isEmpty && counted.count == 3)
        var keysOnly = range("a", "b"); keysOnly.keysOnly = true
        #expect(try await server.range(keysOnly).kvs.allSatisfy { $0.value.isEmpty && $0.modRevision > 0 })
        var serializable = range("a"); serializable.serializable = true
        #expect(keys(try await server.range(serializable)) == ["a"])
    }

    @Test func rangeSortAndFilters() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        _ = try await server.put(put("k1", "z"))   // rev 2
        _ = try await server.put(put("k2", "y"))   // rev 3
        _ = try await server.put(put("k3", "x"))   // rev 4
        _ = try await server.put(put("k1", "w"))   // rev 5, k1 version 2
        var r = range("k", "l")
        r.sortOrder = .descend
        #expect(keys(try await server.range(r)) == ["k3", "k2", "k1"])
        r.sortTarget = .mod
        #expect(keys(try await server.range(r)) == ["k1", "k3", "k2"])
        r.sortOrder = .none  // NONE with a non-key target means ascending
        #expect(keys(try await server.range(r)) == ["k2", "k3", "k1"])
        r.sortTarget = .value
        r.sortOrder = .ascend
        #expect(keys(try await server.range(r)) == ["k1", "k3", "k2"])
        r.sortTarget = .create
        r.sortOrder = .descend
        r.limit = 2
        let sorted = try await server.range(r)
        #expect(keys(sorted) == ["k3", "k2"] && sorted.more && sorted.count == 3)
        var f = range("k", "l")
        f.minModRevision = 3
        f.maxModRevision = 4
        #expect(keys(try await server.range(f)) == ["k2", "k3"])
        f = range("k", "l")
        f.minCreateRevision = 3
        let filtered = try await server.range(f)
        #expect(keys(filtered) == ["k2", "k3"] && filtered.count == 3)
        f = range("k", "l")
        f.maxCreateRevision = 2
        #expect(keys(try await server.range(f)) == ["k1"])
        var invalid = range("k")
        invalid.sortOrder = .UNRECOGNIZED(7)
        #expect(await expectEtcdError(.invalidSortOption) { _ = try await server.range(invalid) })
        invalid = range("k")
        invalid.sortTarget = .UNRECOGNIZED(9)
        #expect(await expectEtcdError(.invalidSortOption) { _ = try await server.range(invalid) })
    }

    @Test func rangeErrors() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        for i in 0..<4 { _ = try await server.put(put("k", "\(i)")) }  // revisions 2...5
        #expect(await expectEtcdError(.emptyKey) { _ = try await server.range(range("")) })
        #expect(await expectEtcdError(.futureRevision) { _ = try await server.range(range("k", revision: 6)) })
        var compact = Etcdserverpb_CompactionRequest(); compact.revision = 4
        _ = try await server.compact(compact)
        #expect(await expectEtcdError(.compacted) { _ = try await server.range(range("k", revision: 3)) })
        #expect(try await server.range(range("k", revision: 4)).kvs[0].value == Data("2"))
        #expect(try await server.range(range("k", revision: 5)).kvs[0].value == Data("3"))
    }

    @Test func putOptionsAndErrors() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        #expect(await expectEtcdError(.emptyKey) { _ = try await server.put(put("", "v")) })
        var r = put("a", "v"); r.ignoreValue = true
        #expect(await expectEtcdError(.valueProvided) { _ = try await server.put(r) })
        r = put("a", ""); r.ignoreValue = true
        #expect(await expectEtcdError(.keyNotFound) { _ = try await server.put(r) })
        r = put("a", "", lease: 5); r.ignoreLease = true
        #expect(await expectEtcdError(.leaseProvided) { _ = try await server.put(r) })
        #expect(await expectEtcdError(.leaseNotFound) { _ = try await server.put(put("a", "v", lease: 12345)) })
        #expect(try await server.range(range("a")).header.revision == 1, "failed puts change nothing")

        let first = try await server.put(put("a", "one", prevKV: true))
        #expect(!first.hasPrevKv)
        let second = try await server.put(put("a", "two", prevKV: true))
        #expect(second.prevKv.value == Data("one") && second.prevKv.modRevision == 2)
        r = put("a", ""); r.ignoreValue = true
        _ = try await server.put(r)
        let kv = try await server.range(range("a")).kvs[0]
        #expect(kv.value == Data("two") && kv.version == 3)
        r = put("a", "three"); r.ignoreLease = true
        _ = try await server.put(r)
        #expect(try await server.range(range("a")).kvs[0].value == Data("three"))
    }

    @Test func deleteRangeForms() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        for key in ["a", "b1", "b2", "c", "d"] { _ = try await server.put(put(key, key)) }  // revs 2...6
        #expect(await expectEtcdError(.emptyKey) { _ = try await server.deleteRange(deleteRange("")) })
        let prefix = try await server.deleteRange(deleteRange("b", "c", prevKV: true))
        #expect(prefix.deleted == 2 && prefix.prevKvs.map(\.value) == [Data("b1"), Data("b2")] && prefix.header.revision == 7)
        let rest = try await server.deleteRange(deleteRange("c", "\0"))
        #expect(rest.deleted == 2 && rest.prevKvs.isEmpty && rest.header.revision == 8)
        #expect(keys(try await server.range(range("\0", "\0"))) == ["a"])
        let all = try await server.deleteRange(deleteRange("\0", "\0"))
        #expect(all.deleted == 1)
        // Deleted keys are still in history.
        #expect(keys(try await server.range(range("\0", "\0", revision: 6))) == ["a", "b1", "b2", "c", "d"])
    }
}
