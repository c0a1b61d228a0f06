import EtcdLiteVerify
import EtcdOperator
import Foundation
import Testing

/// The operator on the local platform: real members and a real operator as processes.
@Suite(.serialized, .timeLimit(.minutes(8))) struct OperatorLocalTests {
    /// A run of free ports: `count` of them from an even base (the boot member takes the two
    /// below the base).
    static func freePortBlock(_ count: Int) -> Int {
        for _ in 0..<200 {
            let base = 2 * Int.random(in: 15_000..<24_000)
            if (base - 2..<base + count).allSatisfy(portIsFree) { return base }
        }
        return 40_002
    }

    static func portIsFree(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        return withLoopback(port: port) { bind(fd, $0, $1) } == 0
    }

    /// Issue 9's scenario: boot → 3 self-hosted → 5 → 3 → rolling upgrade → kill -9 of every
    /// member → back with no command; every acknowledged write is there afterwards.
    @Test func theSelfHostingScenarioKeepsEveryAcknowledgedWrite() async throws {
        let dir = TempDir()
        var scenario = SelfHostScenario(binary: etcdliteBinary(), directory: dir.url, basePort: Self.freePortBlock(12))
        scenario.stepTimeout = 120
        let report = try await scenario.run()
        let table = report.table
        print(table)
        #expect(report.steps.map(\.name) == ["pivot to 3 self-hosted", "scale to 5", "scale to 3", "rolling upgrade", "kill -9 every member"])
        let reached = report.steps.filter(\.reached).count
        #expect(reached == report.steps.count, "\(table)")
        #expect(report.acknowledged > 100)
        #expect(report.missing.isEmpty, "acknowledged but missing: \(report.missing)")
        #expect(report.recoverySeconds != nil)
        // Members run the new binary; the boot member left and stopped itself.
        let status = try Self.status(dir.url.appendingPathComponent("root"))
        #expect(status.members.allSatisfy { $0.version == dir.url.appendingPathComponent("etcdlite-next").path })
        #expect(!status.members.contains { $0.name == "boot" })
        if report.passed { dir.cleanup() }
    }

    static func status(_ root: URL) throws -> ClusterStatus {
        let data = try Data(contentsOf: root.appendingPathComponent("status.json"))
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return try decoder.decode(ClusterStatus.self, from: data)
    }

    /// Waits until the operator reports steady with `count` healthy voters (status written after
    /// `since`).
    static func waitSteady(_ root: URL, count: Int, since: Date, timeout: Double = 90,
                           _ extra: (ClusterStatus) -> Bool = { _ in true }) async throws -> ClusterStatus {
        let deadline = Date().addingTimeInterval(timeout)
        var last: ClusterStatus?
        while Date() < deadline {
            if let status = try? status(root) {
                last = status
                if status.action == "steady", (status.updated ?? .distantPast) > since.addingTimeInterval(0.5), status.members.count == count,
                   status.members.allSatisfy({ $0.healthy && !$0.learner }), extra(status) {
                    return status
                }
            }
            try await Task.sleep(for: .milliseconds(100))
        }
        Issue.record("not steady with \(count) members after \(timeout) s; last status: \(String(describing: last))")
        throw CancellationError()
    }

    /// From nothing to three members; a member whose data is lost comes back under a new
    /// identity; an operator killed in the middle of a scale-up resumes from what it observes;
    /// after every member's data is gone the cluster is re-seeded from the newest backup.
    @Test func replacesLostMembersResumesAfterACrashAndReseedsFromABackup() async throws {
        let cluster = try ManagedCluster(size: 3, ports: 12, backup: .init(intervalSeconds: 2, retain: 2))
        defer { cluster.finish() }
        let root = cluster.root
        let metricsPort = freePort()
        try cluster.startOperator(extra: ["--metrics-address", "127.0.0.1:\(metricsPort)"])
        var status = try await Self.waitSteady(root, count: 3, since: Date())
        let first = status.members.first { $0.leader }!.clientURL!
        // The operator's metrics endpoint follows its status (curl, as a scrape).
        let scrape = try run("/usr/bin/curl", ["-s", "--max-time", "5", "http://127.0.0.1:\(metricsPort)/metrics"], timeout: 10).stdout
        #expect(scrape.contains("etcdlite_operator_members{state=\"healthy\"} 3") && scrape.contains("etcdlite_operator_reconciles_total "),
                "\(scrape)")
        #expect(!scrape.contains("etcdlite_operator_reconciles_total 0\n"), "\(scrape)")
        for i in 0..<20 {
            let put = try etcdctlAt(["--endpoints=\(first)", "put", "key\(i)", "value\(i)"])
            #expect(put.status == 0, "\(put.stderr)")
        }

        // One member loses its data: removed, then a new member (new ID) takes its place.
        let victim = status.members.first { !$0.leader }!
        kill(try Self.pid(root, victim.name), SIGKILL)
        let record = try JSONDecoder().decode(MemberRecord.self, from: Data(contentsOf: root.appendingPathComponent("members/\(victim.name).json")))
        try FileManager.default.removeItem(at: root.appendingPathComponent("data/\(record.dataName ?? victim.name)"))
        var changed = Date()
        status = try await Self.waitSteady(root, count: 3, since: changed) { !$0.members.map(\.id).contains(victim.id) }
        #expect(status.actions["removeMember", default: 0] >= 1 && status.actions["deleteWorkload", default: 0] >= 1)

        // The operator dies right after a scale-up began; a new one finishes it.
        try cluster.resize(5)
        changed = Date()
        let seenAddition = Date().addingTimeInterval(30)
        while (try? Self.status(root))?.actions["addLearner", default: 0] ?? 0 < 4 && Date() < seenAddition {
            try await Task.sleep(for: .milliseconds(20))
        }
        try cluster.startOperator()
        status = try await Self.waitSteady(root, count: 5, since: changed)

        // Every member's data gone: re-seeded from the newest backup, keys written before it there.
        let backupDeadline = Date().addingTimeInterval(20)
        let keysWritten = Date()
        while ((try? Self.status(root))?.lastBackupTime ?? .distantPast) < keysWritten.addingTimeInterval(0.5) && Date() < backupDeadline {
            try await Task.sleep(for: .milliseconds(100))
        }
        for pid in Self.memberPids(root) { kill(pid, SIGKILL) }
        try FileManager.default.removeItem(at: root.appendingPathComponent("data"))
        changed = Date()
        status = try await Self.waitSteady(root, count: 5, since: changed) { $0.actions["restoreFromSnapshot", default: 0] >= 1 }
        let get = try etcdctlAt(["--endpoints=\(status.members.first { $0.leader }!.clientURL!)", "get", "key", "--prefix", "--keys-only"])
        #expect(get.stdout.split(separator: "\n").filter { !$0.isEmpty }.count == 20, "\(get.stdout) \(get.stderr)")
        // The old data was moved aside, not deleted... (here it was deleted by the test: only the
        // records remain in lost/).
        #expect(FileManager.default.fileExists(atPath: root.appendingPathComponent("lost").path))
        let metrics = try String(contentsOf: root.appendingPathComponent("operator.prom"), encoding: .utf8)
        #expect(metrics.contains("etcdlite_operator_actions_total{kind=\"restoreFromSnapshot\"}"))
    }

    /// A restore from a chosen snapshot (the config's `restore`): the live store saved first, the
    /// cluster re-seeded from the snapshot and grown back, once per id; `etcdlite recover
    /// --from-snapshot` does the same by hand.
    @Test func aChosenSnapshotIsRestoredOnceAndByHand() async throws {
        let cluster = try ManagedCluster(size: 3)
        defer { cluster.finish() }
        let root = cluster.root
        try cluster.startOperator()
        var status = try await Self.waitSteady(root, count: 3, since: Date())
        var endpoint = status.members.first { $0.leader }!.clientURL!
        #expect(try etcdctlAt(["--endpoints=\(endpoint)", "put", "before", "snapshot"]).status == 0)
        let chosen = cluster.dir.url.appendingPathComponent("chosen.db").path
        let saved = try etcdctlAt(["--endpoints=\(endpoint)", "snapshot", "save", chosen])
        #expect(saved.status == 0, "\(saved.stderr)")
        #expect(try etcdctlAt(["--endpoints=\(endpoint)", "put", "after", "snapshot"]).status == 0)

        cluster.config.restore = RestoreRequest(id: "r1", snapshot: chosen)
        try cluster.config.save(cluster.configPath)
        let asked = Date()
        status = try await Self.waitSteady(root, count: 3, since: asked) { $0.lastRestore == "r1" && $0.actions["restore", default: 0] == 1 }
        endpoint = status.members.first { $0.leader }!.clientURL!
        let keys = try etcdctlAt(["--endpoints=\(endpoint)", "get", "", "--from-key", "--keys-only"]).stdout.split(separator: "\n").filter { !$0.isEmpty }
        #expect(keys == ["before"], "\(keys)")
        // What the cluster held before is kept as a backup.
        let backups = try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("backups").path)
        let before = try #require(backups.first { $0.contains("-before-restore-r1") }, "\(backups)")
        let beforeStatus = try run(etcdliteBinary(), ["snapshot", "status", root.appendingPathComponent("backups/\(before)").path, "--write-out", "json"])
        #expect(beforeStatus.status == 0 && beforeStatus.stdout.contains("\"totalKey\":2"), "\(beforeStatus.stdout)")
        // Once only: what is written after the restore stays.
        #expect(try etcdctlAt(["--endpoints=\(endpoint)", "put", "after", "restore"]).status == 0)
        try await Task.sleep(for: .seconds(3))
        #expect(try Self.status(root).actions["restore", default: 0] == 1)
        #expect(try etcdctlAt(["--endpoints=\(endpoint)", "get", "after", "--print-value-only"]).stdout == "restore\n")

        // By hand, with the operator gone: back to the snapshot again.
        cluster.stopAll()
        let recovered = try run(etcdliteBinary(), ["recover", "--config", cluster.configPath, "--from-snapshot", chosen, "--timeout", "60"], timeout: 90)
        #expect(recovered.status == 0 && recovered.stdout.contains("the cluster has a leader"), "\(recovered.stdout) \(recovered.stderr)")
        let member0 = try JSONDecoder().decode(MemberRecord.self, from: Data(contentsOf: root.appendingPathComponent("members/member-0.json")))
        let byHand = try etcdctlAt(["--endpoints=\(member0.clientURL)", "get", "", "--from-key", "--keys-only"]).stdout.split(separator: "\n").filter { !$0.isEmpty }
        #expect(byHand == ["before"], "\(byHand)")
        let refused = try run(etcdliteBinary(), ["recover", "--config", cluster.configPath, "--from-snapshot", cluster.configPath, "--timeout", "5"], timeout: 30)
        #expect(refused.status != 0 && refused.stderr.contains("does not check out"), "\(refused.stderr)")
    }

    /// The operator dies right after MemberAdd, before it recorded the answer or started the
    /// member: the next operator finds the member (unstarted, no name) by its peer URL, builds its
    /// `--initial-cluster` from the member list and starts it; the cluster reaches its size.
    @Test(arguments: ["after-member-add", "after-spawn"])
    func aCrashBetweenMemberAddAndStartIsHealedOnTheNextPass(failpoint: String) async throws {
        let cluster = try ManagedCluster(size: 1)
        defer { cluster.finish() }
        let root = cluster.root
        try cluster.startOperator()
        _ = try await Self.waitSteady(root, count: 1, since: Date())
        cluster.operatorProcess?.kill()
        try cluster.resize(2)
        let crashing = try cluster.startOperator(environment: ["ETCDLITE_OPERATOR_FAILPOINT": failpoint])
        crashing.process.waitUntilExit()
        #expect(crashing.process.terminationStatus == 3)
        if failpoint == "after-member-add" {
            // What the crash left: a learner that MemberAdd made, never started, no name.
            let leader = try #require(Self.status(root).members.first?.clientURL)
            let list = try etcdctlAt(["--endpoints=\(leader)", "member", "list"])
            #expect(list.stdout.contains("unstarted, , ") && list.stdout.contains("true"), "\(list.stdout)")
        } else {
            // A member process running with no pid file: the next operator must find it, not
            // start a second one on the same data.
            #expect(!FileManager.default.fileExists(atPath: root.appendingPathComponent("members/member-1.pid").path))
        }
        try cluster.startOperator()
        let status = try await Self.waitSteady(root, count: 2, since: Date())
        #expect(status.actions["promote", default: 0] >= 1, "\(status.actions)")
        #expect(status.actions["addLearner", default: 0] == 1, "healed, not added again: \(status.actions)")
        if failpoint == "after-member-add" { #expect(status.actions["startMember", default: 0] >= 1, "\(status.actions)") }
        #expect(Self.memberPids(root).count == 2, "one process per member")
    }

    /// With the operator gone too (a power-off), `etcdlite recover` brings the members back on
    /// their own data from their records, by hand.
    @Test func recoverByHandRestartsMembersFromTheirRecords() async throws {
        let cluster = try ManagedCluster(size: 3)
        defer { cluster.finish() }
        let root = cluster.root
        try cluster.startOperator()
        let status = try await Self.waitSteady(root, count: 3, since: Date())
        let endpoint = status.members.first { $0.leader }!.clientURL!
        #expect(try etcdctlAt(["--endpoints=\(endpoint)", "put", "before", "power-off"]).status == 0)
        cluster.stopAll()
        let down = try etcdctlAt(["--endpoints=\(endpoint)", "--command-timeout=1s", "get", "before"])
        #expect(down.status != 0)
        let recovered = try run(etcdliteBinary(), ["recover", "--config", cluster.configPath, "--timeout", "60"], timeout: 90)
        #expect(recovered.status == 0 && recovered.stdout.contains("the cluster has a leader"), "\(recovered.stdout) \(recovered.stderr)")
        let endpoints = status.members.compactMap(\.clientURL).joined(separator: ",")
        let get = try etcdctlAt(["--endpoints=\(endpoints)", "get", "before", "--print-value-only"])
        #expect(get.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "power-off", "\(get.stdout) \(get.stderr)")
        // Every member runs again, on the data it had (the same IDs).
        for member in status.members {
            let answer = try etcdctlAt(["--endpoints=\(member.clientURL!)", "endpoint", "status"])
            #expect(answer.status == 0 && answer.stdout.contains(member.id), "\(member.name): \(answer.stdout) \(answer.stderr)")
        }
    }

    /// Every process running on a data directory under `root` (found in /proc: pid files may
    /// be stale or missing after a crash).
    static func memberPids(_ root: URL) -> [pid_t] {
        let data = root.appendingPathComponent("data").path + "/"
        return ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap(pid_t.init).filter { pid in
            let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline").map { String(decoding: $0, as: UTF8.self) } ?? ""
            return cmdline.contains(data)
        }
    }

    static func pid(_ root: URL, _ name: String) throws -> pid_t {
        let text = try String(contentsOf: root.appendingPathComponent("members/\(name).pid"), encoding: .utf8)
        return pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines))!
    }

    /// `etcdctl snapshot save` from etcdlite, `etcdlite snapshot status` and `restore`, a new
    /// member on the restored directory: the same keys at the same revision, a new cluster.
    @Test func aSnapshotRestoresIntoANewCluster() async throws {
        let source = try ServerProcess(executable: etcdliteBinary())
        defer { source.stop() }
        for i in 0..<30 { _ = try source.etcdctl(["put", "k\(i)", "v\(i)"]) }
        _ = try source.etcdctl(["del", "k0"])
        let dir = TempDir()
        defer { dir.cleanup() }
        let file = dir.url.appendingPathComponent("snap.db").path
        let saved = try source.etcdctl(["snapshot", "save", file])
        #expect(saved.status == 0, "\(saved.stderr)")
        let status = try run(etcdliteBinary(), ["snapshot", "status", file, "--write-out", "json"])
        #expect(status.status == 0 && status.stdout.contains("\"revision\":32") && status.stdout.contains("\"totalKey\":29"), "\(status.stdout) \(status.stderr)")

        // A damaged file is refused, and so is a data directory that holds a member.
        var bytes = try Data(contentsOf: URL(fileURLWithPath: file))
        bytes[bytes.count / 2] ^= 0xff
        let damaged = dir.url.appendingPathComponent("damaged.db").path
        try bytes.write(to: URL(fileURLWithPath: damaged))
        let refused = try run(etcdliteBinary(), ["snapshot", "restore", damaged, "--data-dir", dir.url.appendingPathComponent("x").path])
        #expect(refused.status != 0 && refused.stderr.contains("expected sha256"), "\(refused.stderr)")
        let memberDir = TempDir()
        let restoredDir = memberDir.url.appendingPathComponent("data").path
        let restored = try run(etcdliteBinary(), ["snapshot", "restore", file, "--data-dir", restoredDir])
        #expect(restored.status == 0, "\(restored.stderr)")
        let again = try run(etcdliteBinary(), ["snapshot", "restore", file, "--data-dir", restoredDir])
        #expect(again.status != 0 && again.stderr.contains("data-dir \"\(restoredDir)\" exists"), "\(again.stderr)")

        let member = try ServerProcess(executable: etcdliteBinary(), dataDir: memberDir)
        defer { member.stop() }
        let get = try member.etcdctl(["get", "k", "--prefix", "-w", "json"])
        #expect(get.stdout.contains("\"count\":29") && get.stdout.contains("\"revision\":32"), "\(get.stdout)")
        let put = try member.etcdctl(["put", "after", "restore", "-w", "json"])
        #expect(put.stdout.contains("\"revision\":33"), "\(put.stdout)")
        let sourceList = try source.etcdctl(["member", "list"]).stdout
        let newList = try member.etcdctl(["member", "list"]).stdout
        #expect(sourceList.split(separator: ",").first != newList.split(separator: ",").first, "a new member ID")

        // From a URL (as a StatefulSet's member 0 re-seeds from the operator's metrics server).
        let offer = try await MetricsServer.start(host: "127.0.0.1", port: 0, snapshot: { $0 == "snap.db" ? file : nil })
        let fromURL = dir.url.appendingPathComponent("from-url/data").path
        let downloaded = try run(etcdliteBinary(), ["snapshot", "restore", "http://127.0.0.1:\(offer.port)/snapshots/snap.db", "--data-dir", fromURL])
        #expect(downloaded.status == 0, "\(downloaded.stderr)")
        let missing = try run(etcdliteBinary(), ["snapshot", "restore", "http://127.0.0.1:\(offer.port)/snapshots/other.db", "--data-dir",
                                                  dir.url.appendingPathComponent("missing/data").path])
        #expect(missing.status != 0 && missing.stderr.contains("could not download"), "\(missing.stderr)")
        await offer.close()
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.url.appendingPathComponent("from-url").path) == ["data"], "no download left behind")
        let urlMember = try ServerProcess(executable: etcdliteBinary(), dataDir: TempDir(url: dir.url.appendingPathComponent("from-url")))
        defer { urlMember.stop() }
        let urlGet = try urlMember.etcdctl(["get", "k", "--prefix", "-w", "json"])
        #expect(urlGet.stdout.contains("\"count\":29") && urlGet.stdout.contains("\"revision\":32"), "\(urlGet.stdout)")
    }
}

