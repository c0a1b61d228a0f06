import EtcdLiteClient
import EtcdLiteProto
import EtcdOperator
import Foundation
import NIOCore
import Synchronization

/// The self-hosting scenario on the local platform, with real members and a real operator as
/// processes: boot member → pivot to 3 self-hosted members → 5 → 3 → rolling upgrade (a new binary
/// path) → kill -9 every member → back on its own. A writer puts keys one after another all the
/// way through and records every acknowledged write; each step reports the elections it caused
/// (raft term growth seen in the writer's responses) and the longest time with no acknowledged
/// write; at the end every acknowledged key must be there.
public struct SelfHostScenario: Sendable {
    public struct Step: Sendable, Codable {
        public var name: String
        public var seconds: Double
        public var elections: UInt64
        public var longestGapSeconds: Double
        public var writes: Int
        public var reached: Bool
    }

    public struct Report: Sendable, Codable {
        public var steps: [Step]
        public var acknowledged: Int
        public var missing: [String]
        /// From kill -9 of every member to the next acknowledged write.
        public var recoverySeconds: Double?
        public var passed: Bool { steps.allSatisfy(\.reached) && missing.isEmpty && recoverySeconds != nil }

        public var table: String {
            func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
            func left(_ s: String, _ n: Int) -> String { s.count >= n ? s : String(repeating: " ", count: n - s.count) + s }
            var lines = [pad("step", 24) + left("seconds", 9) + left("elections", 11) + left("longest gap (s)", 17) + left("writes", 8)]
            for s in steps {
                lines.append(pad(s.name, 24) + left(String(format: "%.1f", s.seconds), 9) + left(String(s.elections), 11)
                             + left(String(format: "%.2f", s.longestGapSeconds), 17) + left(String(s.writes), 8) + (s.reached ? "" : "  NOT REACHED"))
            }
            lines.append("acknowledged writes: \(acknowledged), missing afterwards: \(missing.count)")
            lines.append("kill -9 of every member to the next acknowledged write: " + (recoverySeconds.map { String(format: "%.1f s", $0) } ?? "never"))
            return lines.joined(separator: "\n")
        }
    }

    public var binary: String
    public var directory: URL
    public var basePort: Int
    public var reconcileMilliseconds = 200
    public var stepTimeout = 180.0
    /// Progress lines.
    public var log: @Sendable (String) -> Void = { _ in }

    public init(binary: String, directory: URL, basePort: Int) {
        self.binary = binary
        self.directory = directory
        self.basePort = basePort
    }

