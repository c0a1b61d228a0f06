import Foundation
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

    public init(node: String, manifestsDir: String, hostPath: String, client: KubeClient?, namespace: String, clusterName: String) {
        self.node = node
        self.manifestsDir = manifestsDir
        self.hostPath = hostPath
        self.client = client
        recordsPath = "/api/v1/namespaces/\(namespace)/configmaps/\(clusterName)-members"
    }

    /// Members this agent wrote manifests for, by data directory (`<hostPath>/.etcdlite-agent.json`).
    struct State: Codable {
        var members: [String: String] = [:]  // data directory name → member name
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
        let bootRemoved = data[Self.bootKey].map { $0.contains("\"removed\":true") } ?? false
        let records = Array(KubernetesPlatform.records(in: data).values)
        lastRecords = records
        return try apply(records, bootRemoved: bootRemoved)
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
        let encoded = try JSONEncoder().encode(state)
        try encoded.write(to: URL(fileURLWithPath: statePath), options: .atomic)
        return done
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
        while !shouldStop() {
            do {
                let done = try await pass()
                if !done.isEmpty { onDone(done) }
            } catch {
                onError(error)
            }
            if let checkpointInterval, ContinuousClock.now >= nextCheckpoint, !lastRecords.isEmpty {
                nextCheckpoint = ContinuousClock.now + checkpointInterval
                let done = await checkpoint(lastRecords) { KubernetesPlatform.checkSnapshot($0) }
                if !done.isEmpty { onDone(done) }
            }
            try? await Task.sleep(for: interval)
        }
    }
}
