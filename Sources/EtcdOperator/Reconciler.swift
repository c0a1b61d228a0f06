import EtcdLiteClient
import EtcdLiteProto
import Foundation
import Logging
import NIOConcurrencyHelpers

/// What the operator shows of a cluster (the EtcdLiteCluster's status; the local platform writes
/// it to `<dataRoot>/status.json`). Written before each mutation, naming it, so that a crash in
/// the middle of a step is visible and the next pass resumes from what it observes.
public struct ClusterStatus: Codable, Sendable, Equatable {
    public struct Member: Codable, Sendable, Equatable {
        public var id: String
        public var name: String
        public var clientURL: String?
        public var leader: Bool
        public var learner: Bool
        public var healthy: Bool
        public var appliedIndex: UInt64
        public var version: String?
    }

    public struct Condition: Codable, Sendable, Equatable {
        public var type: String
        public var status: String
        public var reason: String
        public var message: String
    }

    /// Pending, Creating (boot member or pivot), Running, Scaling, Upgrading, Recovering, Degraded.
    public var phase = "Pending"
    public var members: [Member] = []
    public var leader: String?
    public var conditions: [Condition] = []
    /// The action this pass is taking (or took last), in the planner's words.
    public var action: String?
    public var lastBackup: String?
    public var lastBackupTime: Date?
    /// The id of the last restore from a chosen snapshot.
    public var lastRestore: String?
    /// The configuration this status answers (a hash of the spec).
    public var observedGeneration: String?
    public var updated: Date?
    /// Operator metrics: passes made, actions by kind.
    public var reconciles = 0
    public var actions: [String: Int] = [:]
    /// The voting members when a quorum was last seen (the planner's yardstick without one).
    public var voters: [String]?
}

/// Observe, plan, act: one pass at a time, one action per pass.
public final class Reconciler: @unchecked Sendable {
    public let platform: any MemberPlatform
    let admin = EtcdAdmin(timeout: .seconds(2))
    let logger: Logger
    public private(set) var status = ClusterStatus()
    /// When each learner was first seen (a learner never promoted in time is removed).
    private var learnerSince: [UInt64: Date] = [:]
    private var lastDefragment = Date.distantPast
    private let nudged = NIOLockedValueBox(false)

    /// Something changed (a watch event): the next pass comes now rather than at the interval.
    public func nudge() { nudged.withLockedValue { $0 = true } }

    public init(platform: any MemberPlatform, resuming saved: ClusterStatus? = nil, logger: Logger = Logger(label: "etcdlite.operator")) {
        self.platform = platform
        self.logger = logger
        if let saved { status = saved }
    }

    /// Runs passes until `shouldStop` says so (or `passes` of them, when not 0). A pass runs
    /// only when `gate` allows it (on Kubernetes: this operator holds the leader lease).
    public func run(passes: Int = 0, shouldStop: @Sendable () -> Bool = { false }, gate: (@Sendable () async -> Bool)? = nil) async {
        var done = 0
        while !shouldStop() && (passes == 0 || done < passes) {
            done += 1
            if await gate?() ?? true { _ = await pass() }
            // Until the interval passes or a watch says something changed.
            let until = ContinuousClock.now + platform.settings.reconcileInterval
            while ContinuousClock.now < until && !nudged.withLockedValue({ $0 }) && !shouldStop() {
                try? await Task.sleep(for: .milliseconds(100))
            }
            nudged.withLockedValue { $0 = false }
        }
    }

    /// One pass: the action taken.
    @discardableResult
    public func pass() async -> PlannedAction {
        do {
            try await platform.refresh()
        } catch {
            logger.error("configuration not reloaded; the last good one stays", metadata: ["error": "\(error)"])
        }
        status.reconciles += 1
        let observation = await observe()
        let action = Self.unknownMember(observation) ?? Planner.next(platform.desired, observation)
        record(observation, action)
        if case .wait = action {} else if action != .steady {
            // Before the mutation: a crash now leaves it named in the status.
            await publish()
            logger.info("action", metadata: ["action": "\(action)", "phase": "\(status.phase)"])
            await platform.event(Self.reason(action), "\(action)", warning: false)
        }
        do {
            try await perform(action, observation)
        } catch {
            logger.warning("action failed; the next pass looks again", metadata: ["action": "\(action)", "error": "\(error)"])
            status.conditions = conditions(observation, failure: "\(action): \(error)")
            await platform.event("ActionFailed", "\(action): \(error)", warning: true)
        }
        if action == .steady { await maintain(observation) }
        await publish()
        return action
    }