    public func run() async throws -> Report {
        let fm = FileManager.default
        try fm.createDirectory(at: directory, withIntermediateDirectories: true)
        let bootClient = "http://127.0.0.1:\(basePort - 2)", bootPeer = "http://127.0.0.1:\(basePort - 1)"
        let boot = try ChildProcess(executable: binary, arguments: [
            "--name", "boot", "--data-dir", directory.appendingPathComponent("boot").path,
            "--listen-client-urls", bootClient, "--advertise-client-urls", bootClient,
            "--listen-peer-urls", bootPeer, "--initial-advertise-peer-urls", bootPeer,
            "--initial-cluster", "boot=\(bootPeer)", "--initial-cluster-token", "selfhost",
        ], environment: ProcessInfo.processInfo.environment, log: directory.appendingPathComponent("boot.log").path)
        defer { boot.signal(SIGKILL) }

        let configPath = directory.appendingPathComponent("cluster.json").path
        var config = LocalConfig(name: "selfhost", dataRoot: directory.appendingPathComponent("root").path, basePort: basePort, size: 3, version: binary)
        config.boot = .init(name: "boot", clientURL: bootClient)
        config.reconcileIntervalMilliseconds = reconcileMilliseconds
        config.backup = .init(intervalSeconds: 5, retain: 3, dir: nil)
        let endpoints = [bootClient] + (0..<6).map { "http://127.0.0.1:\(basePort + 2 * $0)" }
        let writer = Writer(endpoints: endpoints)
        let writing = Task { await writer.run() }
        defer { writing.cancel() }
        // The boot member serves alone first.
        let deadline = Date().addingTimeInterval(30)
        while writer.acks.withLock({ $0.isEmpty }) && Date() < deadline { try await Task.sleep(for: .milliseconds(50)) }
        guard !writer.acks.withLock({ $0.isEmpty }) else { throw VerifyError("the boot member never took a write") }

        try config.save(configPath)
        let operatorProcess = try ChildProcess(executable: binary, arguments: ["operator", "--config", configPath],
                                               environment: ProcessInfo.processInfo.environment,
                                               log: directory.appendingPathComponent("operator.log").path)
        defer {
            operatorProcess.signal(SIGKILL)
            for pid in Self.memberPids(config) { kill(pid, SIGKILL) }
        }
        var steps: [Step] = []
        func step(_ name: String, _ change: () throws -> Void, until done: @escaping (ClusterStatus) -> Bool) async throws {
            let started = Date()
            let term = writer.lastTerm
            try change()
            log("\(name)…")
            let reached = await waitFor(config, since: started, done)
            let ended = Date()
            let result = Step(name: name, seconds: ended.timeIntervalSince(started), elections: writer.lastTerm - term,
                              longestGapSeconds: writer.longestGap(from: started, to: ended), writes: writer.count(from: started, to: ended),
                              reached: reached)
            log(String(format: "%@: %.1f s, %d elections, longest gap %.2f s%@", name, result.seconds, result.elections,
                       result.longestGapSeconds, reached ? "" : ", NOT REACHED"))
            steps.append(result)
            guard reached else { throw Abort() }
        }
        let nextBinary = directory.appendingPathComponent("etcdlite-next").path
        var recovery: Double?
        do {
            try await step("pivot to 3 self-hosted", {}) { s in
                s.members.count == 3 && !s.members.contains { $0.name == "boot" }
            }
            try await step("scale to 5", {
                config.size = 5
                try config.save(configPath)
            }) { $0.members.count == 5 }
            try await step("scale to 3", {
                config.size = 3
                try config.save(configPath)
            }) { $0.members.count == 3 }
            try await step("rolling upgrade", {
                try? fm.removeItem(atPath: nextBinary)
                try fm.copyItem(atPath: binary, toPath: nextBinary)
                config.version = nextBinary
                try config.save(configPath)
            }) { s in s.members.count == 3 && s.members.allSatisfy { $0.version == nextBinary } }
            var killedAt = Date()
            try await step("kill -9 every member", {
                let pids = Self.memberPids(config)
                for pid in pids { kill(pid, SIGKILL) }
                // From the moment every member is gone (a put answered while SIGKILL was on its
                // way does not count as recovered).
                let deadline = Date().addingTimeInterval(5)
                while pids.contains(where: Self.isRunning) && Date() < deadline { usleep(5_000) }
                killedAt = Date()
            }) { s in s.members.count == 3 && s.reconciles > 0 }
            recovery = writer.firstAck(after: killedAt).map { $0.timeIntervalSince(killedAt) }
        } catch is Abort {}
        writing.cancel()
        await writer.stopped()
        let acked = writer.keys()
        let present = try await Self.presentKeys(endpoints)
        let missing = acked.filter { !present.contains($0) }
        return Report(steps: steps, acknowledged: acked.count, missing: Array(missing.prefix(20)), recoverySeconds: recovery)
    }

    private struct Abort: Error {}

    /// Waits until the operator's status is steady, written after `since`, and `done` holds.
    private func waitFor(_ config: LocalConfig, since: Date, _ done: (ClusterStatus) -> Bool) async -> Bool {
        let path = config.dataRoot + "/status.json"
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        let deadline = Date().addingTimeInterval(stepTimeout)
        while Date() < deadline {
            if let data = FileManager.default.contents(atPath: path), let status = try? decoder.decode(ClusterStatus.self, from: data),
               status.action == "steady", let updated = status.updated, updated > since.addingTimeInterval(1),
               status.members.allSatisfy({ $0.healthy && !$0.learner }), done(status) {
                return true
            }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return false
    }

    /// The members' processes (a pid file's pid only while that process runs on our data root:
    /// never a reused pid).
    static func memberPids(_ config: LocalConfig) -> [pid_t] {
        let dir = config.dataRoot + "/members"
        return ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasSuffix(".pid") }.compactMap {
            (try? String(contentsOfFile: dir + "/" + $0, encoding: .utf8)).flatMap { pid_t($0.trimmingCharacters(in: .whitespacesAndNewlines)) }
        }.filter { pid in
            let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline").map { String(decoding: $0, as: UTF8.self) } ?? ""
            return cmdline.contains(config.dataRoot + "/data/")
        }
    }

