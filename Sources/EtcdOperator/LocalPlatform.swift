import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The local platform's configuration: a small JSON file, read again on every pass (edit `size`
/// to scale, `version` to upgrade).
public struct LocalConfig: Codable, Sendable, Equatable {
    public struct Boot: Codable, Sendable, Equatable {
        /// The boot member's `--name`.
        public var name: String
        public var clientURL: String

        public init(name: String, clientURL: String) {
            self.name = name
            self.clientURL = clientURL
        }
    }

    public struct Backup: Codable, Sendable, Equatable {
        public var intervalSeconds: Double
        /// Snapshots kept (the newest).
        public var retain: Int
        /// Where they go; default `<dataRoot>/backups`.
        public var dir: String?

        public init(intervalSeconds: Double, retain: Int, dir: String? = nil) {
            self.intervalSeconds = intervalSeconds
            self.retain = retain
            self.dir = dir
        }
    }

    /// Cluster name: the `--initial-cluster-token` of the members.
    public var name: String
    /// Members' data, their recovery records and logs.
    public var dataRoot: String
    /// The address members listen and advertise on (an address, not a name; default 127.0.0.1).
    public var host: String?
    /// member-N listens for clients on basePort + 2N and for peers on basePort + 2N + 1.
    public var basePort: Int
    public var size: Int
    /// The etcdlite binary members run (its path is the version).
    public var version: String
    public var boot: Boot?
    /// More flags for every member (for example --heartbeat-interval).
    public var memberFlags: [String]?
    public var backup: Backup?
    public var reconcileIntervalMilliseconds: Int?
    /// A learner not promoted after this long is removed (default 120).
    public var learnerCatchUpSeconds: Double?
    /// Defragment a member when its database is larger than this and less than half is in use
    /// (default 64 MiB).
    public var defragmentAboveBytes: Int64?
    /// Re-seed the cluster from a chosen snapshot, once per `id` (a new id asks again).
    public var restore: RestoreRequest?

    public init(name: String, dataRoot: String, basePort: Int, size: Int, version: String) {
        self.name = name
        self.dataRoot = dataRoot
        self.basePort = basePort
        self.size = size
        self.version = version
    }

    public static func load(_ path: String) throws -> LocalConfig {
        guard let data = FileManager.default.contents(atPath: path) else { throw OperatorError("cannot read \(path)") }
        do {
            let config = try JSONDecoder().decode(LocalConfig.self, from: data)
            guard config.size >= 1 else { throw OperatorError("\(path): size must be at least 1") }
            return config
        } catch let error as DecodingError {
            throw OperatorError("\(path): \(error)")
        }
    }

    public func save(_ path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(self).write(to: URL(fileURLWithPath: path), options: .atomic)
    }
}

public struct OperatorError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// A member's recovery record on its node: everything needed to start it again without the
/// operator's memory or any API (the local counterpart of a static pod manifest).
public struct MemberRecord: Codable, Sendable, Equatable {
    public var name: String
    /// Known once MemberAdd answered.
    public var id: UInt64?
    public var clientURL: String
    public var peerURL: String
    /// The binary it runs.
    public var binary: String
    public var initialCluster: String
    /// "existing" (joined through MemberAdd) or "new" (a cluster seeded from a snapshot).
    public var initialClusterState: String
    public var clusterToken: String
    /// It was started once: its data directory exists from then on, and its absence means the
    /// data is lost.
    public var started: Bool
    /// The node it runs on (Kubernetes).
    public var node: String?
    /// Its data directory's name, of this identity alone (a member added again gets a new one,
    /// so it never starts on another identity's data).
    public var dataName: String?
    /// A snapshot its data directory is restored from before it first starts (a re-seed).
    public var restoreFrom: String?
    /// Kubernetes: its static pod manifest (JSON), which the node agent of its node writes for
    /// the kubelet.
    public var manifest: String?
}

/// Members as processes on this machine: `<dataRoot>/data/<name>` (data), `<dataRoot>/members/`
/// (records and pid files), `<dataRoot>/logs/`. Members run in their own sessions: they outlive
/// the operator, and a new operator finds them through their pid files.
public final class LocalPlatform: MemberPlatform, @unchecked Sendable {
    public let configPath: String
    public private(set) var config: LocalConfig
    private var children: Set<pid_t> = []
    private var operatorLock: Int32 = -1

