import Foundation
import Testing
@testable import EtcdLiteVerify

/// The checks of `etcdlite verify`, each shown to fail on a history that is wrong.
@Suite struct VerifyCheckerTests {
    static func put(_ key: String, _ value: String, at revision: Int64, version: Int64, created: Int64,
                    prev: (String, Int64)? = nil) -> WatchedEvent {
        WatchedEvent(key: key, isPut: true, value: value, modRevision: revision, createRevision: created, version: version,
                     prevValue: prev?.0, prevModRevision: prev?.1 ?? 0)
    }

    static func delete(_ key: String, at revision: Int64, prev: (String, Int64)?) -> WatchedEvent {
        WatchedEvent(key: key, isPut: false, value: "", modRevision: revision, createRevision: 0, version: 0,
                     prevValue: prev?.0, prevModRevision: prev?.1 ?? 0)
    }

    /// a=1 @2, b=x @3, a=2 @4, delete a @5, a=3 @6.
    static let good: [WatchedEvent] = [
        put("a", "1", at: 2, version: 1, created: 2),
        put("b", "x", at: 3, version: 1, created: 3),
        put("a", "2", at: 4, version: 2, created: 2, prev: ("1", 2)),
        delete("a", at: 5, prev: ("2", 4)),
        put("a", "3", at: 6, version: 1, created: 6),
    ]

    @Test func aConsistentReferencePasses() {
        #expect(VerifyCheckers.checkReference(Self.good).isEmpty)
    }

    @Test func theReferenceCheckFindsWrongVersionsPrevKVsAndOrder() {
        var wrongVersion = Self.good
        wrongVersion[2].version = 3
        #expect(!VerifyCheckers.checkReference(wrongVersion).isEmpty)
        var wrongPrev = Self.good
        wrongPrev[3].prevValue = "1"
        #expect(!VerifyCheckers.checkReference(wrongPrev).isEmpty)
        var missingPrev = Self.good
        missingPrev[2].prevValue = nil
        #expect(!VerifyCheckers.checkReference(missingPrev).isEmpty)
        var recreatedKeepsVersion = Self.good
        recreatedKeepsVersion[4].version = 3
        #expect(!VerifyCheckers.checkReference(recreatedKeepsVersion).isEmpty)
        var backwards = Self.good
        backwards.swapAt(1, 2)
        #expect(!VerifyCheckers.checkReference(backwards).isEmpty)
    }

    @Test func durabilityFindsAnAcknowledgedWriteMissingOrDifferent() {
        let acknowledged = [
            AcknowledgedWrite(key: "a", kind: .put, value: "2", revision: 4),
            AcknowledgedWrite(key: "a", kind: .delete, value: "", revision: 5),
        ]
        #expect(VerifyCheckers.checkDurability(acknowledged, reference: Self.good).isEmpty)
        #expect(VerifyCheckers.checkDurability([AcknowledgedWrite(key: "a", kind: .put, value: "9", revision: 4)], reference: Self.good).count == 1)
        #expect(VerifyCheckers.checkDurability([AcknowledgedWrite(key: "b", kind: .put, value: "x", revision: 7)], reference: Self.good).count == 1)
        #expect(VerifyCheckers.checkDurability([AcknowledgedWrite(key: "a", kind: .delete, value: "", revision: 4)], reference: Self.good).count == 1)
    }

    @Test func aWatcherThatResumesRightAfterItsLastEventPasses() {
        let sessions = [
            WatchStreamRecord(member: 0, start: 2, events: Array(Self.good[0..<2])),
            WatchStreamRecord(member: 1, start: 4, events: []),  // a stream that saw nothing
            WatchStreamRecord(member: 2, start: 4, events: Array(Self.good[2...])),
        ]
        #expect(VerifyCheckers.checkWatcher(sessions, reference: Self.good, through: 6, name: "w").isEmpty)
    }

