import Foundation
import GRPCCore
import Testing
import EtcdLiteProto

/// Watch over gRPC against real members: the same scenario on etcd 3.4 and etcdlite must give
/// every watcher the same answers.
@Suite(.serialized, .timeLimit(.minutes(3))) struct WatchTests {
    func txn(_ ops: [Etcdserverpb_RequestOp]) -> Etcdserverpb_TxnRequest {
        var t = Etcdserverpb_TxnRequest()
        t.success = ops
        return t
    }

    /// Many watchers on one stream: history, prefix and "\0" ranges, prev_kv, filters, chosen and
    /// duplicate ids, an empty range, cancel, and a start revision that compaction passed.
    func scenario(port: Int) async throws -> [Int64: [String]] {
        try await withClient(port: port) { client in
            let kv = Etcdserverpb_KV.Client(wrapping: client)
            _ = try await kv.put(put("a", "1"))  // 2
            _ = try await kv.put(put("b", "2"))  // 3
            return try await withWatchSession(client) { w in
                w.create("a", prefixEnd("a"), start: 1, prevKV: true)   // 0: from history
                w.create("b")                                            // 1
                w.create("a", "c", id: 7, filters: [.nodelete])          // 7
                w.create("a", id: 7)                                     // duplicate
                w.create("z", "a")                                       // empty range
                w.create("", "\0", start: 2)                             // 2: every key, from history
                w.create("x", "\0", prevKV: true, filters: [.noput])    // 3: deletes of keys ≥ x
                await w.wait { $0.filter(\.created).count == 7 && $0.flatMap(\.events).count >= 3 }
                _ = try await kv.put(put("a", "3"))                      // 4
                _ = try await kv.deleteRange(deleteRange("b"))           // 5
                _ = try await kv.txn(txn([op(put("a2", "x")), op(put("c", "y")), op(deleteRange("a")), op(put("xy", "1"))]))  // 6
                _ = try await kv.put(put("b", "again"))                  // 7
                _ = try await kv.deleteRange(deleteRange("x", "\0"))     // 8
                await w.wait { $0.contains { $0.watchID == 2 && $0.events.contains { $0.kv.modRevision == 8 } } }
                w.cancel(1)
                w.cancel(99)  // unknown: no answer
                await w.wait { $0.contains { $0.watchID == 1 && $0.canceled } }
                _ = try await kv.put(put("b", "late"))                   // 9: watcher 1 is gone
                var compact = Etcdserverpb_CompactionRequest()
                compact.revision = 5
                _ = try await kv.compact(compact)
                w.create("a", start: 3)                                  // 4: compacted → canceled
                w.create("b", start: 6, prevKV: true)                    // 5: history after the compaction
                await w.wait { responses in
                    responses.contains { $0.watchID == 4 && $0.compactRevision != 0 }
                        && responses.contains { $0.watchID == 5 && $0.events.contains { $0.kv.modRevision == 9 } }
                }
                try await Task.sleep(for: .milliseconds(300))  // anything extra would arrive now
                return transcript(w.responses)
            }
        }
    }

    @Test(.enabled(if: etcdInstalled, "needs etcd (apt-get install etcd-server)"))
    func watchersSeeWhatEtcdsSee() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let etcd = try ServerProcess(executable: which("etcd")!)
        defer { etcd.stop(); etcd.dataDir.cleanup() }
        let expected = try await scenario(port: etcd.clientPort)
        let actual = try await scenario(port: lite.clientPort)
        if ProcessInfo.processInfo.environment["ETCDLITE_TEST_VERBOSE"] != nil { print(expected.sorted { $0.key < $1.key }) }
        for id in Set(expected.keys).union(actual.keys).sorted() {
            #expect(actual[id] == expected[id], "watch \(id)")
        }
        // The rules themselves, on etcd's own answers: a DELETE's kv is key and revision only.
        #expect(expected[3] == ["created rev=3", "DELETE xy= c0 m8 v0 l0 prev=[xy=1 c6 m6 v1 l0]"])
        #expect(expected[-1]?.contains("created canceled reason=mvcc: duplicate watch ID provided on the WatchStream rev=3") == true)
    }

    /// etcdctl watch: history, --prev-kv, --prefix, and a compacted start revision.
    @Test(.enabled(if: etcdInstalled, "needs etcd and etcdctl"))
    func etcdctlWatchPrintsWhatItPrintsForEtcd() throws {
        func session(_ server: ServerProcess) throws -> [String] {
            for (key, value) in [("a", "1"), ("ab", "2"), ("a", "3"), ("b", "4")] { _ = try server.etcdctl(["put", key, value]) }
            _ = try server.etcdctl(["del", "ab"])
            var out: [String] = []
            for arguments in [["watch", "--rev=1", "--prefix", "a"], ["watch", "--rev=2", "--prev-kv", "a"],
                              ["watch", "--rev=1", "a", "b", "-w", "json"], ["watch", "--rev=3", "--prefix", "", "--prev-kv", "-w", "json"]] {
                // A watch runs until stopped: give it a moment, then stop it.
                let result = try run(etcdctlPath(), ["--endpoints=\(server.endpoint)"] + arguments, environment: ["ETCDCTL_API": "3"], timeout: 1.5)
                out.append(DifferentialTests.normalize(result.stdout))
            }
            _ = try server.etcdctl(["compaction", "4"])
            let compacted = try run(etcdctlPath(), ["--endpoints=\(server.endpoint)", "watch", "--rev=2", "a"], environment: ["ETCDCTL_API": "3"], timeout: 3)
            out.append("\(compacted.stdout) \(DifferentialTests.clean(compacted.stderr))")
            return out
        }
        let expected = try expectSameAsEtcd(session)
        #expect(expected.last!.contains("compacted"))
    }

    @Test func progressRequestsAndNotifications() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary(), extra: ["--experimental-watch-progress-notify-interval", "500ms"])
        defer { lite.stop(); lite.dataDir.cleanup() }
        try await withClient(port: lite.clientPort) { client in
            let kv = Etcdserverpb_KV.Client(wrapping: client)
            for i in 0..<300 { _ = try await kv.put(put("p\(i % 7)", String(repeating: "v", count: 2000))) }
            try await withWatchSession(client) { w in
                // No watchers: a progress request has no one to answer (as etcd 3.5).
                w.requestProgress()
                w.create("p", prefixEnd("p"), progressNotify: true)      // 0: synced
                w.create("p", prefixEnd("p"), start: 1)                  // 1: reads 300 revisions of history
                w.requestProgress()
                let seen = await w.wait { $0.contains { $0.watchID == -1 } }
                let progress = seen.firstIndex { $0.watchID == -1 }!
                // Answered once, after watcher 1 caught up, with the current revision.
                #expect(seen[..<progress].flatMap(\.events).count == 300)
                #expect(seen[progress].header.revision == 301 && seen[progress].events.isEmpty)
                // Periodic notifications for the idle watcher that asked for them, not for the other.
                let notified = await w.wait { $0.filter { $0.watchID == 0 && $0.events.isEmpty && !$0.created }.count >= 2 }
                #expect(notified.filter { $0.watchID == 0 && $0.events.isEmpty && !$0.created }.allSatisfy { $0.header.revision == 301 })
                #expect(!notified.contains { $0.watchID == 1 && $0.events.isEmpty && !$0.created })
                #expect(notified.filter { $0.watchID == -1 }.count == 1)
            }
        }
    }

    @Test func fragmentsSplitLargeRevisionsForWatchersThatAsk() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary(), extra: ["--max-request-bytes", "65536"])
        defer { lite.stop(); lite.dataDir.cleanup() }
        try await withClient(port: lite.clientPort) { client in
            let kv = Etcdserverpb_KV.Client(wrapping: client)
            try await withWatchSession(client) { w in
                w.create("f", prefixEnd("f"), prevKV: true, fragment: true)  // 0
                w.create("f", prefixEnd("f"), prevKV: true)                  // 1
                await w.wait { $0.filter(\.created).count == 2 }
                // Each request stays under the limit; the second revision's events with their
                // previous values do not.
                let value = String(repeating: "x", count: 6_000)
                _ = try await kv.txn(txn((0..<10).map { op(put("f\($0)", value)) }))  // 2
                _ = try await kv.txn(txn((0..<10).map { op(put("f\($0)", value)) }))  // 3
                let seen = await w.wait { responses in
                    responses.filter { $0.watchID == 0 }.flatMap(\.events).count == 20
                        && responses.filter { $0.watchID == 1 }.flatMap(\.events).count == 20
                }
                let pieces = seen.filter { $0.watchID == 0 && $0.events.contains { $0.kv.modRevision == 3 } }
                #expect(pieces.count > 1)
                #expect(pieces.dropLast().allSatisfy(\.fragment) && !pieces.last!.fragment)
                #expect(pieces.flatMap(\.events).map(\.kv.key) == (0..<10).map { Data("f\($0)") })
                #expect(pieces.allSatisfy { (try? $0.serializedBytes() as [UInt8])!.count < 65_536 })
                #expect(seen.filter { $0.watchID == 0 && $0.events.contains { $0.kv.modRevision == 2 } }.count == 1)
                #expect(seen.filter { $0.watchID == 1 && $0.events.contains { $0.kv.modRevision == 3 } }.count == 1)
                #expect(!seen.contains { $0.watchID == 1 && $0.fragment })
            }
        }
    }

    /// A client that stops sending (half-close) still gets events until it cancels, as from etcd.
    @Test func aHalfClosedStreamKeepsDeliveringEvents() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        try await withClient(port: lite.clientPort) { client in
            try await withWatchSession(client) { w in
                w.create("h")
                await w.wait { $0.contains(where: \.created) }
                w.finishSending()
                try await Task.sleep(for: .milliseconds(200))
                _ = try await Etcdserverpb_KV.Client(wrapping: client).put(put("h", "1"))
                let seen = await w.wait { $0.flatMap(\.events).count == 1 }
                #expect(seen.flatMap(\.events).count == 1)
                #expect(w.endStatus.withLock { $0 } == nil)
            }
        }
    }

    @Test func hasLeaderMetadataAndManyStreams() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        try await withClient(port: lite.clientPort) { client in
            let kv = Etcdserverpb_KV.Client(wrapping: client)
            var metadata = Metadata()
            metadata.addString("true", forKey: "hasleader")
            try await withWatchSession(client, metadata: metadata) { first in
                try await withWatchSession(client) { second in
                    for n in 0..<50 { first.create("k\(n)") }
                    second.create("k", prefixEnd("k"), prevKV: true)
                    await first.wait { $0.filter(\.created).count == 50 }
                    await second.wait { $0.filter(\.created).count == 1 }
                    for n in 0..<50 { _ = try await kv.put(put("k\(n)", "\(n)")) }
                    for n in 0..<50 { _ = try await kv.put(put("k\(n)", "again")) }
                    let seen = await first.wait { $0.flatMap(\.events).count == 100 }
                    for n in 0..<50 {
                        #expect(first.events(of: Int64(n)).map { String(decoding: $0.kv.value, as: UTF8.self) } == ["\(n)", "again"])
                    }
                    #expect(seen.flatMap(\.events).count == 100)
                    let all = await second.wait { $0.flatMap(\.events).count == 100 }.flatMap(\.events)
                    #expect(all.map(\.kv.modRevision) == Array(2...101))
                    #expect(all[50...].allSatisfy { $0.hasPrevKv && $0.prevKv.modRevision == $0.kv.modRevision - 50 })
                    #expect(first.endStatus.withLock { $0 } == nil)
                }
            }
        }
    }
}
