import Foundation
import NIOConcurrencyHelpers
#if canImport(Glibc)
import Glibc
#endif

/// `etcdlite node-agent`: on each node that may run members, turns the members' records (the
/// ConfigMap `<cluster>-members`) into static pod manifests for the kubelet, and back.
///
/// - A record started on this node: its manifest is written to the kubelet's manifest directory
///   as `etcdlite-<member>.json` (rewritten when it changes: an upgrade).
/// - A member whose record went (removed, replaced under a new identity, re-seeded): its
///   manifest is deleted, and its data directory is moved to `<hostPath>/.removed` (the newest
///   three kept) once no process holds the directory's lock (the kubelet stops the pod
///   asynchronously).
/// - The boot member removed (`boot.json` in the ConfigMap): the boot member's manifest goes.
/// - The API server unreachable: nothing changes. The manifests stay where the kubelet reads them
///   at boot, so after a full power-off every member comes back on its own data, the API server
///   after them.
/// - Recovery checkpoints: on an interval, a snapshot of each member on this node is written to
///   `<hostPath>/checkpoints/<member>-<time>.db` and checked with `etcdlite snapshot status`; the
///   newest `checkpointsKept` of each member are kept. With the manifest, it is the member's
///   checkpoint on its own node: a store to re-seed from when no quorum of data survives.
/// - No quorum of data surviving (and so no API server): the agents re-seed the cluster among
///   themselves from the records each last read (`<hostPath>/.etcdlite-records.json`), see
///   `RecoveryPlan` and NodeAgent+Recovery.swift.
public final class NodeAgent: @unchecked Sendable {
    /// The ConfigMap key that says the boot member was removed.
    public static let bootKey = "boot.json"
    /// The boot member's manifest as `etcdlite bootstrap render` names it.
    public static let bootManifest = "etcdlite-boot.json"
    /// Data directories of removed members kept in `<hostPath>/.removed` (the newest).
    static let removedKept = 3
    /// Recovery checkpoints kept per member (the newest).
    public static let checkpointsKept = 2
    /// The records of the last pass that read them.
    private var lastRecords: [MemberRecord] = []

    public let node: String
    public let manifestsDir: String
    public let hostPath: String
    let client: KubeClient?
    let recordsPath: String

    public let namespace: String
    public let clusterName: String
    /// Seconds the API server must have been silent before the agents re-seed on their own.
    public var recoveryGrace: Double = 60
    /// Where another node's agent serves `/recovery`, from its node's name and address.
    public var agentURL: @Sendable (_ node: String, _ address: String) -> String = { _, address in "http://\(address):\(NodeAgent.recoveryPort)" }
    /// The port agents serve `/recovery` on (host network).
    public static let recoveryPort = 2382
    /// The etcdlite binary that checks snapshots (this very one unless a test says otherwise).
    public var executable: String? = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")
    let startedAt = Date()
    /// When the records were last read from the API server.
    var lastRead: Date?
    /// This agent's report as `/recovery` serves it.
    let served = NIOLockedValueBox<RecoveryReport?>(nil)
    /// Re-seed orders received on `/recovery/reseed`, for the next pass to check.
    let orders = NIOLockedValueBox<[ReseedOrder]>([])
    /// Nodes declared lost on `/recovery/presume-lost`, for the next pass.
    let presumptions = NIOLockedValueBox<Set<String>>([])
    /// The last recovery decision, in words.
    let lastPlanText = NIOLockedValueBox<String?>(nil)
    /// Checkpoint revisions already read, by path.
    var checkpointRevisions: [String: Int64] = [:]

    public init(node: String, manifestsDir: String, hostPath: String, client: KubeClient?, namespace: String, clusterName: String) {
        self.namespace = namespace
        self.clusterName = clusterName
        self.node = node
        self.manifestsDir = manifestsDir
        self.hostPath = hostPath
        self.client = client
        recordsPath = "/api/v1/namespaces/\(namespace)/configmaps/\(clusterName)-members"
    }

    /// Members this agent wrote manifests for, by data directory (`<hostPath>/.etcdlite-agent.json`).
    struct State: Codable {
        var members: [String: String] = [:]  // data directory name → member name
        /// A re-seed this agent takes part in, until the records carry its token.
        var reseed: ReseedOrder?
        /// Nodes a person declared lost during this outage (cleared when the API server answers).
        var presumedLost: [String]?
    }

    var statePath: String { hostPath + "/.etcdlite-agent.json" }

