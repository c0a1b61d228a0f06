import Foundation
import Testing
@testable import EtcdLite
import EtcdLiteProto

@Suite struct TxnTests {
    func txn(_ compares: [Etcdserverpb_Compare], _ success: [Etcdserverpb_RequestOp], _ failure: [Etcdserverpb_RequestOp] = []) -> Etcdserverpb_TxnRequest {
        var t = Etcdserverpb_TxnRequest()
        t.compare = compares
        t.success = success
        t.failure = failure
        return t
    }

    @Test func comparesOnEveryTarget() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        _ = try await server.put(put("k", "m"))  // rev 2, version 1
        let cases: [(Etcdserverpb_Compare, Bool)] = [
            (compare("k", .version, .equal, 1), true),
            (compare("k", .version, .greater, 0), true),
            (compare("k", .create, .equal, 2), true),
            (compare("k", .mod, .less, 3), true),
            (compare("k", .mod, .notEqual, 2), false),
            (compare("k", .lease, .equal, 0), true),
            (compareValue("k", .equal, "m"), true),
            (compareValue("k", .greater, "a"), true),
            (compareValue("k", .less, "a"), false),
            (compare("missing", .version, .equal, 0), true),
            (compare("missing", .mod, .equal, 0), true),
            (compareValue("missing", .equal, ""), false),
            (compareValue("missing", .notEqual, "x"), false),
        ]
        for (c, expected) in cases {
            let response = try await server.txn(txn([c], []))
            #expect(response.succeeded == expected, "\(c)")
        }
        // Read-only txns do not advance the revision.
        #expect(try await server.range(range("k")).header.revision == 2)
    }

    @Test func compareOverARange() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        _ = try await server.put(put("p/a", "1"))
        _ = try await server.put(put("p/b", "1"))
        var c = compareValue("p/", .equal, "1")
        c.rangeEnd = Data("p0")
        #expect(try await server.txn(txn([c], [])).succeeded)
        _ = try await server.put(put("p/c", "2"))
        #expect(try await !server.txn(txn([c], [])).succeeded)
    }

    @Test func opsRunInOrderUnderOneRevision() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        _ = try await server.put(put("a", "1"))  // rev 2
        let request = txn([compareValue("a", .equal, "1")],
                          [op(range("a")), op(put("b", "2")), op(deleteRange("zz")), op(range("b")), op(put("c", "3"))],
                          [op(put("never", "x"))])
        let response = try await server.txn(request)
        #expect(response.succeeded && response.header.revision == 3)
        #expect(response.responses[0].responseRange.header.revision == 2)
        #expect(response.responses[1].responsePut.header.revision == 3)
        #expect(response.responses[2].responseDeleteRange.header.revision == 3)
        #expect(keys(response.responses[3].responseRange) == ["b"])
        #expect(response.responses[3].responseRange.kvs[0].modRevision == 3)
        #expect(try await server.range(range("c")).kvs[0].modRevision == 3)
        #expect(try await server.range(range("never")).kvs.isEmpty)
        // The failure branch runs when a compare fails.
        let failed = try await server.txn(txn([compareValue("a", .equal, "nope")], [op(put("x", "1"))], [op(range("a"))]))
        #expect(!failed.succeeded && keys(failed.responses[0].responseRange) == ["a"] && failed.header.revision == 3)
    }

    @Test func nestedTxnsEvaluateAgainstTheStartingState() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        // The nested compare sees "n" missing even though the outer txn wrote it first.
        let inner = txn([compare("n", .version, .equal, 0)], [op(put("inner", "then"))], [op(put("inner", "else"))])
        let outer = txn([], [op(put("n", "1")), op(inner), op(range("inner"))])
        let response = try await server.txn(outer)
        #expect(response.succeeded)
        #expect(response.responses[1].responseTxn.succeeded)
        #expect(response.responses[1].responseTxn.hasHeader)
        #expect(keys(response.responses[2].responseRange) == ["inner"])
        #expect(try await server.range(range("inner")).kvs[0].value == Data("then"))
    }

    @Test func invalidTxns() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir) { $0.maxTxnOps = 3 }; defer { server.close() }
        #expect(await expectEtcdError(.duplicateKey) { _ = try await server.txn(txn([], [op(put("a", "1")), op(put("a", "2"))])) })
        #expect(await expectEtcdError(.duplicateKey) { _ = try await server.txn(txn([], [op(deleteRange("a", "c")), op(put("b", "2"))])) })
        let nested = txn([], [op(put("a", "x"))], [op(put("a", "y"))])
        // Both branches of a nested txn may put the same key; the outer branch may not.
        _ = try await server.txn(txn([], [op(nested)]))
        #expect(await expectEtcdError(.duplicateKey) { _ = try await server.txn(txn([], [op(put("a", "1")), op(nested)])) })
        #expect(await expectEtcdError(.tooManyOps) { _ = try await server.txn(txn([], [op(put("1", "")), op(put("2", "")), op(put("3", "")), op(put("4", ""))])) })
        #expect(await expectEtcdError(.keyNotFound) { _ = try await server.txn(txn([], [Etcdserverpb_RequestOp()])) })
        #expect(await expectEtcdError(.emptyKey) { _ = try await server.txn(txn([compare("", .version, .equal, 0)], [])) })
        #expect(await expectEtcdError(.emptyKey) { _ = try await server.txn(txn([], [op(put("", "v"))])) })
        var ignore = put("missing", ""); ignore.ignoreValue = true
        #expect(await expectEtcdError(.keyNotFound) { _ = try await server.txn(txn([], [op(put("b", "1")), op(ignore)])) })
        #expect(await expectEtcdError(.leaseNotFound) { _ = try await server.txn(txn([], [op(put("b", "1", lease: 9))])) })
        #expect(await expectEtcdError(.futureRevision) { _ = try await server.txn(txn([], [op(put("b", "1")), op(range("b", revision: 100))])) })
        // Nothing of a rejected txn was applied.
        #expect(try await server.range(range("b")).kvs.isEmpty)
    }

    @Test func compaction() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let server = try makeServer(dir); defer { server.close() }
        _ = try await server.put(put("a", "1"))  // 2
        _ = try await server.put(put("a", "2"))  // 3
        _ = try await server.put(put("b", "1"))  // 4
        _ = try await server.deleteRange(deleteRange("b"))  // 5
        _ = try await server.put(put("c", "1"))  // 6
        var c = Etcdserverpb_CompactionRequest()
        c.revision = 7
        #expect(await expectEtcdError(.futureRevision) { _ = try await server.compact(c) })
        c.revision = 5
        c.physical = true
        #expect(try await server.compact(c).header.revision == 6)
        #expect(await expectEtcdError(.compacted) { _ = try await server.compact(c) })
        c.revision = 4
        #expect(await expectEtcdError(.compacted) { _ = try await server.compact(c) })
        #expect(keys(try await server.range(range("\0", "\0", revision: 5))) == ["a"])
        #expect(keys(try await server.range(range("\0", "\0", revision: 6))) == ["a", "c"])
        #expect(try await server.range(range("a", revision: 5)).kvs[0].value == Data("2"))
        // Only the newest version at or below the compaction point survives.
        let rows = try server.backend.read { view in
            try RangeQuery.count(view.connection, range: .from(Data([0])), revision: 5, atLatest: false)
        }
        #expect(rows == 1)
    }
}