/// A cluster the operator manages on the local platform, in a temporary directory.
final class ManagedCluster {
    let dir = TempDir()
    var root: URL { dir.url.appendingPathComponent("root") }
    var configPath: String { dir.url.appendingPathComponent("cluster.json").path }
    var config: LocalConfig
    private(set) var operatorProcess: ServerProcessHandle?

    init(size: Int, ports: Int = 8, backup: LocalConfig.Backup? = nil) throws {
        config = LocalConfig(name: "homelab", dataRoot: "", basePort: OperatorLocalTests.freePortBlock(ports), size: size, version: etcdliteBinary())
        config.dataRoot = root.path
        config.reconcileIntervalMilliseconds = 200
        config.backup = backup
        try config.save(configPath)
    }

    func resize(_ size: Int) throws {
        config.size = size
        try config.save(configPath)
    }

    /// Starts an operator (the one before, if any, is killed first).
    @discardableResult
    func startOperator(environment: [String: String] = [:], extra: [String] = []) throws -> ServerProcessHandle {
        operatorProcess?.kill()
        let process = try ServerProcessHandle(etcdliteBinary(), ["operator", "--config", configPath] + extra,
                                              log: dir.url.appendingPathComponent("operator.log").path, environment: environment)
        operatorProcess = process
        return process
    }

    /// kill -9 of the operator and every member.
    func stopAll() {
        operatorProcess?.kill()
        for pid in OperatorLocalTests.memberPids(root) { kill(pid, SIGKILL) }
    }

    /// Everything stopped (members run in sessions of their own: nothing else stops them), the
    /// directory removed.
    func finish() {
        stopAll()
        dir.cleanup()
    }
}

/// etcdctl with exactly these arguments.
func etcdctlAt(_ arguments: [String]) throws -> CommandResult {
    try run(etcdctlPath(), arguments, environment: ["ETCDCTL_API": "3"])
}

/// A process started with the etcdlite binary, killed at the end.
struct ServerProcessHandle {
    let process: Process

    init(_ executable: String, _ arguments: [String], log: String, environment: [String: String] = [:]) throws {
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        FileManager.default.createFile(atPath: log, contents: nil)
        let handle = FileHandle(forWritingAtPath: log)
        process.standardOutput = handle
        process.standardError = handle
        try process.run()
    }

    func kill() {
        if process.isRunning {
            Foundation.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }
}
