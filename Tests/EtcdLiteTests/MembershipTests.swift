import Foundation
import Testing

/// Membership changes through etcdctl against member processes: learners that join with
/// `--initial-cluster-state existing` and are promoted, removals (of the leader too), and etcd's
/// refusals.
@Suite(.serialized) struct MembershipTests {
    /// A member process with known ports.
    struct Member {
        let process: ServerProcess
        let name: String
        let peerURL: String
        var initial: String { "\(name)=\(peerURL)" }
    }

    static func start(_ name: String, initialCluster: String? = nil, existing: Bool = false, peerPort: Int = freePort(),
                      executable: String = etcdliteBinary(), extra: [String] = []) throws -> Member {
        let peerURL = "http://127.0.0.1:\(peerPort)"
        let process = try ServerProcess(executable: executable, name: name, clientPort: freePort(), peerPort: peerPort,
                                        initialCluster: initialCluster ?? "\(name)=\(peerURL)",
                                        extra: ["--initial-cluster-token", "membership-test"] + (existing ? ["--initial-cluster-state", "existing"] : []) + extra)
        return Member(process: process, name: name, peerURL: peerURL)
    }

    /// `etcdctl member add` and the new member's ID (hex), or the failure.
    static func add(_ name: String, peerURL: String, learner: Bool, through member: ServerProcess) throws -> (id: String?, result: CommandResult) {
        let result = try member.etcdctl(["member", "add", name, "--peer-urls=\(peerURL)"] + (learner ? ["--learner"] : []))
        let id = result.stdout.split(separator: " ").dropFirst().first.map(String.init)
        return (result.status == 0 ? id : nil, result)
    }