    func loadState() -> State {
        FileManager.default.contents(atPath: statePath).flatMap { try? JSONDecoder().decode(State.self, from: $0) } ?? State()
    }

    /// One pass against the API: the records, then the files. Throws (and changes nothing) when the
    /// API server does not answer.
    @discardableResult
    public func pass() async throws -> [String] {
        guard let client else { return [] }
        let data: [String: String]
        do {
            data = try await client.get(recordsPath)["data"] as? [String: String] ?? [:]
        } catch let error as KubeAPIError where error.isNotFound {
            data = [:]
        }
        lastRead = Date()
        let bootRemoved = data[Self.bootKey].map { $0.contains("\"removed\":true") } ?? false
        var records = Array(KubernetesPlatform.records(in: data).values).sorted { $0.name < $1.name }
        var done: [String] = []
        var state = loadState()
        // The outage is over: a declaration made for it does not outlive it.
        let declared = state.presumedLost != nil
        state.presumedLost = nil
        let order = state.reseed
        if let order, records.contains(where: { $0.clusterToken == order.record.clusterToken }) {
            // The records carry the re-seed: it is over.
            state.reseed = nil
            done.append("the records carry the re-seed \(order.record.clusterToken)")
        }
        if declared || state.reseed != order { try saveState(state) }
        if let order = state.reseed {
            // The API server is back on the re-seeded store, whose records are the old ones:
            // the coordinator writes the re-seeded member's; until then they are not followed.
            if order.record.node == node {
                let platform = KubernetesPlatform(client: client, namespace: namespace, clusterName: clusterName)
                try await platform.loadRecords()
                try await platform.updateRecords { $0 = [order.record.name: order.record] }
                done.append("wrote the re-seeded member's record \(order.record.name)")
            }
            records = [order.record]
        }
        lastRecords = records
        var spec: String?
        if let cluster = try? await client.get("/apis/\(Manifests.group)/\(Manifests.version)/namespaces/\(namespace)/etcdliteclusters/\(clusterName)"),
           let object = cluster["spec"], let json = try? JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) {
            spec = String(decoding: json, as: UTF8.self)
        }
        saveCache(records, spec: spec)
        return try done + apply(records, bootRemoved: bootRemoved)
    }

    var checkpointsDir: String { hostPath + "/checkpoints" }

    /// A checkpoint of every member of this node among `records`: a snapshot from its client URL,
    /// kept once `verify` (nil: it checks out) accepts it; the newest `checkpointsKept` of each
    /// member stay. Returns what it did.
    public func checkpoint(_ records: [MemberRecord], verify: (String) async -> String?) async -> [String] {
        let fm = FileManager.default
        var done: [String] = []
        let admin = EtcdAdmin(timeout: .seconds(5))
        for record in records where record.node == node && record.started {
            try? fm.createDirectory(atPath: checkpointsDir, withIntermediateDirectories: true)
            let stamp = String(format: "%016llx", UInt64(Date().timeIntervalSince1970 * 1e6))
            let path = "\(checkpointsDir)/\(record.name)-\(stamp).db"
            do {
                let bytes = try await admin.verifiedSnapshot(record.clientURL, to: path, verify: verify)
                done.append("checkpoint of \(record.name): \(bytes) bytes")
            } catch {
                done.append("no checkpoint of \(record.name): \(error)")
                continue
            }
            for old in checkpoints(of: record.name).dropLast(Self.checkpointsKept) { try? fm.removeItem(atPath: old) }
        }
        return done
    }

    /// A member's checkpoints on this node, oldest first.
    public func checkpoints(of member: String) -> [String] {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: checkpointsDir)) ?? []
        return names.filter { $0.hasPrefix(member + "-") && $0.hasSuffix(".db") && $0.dropFirst(member.count + 1).count == 19 }
            .sorted().map { checkpointsDir + "/" + $0 }
    }

    /// Makes the files match the records; returns what it did.
    public func apply(_ records: [MemberRecord], bootRemoved: Bool) throws -> [String] {
        let fm = FileManager.default
        try fm.createDirectory(atPath: manifestsDir, withIntermediateDirectories: true)
        try fm.createDirectory(atPath: hostPath, withIntermediateDirectories: true)
        var state = loadState()
        var done: [String] = []
        let mine = records.filter { $0.node == node && $0.started && $0.manifest != nil }
        for record in mine {
            let path = manifestPath(record.name)
            let manifest = Data(record.manifest!.utf8)
            if fm.contents(atPath: path) != manifest {
                // Written beside it under a hidden name (the kubelet skips those), then renamed.
                let temporary = manifestsDir + "/.etcdlite-\(record.name).json.tmp"
                try manifest.write(to: URL(fileURLWithPath: temporary))
                if fm.fileExists(atPath: path) { _ = rename(temporary, path) } else { try fm.moveItem(atPath: temporary, toPath: path) }
                done.append("wrote \(record.name)")
            }
            if let dataName = record.dataName { state.members[dataName] = record.name }
        }
        let wanted = Set(mine.compactMap(\.dataName))
        for (dataName, name) in state.members where !wanted.contains(dataName) {
            // Gone from the records: its manifest first (unless a newer identity of the same name
            // runs here), then its data once nothing holds it.
            if !mine.contains(where: { $0.name == name }), fm.fileExists(atPath: manifestPath(name)) {
                try fm.removeItem(atPath: manifestPath(name))
                done.append("removed the manifest of \(name)")
            }
            let dir = hostPath + "/" + dataName
            guard Self.unlocked(dir) else { continue }
            if fm.fileExists(atPath: dir) {
                // Aside rather than deleted (a re-seed drops every record at once); the newest
                // few removed directories are kept.
                let removed = hostPath + "/.removed"
                try fm.createDirectory(atPath: removed, withIntermediateDirectories: true)
                try fm.moveItem(atPath: dir, toPath: removed + "/\(dataName)-\(Int(Date().timeIntervalSince1970))")
                let kept = try fm.contentsOfDirectory(atPath: removed).sorted {
                    let a = (try? fm.attributesOfItem(atPath: removed + "/" + $0)[.modificationDate] as? Date) ?? .distantPast
                    let b = (try? fm.attributesOfItem(atPath: removed + "/" + $1)[.modificationDate] as? Date) ?? .distantPast
                    return a > b
                }
                for old in kept.dropFirst(Self.removedKept) { try? fm.removeItem(atPath: removed + "/" + old) }
                done.append("moved the data of \(name) aside (\(dataName))")
            }
            state.members[dataName] = nil
        }
        if bootRemoved, fm.fileExists(atPath: manifestsDir + "/" + Self.bootManifest) {
            try fm.removeItem(atPath: manifestsDir + "/" + Self.bootManifest)
            done.append("removed the boot member's manifest")
        }
        try saveState(state)
        return done
    }

    func saveState(_ state: State) throws {
        try FileManager.default.createDirectory(atPath: hostPath, withIntermediateDirectories: true)
        try JSONEncoder().encode(state).write(to: URL(fileURLWithPath: statePath), options: .atomic)
    }

    func manifestPath(_ member: String) -> String { manifestsDir + "/etcdlite-\(member).json" }

    /// No process holds the member's data directory (the lock every etcdlite member takes).
    static func unlocked(_ dir: String) -> Bool {
        let lock = dir + "/member/lock"
        guard FileManager.default.fileExists(atPath: lock) else { return true }
        let fd = open(lock, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else { return false }
        flock(fd, LOCK_UN)
        return true
    }

    /// Passes every `interval` until `shouldStop`; failures (the API server away) are logged by
    /// the caller's `onError` and change nothing.
    /// Checkpoints are taken every `checkpointInterval` (nil: never), from the records last read.
    public func run(interval: Duration = .seconds(5), checkpointInterval: Duration? = nil, shouldStop: @Sendable () -> Bool,
                    onDone: @Sendable ([String]) -> Void, onError: @Sendable (any Error) -> Void) async {
        // The first soon after start (a node back from a power-off has none newer than before it).
        var nextCheckpoint = ContinuousClock.now + min(checkpointInterval ?? .zero, .seconds(60))
        var lastPlan: RecoveryPlan?
        while !shouldStop() {
            do {
                let done = try await pass()
                if !done.isEmpty { onDone(done) }
            } catch {
                onError(error)
            }
            // What `/recovery` answers, then what the API server's silence calls for.
            await publishReport()
            let (done, plan) = await recoveryPass()
            if !done.isEmpty { onDone(done) }
            if let plan, plan != lastPlan, apiSilence >= recoveryGrace {
                onDone(["recovery: \(plan)"])
                lastPlan = plan
            }
            if let checkpointInterval, ContinuousClock.now >= nextCheckpoint, !lastRecords.isEmpty {
                nextCheckpoint = ContinuousClock.now + checkpointInterval
                let done = await checkpoint(lastRecords) { [self] in checkSnapshot($0) }
                if !done.isEmpty { onDone(done) }
            }
            try? await Task.sleep(for: interval)
        }
    }
}