    /// `etcdlite recover`: only the steps that bring a cluster without a quorum back (restarts on
    /// members' own data, or a re-seed from a snapshot), until a leader answers and every member
    /// with data runs. Returns whether that happened within `timeout` seconds.
    public func recover(timeout: Double) async -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            let observation = await observe()
            // Done when a leader answers and every member that can run on its data does.
            if observation.members?.contains(where: \.isLeader) == true && !observation.workloads.contains(where: { $0.state == .stopped }) {
                return true
            }
            let action = Planner.next(platform.desired, observation)
            switch action {
            case .restartInPlace, .restoreFromSnapshot, .deleteWorkload:
                record(observation, action)
                await publish()
                logger.info("recovering", metadata: ["action": "\(action)"])
                do { try await perform(action, observation) } catch {
                    logger.warning("recovery step failed", metadata: ["action": "\(action)", "error": "\(error)"])
                }
            default:
                try? await Task.sleep(for: .milliseconds(300))
            }
        }
        return false
    }

    /// A member nobody here recorded and that never started (someone else's MemberAdd, or a
    /// record lost): removed, as it can never be started from here.
    static func unknownMember(_ observation: Observation) -> PlannedAction? {
        guard let members = observation.members,
              let stranger = members.first(where: { $0.name.isEmpty }),
              let via = members.first(where: { $0.isLeader }) else { return nil }
        return .removeMember(id: stranger.id, via: via.id)
    }

    func observe() async -> Observation {
        var observer = MemberObserver(endpoints: platform.endpoints, bootMemberName: platform.bootMemberName)
        observer.admin = admin
        var members = await observer.observe()
        // A member MemberAdd made but that has not started has no name yet: known by its peer URL.
        if var list = members {
            for i in list.indices where list[i].name.isEmpty {
                if let name = platform.memberName(peerURLs: list[i].peerURLs) { list[i].name = name }
            }
            members = list
        }
        let now = Date()
        let learners = Set((members ?? []).filter(\.isLearner).map(\.id))
        learnerSince = learnerSince.filter { learners.contains($0.key) }
        for id in learners where learnerSince[id] == nil { learnerSince[id] = now }
        let patience = platform.settings.learnerCatchUpSeconds
        let stalled = Set(learnerSince.filter { now.timeIntervalSince($0.value) > patience }.map(\.key))
        let workloads: [ObservedWorkload]
        do {
            workloads = try await platform.workloads()
        } catch {
            // Without the platform's view nothing is safe to change: wait.
            logger.warning("workloads not observed", metadata: ["error": "\(error)"])
            return Observation(members: members, workloads: [], stalledLearners: stalled, platformAnswered: false, lastVoters: status.voters)
        }
        var observation = Observation(members: members, workloads: workloads, stalledLearners: stalled)
        observation.restoresDone = restoresDone()
        if let members, members.contains(where: \.isLeader) {
            status.voters = members.filter { !$0.isLearner && !$0.name.isEmpty }.map(\.name).sorted()
        }
        observation.lastVoters = status.voters
        return observation
    }

    func perform(_ action: PlannedAction, _ observation: Observation) async throws {
        let members = observation.members ?? []
        func endpoint(_ id: UInt64) throws -> String {
            guard let url = members.first(where: { $0.id == id })?.clientURLs.first else { throw OperatorError("member \(String(id, radix: 16)) has no client URL") }
            return url
        }
        switch action {
        case .steady, .wait:
            return
        case .addLearner(let name):
            guard let leader = members.first(where: \.isLeader) else { throw OperatorError("no leader") }
            let peerURL = try await platform.prepare(name)
            let added = try await admin.addMember(via: try endpoint(leader.id), peerURL: peerURL)
            Self.failpoint("after-member-add")
            // etcd's rule for a joining member: every member by name, the new one by its own.
            let initialCluster = added.members.compactMap { member -> String? in
                let memberName = member.id == added.member.id ? name : (member.name.isEmpty ? platform.memberName(peerURLs: member.peerUrls) : member.name)
                guard let memberName else { return nil }
                return member.peerUrls.map { "\(memberName)=\($0)" }.joined(separator: ",")
            }.joined(separator: ",")
            try await platform.joined(name, id: added.member.id, initialCluster: initialCluster)
            try await platform.start(name)
        case .startMember(let name):
            if !platform.hasJoined(name), let id = members.first(where: { $0.name == name })?.id {
                // A crash between MemberAdd and recording its answer: the member list has the rest.
                let initialCluster = members.compactMap { m in
                    m.name.isEmpty ? nil : m.peerURLs.map { "\(m.name)=\($0)" }.joined(separator: ",")
                }.joined(separator: ",")
                try await platform.joined(name, id: id, initialCluster: initialCluster)
            }
            try await platform.start(name)
        case .restartInPlace(let name):
            try await platform.start(name)
        case .promote(let id):
            guard let leader = members.first(where: \.isLeader) else { throw OperatorError("no leader") }
            try await admin.promote(via: try endpoint(leader.id), id: id)
        case .moveLeader(let target):
            guard let leader = members.first(where: \.isLeader) else { throw OperatorError("no leader") }
            try await admin.moveLeader(leader: try endpoint(leader.id), to: target)
        case .removeMember(let id, let via):
            try await admin.remove(via: try endpoint(via), id: id)
            if members.first(where: { $0.id == id })?.isBootMember == true { await platform.bootMemberRemoved() }
        case .deleteWorkload(let name):
            try await platform.delete(name)
        case .upgrade(let name, let version):
            try await platform.upgrade(name, to: version)
        case .restoreFromSnapshot:
            try await reseed(observation)
        case .restore(let id, let snapshot):
            try await restore(id: id, snapshot: snapshot, observation)
        }
    }

    /// No quorum of data survives: a survivor's store if one runs (newer than any backup), else
    /// the newest backup that verifies.
    func reseed(_ observation: Observation) async throws {
        // The survivor that applied the most (a lagging or cut-off member, or a learner, would
        // lose acknowledged writes), saved as a backup so that a crash from here on still has it.
        var best: (url: String, applied: UInt64)?
        for url in platform.endpoints {
            guard let s = try? await admin.status(url), !s.isLearner else { continue }
            if best == nil || s.raftAppliedIndex > best!.applied { best = (url, s.raftAppliedIndex) }
        }
        var source: String?
        if let best {
            try? FileManager.default.createDirectory(atPath: platform.backupDir, withIntermediateDirectories: true)
            let path = "\(platform.backupDir)/snapshot-\(Self.stamp())-survivor.db"
            if (try? await admin.snapshot(best.url, to: path)) != nil, await platform.verifySnapshot(path) == nil {
                source = path
            } else {
                try? FileManager.default.removeItem(atPath: path)
            }
        }
        if source == nil {
            for backup in backups().reversed() where await platform.verifySnapshot(backup) == nil {
                source = backup
                break
            }
        }
        guard let source else {
            if let first = try await platform.createFirstMember() {
                logger.info("a new cluster", metadata: ["member": "\(first)"])
                await platform.event("ClusterCreated", "a new cluster from \(first)", warning: false)
                return
            }
            throw OperatorError("no quorum of data survives and there is no snapshot to re-seed from")
        }
        logger.warning("re-seeding the cluster from a snapshot", metadata: ["snapshot": "\(source)"])
        await platform.event("Reseeding", "no quorum of data survives; re-seeding from \(source)", warning: true)
        try await platform.reseed(from: source)
    }

    /// A restore from the snapshot the user chose: checked first; the live store is saved as a
    /// backup (`…-before-restore-<id>.db`, when a member answers); the restore is marked done
    /// before the platform re-seeds (a restore that ran twice would throw away what was written
    /// after the first), and unmarked if the re-seed fails, to be tried again.
    func restore(id: String, snapshot: String, _ observation: Observation) async throws {
        if let problem = await platform.verifySnapshot(snapshot) { throw OperatorError("snapshot \(snapshot) does not check out: \(problem)") }
        let members = observation.members ?? []
        if let url = (members.first(where: \.isLeader) ?? members.first(where: \.healthy))?.clientURLs.first {
            try? FileManager.default.createDirectory(atPath: platform.backupDir, withIntermediateDirectories: true)
            let path = "\(platform.backupDir)/snapshot-\(Self.stamp())-before-restore-\(Self.markerName(id)).db"
            let saved = (try? await admin.snapshot(url, to: path)) != nil
            let problem = saved ? await platform.verifySnapshot(path) : "not saved"
            if problem != nil { try? FileManager.default.removeItem(atPath: path) }
        }
        let marker = restoreMarker(id)
        try FileManager.default.createDirectory(atPath: (marker as NSString).deletingLastPathComponent, withIntermediateDirectories: true)
        try Data(snapshot.utf8).write(to: URL(fileURLWithPath: marker))
        logger.warning("restoring the cluster from a chosen snapshot", metadata: ["id": "\(id)", "snapshot": "\(snapshot)"])
        await platform.event("Restoring", "restore \(id): the cluster is re-seeded from \(snapshot)", warning: true)
        do {
            try await platform.reseed(from: snapshot)
        } catch {
            try? FileManager.default.removeItem(atPath: marker)
            throw error
        }
        status.lastRestore = id
    }

    /// `<backupDir>/restores/<id>`: outside the store, so a restore that rolls the store (and a
    /// spec kept in it) back is not carried out again.
    func restoreMarker(_ id: String) -> String { "\(platform.backupDir)/restores/\(Self.markerName(id))" }

    static func markerName(_ id: String) -> String {
        String(id.map { $0.isLetter || $0.isNumber || $0 == "-" || $0 == "_" || $0 == "." ? $0 : "_" }.prefix(100))
    }

    func restoresDone() -> Set<String> {
        guard let id = platform.desired.restore?.id, FileManager.default.fileExists(atPath: restoreMarker(id)) else { return [] }
        return [id]
    }

    // MARK: Backups and defragmentation

    /// Backup files, oldest first.
    func backups() -> [String] {
        let dir = platform.backupDir
        let names = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { $0.hasPrefix("snapshot-") && $0.hasSuffix(".db") }
        return names.sorted().map { dir + "/" + $0 }
    }

    /// When steady: a backup when one is due, then one defragmentation at most.
    func maintain(_ observation: Observation) async {
        guard let members = observation.members, let leader = members.first(where: \.isLeader), let url = leader.clientURLs.first else { return }
        let settings = platform.settings
        if let interval = settings.backupIntervalSeconds, Date().timeIntervalSince(status.lastBackupTime ?? .distantPast) >= interval {
            await takeBackup(from: url, retain: settings.backupRetain)
        }
        let threshold = settings.defragmentAboveBytes
        guard Date().timeIntervalSince(lastDefragment) > 60 else { return }
        for member in members where member.healthy {
            guard let url = member.clientURLs.first, let s = try? await admin.status(url) else { continue }
            if s.dbSize > threshold && s.dbSizeInUse * 2 < s.dbSize {
                lastDefragment = Date()
                status.action = "defragment \(member.name)"
                await publish()
                do {
                    try await admin.defragment(url)
                    count("defragment")
                } catch {
                    logger.warning("defragment failed", metadata: ["member": "\(member.name)", "error": "\(error)"])
                }
                return
            }
        }
    }

    func takeBackup(from endpoint: String, retain: Int) async {
        let dir = platform.backupDir
        try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let path = "\(dir)/snapshot-\(Self.stamp()).db"
        do {
            try await admin.verifiedSnapshot(endpoint, to: path) { await platform.verifySnapshot($0) }
            status.lastBackup = path
            status.lastBackupTime = Date()
            count("backup")
            for old in backups().dropLast(max(1, retain)) { try? FileManager.default.removeItem(atPath: old) }
        } catch {
            logger.warning("backup failed", metadata: ["error": "\(error)"])
            status.conditions.append(.init(type: "BackupFailed", status: "True", reason: "SnapshotFailed", message: "\(error)"))
        }
    }

    // MARK: Status

    private func count(_ kind: String) { status.actions[kind, default: 0] += 1 }

    private func record(_ observation: Observation, _ action: PlannedAction) {
        let versions = Dictionary(observation.workloads.map { ($0.name, $0.version) }, uniquingKeysWith: { a, _ in a })
        status.members = (observation.members ?? []).map { m in
            .init(id: String(m.id, radix: 16), name: m.name, clientURL: m.clientURLs.first, leader: m.isLeader, learner: m.isLearner,
                  healthy: m.healthy, appliedIndex: m.appliedIndex, version: versions[m.name])
        }
        status.leader = observation.members?.first(where: \.isLeader)?.name
        status.action = "\(action)"
        status.observedGeneration = platform.desired.generation
        status.phase = Self.phase(action, observation)
        status.conditions = conditions(observation, failure: nil)
        switch action {
        case .wait, .steady: break
        case .addLearner: count("addLearner")
        case .startMember: count("startMember")
        case .restartInPlace: count("restartInPlace")
        case .promote: count("promote")
        case .moveLeader: count("moveLeader")
        case .removeMember: count("removeMember")
        case .deleteWorkload: count("deleteWorkload")
        case .upgrade: count("upgrade")
        case .restoreFromSnapshot: count("restoreFromSnapshot")
        case .restore: count("restore")
        }
    }

    static func phase(_ action: PlannedAction, _ observation: Observation) -> String {
        guard let members = observation.members else { return "Recovering" }
        switch action {
        case .steady: return "Running"
        case .upgrade: return "Upgrading"
        case .restartInPlace, .restoreFromSnapshot, .restore: return "Recovering"
        case .addLearner, .promote, .startMember, .removeMember, .deleteWorkload, .moveLeader:
            return members.contains(where: \.isBootMember) ? "Creating" : "Scaling"
        case .wait:
            let voters = members.filter { !$0.isLearner }
            return voters.filter(\.healthy).count * 2 > voters.count ? "Progressing" : "Degraded"
        }
    }

    private func conditions(_ observation: Observation, failure: String?) -> [ClusterStatus.Condition] {
        let voters = (observation.members ?? []).filter { !$0.isLearner }
        let healthy = voters.filter(\.healthy).count
        let available = healthy * 2 > voters.count && observation.members?.contains(where: \.isLeader) == true
        var list: [ClusterStatus.Condition] = [
            .init(type: "Available", status: available ? "True" : "False", reason: available ? "QuorumHealthy" : "NoQuorum",
                  message: "\(healthy) of \(voters.count) voting members healthy"),
            .init(type: "Progressing", status: status.phase == "Running" ? "False" : "True", reason: status.phase, message: status.action ?? ""),
            .init(type: "Degraded", status: healthy < voters.count || voters.isEmpty ? "True" : "False",
                  reason: healthy < voters.count ? "MemberUnhealthy" : "AllHealthy", message: ""),
        ]
        if let failure { list.append(.init(type: "ActionFailed", status: "True", reason: "Error", message: failure)) }
        return list
    }

    func publish() async {
        status.updated = Date()
        await platform.publish(status)
        published?(status)
    }

    /// Also told of every status published (the metrics endpoint).
    public var published: (@Sendable (ClusterStatus) -> Void)?

    /// `ETCDLITE_OPERATOR_FAILPOINT=<name>`: the operator process exits at that point (tests of
    /// what a crash between two steps leaves and how the next operator heals it).
    static func failpoint(_ name: String) {
        guard ProcessInfo.processInfo.environment["ETCDLITE_OPERATOR_FAILPOINT"] == name else { return }
        FileHandle.standardError.write(Data("failpoint \(name): exiting\n".utf8))
        exit(3)
    }

    /// A backup's time in its name (names sort by time).
    static func stamp() -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withFullDate, .withFullTime, .withFractionalSeconds]
        return formatter.string(from: Date()).replacingOccurrences(of: ":", with: "")
    }

    static func reason(_ action: PlannedAction) -> String {
        switch action {
        case .addLearner: "AddingLearner"
        case .startMember: "StartingMember"
        case .restartInPlace: "RestartingMember"
        case .promote: "PromotingLearner"
        case .moveLeader: "MovingLeader"
        case .removeMember: "RemovingMember"
        case .deleteWorkload: "DeletingWorkload"
        case .upgrade: "Upgrading"
        case .restoreFromSnapshot: "Restoring"
        case .restore: "RestoringChosenSnapshot"
        case .wait: "Waiting"
        case .steady: "Steady"
        }
    }
}

extension ClusterStatus {
    /// Prometheus text format (for node_exporter's textfile collector, or a scrape).
    public var metricsText: String {
        var lines = ["# TYPE etcdlite_operator_reconciles_total counter", "etcdlite_operator_reconciles_total \(reconciles)",
                     "# TYPE etcdlite_operator_actions_total counter"]
        for (kind, n) in actions.sorted(by: { $0.key < $1.key }) { lines.append("etcdlite_operator_actions_total{kind=\"\(kind)\"} \(n)") }
        lines.append("# TYPE etcdlite_operator_members gauge")
        for (state, n) in [("healthy", members.filter { $0.healthy && !$0.learner }.count),
                           ("unhealthy", members.filter { !$0.healthy }.count),
                           ("learner", members.filter(\.learner).count)] {
            lines.append("etcdlite_operator_members{state=\"\(state)\"} \(n)")
        }
        return lines.joined(separator: "\n") + "\n"
    }
}

extension JSONEncoder {
    static var status: JSONEncoder {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
        encoder.dateEncodingStrategy = .iso8601
        return encoder
    }
}

extension JSONDecoder {
    static var status: JSONDecoder {
        let decoder = JSONDecoder()
        decoder.dateDecodingStrategy = .iso8601
        return decoder
    }
}
