import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Testing
import EtcdLiteProto

/// kube-apiserver's storage layer (k8s.io/apiserver/pkg/storage/etcd3) replayed against etcd 3.4
/// and etcdlite: the same requests, answer by answer.
@Suite(.serialized, .timeLimit(.minutes(3)), .enabled(if: etcdInstalled, "needs etcd (apt-get install etcd-server)"))
struct KubeStoragePatternTests {
    struct Store {
        let kv: Etcdserverpb_KV.Client<HTTP2ClientTransport.Posix>
        let lease: Etcdserverpb_Lease.Client<HTTP2ClientTransport.Posix>

        func modRevisionIs(_ key: String, _ revision: Int64) -> Etcdserverpb_Compare {
            compare(key, .mod, .equal, revision)
        }

        /// create: Txn(mod_revision(key) = 0 → Put [lease]).
        func create(_ key: String, _ value: String, lease: Int64 = 0) async throws -> String {
            var txn = Etcdserverpb_TxnRequest()
            txn.compare = [modRevisionIs(key, 0)]
            txn.success = [op(put(key, value, lease: lease))]
            let r = try await kv.txn(txn)
            return "create \(key): succeeded=\(r.succeeded) rev=\(r.header.revision)"
        }

        /// GuaranteedUpdate: Txn(mod = rev → Put, else Range).
        func update(_ key: String, _ value: String, expecting revision: Int64) async throws -> String {
            var txn = Etcdserverpb_TxnRequest()
            txn.compare = [modRevisionIs(key, revision)]
            txn.success = [op(put(key, value))]
            txn.failure = [op(range(key))]
            let r = try await kv.txn(txn)
            let current = r.succeeded ? "" : r.responses.first.map { " current=\($0.responseRange.kvs.map(describe))" } ?? ""
            return "update \(key)@\(revision): succeeded=\(r.succeeded) rev=\(r.header.revision)\(current)"
        }

        /// Delete with a precondition: Txn(mod = rev → DeleteRange, else Range).
        func delete(_ key: String, expecting revision: Int64) async throws -> String {
            var txn = Etcdserverpb_TxnRequest()
            txn.compare = [modRevisionIs(key, revision)]
            var delete = deleteRange(key)
            delete.prevKv = true
            txn.success = [op(delete)]
            txn.failure = [op(range(key))]
            let r = try await kv.txn(txn)
            return "delete \(key)@\(revision): succeeded=\(r.succeeded) rev=\(r.header.revision) \(r.responses.map { $0.responseDeleteRange.prevKvs.map(describe) + $0.responseRange.kvs.map(describe) })"
        }

        /// A paginated list: limit, a revision pinned by the first page, continue from the last key.
        func list(_ prefix: String, limit: Int64) async throws -> (String, Int64) {
            var pages: [String] = []
            var request = range(prefix, prefixEnd(prefix), limit: limit)
            var pinned: Int64 = 0
            while true {
                request.revision = pinned
                let r = try await kv.range(request)
                if pinned == 0 { pinned = r.header.revision }
                pages.append("[\(keys(r).joined(separator: ",")) more=\(r.more) count=\(r.count) rev=\(r.header.revision)]")
                guard r.more, let last = r.kvs.last else { break }
                request.key = last.key + Data([0])
            }
            return ("list \(prefix) limit \(limit): \(pages.joined(separator: " "))", pinned)
        }

        func count(_ prefix: String) async throws -> String {
            var request = range(prefix, prefixEnd(prefix))
            request.countOnly = true
            let r = try await kv.range(request)
            return "count \(prefix): \(r.count) kvs=\(r.kvs.count) rev=\(r.header.revision)"
        }

        /// The compactor: Txn(version(compact_rev_key) = t → Put(compact_rev_key, rev), else Get),
        /// then Compact(rev) when the txn won.
        func compact(to revision: Int64, expectVersion version: Int64) async throws -> String {
            var txn = Etcdserverpb_TxnRequest()
            txn.compare = [compare("compact_rev_key", .version, .equal, version)]
            txn.success = [op(put("compact_rev_key", "\(revision)"))]
            txn.failure = [op(range("compact_rev_key"))]
            let r = try await kv.txn(txn)
            var text = "compact txn: succeeded=\(r.succeeded) rev=\(r.header.revision)"
            if r.succeeded {
                var compact = Etcdserverpb_CompactionRequest()
                compact.revision = revision
                let c = try await kv.compact(compact)
                text += " compacted rev=\(c.header.revision)"
            }
            return text
        }
    }