    @Test func theWatchCheckFindsGapsDuplicatesWrongResumesAndStalls() {
        let gap = [WatchStreamRecord(member: 0, start: 2, events: [Self.good[0], Self.good[2]])]
        #expect(!VerifyCheckers.checkWatcher(gap, reference: Self.good, through: 0, name: "w").isEmpty)
        let duplicate = [WatchStreamRecord(member: 0, start: 2, events: [Self.good[0], Self.good[0]])]
        #expect(!VerifyCheckers.checkWatcher(duplicate, reference: Self.good, through: 0, name: "w").isEmpty)
        var altered = Self.good[0]
        altered.value = "other"
        #expect(!VerifyCheckers.checkWatcher([WatchStreamRecord(member: 0, start: 2, events: [altered])], reference: Self.good, through: 0, name: "w").isEmpty)
        var noPrev = Self.good[2]
        noPrev.prevValue = nil
        #expect(!VerifyCheckers.checkWatcher([WatchStreamRecord(member: 0, start: 4, events: [noPrev])], reference: Self.good, through: 0, name: "w").isEmpty)
        let skippedResume = [
            WatchStreamRecord(member: 0, start: 2, events: [Self.good[0]]),
            WatchStreamRecord(member: 1, start: 4, events: Array(Self.good[2...])),
        ]
        #expect(!VerifyCheckers.checkWatcher(skippedResume, reference: Self.good, through: 6, name: "w").isEmpty)
        let stalled = [WatchStreamRecord(member: 0, start: 2, events: Array(Self.good[0..<3]))]
        #expect(!VerifyCheckers.checkWatcher(stalled, reference: Self.good, through: 6, name: "w").isEmpty)
        #expect(VerifyCheckers.checkWatcher(stalled, reference: Self.good, through: 4, name: "w").isEmpty)
    }

    @Test func aKeptAliveLeaseMayNotExpireBeforeItsLastRenewalRunsOut() {
        let renewals = [
            VerifyCheckers.KeepAlive(invoked: 1, returned: 1.1, ttl: 10),
            VerifyCheckers.KeepAlive(invoked: 2, returned: 2.1, ttl: 10),
        ]
        let early = renewals + [VerifyCheckers.KeepAlive(invoked: 7, returned: 7.1, ttl: 0)]
        #expect(VerifyCheckers.checkKeepAlives(early, granted: 0, ttl: 10).count == 1)
        let late = renewals + [VerifyCheckers.KeepAlive(invoked: 13, returned: 13.1, ttl: 0)]
        #expect(VerifyCheckers.checkKeepAlives(late, granted: 0, ttl: 10).isEmpty)
    }
}

/// `etcdlite verify` as users run it: three members under every kind of fault. It loads both
/// cores for minutes, so it runs on its own after the other tests (scripts/verify-and-fuzz.sh sets
/// ETCDLITE_VERIFY_SECONDS); timing-sensitive tests beside it would fail for want of CPU.
@Suite(.serialized) struct VerifyRunTests {
    static let seconds = ProcessInfo.processInfo.environment["ETCDLITE_VERIFY_SECONDS"].flatMap(Double.init)