    /// Still running (neither gone nor a zombie waiting for its parent).
    static func isRunning(_ pid: pid_t) -> Bool {
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8), let close = stat.lastIndex(of: ")") else { return false }
        return stat[stat.index(close, offsetBy: 2)] != "Z"
    }

    /// Every key under the writer's prefix, read (linearizable) from the first member that answers.
    static func presentKeys(_ endpoints: [String]) async throws -> Set<String> {
        var request = Etcdserverpb_RangeRequest()
        request.key = Array(Writer.prefix.utf8).data
        request.rangeEnd = Array((Writer.prefix.dropLast() + "0").utf8).data
        request.keysOnly = true
        for endpoint in endpoints {
            guard let connection = try? await EtcdAdmin.connect(endpoint, timeout: .milliseconds(500)) else { continue }
            defer { Task { await connection.close() } }
            guard let bytes = try? await connection.unary("/etcdserverpb.KV/Range", try request.serializedBytes(), timeout: .seconds(10)),
                  let response = try? Etcdserverpb_RangeResponse(serializedBytes: bytes) else { continue }
            return Set(response.kvs.map { String(decoding: $0.key, as: UTF8.self) })
        }
        throw VerifyError("no member answered the final read")
    }
}

private extension Array where Element == UInt8 {
    var data: Data { Data(self) }
}

/// Puts keys one after another (at most 200 a second) through whichever endpoint answers,
/// recording each acknowledgement's time and raft term.
final class Writer: Sendable {
    static let prefix = "selfhost/"
    let endpoints: [String]
    let acks = Mutex<[(key: String, time: Date, term: UInt64)]>([])
    private let done = Mutex<Bool>(false)

    init(endpoints: [String]) { self.endpoints = endpoints }

    func run() async {
        var next = 0, seq = 0
        var connection: GRPCClientConnection?
        while !Task.isCancelled {
            if connection == nil {
                connection = try? await EtcdAdmin.connect(endpoints[next % endpoints.count], timeout: .milliseconds(500))
                if connection == nil {
                    next += 1
                    try? await Task.sleep(for: .milliseconds(20))
                    continue
                }
            }
            let key = Self.prefix + String(format: "%08d", seq)
            var put = Etcdserverpb_PutRequest()
            put.key = Data(key.utf8)
            put.value = Data(String(seq).utf8)
            do {
                let bytes = try await connection!.unary("/etcdserverpb.KV/Put", try put.serializedBytes(), timeout: .seconds(1))
                let response = try Etcdserverpb_PutResponse(serializedBytes: bytes)
                acks.withLock { $0.append((key, Date(), response.header.raftTerm)) }
                seq += 1
                try? await Task.sleep(for: .milliseconds(5))
            } catch {
                // Not acknowledged: the same key again elsewhere (a put is idempotent here).
                await connection?.close()
                connection = nil
                next += 1
            }
        }
        await connection?.close()
        done.withLock { $0 = true }
    }

    func stopped() async {
        while !done.withLock({ $0 }) { try? await Task.sleep(for: .milliseconds(20)) }
    }

    var lastTerm: UInt64 { acks.withLock { $0.last?.term ?? 0 } }

    func keys() -> [String] { acks.withLock { $0.map(\.key) } }

    func count(from start: Date, to end: Date) -> Int { acks.withLock { $0.filter { $0.time >= start && $0.time <= end }.count } }

    func firstAck(after time: Date) -> Date? { acks.withLock { $0.first { $0.time > time }?.time } }

    /// The longest stretch of [start, end] with no acknowledged write.
    func longestGap(from start: Date, to end: Date) -> Double {
        let times = acks.withLock { $0.map(\.time).filter { $0 >= start && $0 <= end } }
        var previous = start, longest = 0.0
        for t in times + [end] {
            longest = max(longest, t.timeIntervalSince(previous))
            previous = t
        }
        return longest
    }
}