    /// A member "a" with `keys` keys written, and a learner "b" added to it (not started yet).
    static func memberWithLearner(keys: Int, extra: [String] = [])
        throws -> (first: Member, id: String?, added: CommandResult, peerPort: Int, peerURL: String) {
        let first = try start("a", extra: extra)
        try first.process.waitUntilServing()
        for n in 0..<keys { #expect(try first.process.etcdctl(["put", "k\(n)", "v\(n)"]).status == 0) }
        let peerPort = freePort()
        let peerURL = "http://127.0.0.1:\(peerPort)"
        let (id, added) = try add("b", peerURL: peerURL, learner: true, through: first.process)
        #expect(added.status == 0, "\(added.stderr)")
        return (first, id, added, peerPort, peerURL)
    }

    /// Member list lines: "id, status, name, peer URLs, client URLs, is learner".
    static func memberList(_ member: ServerProcess) throws -> [String] {
        try member.etcdctl(["member", "list"]).stdout.split(separator: "\n").map(String.init)
    }

    /// Waits until `body` holds (at most `seconds`).
    static func eventually(_ seconds: Double = 15, _ body: () throws -> Bool) -> Bool {
        let deadline = Date().addingTimeInterval(seconds)
        while Date() < deadline {
            if (try? body()) == true { return true }
            usleep(100_000)
        }
        return false
    }

    static func waitForExit(_ process: ServerProcess, seconds: Double = 10) -> Bool {
        eventually(seconds) { !process.process.isRunning }
    }

    /// One member grows to two: the new one joins as a learner (refusing what etcd's learners
    /// refuse), catches up from the log, is promoted, and then takes writes.
    @Test func aLearnerJoinsCatchesUpAndIsPromoted() throws {
        let (first, id, added, peerPort, peerURL) = try Self.memberWithLearner(keys: 30)
        defer { first.process.stop() }
        #expect(added.stdout.contains("ETCD_INITIAL_CLUSTER_STATE=\"existing\""), "\(added.stdout)")
        guard let id else { return }
        // Before it starts: listed as unstarted, a learner, without a name.
        let before = try Self.memberList(first.process)
        #expect(before.contains { $0.hasPrefix("\(id), unstarted, , \(peerURL), , true") }, "\(before)")

        let second = try Self.start("b", initialCluster: "\(first.initial),b=\(peerURL)", existing: true, peerPort: peerPort)
        defer { second.process.stop() }
        // (etcdctl's `endpoint health` reads linearizably, which a learner refuses, as etcd's does.)
        // A learner serves serializable reads of its own store (once it caught up) and refuses the rest.
        #expect(Self.eventually {
            try second.process.etcdctl(["get", "k", "--prefix", "--keys-only", "--consistency=s"]).stdout.split(separator: "\n").count == 30
        }, "the learner caught up from the log")
        let refusedPut = try second.process.etcdctl(["put", "x", "y"])
        #expect(refusedPut.status != 0 && refusedPut.stderr.contains("etcdserver: rpc not supported for learner"), "\(refusedPut.stderr)")
        let refusedGet = try second.process.etcdctl(["get", "k1"])
        #expect(refusedGet.stderr.contains("etcdserver: rpc not supported for learner"), "\(refusedGet.stderr)")
        // endpoint, ID, version, DB size, is leader, is learner, ...
        let status = try second.process.etcdctl(["endpoint", "status"]).stdout.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }
        #expect(status.count > 5 && status[4] == "false" && status[5] == "true", "a learner's status says so: \(status)")

        // Promote (etcd refuses until the learner is in sync; it is by now).
        var promoted = CommandResult(status: 1, stdout: "", stderr: "")
        #expect(Self.eventually { promoted = try first.process.etcdctl(["member", "promote", id]); return promoted.status == 0 }, "\(promoted.stderr)")
        #expect(promoted.stdout.contains("\(id) promoted in cluster"), "\(promoted.stdout)")
        let after = try Self.memberList(second.process)
        #expect(after.count == 2 && after.allSatisfy { $0.contains(", started, ") && $0.hasSuffix(", false") }, "\(after)")
        #expect(after.contains { $0.hasPrefix("\(id), started, b, \(peerURL), http://\(second.process.endpoint), false") }, "\(after)")
        // A voter now: writes through it, read linearizably through the other.
        #expect(try second.process.etcdctl(["put", "x", "y"]).status == 0)
        #expect(try first.process.etcdctl(["get", "x", "--print-value-only"]).stdout == "y\n")
        // Promoting a voter is refused.
        let again = try first.process.etcdctl(["member", "promote", id])
        #expect(again.stderr.contains("etcdserver: can only promote a learner member"), "\(again.stderr)")
    }

    /// Three members: a follower is removed (it stops, and never comes back with its old
    /// identity), then the leader (it hands over and stops); the last member carries on alone.
    /// A member that has started once and then lost its data is refused under its old ID (etcd:
    /// "member ... has already been bootstrapped"): it would vote without the entries it had
    /// acknowledged. And a second process on a live member's data directory is refused.
    @Test func aMemberWhoseDataIsLostIsRefusedUnderItsOldID() throws {
        let (first, id, _, peerPort, peerURL) = try Self.memberWithLearner(keys: 5)
        defer { first.process.stop() }
        guard let id else { return }
        let second = try Self.start("b", initialCluster: "\(first.initial),b=\(peerURL)", existing: true, peerPort: peerPort)
        defer { second.process.stop() }
        // A learner answers no linearizable health check: its name in the list says it started.
        #expect(Self.eventually { try Self.memberList(first.process).contains { $0.hasPrefix("\(id), started, b,") } })
        second.process.stop()
        try FileManager.default.removeItem(at: second.process.dataDir.url.appendingPathComponent("data"))
        try second.process.restart()
        #expect(Self.waitForExit(second.process), "it must not come back under \(id)")
        let log = (try? String(contentsOfFile: second.process.logPath, encoding: .utf8)) ?? ""
        #expect(log.contains("member \(id) has already been bootstrapped"), "\(log.suffix(600))")
        // The refused start leaves no member directory behind: one on disk means a member's data.
        #expect(!FileManager.default.fileExists(atPath: second.process.dataDir.url.appendingPathComponent("data/member").path))

        let intruder = try run(etcdliteBinary(), ["--name", "a", "--data-dir", first.process.dataDir.url.appendingPathComponent("data").path,
                                                  "--listen-client-urls", "http://127.0.0.1:\(freePort())", "--listen-peer-urls", "http://127.0.0.1:\(freePort())"],
                               timeout: 20)
        #expect(intruder.status != 0 && (intruder.stdout + intruder.stderr).contains("is in use by another process"), "\(intruder.stdout) \(intruder.stderr)")
        #expect(try first.process.etcdctl(["get", "k0", "--print-value-only"]).stdout.contains("v0"))
    }

    @Test func removedMembersStopAndNeverRejoin() throws {
        let ports = (0..<3).map { _ in freePort() }
        let initial = ports.enumerated().map { "m\($0.offset)=http://127.0.0.1:\($0.element)" }.joined(separator: ",")
        let members = try (0..<3).map { try Self.start("m\($0)", initialCluster: initial, peerPort: ports[$0]) }
        defer { for m in members { m.process.stop() } }
        for m in members { try m.process.waitUntilServing() }
        let processes = members.map(\.process)
        for n in 0..<10 { #expect(try processes[n % 3].etcdctl(["put", "k\(n)", "v\(n)"]).status == 0) }

        let leader = try ClusterTests.requireLeader(processes)
        let followers = processes.filter { $0 !== leader }
        let gone = followers[0]
        let goneID = String(try ClusterTests.status(gone).id, radix: 16)
        // Removed through the other follower (forwarded to the leader).
        let removed = try followers[1].etcdctl(["member", "remove", goneID])
        // (etcdctl pads the ID to 16 characters with spaces.)
        #expect(removed.status == 0 && removed.stdout.contains("\(goneID) removed from cluster"), "\(removed.stderr)")
        #expect(Self.waitForExit(gone), "the removed member stops")
        #expect(try Self.memberList(leader).count == 2)
        #expect(try followers[1].etcdctl(["put", "after", "remove"]).status == 0)
        // Restarted on its data, it refuses to start.
        let restarted = try run(etcdliteBinary(), gone.process.arguments ?? [], timeout: 15)
        #expect(restarted.status != 0 && restarted.stderr.contains("the member has been permanently removed from the cluster"),
                "\(restarted.stderr.suffix(500))")

        // Now the leader: it stays until the survivor knows, then stops; the survivor leads alone.
        let leaderID = String(try ClusterTests.status(leader).id, radix: 16)
        let removedLeader = try followers[1].etcdctl(["member", "remove", leaderID])
        #expect(removedLeader.status == 0, "\(removedLeader.stderr)")
        #expect(Self.waitForExit(leader), "the removed leader stops")
        let survivorID = try ClusterTests.status(followers[1]).id
        #expect(Self.eventually { try ClusterTests.status(followers[1]).leader == survivorID }, "the survivor leads")
        #expect(try followers[1].etcdctl(["put", "alone", "yes"]).status == 0)
        #expect(try followers[1].etcdctl(["get", "k", "--prefix", "--keys-only"]).stdout.split(separator: "\n").count == 10)
        #expect(try Self.memberList(followers[1]).count == 1)
    }

    /// A member removed while it was paused never applies its own removal: the others refuse its
    /// messages as a removed member's, and it stops.
    @Test func aMemberRemovedWhilePausedStopsWhenItWakes() throws {
        let ports = (0..<3).map { _ in freePort() }
        let initial = ports.enumerated().map { "m\($0.offset)=http://127.0.0.1:\($0.element)" }.joined(separator: ",")
        let members = try (0..<3).map { try Self.start("m\($0)", initialCluster: initial, peerPort: ports[$0]) }
        defer { for m in members { kill(m.process.process.processIdentifier, SIGCONT); m.process.stop() } }
        for m in members { try m.process.waitUntilServing() }
        let processes = members.map(\.process)
        let leader = try ClusterTests.requireLeader(processes)
        let paused = processes.first { $0 !== leader }!
        let pausedID = String(try ClusterTests.status(paused).id, radix: 16)
        kill(paused.process.processIdentifier, SIGSTOP)
        let removed = try leader.etcdctl(["member", "remove", pausedID])
        #expect(removed.status == 0, "\(removed.stderr)")
        kill(paused.process.processIdentifier, SIGCONT)
        #expect(Self.waitForExit(paused, seconds: 20), "the removed member stops once a peer tells it")
        #expect(try leader.etcdctl(["put", "k", "v"]).status == 0)
    }

    /// `--strict-reconfig-check=false` (etcd's flag, on by default) lets a change through that
    /// could cost quorum.
    @Test func strictReconfigCheckCanBeTurnedOff() throws {
        for strict in [true, false] {
            let member = try Self.start("solo", extra: strict ? [] : ["--strict-reconfig-check=false"])
            defer { member.process.stop(); member.process.dataDir.cleanup() }
            try member.process.waitUntilServing()
            #expect(try member.process.etcdctl(["member", "add", "v1", "--peer-urls=http://127.0.0.1:7"]).status == 0)
            let second = try member.process.etcdctl(["member", "add", "v2", "--peer-urls=http://127.0.0.1:8", "--command-timeout=2s"])
            #expect(second.stderr.contains("re-configuration failed due to not enough started members") == strict,
                    "strict \(strict): \(second.stderr.suffix(300))")
        }
    }

    /// etcd's answers to membership requests it refuses, side by side with etcd 3.4.
    @Test(.enabled(if: etcdInstalled, "needs etcd (apt-get install etcd-server)"))
    func membershipRefusalsAreEtcds() throws {
        func session(_ executable: String) throws -> [String] {
            let member = try Self.start("solo", executable: executable)
            defer { member.process.stop(); member.process.dataDir.cleanup() }
            try member.process.waitUntilServing()
            let me = try Self.memberList(member.process)[0].split(separator: ",")[0]
            var lines: [String] = []
            // IDs and ports differ between the two runs.
            func normalize(_ text: String) -> String {
                // member add lists the cluster in member ID order, and IDs differ: sort it.
                let lines = text.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
                    guard line.hasPrefix("ETCD_INITIAL_CLUSTER=\"") else { return String(line) }
                    let list = line.dropFirst("ETCD_INITIAL_CLUSTER=\"".count).dropLast()
                    return "ETCD_INITIAL_CLUSTER=\"" + list.split(separator: ",").sorted().joined(separator: ",") + "\""
                }
                return lines.joined(separator: "\n").replacingOccurrences(of: member.peerURL, with: "PEER")
                    .replacingOccurrences(of: member.process.endpoint, with: "CLIENT")
                    .replacingOccurrences(of: #" *\b[0-9a-f]{10,16}\b"#, with: " ID", options: .regularExpression)
            }
            func step(_ arguments: [String]) throws {
                let result = try member.process.etcdctl(arguments)
                let errors = result.stderr.split(separator: "\n").filter { $0.hasPrefix("Error:") }
                lines.append(normalize("\(arguments.joined(separator: " ")) -> \(result.status) \(result.stdout)\(errors.joined(separator: " "))"))
            }
            try step(["member", "add", "dup", "--peer-urls=\(member.peerURL)"])
            try step(["member", "add", "bad", "--peer-urls=http://127.0.0.1"])
            try step(["member", "remove", "1234"])
            try step(["member", "promote", "1234"])
            try step(["member", "promote", String(me)])
            try step(["member", "update", "1234", "--peer-urls=http://127.0.0.1:1"])
            let learner = try Self.add("l1", peerURL: "http://127.0.0.1:1", learner: true, through: member.process)
            lines.append("add learner -> \(learner.result.status)")
            try step(["member", "add", "l2", "--peer-urls=http://127.0.0.1:2", "--learner"])
            if let id = learner.id {
                try step(["member", "promote", id])
                try step(["member", "update", id, "--peer-urls=http://127.0.0.1:3"])
                try step(["member", "update", id, "--peer-urls=\(member.peerURL)"])
                try step(["member", "remove", id])
                try step(["member", "remove", id])
            }
            lines.append(normalize(try Self.memberList(member.process).joined(separator: " | ")))
            // A second voter that never starts is allowed (restoring a cluster); a third is not:
            // two of three would be down.
            try step(["member", "add", "v1", "--peer-urls=http://127.0.0.1:7"])
            try step(["member", "add", "v2", "--peer-urls=http://127.0.0.1:8"])
            return lines
        }
        let expected = try session(which("etcd")!)
        let actual = try session(etcdliteBinary())
        #expect(actual.count == expected.count)
        for (e, a) in zip(expected, actual) { #expect(a == e) }
    }
}