    public init(configPath: String) throws {
        self.configPath = configPath
        config = try LocalConfig.load(configPath)
        for dir in [recordsDir, dataDir, logsDir] { try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true) }
    }

    /// Reads the configuration again (a bad edit keeps the last good one).
    public func refresh() throws {
        config = try LocalConfig.load(configPath)
    }

    public var bootMemberName: String? { config.boot?.name }

    public var settings: OperatorSettings {
        var settings = OperatorSettings()
        settings.reconcileInterval = .milliseconds(config.reconcileIntervalMilliseconds ?? 500)
        if let seconds = config.learnerCatchUpSeconds { settings.learnerCatchUpSeconds = seconds }
        if let bytes = config.defragmentAboveBytes { settings.defragmentAboveBytes = bytes }
        settings.backupIntervalSeconds = config.backup?.intervalSeconds
        settings.backupRetain = config.backup?.retain ?? 5
        return settings
    }

    public func memberName(peerURLs: [String]) -> String? {
        records().first { peerURLs.contains($0.peerURL) }?.name
    }

    public func prepare(_ name: String) throws -> String {
        try plan(name).peerURL
    }

    public func joined(_ name: String, id: UInt64, initialCluster: String) throws {
        guard var record = record(name) else { throw OperatorError("no record of \(name)") }
        record.id = id
        record.initialCluster = initialCluster
        try save(record)
    }

    public func hasJoined(_ name: String) -> Bool {
        record(name).map { !$0.initialCluster.isEmpty } ?? false
    }

    public func runningClientURLs() -> [String] {
        records().filter { pid(of: $0.name) != nil }.map(\.clientURL)
    }

    public func publish(_ status: ClusterStatus) {
        if let data = try? JSONEncoder.status.encode(status) {
            try? data.write(to: URL(fileURLWithPath: statusPath), options: .atomic)
        }
        try? status.metricsText.write(toFile: config.dataRoot + "/operator.prom", atomically: true, encoding: .utf8)
    }

    public func event(_ reason: String, _ message: String, warning: Bool) {}

    var recordsDir: String { config.dataRoot + "/members" }
    var dataDir: String { config.dataRoot + "/data" }
    var logsDir: String { config.dataRoot + "/logs" }
    public var backupDir: String { config.backup?.dir ?? config.dataRoot + "/backups" }
    public var statusPath: String { config.dataRoot + "/status.json" }

    /// A member's data directory (records from before `dataName` use the member's name).
    public func dataDir(_ name: String) -> String { dataDir(record(name)) ?? dataDir + "/" + name }
    func dataDir(_ record: MemberRecord?) -> String? { record.map { dataDir + "/" + ($0.dataName ?? $0.name) } }
    func recordPath(_ name: String) -> String { recordsDir + "/" + name + ".json" }
    func pidPath(_ name: String) -> String { recordsDir + "/" + name + ".pid" }

    public var desired: DesiredCluster {
        var desired = DesiredCluster(size: config.size, version: config.version)
        // A hash of the configuration stands in for Kubernetes' metadata.generation.
        let data = (try? JSONEncoder.status.encode(config)) ?? Data()
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for byte in data { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        desired.generation = String(hash, radix: 16)
        desired.restore = config.restore
        return desired
    }

    /// The status the last operator wrote (a new one resumes from it).
    public func savedStatus() -> ClusterStatus? {
        FileManager.default.contents(atPath: statusPath).flatMap { try? JSONDecoder.status.decode(ClusterStatus.self, from: $0) }
    }

    // MARK: Records

    public func records() -> [MemberRecord] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: recordsDir)) ?? []
        return names.filter { $0.hasSuffix(".json") }.sorted().compactMap { file in
            FileManager.default.contents(atPath: recordsDir + "/" + file).flatMap { try? JSONDecoder().decode(MemberRecord.self, from: $0) }
        }
    }

    public func record(_ name: String) -> MemberRecord? {
        FileManager.default.contents(atPath: recordPath(name)).flatMap { try? JSONDecoder().decode(MemberRecord.self, from: $0) }
    }

    public func save(_ record: MemberRecord) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        try encoder.encode(record).write(to: URL(fileURLWithPath: recordPath(record.name)), options: .atomic)
    }

    /// A new member's record (before MemberAdd, so that a crash after MemberAdd still knows which
    /// peer URL is whose).
    public func plan(_ name: String) throws -> MemberRecord {
        guard let n = Int(name.split(separator: "-").last ?? "") else { throw OperatorError("member names are member-N, not \(name)") }
        let record = MemberRecord(name: name, id: nil, clientURL: "http://\(config.host ?? "127.0.0.1"):\(config.basePort + 2 * n)",
                                  peerURL: "http://\(config.host ?? "127.0.0.1"):\(config.basePort + 2 * n + 1)", binary: config.version,
                                  initialCluster: "", initialClusterState: "existing", clusterToken: config.name, started: false,
                                  dataName: "\(name)-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))")
        try save(record)
        return record
    }

    /// Client URLs of every member known here, the boot member first.
    public var endpoints: [String] {
        (config.boot.map { [$0.clientURL] } ?? []) + records().map(\.clientURL)
    }

    // MARK: Workloads

    /// Every started member's process: running, stopped on intact data, or with its data gone.
    /// A record never started is not a workload yet (the planner starts it once it is a member).
    public func workloads() -> [ObservedWorkload] {
        reapChildren()
        return records().filter(\.started).map { record in
            let state: ObservedWorkload.State
            let member = dataDir(record.name) + "/member"
            if pid(of: record.name) != nil {
                state = .running
            } else if FileManager.default.fileExists(atPath: member + "/store.db") && FileManager.default.fileExists(atPath: member + "/raft") {
                state = .stopped
            } else {
                // Gone, or a start that was refused before it had a log ("has already been
                // bootstrapped": its data was lost after it had started once).
                state = .dataLost
            }
            return ObservedWorkload(name: record.name, state: state, version: record.binary)
        }
    }

    /// The process of a member, if one runs on its data directory: its pid file's, or, when a
    /// crash came between spawning it and writing that file, the one /proc shows on its data
    /// directory (the pid file is written again).
    public func pid(of name: String) -> pid_t? {
        let dir = dataDir(name)
        if let text = try? String(contentsOfFile: pidPath(name), encoding: .utf8),
           let pid = pid_t(text.trimmingCharacters(in: .whitespacesAndNewlines)), Self.isAlive(pid, dataDir: dir) {
            return pid
        }
        let candidates = ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap(pid_t.init)
        guard let found = candidates.first(where: { Self.isAlive($0, dataDir: dir) }) else { return nil }
        try? String(found).write(toFile: pidPath(name), atomically: true, encoding: .utf8)
        return found
    }

    /// The process exists, is not a zombie, and runs on that data directory (not a reused pid).
    static func isAlive(_ pid: pid_t, dataDir: String) -> Bool {
        guard kill(pid, 0) == 0 || errno == EPERM else { return false }
        if let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
           let close = stat.lastIndex(of: ")"), stat[stat.index(close, offsetBy: 2)] == "Z" { return false }
        guard let cmdline = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
        let arguments = cmdline.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        return arguments.contains(dataDir)
    }

    private func reapChildren() {
        for child in children {
            var status: Int32 = 0
            let result = waitpid(child, &status, WNOHANG)
            if result == child || (result < 0 && errno == ECHILD) { children.remove(child) }
        }
    }

    /// Starts a member's process from its record.
    public func start(_ name: String) throws {
        guard var record = record(name) else { throw OperatorError("no record of \(name)") }
        if pid(of: name) != nil { return }
        var arguments = ["--name", name, "--data-dir", dataDir(name),
                         "--listen-client-urls", record.clientURL, "--advertise-client-urls", record.clientURL,
                         "--listen-peer-urls", record.peerURL, "--initial-advertise-peer-urls", record.peerURL,
                         "--initial-cluster-token", record.clusterToken]
        if !record.initialCluster.isEmpty {
            arguments += ["--initial-cluster", record.initialCluster, "--initial-cluster-state", record.initialClusterState]
        }
        arguments += config.memberFlags ?? []
        // Started from now on: should it not come up, its missing data makes it `dataLost`
        // (a learner that is removed and added again), never a record nobody starts.
        if !record.started {
            record.started = true
            try save(record)
        }
        try FileManager.default.createDirectory(atPath: dataDir(name), withIntermediateDirectories: true)
        let pid = try Self.spawn(record.binary, arguments, log: logsDir + "/" + name + ".log")
        children.insert(pid)
        Reconciler.failpoint("after-spawn")
        try String(pid).write(toFile: pidPath(name), atomically: true, encoding: .utf8)
    }

    /// SIGTERM (the member finishes what is in flight), SIGKILL after `grace` seconds.
    public func stop(_ name: String, grace: Double = 10) {
        guard let pid = pid(of: name) else { return }
        kill(pid, SIGTERM)
        let deadline = Date().addingTimeInterval(grace)
        while Self.isAlive(pid, dataDir: dataDir(name)) {
            reapChildren()
            if Date() > deadline { kill(pid, SIGKILL) }
            usleep(20_000)
        }
        try? FileManager.default.removeItem(atPath: pidPath(name))
    }

    /// Stops a member that is no longer one and deletes its data and record.
    public func delete(_ name: String) throws {
        stop(name)
        let dir = dataDir(name)
        if FileManager.default.fileExists(atPath: dir) { try FileManager.default.removeItem(atPath: dir) }
        try? FileManager.default.removeItem(atPath: recordPath(name))
    }

    /// Restarts a member on `binary`, its data kept.
    public func upgrade(_ name: String, to binary: String) throws {
        guard var record = record(name) else { throw OperatorError("no record of \(name)") }
        stop(name)
        record.binary = binary
        try save(record)
        try start(name)
    }

    /// Re-seeds the cluster from a snapshot: every member's data moves aside (never deleted) to
    /// `<dataRoot>/lost/`, and member-0 starts a new cluster on the snapshot's image.
    public func reseed(from snapshot: String) throws {
        let lost = config.dataRoot + "/lost/\(Int(Date().timeIntervalSince1970))-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))"
        try FileManager.default.createDirectory(atPath: lost, withIntermediateDirectories: true)
        for record in records() {
            stop(record.name)
            let dir = dataDir(record.name)
            if FileManager.default.fileExists(atPath: dir) {
                try FileManager.default.moveItem(atPath: dir, toPath: lost + "/" + (dir as NSString).lastPathComponent)
            }
            try FileManager.default.moveItem(atPath: recordPath(record.name), toPath: lost + "/" + record.name + ".json")
        }
        var record = try plan("member-0")
        // A new cluster: a token of its own, so that no ID of the old one comes back.
        record.clusterToken = "\(config.name)-\(Int(Date().timeIntervalSince1970))"
        record.initialCluster = "member-0=\(record.peerURL)"
        record.initialClusterState = "new"
        let result = try Self.run(config.version, ["snapshot", "restore", snapshot, "--data-dir", dataDir(record.name)])
        guard result.code == 0 else { throw OperatorError("snapshot restore failed: \(result.output)") }
        try save(record)
        try start(record.name)
    }

    /// A first member for a cluster that starts from nothing (no boot member, no records, no
    /// data ever moved aside): a new one-member cluster that the planner then grows.
    public func createFirstMember() throws -> String? {
        guard config.boot == nil, records().isEmpty, !FileManager.default.fileExists(atPath: config.dataRoot + "/lost") else { return nil }
        var record = try plan("member-0")
        record.initialCluster = "member-0=\(record.peerURL)"
        record.initialClusterState = "new"
        try save(record)
        try start(record.name)
        return record.name
    }

    /// One operator (or `etcdlite recover`) per data root: an exclusive flock held while the
    /// process lives.
    public func lockOperator() throws {
        let path = config.dataRoot + "/operator.lock"
        try FileManager.default.createDirectory(atPath: config.dataRoot, withIntermediateDirectories: true)
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0, flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            throw OperatorError("another operator (or etcdlite recover) runs on \(config.dataRoot)")
        }
        operatorLock = fd
    }

    /// Checks a snapshot with the binary's own reader (`etcdlite snapshot status`).
    public func verifySnapshot(_ path: String) -> String? {
        guard let result = try? Self.run(config.version, ["snapshot", "status", path]) else { return "cannot run \(config.version)" }
        return result.code == 0 ? nil : result.output
    }

    // MARK: Processes

    static func spawn(_ executable: String, _ arguments: [String], log: String) throws -> pid_t {
        try Spawn.process(executable, arguments, environment: ProcessInfo.processInfo.environment, log: log, newSession: true)
    }

    /// Runs a short command to its end (60 s at most): exit code (nil: killed) and output.
    static func run(_ executable: String, _ arguments: [String]) throws -> (code: Int32?, output: String) {
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-operator-\(UUID().uuidString).log").path
        defer { try? FileManager.default.removeItem(atPath: log) }
        let pid = try spawn(executable, arguments, log: log)
        let deadline = Date().addingTimeInterval(60)
        var status: Int32 = 0
        while waitpid(pid, &status, WNOHANG) == 0 {
            if Date() > deadline {
                kill(pid, SIGKILL)
                waitpid(pid, &status, 0)
                return (nil, (try? String(contentsOfFile: log, encoding: .utf8)) ?? "")
            }
            usleep(10_000)
        }
        let output = (try? String(contentsOfFile: log, encoding: .utf8)) ?? ""
        return (status & 0x7f == 0 ? (status >> 8) & 0xff : nil, output)
    }
}