    @Test(.enabled(if: seconds != nil, "run by scripts/verify-and-fuzz.sh on its own (ETCDLITE_VERIFY_SECONDS)"), .timeLimit(.minutes(10)))
    func threeMembersUnderEveryFaultLoseNothingAndStayLinearizable() throws {
        // A different seed each day (printed with the report, so a failure can be replayed).
        let seed = Int(Date().timeIntervalSince1970 / 86_400) % 1_000 + 1
        let seconds = Self.seconds ?? 120
        let result = try run(etcdliteBinary(), ["verify", "--members", "3", "--duration", "\(Int(seconds))", "--seed", "\(seed)", "--json"],
                             timeout: seconds + 240)
        print("etcdlite verify --seed \(seed):\n\(result.stdout)\n\(result.stderr.suffix(2_000))")
        let report = try JSONDecoder().decode(Verifier.Report.self, from: Data(result.stdout.utf8))
        // Safety and availability: every heal is followed by a healthy cluster within 30 s.
        #expect(report.passed, "violations: \(report.violations)")
        #expect(report.unhealthyAfterHeal == 0)
        #expect(report.linearizabilityAnomalies == 0 && report.acknowledgedWritesLost == 0 && report.watchViolations == 0)
        #expect(report.leaseViolations == 0 && report.hashMismatches == 0 && report.phantomReads == 0)
        // Where root and iproute2 are, the members ran in network namespaces; only netem's faults
        // may be missing there (kernels without the module).
        if geteuid() == 0 && NetworkNamespaces.tool("ip") != nil {
            #expect(report.network == "netns")
            #expect(Set(report.faultsUnavailable.keys).isSubset(of: ["delay", "loss", "reorder"]), "\(report.faultsUnavailable)")
        }
        // The run did what it says: every fault kind it could make (the first round takes each
        // once), and real work checked.
        for fault in Verifier.Fault.allCases where report.faultsUnavailable[fault.rawValue] == nil {
            #expect(report.faultsInjected[fault.rawValue, default: 0] > 0, "\(fault.rawValue) was never injected")
        }
        #expect(report.operationsChecked > 1_000)
        #expect(report.acknowledgedWrites > 500)
        #expect(report.watchEventsChecked > 500)
        #expect(report.expiringLeasesChecked > 5)
        #expect(report.readBacksPerMember > 100)
        // The tests run a debug binary: its storage failpoints are there, and a failing fdatasync stops a member.
        #expect(report.failpointsUnavailable == 0)
        #expect(report.stoppedOnSyncFailure > 0)
    }
}

/// Members in network namespaces: a link blocked in the kernel (a blackhole route) cuts what it
/// must. Root with iproute2 only.
@Suite(.serialized) struct NetworkNamespaceTests {
    @Test(.enabled(if: geteuid() == 0 && NetworkNamespaces.available(), "needs root and iproute2"), .timeLimit(.minutes(3)))
    func aLeaderCutOffInItsNamespaceIsReplacedAndRejoins() async throws {
        let namespaces = try NetworkNamespaces(members: 3)
        defer { namespaces.tearDown() }
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-netns-test-\(getpid())")
        defer { try? FileManager.default.removeItem(at: dir) }
        let cluster = try VerifyCluster(binary: etcdliteBinary(), directory: dir, members: 3, token: "netns-test", namespaces: namespaces, log: { _ in })
        do {
            try await cluster.start()
            #expect(cluster.slots.map(\.host) == (0..<3).map(namespaces.address))
            #expect(await cluster.waitHealthy(timeout: 30))
            let old = try #require(await cluster.leader())
            let oldID = try await cluster.status(old).header.memberID
            // Cut the leader off both ways, in the kernel.
            var links = Set<LinkTable.Link>()
            for other in 0..<3 where other != old {
                links.insert(.init(from: old, to: other))
                links.insert(.init(from: other, to: old))
            }
            cluster.links.block(links)
            // The two others elect one of themselves; the cut-off member cannot reach them.
            let others = (0..<3).filter { $0 != old }
            var newLeader: UInt64 = 0
            for _ in 0..<150 {
                let leaders = await Set(others.asyncMap { (try? await cluster.status($0).leader) ?? 0 })
                if leaders.count == 1, let leader = leaders.first, leader != 0, leader != oldID { newLeader = leader; break }
                try await Task.sleep(for: .milliseconds(100))
            }
            #expect(newLeader != 0, "the majority elected a new leader")
            // Healed, the three agree on one leader again.
            cluster.links.healAll()
            #expect(await cluster.waitHealthy(timeout: 30))
        } catch {
            await cluster.stopAll()
            throw error
        }
        await cluster.stopAll()
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var results: [T] = []
        for element in self { results.append(try await transform(element)) }
        return results
    }
}