/// Members behind the leader's log compaction catch up from a snapshot of the SQLite store
/// streamed by the leader (`--snapshot-count 100`: the log is compacted every 100 entries, 100
/// kept behind).
@Suite(.serialized) struct SnapshotCatchUpTests {
    static let compactOften = ["--snapshot-count", "100"]

    /// Keys under `prefix` in the member's own store (a serializable read).
    static func keys(_ member: ServerProcess, _ prefix: String) -> Int {
        let out = (try? member.etcdctl(["get", prefix, "--prefix", "--keys-only", "--consistency=s"]).stdout) ?? ""
        return out.split(separator: "\n").count
    }

    static func log(_ member: ServerProcess) -> String {
        (try? String(contentsOfFile: member.logPath, encoding: .utf8)) ?? ""
    }

    /// Whether every member's HashKV agrees (waiting up to 10 s for them to catch up).
    static func storesAreEqual(_ members: [ServerProcess]) -> Bool {
        let endpoints = "--endpoints=" + members.map(\.endpoint).joined(separator: ",")
        return MembershipTests.eventually(10) {
            let hashes = try members[0].etcdctlRaw([endpoints, "endpoint", "hashkv", "-w", "json"]).stdout
            let values = hashes.matches(of: /"hash":(\d+)/).map { String($0.1) }
            return values.count == members.count && Set(values).count == 1
        }
    }

