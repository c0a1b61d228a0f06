import EtcdLiteBench
import EtcdLiteClient
import EtcdLiteProto
import Foundation
import NIOCore
import Raft
import Synchronization

/// `etcdlite verify`: real members on loopback, concurrent clients, faults on a schedule, then a
/// final heal and the checks (linearizability, durability on every member, watch invariants,
/// lease semantics, equal hashes).
public struct Verifier: Sendable {
    public enum Fault: String, CaseIterable, Codable, Sendable {
        case kill, killLeader = "kill-leader", pause, pauseLeader = "pause-leader", partition,
             partitionLeader = "partition-leader", asymmetric, bridge, wipe
        /// A member restarted with its log's fdatasync failing after a few syncs (it must stop),
        /// or slow (200 ms each); debug builds only (the failpoints are not in release binaries).
        case fsyncFail = "fsync-fail", fsyncSlow = "fsync-slow"
        /// One member's outgoing traffic delayed, lost or reordered (`tc netem`), or squeezed
        /// through a narrow queueing link (`tc tbf`): members in network namespaces only, netem
        /// only where the kernel has it.
        case delay, loss, reorder, slowLink = "slow-link"

        var needsNamespaces: Bool { [.delay, .loss, .reorder, .slowLink].contains(self) }
        var needsNetem: Bool { [.delay, .loss, .reorder].contains(self) }
    }

    /// Where the members run: each in a network namespace of its own (root with iproute2), or all
    /// on 127.0.0.1 behind fault proxies; `auto` takes namespaces when it can.
    public enum Network: String, CaseIterable, Sendable {
        case auto, netns, proxy
    }

    public var binary: String
    public var members = 3
    public var duration = 60.0
    public var faults: [Fault] = Fault.allCases
    public var network = Network.auto
    public var seed: UInt64 = 1
    public var clients = 6
    /// Operations per second per client (at most).
    public var rate = 60
    public var directory: URL?
    public var log: @Sendable (String) -> Void = { _ in }

    public init(binary: String) { self.binary = binary }

    public struct Report: Codable, Sendable {
        public var members: Int
        public var seconds: Double
        public var seed: UInt64
        public var faultsInjected: [String: Int] = [:]
        /// `netns` or `proxy`.
        public var network = ""
        /// Faults asked for that this machine cannot make, with why.
        public var faultsUnavailable: [String: String] = [:]
        public var operations: [String: Int] = [:]
        public var operationsChecked = 0
        public var unknownOutcomes = 0
        public var linearizabilityAnomalies = 0
        public var undecidedKeys = 0
        public var serializableReadsChecked = 0
        public var phantomReads = 0
        public var acknowledgedWrites = 0
        public var acknowledgedWritesLost = 0
        public var readBacksPerMember = 0
        public var watchers = 0
        public var watchStreams = 0
        public var watchEventsChecked = 0
        public var watchViolations = 0
        public var leaseViolations = 0
        public var expiringLeasesChecked = 0
        public var hashMismatches = 0
        /// Member starts whose `--experimental-initial-corrupt-check` compared hashes with peers and passed.
        public var startupHashChecksPassed = 0
        public var unhealthyAfterHeal = 0
        /// Failpoint faults the binary could not arm (a release build).
        public var failpointsUnavailable = 0
        /// Members whose failing fdatasync stopped them, as it must.
        public var stoppedOnSyncFailure = 0
        public var errors: [String: Int] = [:]
        /// The first violations found, in words (a counterexample for linearizability).
        public var violations: [String] = []
        public var passed: Bool {
            linearizabilityAnomalies == 0 && phantomReads == 0 && acknowledgedWritesLost == 0 && watchViolations == 0
                && leaseViolations == 0 && hashMismatches == 0 && unhealthyAfterHeal == 0
        }

        public init(members: Int, seconds: Double, seed: UInt64) {
            self.members = members
            self.seconds = seconds
            self.seed = seed
        }

