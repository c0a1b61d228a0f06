import Foundation
import GRPCCore
import Testing
@testable import EtcdLite
import EtcdLiteProto

/// What an RPC answered, in words: the message or the error's code and text.
func outcome<T: Sendable>(_ body: () async throws -> T, _ text: (T) -> String) async -> String {
    do {
        return text(try await body())
    } catch let error as RPCError {
        return "error \(error.code): \(error.message)"
    } catch {
        return "error \(error)"
    }
}

@Suite(.serialized, .timeLimit(.minutes(3))) struct LeaseTests {
    func grant(_ id: Int64, _ ttl: Int64) -> Etcdserverpb_LeaseGrantRequest {
        var r = Etcdserverpb_LeaseGrantRequest()
        r.id = id
        r.ttl = ttl
        return r
    }

    func timeToLive(_ id: Int64, keys: Bool = false) -> Etcdserverpb_LeaseTimeToLiveRequest {
        var r = Etcdserverpb_LeaseTimeToLiveRequest()
        r.id = id
        r.keys = keys
        return r
    }

    func revoke(_ id: Int64) -> Etcdserverpb_LeaseRevokeRequest {
        var r = Etcdserverpb_LeaseRevokeRequest()
        r.id = id
        return r
    }

    /// Sends keep-alives for `ids` on one stream and returns "ID TTL" per answer.
    func keepAlive(_ client: Client, _ ids: [Int64]) async throws -> [String] {
        try await Etcdserverpb_Lease.Client(wrapping: client).leaseKeepAlive(
            request: StreamingClientRequest { writer in
                for id in ids {
                    var r = Etcdserverpb_LeaseKeepAliveRequest()
                    r.id = id
                    try await writer.write(r)
                }
            }
        ) { response in
            var answers: [String] = []
            for try await message in response.messages { answers.append("\(message.id) \(message.ttl)") }
            return answers
        }
    }

    /// Every lease rule that does not depend on time, then an expiry watched end to end.
    func scenario(port: Int) async throws -> [String] {
        try await withClient(port: port) { client in
            let lease = Etcdserverpb_Lease.Client(wrapping: client)
            let kv = Etcdserverpb_KV.Client(wrapping: client)
            var log: [String] = []
            func record(_ step: String, _ text: String) { log.append("\(step): \(text)") }
            record("grant", await outcome({ try await lease.leaseGrant(grant(100, 60)) }) { "\($0.id) \($0.ttl) \($0.error) rev=\($0.header.revision)" })
            record("grant again", await outcome({ try await lease.leaseGrant(grant(100, 60)) }) { "\($0.id)" })
            record("grant short", await outcome({ try await lease.leaseGrant(grant(101, 1)) }) { "\($0.id) \($0.ttl)" })
            // Revoked at once, its answer not compared: on a loaded machine the 2 s lease may already
            // have expired (either store then answers "requested lease not found").
            _ = try? await lease.leaseRevoke(revoke(101))
            record("grant huge", await outcome({ try await lease.leaseGrant(grant(102, 9_000_000_001)) }) { "\($0.id) \($0.ttl)" })
            record("grant max", await outcome({ try await lease.leaseGrant(grant(103, 9_000_000_000)) }) { "\($0.id) \($0.ttl)" })
            let chosen = try await lease.leaseGrant(grant(0, 30))
            record("server-chosen id", "\(chosen.id > 0) \(chosen.ttl)")
            for (key, id) in [("k1", 100), ("k2", 100), ("k3", 103), ("k4", 555)] {
                record("put \(key)", await outcome({ try await kv.put(put(key, "v", lease: Int64(id))) }) { "rev=\($0.header.revision)" })
            }
            var ignoreLease = put("k1", "w")
            ignoreLease.ignoreLease = true
            record("put ignore lease", await outcome({ try await kv.put(ignoreLease) }) { "rev=\($0.header.revision)" })
            record("txn with unknown lease", await outcome({
                var t = Etcdserverpb_TxnRequest()
                t.success = [op(put("k5", "v", lease: 777))]
                return try await kv.txn(t)
            }) { "\($0.succeeded)" })
            record("ttl", await outcome({ try await lease.leaseTimeToLive(timeToLive(100, keys: true)) }) {
                "\($0.id) ttl>=50:\($0.ttl >= 50 && $0.ttl <= 60) granted=\($0.grantedTtl) keys=\($0.keys.map { String(decoding: $0, as: UTF8.self) }.sorted())"
            })
            record("ttl no keys", await outcome({ try await lease.leaseTimeToLive(timeToLive(100)) }) { "keys=\($0.keys.count)" })
            record("ttl unknown", await outcome({ try await lease.leaseTimeToLive(timeToLive(999)) }) { "\($0.id) \($0.ttl) \($0.grantedTtl)" })
            record("leases", await outcome({ try await lease.leaseLeases(Etcdserverpb_LeaseLeasesRequest()) }) {
                "\($0.leases.map(\.id).filter { $0 < 1000 }.sorted())"
            })
            record("keepalive", try await keepAlive(client, [100, 999, 101]).joined(separator: ", "))
            record("keepalive none", try await keepAlive(client, []).joined(separator: ", "))
            // A revoke deletes the lease's keys in one revision.
            let watched = try await withWatchSession(client) { w in
                w.create("k", prefixEnd("k"), prevKV: true)
                await w.wait { $0.contains(where: \.created) }
                record("revoke", await outcome({ try await lease.leaseRevoke(revoke(100)) }) { "rev=\($0.header.revision)" })
                record("revoke again", await outcome({ try await lease.leaseRevoke(revoke(100)) }) { "rev=\($0.header.revision)" })
                record("revoke keyless", await outcome({ try await lease.leaseRevoke(revoke(chosen.id)) }) { "rev=\($0.header.revision)" })
                record("get after revoke", await outcome({ try await kv.range(range("k", prefixEnd("k"))) }) { keys($0).joined(separator: ",") })
                // A short lease expires by itself: its key goes with a DELETE event. (6 s: long enough
                // for the put that follows even on a machine busy with other tests.)
                record("grant expiring", await outcome({ try await lease.leaseGrant(grant(104, 6)) }) { "\($0.id) \($0.ttl)" })
                record("put k6", await outcome({ try await kv.put(put("k6", "v", lease: 104)) }) { "rev=\($0.header.revision)" })
                let seen = await w.wait(timeout: .seconds(20)) { $0.flatMap(\.events).contains { $0.type == .delete && $0.kv.key == Data("k6") } }
                return seen.flatMap(\.events).map(describe)
            }
            log += watched
            record("get after expiry", await outcome({ try await kv.range(range("k", prefixEnd("k"))) }) { keys($0).joined(separator: ",") })
            record("ttl expired", await outcome({ try await lease.leaseTimeToLive(timeToLive(104)) }) { "\($0.id) \($0.ttl)" })
            record("keepalive expired", try await keepAlive(client, [104]).joined(separator: ", "))
            return log
        }
    }

    @Test(.enabled(if: etcdInstalled, "needs etcd (apt-get install etcd-server)"))
    func leasesBehaveAsEtcds() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let etcd = try ServerProcess(executable: which("etcd")!)
        defer { etcd.stop(); etcd.dataDir.cleanup() }
        async let expected = scenario(port: etcd.clientPort)
        async let actual = scenario(port: lite.clientPort)
        let (e, a) = try await (expected, actual)
        #expect(a == e)
        #expect(e.contains("grant again: error failedPrecondition: etcdserver: lease already exists"))
        #expect(e.contains { $0.hasPrefix("DELETE k6= c0") && $0.hasSuffix("v1 l104]") }, "etcd expired lease 104")
    }

    /// etcdctl's lease commands print the same on both (lease IDs aside).
    @Test(.enabled(if: etcdInstalled, "needs etcd and etcdctl"))
    func etcdctlLeaseCommands() throws {
        func session(_ server: ServerProcess) throws -> [String] {
            let granted = try server.etcdctl(["lease", "grant", "100"]).stdout
            let id = granted.split(separator: " ")[1]
            var out = [granted]
            for arguments in [["put", "a", "1", "--lease=\(id)"], ["put", "b", "2", "--lease=\(id)"],
                              ["lease", "timetolive", String(id)], ["lease", "timetolive", String(id), "--keys", "-w", "json"],
                              ["lease", "list"], ["lease", "keep-alive", "--once", String(id)],
                              ["lease", "revoke", String(id)], ["lease", "revoke", String(id)],
                              ["lease", "timetolive", String(id)], ["get", "a", "--from-key"], ["lease", "list"],
                              ["lease", "keep-alive", "--once", "1234"], ["put", "c", "1", "--lease=1234"]] {
                let result = try server.etcdctl(arguments)
                out.append("\(arguments.first!) \(arguments.dropFirst().first ?? ""): \(result.status) \(result.stdout) \(DifferentialTests.clean(result.stderr))")
            }
            return out.map { text in
                // Remaining seconds tick; ids differ between servers. The JSON lease id goes first:
                // a random id of 14–16 decimal digits would otherwise pass for a hex id (HEXID).
                let ids = text.replacingOccurrences(of: String(id), with: "LEASEID")
                    .replacingOccurrences(of: #"\"id\":\d+"#, with: "\"id\":ID", options: .regularExpression)
                return sortedKeyLists(DifferentialTests.normalize(ids))
                    .replacingOccurrences(of: #"remaining\(\d+s\)"#, with: "remaining(Ns)", options: .regularExpression)
                    .replacingOccurrences(of: #"\"ttl\":\d+"#, with: "\"ttl\":N", options: .regularExpression)
            }
        }
        try expectSameAsEtcd(session)
    }

    /// etcd lists a lease's keys in map order; compare them as sets.
    func sortedKeyLists(_ text: String) -> String {
        var out = text
        for pattern in [#"\"keys\":\[([^\]]*)\]"#, #"attached keys\(\[([^\]]*)\]\)"#] {
            let regex = try! NSRegularExpression(pattern: pattern)
            for match in regex.matches(in: out, range: NSRange(out.startIndex..., in: out)).reversed() {
                let inner = Range(match.range(at: 1), in: out)!
                let separator = out[inner].contains(",") ? "," : " "
                let sorted = out[inner].split(separator: Character(separator)).sorted().joined(separator: separator)
                out.replaceSubrange(inner, with: sorted)
            }
        }
        return out
    }

    @Test func leasesSurviveRestartWithRenewedClocks() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        var lite = try ServerProcess(executable: etcdliteBinary(), dataDir: dir)
        let port = lite.clientPort
        try await withClient(port: port) { client in
            let lease = Etcdserverpb_Lease.Client(wrapping: client)
            _ = try await lease.leaseGrant(grant(7, 40))
            _ = try await lease.leaseGrant(grant(8, 8))
            _ = try await Etcdserverpb_KV.Client(wrapping: client).put(put("long", "1", lease: 7))
            _ = try await Etcdserverpb_KV.Client(wrapping: client).put(put("short", "1", lease: 8))
        }
        // Half the short lease's TTL (with margin for a loaded machine: with TTL 4 and 2.5 s, a
        // CI run once killed the member after the lease had already expired).
        try await Task.sleep(for: .seconds(4))
        lite.kill()  // no graceful shutdown: the grant and puts come back from the log or the store
        let restarting = ContinuousClock.now
        lite = try ServerProcess(executable: etcdliteBinary(), dataDir: dir, clientPort: port)
        defer { lite.stop() }
        try await withClient(port: port) { client in
            let lease = Etcdserverpb_Lease.Client(wrapping: client)
            let long = try await lease.leaseTimeToLive(timeToLive(7, keys: true))
            // Renewed in full at the restart: at least 40 s less the time the restart took (a busy
            // machine makes that seconds); a clock that went on would show at most 37.5 s less it.
            let took = Int64((ContinuousClock.now - restarting).components.seconds)
            #expect(long.grantedTtl == 40 && long.ttl >= 40 - took - 1 && long.keys == [Data("long")], "\(long) after \(took) s")
            // The short lease had about 4 s left; its clock restarted in full (8 s), so its key is
            // still there now, with more time left than the old clock had…
            let short = try await lease.leaseTimeToLive(timeToLive(8, keys: true))
            #expect(short.ttl >= min(5, 8 - took - 1) && short.keys == [Data("short")], "\(short) after \(took) s")
            // …and goes once the full TTL has passed.
            let deadline = ContinuousClock.now + .seconds(15)
            var left = 1
            while left > 0 && ContinuousClock.now < deadline {
                left = try await Etcdserverpb_KV.Client(wrapping: client).range(range("short")).kvs.count
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(left == 0)
            #expect(try await Etcdserverpb_KV.Client(wrapping: client).range(range("long")).kvs.count == 1)
        }
    }

    /// A revoke finds the lease's keys through the partial index, not by scanning every revision.
    @Test func attachedKeysAreFoundThroughTheLeaseIndex() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let server = try makeServer(dir)
        defer { server.close() }
        let plan = try server.backend.withReader { connection -> [String] in
            let statement = try connection.prepared("EXPLAIN QUERY PLAN " + StateMachine.attachedKeysSQL)
            statement.bind(1, Int64(7))
            defer { statement.reset() }
            var details: [String] = []
            while try statement.step() { details.append(statement.text(3)) }
            return details
        }
        #expect(plan.contains { $0.contains("USING INDEX revs_by_lease") }, "\(plan)")
        #expect(!plan.contains { $0.hasPrefix("SCAN r") }, "\(plan)")
    }

    @Test func lessorHandsOutEachExpiredLeaseOnceUntilItsRetry() async throws {
        let lessor = Lessor()
        lessor.granted(1, ttl: 0)
        lessor.granted(2, ttl: 0)
        lessor.granted(3, ttl: 60)
        try await Task.sleep(for: .milliseconds(5))
        #expect(lessor.expired(limit: 1).count == 1)
        #expect(lessor.expired(limit: 10).count == 1)  // the other one; the first waits for its retry
        #expect(lessor.expired(limit: 10).isEmpty)
        #expect(lessor.renew(1) == nil && lessor.renew(3) == 60)
        lessor.revoked(1)
        #expect(lessor.ids == [2, 3] && lessor.timeToLive(1) == nil)
        lessor.renewAll()
        #expect(lessor.expired(limit: 10) == [2])  // TTL 0 is due again at once
    }
}