    func scenario(port: Int) async throws -> (log: [String], watch: [Int64: [String]], notifications: Int) {
        try await withClient(port: port) { client in
            let store = Store(kv: Etcdserverpb_KV.Client(wrapping: client), lease: Etcdserverpb_Lease.Client(wrapping: client))
            var log: [String] = []
            for n in 0..<7 { log.append(try await store.create("/registry/pods/default/p\(n)", "pod\(n)")) }
            log.append(try await store.create("/registry/pods/default/p3", "again"))  // AlreadyExists
            log.append(try await store.create("/registry/services/default/s", "svc"))
            let (listed, listRevision) = try await store.list("/registry/pods/", limit: 3)
            log.append(listed)
            log.append(try await store.count("/registry/pods/"))
            return try await withWatchSession(client) { w in
                // The watch cache: one stream, a prefix watch per resource from the list revision.
                w.create("/registry/pods/", prefixEnd("/registry/pods/"), start: listRevision + 1, prevKV: true, progressNotify: true)
                w.create("/registry/services/", prefixEnd("/registry/services/"), start: listRevision + 1, prevKV: true, progressNotify: true)
                w.create("/registry/events/", prefixEnd("/registry/events/"), start: listRevision + 1, prevKV: true, progressNotify: true)
                await w.wait { $0.filter(\.created).count == 3 }
                log.append(try await store.update("/registry/pods/default/p1", "pod1-v2", expecting: 3))
                log.append(try await store.update("/registry/pods/default/p1", "stale", expecting: 3))  // conflict
                log.append(try await store.delete("/registry/pods/default/p2", expecting: 4))
                log.append(try await store.delete("/registry/pods/default/p0", expecting: 99))         // conflict
                // Events share one lease; the lease expires and takes them with it.
                var grant = Etcdserverpb_LeaseGrantRequest()
                grant.ttl = 6
                grant.id = 4242
                let granted = try await store.lease.leaseGrant(grant)
                log.append("lease grant: ttl=\(granted.ttl)")
                for n in 0..<5 { log.append(try await store.create("/registry/events/default/e\(n)", "event\(n)", lease: 4242)) }
                log.append(try await store.count("/registry/events/"))
                let revision = try await store.kv.range(range("/registry/pods/default/p5")).header.revision
                await w.wait { $0.flatMap(\.events).last?.kv.modRevision == revision }
                w.requestProgress()
                await w.wait { $0.contains { $0.watchID == -1 } }
                // Expiry: five DELETE events with their previous values.
                await w.wait(timeout: .seconds(25)) { $0.flatMap(\.events).filter { $0.type == .delete }.count >= 6 }
                log.append(try await store.count("/registry/events/"))
                // The compactor, then a watch that starts below the compaction: the watch cache relists.
                let current = try await store.kv.range(range("/registry/pods/default/p5")).header.revision
                log.append(try await store.compact(to: current - 2, expectVersion: 0))
                log.append(try await store.compact(to: current, expectVersion: 0))  // lost the race
                w.create("/registry/pods/", prefixEnd("/registry/pods/"), start: listRevision + 1, prevKV: true)
                await w.wait { $0.contains { $0.compactRevision != 0 } }
                let (relisted, relistRevision) = try await store.list("/registry/pods/", limit: 2)
                log.append(relisted)
                let createdBefore = w.responses.filter(\.created).count
                w.create("/registry/pods/", prefixEnd("/registry/pods/"), start: relistRevision + 1, prevKV: true)
                // The created answer carries the revision at creation: write only after it, so
                // that both stores answer the same whatever the machine's speed.
                await w.wait { $0.filter(\.created).count > createdBefore }
                log.append(try await store.create("/registry/pods/default/p9", "pod9"))
                await w.wait { $0.contains { $0.watchID == 4 && !$0.events.isEmpty } }
                try await Task.sleep(for: .milliseconds(1_500))  // progress notifications for idle watchers
                let responses = w.responses
                let notifications = responses.filter { $0.watchID >= 0 && $0.events.isEmpty && !$0.created && !$0.canceled }.count
                // Notifications depend on timing; compare everything else.
                let compared = responses.filter { !($0.watchID >= 0 && $0.events.isEmpty && !$0.created && !$0.canceled) }
                return (log, transcript(compared), notifications)
            }
        }
    }

    @Test func kubeApiserverStoragePatternsAnswerAsEtcd() async throws {
        let flags = ["--experimental-watch-progress-notify-interval", "1s"]
        let lite = try ServerProcess(executable: etcdliteBinary(), extra: flags)
        defer { lite.stop(); lite.dataDir.cleanup() }
        let etcd = try ServerProcess(executable: which("etcd")!, extra: flags)
        defer { etcd.stop(); etcd.dataDir.cleanup() }
        async let expected = scenario(port: etcd.clientPort)
        async let actual = scenario(port: lite.clientPort)
        let (e, a) = try await (expected, actual)
        for (expectedLine, actualLine) in zip(e.log, a.log) { #expect(actualLine == expectedLine) }
        #expect(a.log.count == e.log.count)
        for id in Set(e.watch.keys).union(a.watch.keys).sorted() {
            #expect(a.watch[id] == e.watch[id], "watch \(id)")
        }
        #expect(e.watch[2]?.filter { $0.hasPrefix("DELETE") }.count == 5, "etcd expired the events' lease")
        #expect(a.notifications > 0 && e.notifications > 0)
    }
}