        /// The report as one JSON object, with the verdict (`passed`) in it.
        public func json() throws -> String {
            let encoder = JSONEncoder()
            guard var object = try JSONSerialization.jsonObject(with: encoder.encode(self)) as? [String: Any] else { return "{}" }
            object["passed"] = passed
            return String(decoding: try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]), as: UTF8.self)
        }
    }

    public func run() async throws -> Report {
        let started = Date()
        let directory = self.directory ?? FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-verify-\(getpid())-\(seed)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        var report = Report(members: members, seconds: duration, seed: seed)
        let namespaces: NetworkNamespaces?
        switch network {
        case .proxy: namespaces = nil
        case .netns: namespaces = try NetworkNamespaces(members: members)
        case .auto: namespaces = NetworkNamespaces.available() ? try NetworkNamespaces(members: members) : nil
        }
        defer { namespaces?.tearDown() }
        report.network = namespaces == nil ? "proxy" : "netns"
        var runner = self
        runner.faults = faults.filter { fault in
            if fault.needsNamespaces && namespaces == nil {
                report.faultsUnavailable[fault.rawValue] = "needs members in network namespaces (root, iproute2)"
            } else if fault.needsNetem && namespaces?.hasNetem == false {
                report.faultsUnavailable[fault.rawValue] = "this kernel has no netem queueing discipline"
            } else {
                return true
            }
            return false
        }
        for (fault, why) in report.faultsUnavailable.sorted(by: { $0.key < $1.key }) { log("fault \(fault) not available: \(why)") }
        let cluster = try VerifyCluster(binary: binary, directory: directory, members: members, token: "verify-\(seed)",
                                        namespaces: namespaces, log: log)
        do {
            try await cluster.start()
            guard await cluster.waitHealthy(timeout: 30) else { throw VerifyError("the cluster did not become healthy") }
            log("cluster of \(members) healthy (\(report.network)); running \(Int(duration)) s with faults \(runner.faults.map(\.rawValue).joined(separator: ","))")
            try await runner.exercise(cluster, &report)
        } catch {
            await cluster.stopAll()
            throw error
        }
        await cluster.stopAll()
        report.seconds = Date().timeIntervalSince(started)
        if report.passed { try? FileManager.default.removeItem(at: directory) } else { log("member logs kept in \(directory.path)") }
        return report
    }

    private func exercise(_ cluster: VerifyCluster, _ report: inout Report) async throws {
        let prefix = "verify/\(seed)/"
        let recorder = Recorder()
        let startRevision = try await currentRevision(cluster)
        let start = monotonicNanos()
        let deadline = start + UInt64(duration * 1e9)
        let seed = self.seed
        let flags = RunFlags()
        let watchers = (0..<2).map { Watcher(name: "watcher \($0)", cluster: cluster, prefix: prefix, from: startRevision + 1, seed: seed &+ UInt64($0) &* 7919) }
        let leases = LeaseClient(cluster: cluster, prefix: prefix, seed: seed ^ 0x1EA5E)
        let interval = Duration.milliseconds(max(1, 1_000 / max(1, rate)))
        let clients = self.clients
        var random = SeededRandom(seed: seed ^ 0xFA17)

        try await withThrowingTaskGroup(of: Void.self) { group in
            for client in 0..<clients {
                group.addTask {
                    await KVClient.run(client: client, cluster: cluster, recorder: recorder, prefix: prefix, keys: 8,
                                       epochSeconds: 5, interval: interval, seed: seed &+ UInt64(client) &* 104_729,
                                       start: start, deadline: deadline)
                }
            }
            for watcher in watchers {
                group.addTask {
                    await watcher.run(stop: { flags.stopWatchers.withLock { $0 } }, through: { flags.finished.withLock { $0 } },
                                      giveUp: { flags.giveUp.withLock { $0 } })
                }
            }
            group.addTask { await leases.run(deadline: deadline, keepUntil: { flags.giveUp.withLock { $0 } }) }

            // The faults, one at a time, each healed before the next.
            var order: [Fault] = []
            while monotonicNanos() + 3_000_000_000 < deadline {
                if order.isEmpty { order = faults.shuffled(using: &random) }
                let fault = order.removeFirst()
                if fault == .bridge && cluster.count < 3 { continue }
                let held = Double.random(in: 2...5, using: &random)
                let leaderBefore = await cluster.leader()
                log("fault \(fault.rawValue) for \(String(format: "%.1f", held)) s")
                let heal: (inout Report) async throws -> Void
                do {
                    heal = try await checked("injecting \(fault.rawValue)") { try await inject(fault, cluster, &random, &report) }
                } catch let failed as VerifyCluster.ReplaceFailed {
                    // The cluster did not answer a membership change: unavailable, but whole again.
                    report.unhealthyAfterHeal += 1
                    report.violations.append(failed.description)
                    heal = { _ in }
                }
                report.faultsInjected[fault.rawValue, default: 0] += 1
                try await Task.sleep(for: .seconds(held))
                let leaderDuring = await cluster.leader()
                log("healing \(fault.rawValue); leader before m\(leaderBefore.map(String.init) ?? "?"), now m\(leaderDuring.map(String.init) ?? "?")")
                try await heal(&report)
                if !(await cluster.waitHealthy(timeout: 30)) {
                    report.unhealthyAfterHeal += 1
                    report.violations.append("not healthy 30 s after healing \(fault.rawValue)")
                }
                try await Task.sleep(for: .seconds(Double.random(in: 0.5...1.5, using: &random)))
            }
            while monotonicNanos() < deadline { try await Task.sleep(for: .milliseconds(100)) }
            // Clients and the lease client stop at the deadline; the watchers go on to the end.
            cluster.links.healAll()
            for i in 0..<cluster.count { cluster.resume(i) }
            if !(await cluster.waitHealthy(timeout: 30)) {
                report.unhealthyAfterHeal += 1
                report.violations.append("not healthy 30 s after the final heal")
            }
            let final = try await checked("reading the final revision") { try await currentRevision(cluster) }
            flags.finished.withLock { $0 = final }
            flags.stopWatchers.withLock { $0 = true }
            // The watchers get 30 s to reach the final revision.
            group.addTask {
                for _ in 0..<300 where !watchers.allSatisfy({ $0.next > final }) {
                    try? await Task.sleep(for: .milliseconds(100))
                }
                flags.giveUp.withLock { $0 = true }
            }
            try await group.waitForAll()
        }
        let finalRevision = flags.finished.withLock { $0 } ?? 0
        let recorded = recorder.state.withLock { $0 }
        report.operations = recorded.counts
        report.errors = recorded.errors

        // Linearizability.
        let verdict = KVLinearizability.check(recorded.history)
        report.operationsChecked = recorded.history.count
        report.unknownOutcomes = recorded.history.filter { $0.output == .unknown }.count
        report.undecidedKeys = verdict.undecidedKeys.count
        if !verdict.linearizable && verdict.key != nil {
            report.linearizabilityAnomalies += 1
            let origin = verdict.counterexample.map(\.invoked).min() ?? 0
            report.violations.append("not linearizable on \(verdict.key!):\n" + verdict.counterexample.map { "  " + $0.line(origin: origin) }.joined(separator: "\n"))
        }
        // Serializable reads return values someone wrote (possibly stale, never invented).
        report.serializableReadsChecked = recorded.serializableReads.count
        for read in recorded.serializableReads {
            if let value = read.value, !(recorded.attempted[read.key]?.contains(value) ?? false) {
                report.phantomReads += 1
                report.violations.append("serializable read of \(read.key) returned \(value), which no client wrote")
            }
        }

        // The reference history from one member, then durability, watch invariants.
        let reference = try await checked("reading the reference history") {
            try await referenceEvents(cluster, prefix: prefix, from: startRevision + 1, through: finalRevision)
        }
        var problems = VerifyCheckers.checkReference(reference)
        report.acknowledgedWrites = recorded.acknowledged.count
        let lost = VerifyCheckers.checkDurability(recorded.acknowledged, reference: reference)
        report.acknowledgedWritesLost = lost.count
        problems += lost
        // Every member answers every acknowledged put at its revision (a sample of at most 500).
        let (readBacks, readBackProblems) = try await checked("reading writes back") { try await readBack(cluster, recorded.acknowledged, seed: seed) }
        report.readBacksPerMember = readBacks
        report.acknowledgedWritesLost += readBackProblems.count
        problems += readBackProblems
        // Equal hashes of the whole history on every member.
        let hashProblems = try await checked("comparing hashes") { try await compareHashes(cluster, revision: finalRevision) }
        report.hashMismatches = hashProblems.count
        problems += hashProblems
        // Every start of a member compared its store with its peers' (a refusal is a mismatch).
        let startups = cluster.startupHashChecks()
        report.startupHashChecksPassed = startups.passed
        report.hashMismatches += startups.refused.count
        problems += startups.refused
        report.violations += problems.prefix(20)
        report.watchers = watchers.count
        for watcher in watchers {
            report.watchStreams += watcher.sessions.count
            report.watchEventsChecked += watcher.sessions.reduce(0) { $0 + $1.events.count }
            let found = VerifyCheckers.checkWatcher(watcher.sessions, reference: reference, through: finalRevision, name: watcher.name)
            report.watchViolations += found.count
            report.violations += found.prefix(10)
        }

        // Leases: the expiring ones are gone, the kept-alive one is there and never expired early.
        let leaseProblems = try await checked("checking leases") { try await leases.check(cluster) }
        report.expiringLeasesChecked = leases.expiring.withLock { $0.count }
        report.leaseViolations = leaseProblems.count
        report.violations += leaseProblems
    }

    private func currentRevision(_ cluster: VerifyCluster) async throws -> Int64 {
        for _ in 0..<50 {
            for i in 0..<cluster.count where cluster.isRunning(i) {
                var range = Etcdserverpb_RangeRequest()
                range.key = Data("verify".utf8)
                if let response = try? await cluster.call(i, "/etcdserverpb.KV/Range", range, as: Etcdserverpb_RangeResponse.self) {
                    return response.header.revision
                }
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        throw VerifyError("no member answered a linearizable read")
    }

    /// Every event on the prefix from `from` through `through`, by a watch on one member.
    private func referenceEvents(_ cluster: VerifyCluster, prefix: String, from: Int64, through: Int64) async throws -> [WatchedEvent] {
        guard through >= from else { return [] }
        for i in 0..<cluster.count {
            guard let connection = try? await cluster.connect(i) else { continue }
            defer { Task { await connection.close() } }
            let observer = StreamObserver()
            let call = connection.start("/etcdserverpb.Watch/Watch", messages: [LinearizabilityBench.watchPrefix(prefix, from: from)],
                                        endRequest: false, observer: observer)
            defer { call.cancel() }
            var events: [WatchedEvent] = []
            var consumed = 0
            let deadline = Date().addingTimeInterval(30)
            while Date() < deadline {
                let (messages, closed) = observer.take(from: consumed)
                consumed += messages.count
                for bytes in messages {
                    guard let response = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { continue }
                    events += response.events.map(Watcher.record)
                }
                // Every write is on the prefix: the history is complete once an event reaches `through`.
                if let last = events.last, last.modRevision >= through { return events.filter { $0.modRevision <= through } }
                if closed { break }
                try await Task.sleep(for: .milliseconds(100))
            }
        }
        throw VerifyError("no member gave the reference history")
    }

    /// Reads acknowledged puts back at their revisions on every member (serializable, local).
    private func readBack(_ cluster: VerifyCluster, _ writes: [AcknowledgedWrite], seed: UInt64) async throws -> (Int, [String]) {
        var random = SeededRandom(seed: seed ^ 0xBAC)
        let puts = writes.filter { $0.kind == .put }
        let sample = puts.count <= 500 ? puts : Array(puts.shuffled(using: &random).prefix(500))
        var problems: [String] = []
        for i in 0..<cluster.count {
            let connection = try await cluster.connect(i)
            defer { Task { await connection.close() } }
            for write in sample {
                var range = Etcdserverpb_RangeRequest()
                range.key = Data(write.key.utf8)
                range.revision = write.revision
                range.serializable = true
                let request: [UInt8] = try range.serializedBytes()
                var answer: [UInt8]?
                for attempt in 0..<40 where answer == nil {
                    // A member still applying answers "future revision" for a while.
                    do { answer = try await connection.unary("/etcdserverpb.KV/Range", request, timeout: .seconds(5)) } catch {
                        if attempt == 39 { throw VerifyError("reading back \(write.key)@\(write.revision) on m\(i): \(error)") }
                        try await Task.sleep(for: .milliseconds(250))
                    }
                }
                let response = try Etcdserverpb_RangeResponse(serializedBytes: answer ?? [])
                let value = response.kvs.first.map { String(decoding: $0.value, as: UTF8.self) }
                if value != write.value || response.kvs.first?.modRevision != write.revision {
                    problems.append("member m\(i) reads \(write.key) at revision \(write.revision) as \(value ?? "absent"), acknowledged \(write.value)")
                }
            }
        }
        return (sample.count, problems)
    }

    private func compareHashes(_ cluster: VerifyCluster, revision: Int64) async throws -> [String] {
        var hashes: [Int: UInt32] = [:]
        for i in 0..<cluster.count {
            var request = Etcdserverpb_HashKVRequest()
            request.revision = revision
            var answer: Etcdserverpb_HashKVResponse?
            for _ in 0..<50 {
                // A member still applying the last entries answers "future revision": wait for it.
                if let response = try? await cluster.call(i, "/etcdserverpb.Maintenance/HashKV", request, as: Etcdserverpb_HashKVResponse.self, timeout: .seconds(10)) {
                    answer = response
                    break
                }
                try await Task.sleep(for: .milliseconds(200))
            }
            guard let answer else { return ["member m\(i) gave no hash at revision \(revision)"] }
            hashes[i] = answer.hash
        }
        guard Set(hashes.values).count > 1 else { return [] }
        return ["members' hashes at revision \(revision) differ: \(hashes.sorted { $0.key < $1.key }.map { "m\($0.key)=\($0.value)" }.joined(separator: " "))"]
    }

    /// Starts a fault; returns what heals it.
    private func inject(_ fault: Fault, _ cluster: VerifyCluster, _ random: inout SeededRandom,
                        _ report: inout Report) async throws -> (inout Report) async throws -> Void {
        let n = cluster.count
        let any = Int.random(in: 0..<n, using: &random)
        let leader = await cluster.leader() ?? any
        switch fault {
        case .kill, .killLeader:
            let target = fault == .kill ? any : leader
            cluster.kill(target)
            return { _ in try cluster.restart(target) }
        case .pause, .pauseLeader:
            let target = fault == .pause ? any : leader
            cluster.pause(target)
            return { _ in cluster.resume(target) }
        case .fsyncFail, .fsyncSlow:
            cluster.kill(any)
            let logged = cluster.logSize(any)
            let spec = fault == .fsyncFail ? "fail-after:\(Int.random(in: 3...20, using: &random))" : "slow:200"
            // The expected crash needs no backtrace (it takes the runtime seconds).
            try cluster.restart(any, environment: ["ETCDLITE_FAILPOINT_LOG_SYNC": spec, "SWIFT_BACKTRACE": "enable=no"])
            if !(await cluster.failpointArmed(any, after: logged)) { report.failpointsUnavailable += 1 }
            return { report in
                // A failing sync must have stopped the member (after the syncs it was allowed).
                // The workload may have been too slow in the fault's seconds to use up those
                // syncs: a few writes of our own then give the member entries to sync.
                if fault == .fsyncFail { await cluster.driveSyncs(until: any, seconds: 20) }
                if fault == .fsyncFail && !cluster.isRunning(any) { report.stoppedOnSyncFailure += 1 }
                cluster.kill(any)
                try cluster.restart(any)
            }
        case .partition, .partitionLeader:
            // A minority (the leader alone, or a random minority) cut from the rest, both ways.
            let minority: Set<Int>
            if fault == .partitionLeader {
                minority = [leader]
            } else {
                let size = Int.random(in: 1...max(1, (n - 1) / 2), using: &random)
                minority = Set((0..<n).shuffled(using: &random).prefix(size))
            }
            var links = Set<LinkTable.Link>()
            for a in 0..<n { for b in 0..<n where a != b && minority.contains(a) != minority.contains(b) { links.insert(.init(from: a, to: b)) } }
            cluster.links.block(links)
            return { _ in cluster.links.healAll() }
        case .asymmetric:
            // One member's messages to the others are lost; it still hears them.
            var links = Set<LinkTable.Link>()
            for b in 0..<n where b != any { links.insert(.init(from: any, to: b)) }
            cluster.links.block(links)
            return { _ in cluster.links.healAll() }
        case .bridge:
            // Two halves that cannot talk, and one member that talks to both.
            let bridge = any
            let others = (0..<n).filter { $0 != bridge }.shuffled(using: &random)
            let half = Set(others.prefix(others.count / 2))
            var links = Set<LinkTable.Link>()
            for a in others { for b in others where a != b && half.contains(a) != half.contains(b) { links.insert(.init(from: a, to: b)) } }
            cluster.links.block(links)
            return { _ in cluster.links.healAll() }
        case .wipe:
            try await cluster.replace(any)
            return { _ in }
        case .delay, .loss, .reorder, .slowLink:
            guard let namespaces = cluster.namespaces else { return { _ in } }
            let discipline: [String]
            switch fault {
            case .delay: discipline = ["netem", "delay", "\(Int.random(in: 20...150, using: &random))ms", "20ms"]
            case .loss: discipline = ["netem", "loss", "\(Int.random(in: 5...30, using: &random))%"]
            case .reorder: discipline = ["netem", "delay", "10ms", "reorder", "25%", "50%"]
            default: discipline = ["tbf", "rate", "256kbit", "burst", "16kbit", "latency", "300ms"]
            }
            try namespaces.shape(any, discipline)
            return { _ in namespaces.unshape(any) }
        }
    }
}

/// Runs a step of the final checks, naming it in its error.
func checked<T>(_ step: String, _ body: () async throws -> T) async throws -> T {
    do { return try await body() } catch let error as VerifyError { throw error } catch let error as VerifyCluster.ReplaceFailed {
        throw error
    } catch {
        throw VerifyError("\(step): \(error)")
    }
}

/// What the tasks of a run share.
final class RunFlags: Sendable {
    let finished = Mutex<Int64?>(nil)
    let stopWatchers = Mutex(false)
    let giveUp = Mutex(false)
}

/// Leases under faults: short ones with a key each and no keep-alive (they must expire), and one
/// long one kept alive every second through any member (it must not expire early).
final class LeaseClient: @unchecked Sendable {
    struct Expiring { let key: String; let acknowledged: Double }
    let cluster: VerifyCluster
    let prefix: String
    let expiring = Mutex<[Expiring]>([])
    private var keepAlives: [VerifyCheckers.KeepAlive] = []
    private var keptLease: Int64 = 0
    private var keptGranted = 0.0
    private var keptKey: String { prefix + "lease/kept" }
    private var violations: [String] = []
    private let member: MemberConnection
    static let keptTTL: Int64 = 10
    static let shortTTL: Int64 = 2
    private let origin = Date()

    init(cluster: VerifyCluster, prefix: String, seed: UInt64) {
        self.cluster = cluster
        self.prefix = prefix
        member = MemberConnection(cluster: cluster, seed: seed)
    }

    private var now: Double { Date().timeIntervalSince(origin) }

    /// Until `deadline`: grants, and keeps the long lease alive; then only keeps it alive, until
    /// `keepUntil` says the run is over (the final checks come right after).
    func run(deadline: UInt64, keepUntil: @escaping @Sendable () -> Bool) async {
        var n = 0
        var lastShort = 0.0
        while monotonicNanos() < deadline && !Task.isCancelled {
            if keptLease == 0 { await grantKept() }
            if keptLease != 0 { await keepAlive() }
            if now - lastShort > 3 {
                lastShort = now
                n += 1
                await grantShort(n)
            }
            try? await Task.sleep(for: .seconds(1))
        }
        while !keepUntil() && !Task.isCancelled {
            if keptLease != 0 { await keepAlive() }
            try? await Task.sleep(for: .seconds(1))
        }
    }

    private func grant(_ ttl: Int64) async -> Int64? {
        var request = Etcdserverpb_LeaseGrantRequest()
        request.ttl = ttl
        guard let bytes = try? await member.unary("/etcdserverpb.Lease/LeaseGrant", try! request.serializedBytes()),
              let response = try? Etcdserverpb_LeaseGrantResponse(serializedBytes: bytes), response.error.isEmpty else { return nil }
        return response.id
    }

    private func put(_ key: String, lease: Int64) async -> Bool {
        var put = Etcdserverpb_PutRequest()
        put.key = Data(key.utf8)
        put.value = Data("lease".utf8)
        put.lease = lease
        return (try? await member.unary("/etcdserverpb.KV/Put", try! put.serializedBytes())) != nil
    }

    private func grantKept() async {
        let invoked = now
        guard let id = await grant(Self.keptTTL) else { return }
        guard await put(keptKey, lease: id) else { return }
        keptLease = id
        keptGranted = invoked
        keepAlives = []
    }

    private func grantShort(_ n: Int) async {
        guard let id = await grant(Self.shortTTL) else { return }
        let key = prefix + "lease/short-\(n)"
        if await put(key, lease: id) { expiring.withLock { $0.append(Expiring(key: key, acknowledged: now)) } }
    }

    private func keepAlive() async {
        var request = Etcdserverpb_LeaseKeepAliveRequest()
        request.id = keptLease
        guard let connection = try? await member.get() else { return }
        let observer = StreamObserver()
        let invoked = now
        let call = connection.start("/etcdserverpb.Lease/LeaseKeepAlive", messages: [try! request.serializedBytes()], endRequest: true, observer: observer)
        let deadline = Date().addingTimeInterval(3)
        while Date() < deadline && observer.count == 0 { try? await Task.sleep(for: .milliseconds(20)) }
        call.cancel()
        guard let bytes = observer.take(from: 0).0.first, let response = try? Etcdserverpb_LeaseKeepAliveResponse(serializedBytes: bytes) else {
            member.drop()
            return
        }
        keepAlives.append(.init(invoked: invoked, returned: now, ttl: response.ttl))
        if response.ttl <= 0 {
            violations += VerifyCheckers.checkKeepAlives(keepAlives, granted: keptGranted, ttl: Self.keptTTL)
            keptLease = 0
        }
    }

    func check(_ cluster: VerifyCluster) async throws -> [String] {
        var problems = violations
        // Wait past every short lease's TTL after the heal, with a margin for the lease checker.
        try await Task.sleep(for: .seconds(Double(Self.shortTTL) + 3))
        let connection = try await cluster.connect(0)
        defer { Task { await connection.close() } }
        for lease in expiring.withLock({ $0 }) {
            var range = Etcdserverpb_RangeRequest()
            range.key = Data(lease.key.utf8)
            let response = try await checked("reading \(lease.key)") {
                try Etcdserverpb_RangeResponse(serializedBytes: try await connection.unary("/etcdserverpb.KV/Range", try range.serializedBytes(), timeout: .seconds(5)))
            }
            if !response.kvs.isEmpty { problems.append("\(lease.key) is still there although its \(Self.shortTTL) s lease was never renewed") }
        }
        // One more keep-alive now: a lease whose last renewal is more than its TTL old may have
        // expired legitimately (the final heal and the watchers take a while); one renewed now
        // must still have its key.
        if keptLease != 0 {
            for _ in 0..<10 where (keepAlives.last?.invoked ?? 0) < now - 2 {
                await keepAlive()
                if keptLease == 0 { break }
            }
            if keptLease == 0 { problems += violations.filter { !problems.contains($0) } }
        }
        if keptLease != 0, let last = keepAlives.last, last.ttl > 0, last.invoked > now - 5 {
            var range = Etcdserverpb_RangeRequest()
            range.key = Data(keptKey.utf8)
            let response = try await checked("reading \(keptKey)") {
                try Etcdserverpb_RangeResponse(serializedBytes: try await connection.unary("/etcdserverpb.KV/Range", try range.serializedBytes(), timeout: .seconds(5)))
            }
            if response.kvs.first?.lease != keptLease { problems.append("\(keptKey) of a kept-alive lease is gone") }
        }
        return problems
    }
}

extension Verifier.Report {
    /// The report for a terminal.
    public var text: String {
        func list(_ counts: [String: Int]) -> String {
            counts.isEmpty ? "none" : counts.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
        }
        var lines = [
            "verify: \(members) members, \(String(format: "%.0f", seconds)) s, seed \(seed): \(passed ? "PASSED" : "FAILED")",
            "network: \(network)" + (faultsUnavailable.isEmpty ? "" : "; not available here: " + faultsUnavailable.sorted { $0.key < $1.key }.map { "\($0.key) (\($0.value))" }.joined(separator: ", ")),
            "faults injected: \(list(faultsInjected))",
            "operations: \(list(operations))",
            "linearizability: \(operationsChecked) operations checked (\(unknownOutcomes) with unknown outcome), \(linearizabilityAnomalies) anomalies, \(undecidedKeys) keys undecided",
            "serializable reads: \(serializableReadsChecked) checked, \(phantomReads) returned a value never written",
            "durability: \(acknowledgedWrites) acknowledged writes, \(acknowledgedWritesLost) lost; \(readBacksPerMember) read back on every member; \(hashMismatches) hash mismatches; \(startupHashChecksPassed) start-up hash checks passed",
            "watch: \(watchers) watchers, \(watchStreams) streams, \(watchEventsChecked) events checked, \(watchViolations) violations",
            "leases: \(expiringLeasesChecked) expiring leases checked, \(leaseViolations) violations",
            "unhealthy after a heal: \(unhealthyAfterHeal)",
            "fdatasync failpoints: \(stoppedOnSyncFailure) members stopped on a failed sync\(failpointsUnavailable > 0 ? ", \(failpointsUnavailable) faults not armed (a release binary has no failpoints)" : "")",
            "client errors: \(list(errors))",
        ]
        if !violations.isEmpty { lines.append("violations:\n" + violations.map { "- " + $0 }.joined(separator: "\n")) }
        return lines.joined(separator: "\n")
    }
}