    @Test func aPausedFollowerBehindACompactionCatchesUpFromASnapshot() throws {
        let members = try ClusterTests.startCluster(3, extra: Self.compactOften)
        defer { for m in members { kill(m.process.processIdentifier, SIGCONT); m.stop() } }
        let leader = try ClusterTests.requireLeader(members)
        let paused = members.first { $0 !== leader }!
        #expect(try leader.etcdctl(["put", "before", "pause"]).status == 0)
        // A watcher on the member that will fall behind: it must see every event, also those
        // that reach its member inside the snapshot.
        let (watch, watchOutput) = try paused.startWatch(["k", "--prefix"])
        defer { if watch.isRunning { watch.terminate() } }
        usleep(500_000)
        kill(paused.process.processIdentifier, SIGSTOP)
        // 400 writes: the log is compacted past the paused member's last entry.
        for n in 0..<400 { #expect(try leader.etcdctl(["put", "k\(n)", "v\(n)"]).status == 0) }
        _ = try leader.etcdctl(["del", "before"])
        kill(paused.process.processIdentifier, SIGCONT)
        #expect(MembershipTests.eventually(20) { Self.keys(paused, "k") == 400 }, "the resumed member has every write")
        #expect(Self.log(paused).contains("installed a snapshot from the leader"), "it caught up through a snapshot")
        // (Logged once the receiver has the image, which it may install first; by whichever member
        // led then.)
        #expect(MembershipTests.eventually(5) { members.contains { Self.log($0).contains("sent a snapshot") } })
        #expect(Self.keys(paused, "before") == 0, "the delete that came with the snapshot too")
        var events: [Substring] = []
        #expect(MembershipTests.eventually(10) {
            events = (try String(contentsOf: watchOutput, encoding: .utf8)).split(separator: "\n")
            return events.count >= 1200
        }, "the watcher saw \(events.count / 3) of 400 events")
        // In order, each once: PUT, key, value.
        #expect(events.count == 1200 && (0..<400).allSatisfy { events[3 * $0] == "PUT" && events[3 * $0 + 1] == "k\($0)" })
        // It carries on from the log afterwards, and every store hashes the same.
        #expect(try paused.etcdctl(["put", "after", "snapshot"]).status == 0)
        #expect(try leader.etcdctl(["get", "after", "--print-value-only"]).stdout == "snapshot\n")
        #expect(Self.storesAreEqual(members), "the three stores are equal")
    }

    /// Three members compacting often; a follower killed after 20 writes (`early…`) and 400 more
    /// made without it (`k…`): restarted, it is behind the leader's log start. Every member gets
    /// `environment`.
    static func followerBehindCompaction(environment: [String: String] = [:]) throws -> (members: [ServerProcess], leader: ServerProcess, follower: ServerProcess) {
        let members = try ClusterTests.startCluster(3, extra: compactOften, environment: environment)
        do {
            let leader = try ClusterTests.requireLeader(members)
            let follower = members.first { $0 !== leader }!
            for n in 0..<20 { #expect(try leader.etcdctl(["put", "early\(n)", "v"]).status == 0) }
            follower.kill()
            for n in 0..<400 { #expect(try leader.etcdctl(["put", "k\(n)", "v\(n)"]).status == 0) }
            return (members, leader, follower)
        } catch {
            for m in members { m.stop() }
            throw error
        }
    }

    /// kill -9 of a follower, 400 writes, restart on its data: it comes back behind the
    /// leader's log start and catches up from a snapshot.
    @Test func aRestartedFollowerBehindACompactionCatchesUpFromASnapshot() throws {
        let (members, _, follower) = try Self.followerBehindCompaction()
        defer { for m in members { m.stop() } }
        try follower.restart()
        #expect(MembershipTests.eventually(20) { Self.keys(follower, "k") == 400 }, "the restarted member has every write")
        #expect(Self.keys(follower, "early") == 20)
        #expect(Self.log(follower).contains("installed a snapshot from the leader"))
        #expect(try follower.etcdctl(["put", "after", "restart"]).status == 0)
        // Restarted once more, it starts from the installed snapshot and its own log.
        follower.stop()
        try follower.restart()
        try follower.waitUntilServing()
        #expect(Self.keys(follower, "k") == 400 && Self.keys(follower, "after") == 1)
    }

    /// Every member sends its first snapshot image with one byte flipped after its checksums were
    /// taken (a failpoint of debug builds): the receiver refuses it, naming the file and offset,
    /// and the leader's next image gets through.
    @Test func aSnapshotDamagedOnTheWayIsRefusedAndSentAgain() throws {
        let (members, _, follower) = try Self.followerBehindCompaction(environment: ["ETCDLITE_FAILPOINT_SNAPSHOT": "corrupt-send:1"])
        defer { for m in members { m.stop() } }
        try #require(Self.log(members[0]).contains("failpoint armed"), "a debug build (failpoints compiled in)")
        try follower.restart()
        #expect(MembershipTests.eventually(30) { Self.keys(follower, "k") == 400 }, "the restarted member has every write")
        let log = Self.log(follower)
        #expect(log.contains("received a damaged snapshot image; refused"), "\(log.suffix(3000))")
        let refusal = log.firstMatch(of: /snapshot image (\S+incoming-\S+\.db) corrupted at offset (\d+): block checksum mismatch/)
        #expect(refusal != nil, "the refusal names the file and the offset")
        #expect(log.contains("installed a snapshot from the leader"))
        // Nothing of the refused image is left behind, and the stores agree.
        if let refusal { #expect(!FileManager.default.fileExists(atPath: String(refusal.1))) }
        #expect(Self.storesAreEqual(members), "the three stores are equal")
    }

    /// An image that checked out on arrival and was damaged on the receiver's disk before it was
    /// installed (a failpoint flips one byte): the member stops with an error naming the file and
    /// offset, having installed nothing of it; restarted, it catches up from a good image.
    @Test func aSnapshotDamagedOnDiskStopsTheMemberBeforeItIsInstalled() throws {
        let (members, _, follower) = try Self.followerBehindCompaction()
        defer { for m in members { m.stop() } }
        try follower.restart(environment: ["ETCDLITE_FAILPOINT_SNAPSHOT": "corrupt-install", "SWIFT_BACKTRACE": "enable=no"])
        #expect(MembershipTests.eventually(30) { !follower.process.isRunning }, "the member stopped")
        let log = Self.log(follower)
        try #require(log.contains("failpoint armed"), "a debug build (failpoints compiled in)")
        #expect(log.firstMatch(of: /snapshot image \S+incoming-\S+\.db corrupted at offset \d+: block checksum mismatch/) != nil, "\(log.suffix(3000))")
        #expect(!log.contains("installed a snapshot from the leader"))
        // Restarted without the fault: its own store was left as it was, the next image installs.
        try follower.restart()
        #expect(MembershipTests.eventually(30) { Self.keys(follower, "k") == 400 }, "the restarted member has every write")
        #expect(Self.keys(follower, "early") == 20)
        #expect(Self.log(follower).contains("installed a snapshot from the leader"))
    }

    @Test func aLearnerAddedAfterCompactionStartsFromASnapshot() throws {
        let (first, id, _, peerPort, peerURL) = try MembershipTests.memberWithLearner(keys: 300, extra: Self.compactOften)
        defer { first.process.stop() }
        let second = try MembershipTests.start("b", initialCluster: "\(first.initial),b=\(peerURL)", existing: true, peerPort: peerPort,
                                               extra: Self.compactOften)
        defer { second.process.stop() }
        #expect(MembershipTests.eventually(20) { Self.keys(second.process, "k") == 300 }, "the learner has every key")
        #expect(Self.log(second.process).contains("installed a snapshot from the leader"), "from a snapshot, not the whole log")
        if let id {
            #expect(MembershipTests.eventually { try first.process.etcdctl(["member", "promote", id]).status == 0 })
            // The snapshot carried the membership (a learner may not list it; a voter may).
            #expect(try MembershipTests.memberList(second.process).count == 2)
            #expect(try second.process.etcdctl(["put", "from", "b"]).status == 0)
            #expect(try first.process.etcdctl(["get", "from", "--print-value-only"]).stdout == "b\n")
        }
    }
}
