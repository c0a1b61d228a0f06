/// What the operator wants of a cluster (the EtcdLiteCluster spec, as far as planning goes).
public struct DesiredCluster: Sendable, Equatable {
    /// Voting members wanted.
    public var size: Int
    /// The version (image or binary) every member should run.
    public var version: String
    /// Rolling upgrades need at least this many members (one down must leave a quorum).
    public var minimumSizeForUpgrade = 3
    /// Which spec this is (the status's observedGeneration).
    public var generation: String?
    /// New members are `<namePrefix>-N` with the lowest N free.
    public var namePrefix = "member"
    /// Members are a StatefulSet's pods: a scale-down removes the highest ordinal (the only pod
    /// the StatefulSet can drop), whichever member leads.
    public var ordinalScaleDown = false
    /// During an upgrade, every voter must be within this many entries of the leader before the
    /// next member restarts.
    public var upgradeLagEntries: UInt64 = 1000
    /// A restore the user asked for: the cluster re-seeded from this snapshot, once per `id`.
    public var restore: RestoreRequest?

    public init(size: Int, version: String) {
        self.size = size
        self.version = version
    }
}

/// `spec.restore`: re-seed the cluster from a chosen snapshot. A new `id` asks again.
public struct RestoreRequest: Codable, Sendable, Equatable {
    public var id: String
    public var snapshot: String

    public init(id: String, snapshot: String) {
        self.id = id
        self.snapshot = snapshot
    }
}

/// One member as the etcd API shows it (MemberList, plus Status where it answers).
public struct ObservedMember: Sendable, Equatable {
    public var id: UInt64
    public var name: String
    public var isLearner: Bool
    /// It answered Status.
    public var healthy: Bool
    public var isLeader: Bool
    /// Its Raft applied index (0 when it did not answer).
    public var appliedIndex: UInt64
    /// The boot member the cluster started from (a static pod), to be removed once self-hosted
    /// members hold a quorum on their own.
    public var isBootMember: Bool
    public var peerURLs: [String] = []
    public var clientURLs: [String] = []

    public init(id: UInt64, name: String, isLearner: Bool = false, healthy: Bool = true, isLeader: Bool = false,
                appliedIndex: UInt64 = 0, isBootMember: Bool = false) {
        self.id = id
        self.name = name
        self.isLearner = isLearner
        self.healthy = healthy
        self.isLeader = isLeader
        self.appliedIndex = appliedIndex
        self.isBootMember = isBootMember
    }
}

/// A member's workload as the platform shows it (a pod or a local process) and its data.
public struct ObservedWorkload: Sendable, Equatable {
    public enum State: Sendable, Equatable {
        case running
        /// Stopped or crashed; its data directory is still there.
        case stopped
        /// Its data is gone (a lost disk or PVC): it may never start again under its old identity.
        case dataLost
    }

    public var name: String
    public var state: State
    public var version: String

    public init(name: String, state: State = .running, version: String) {
        self.name = name
        self.state = state
        self.version = version
    }
}

/// What is observed: the members (nil when no member answered MemberList: no quorum, or every
/// member is down), the workloads, and how long each learner has been behind.
public struct Observation: Sendable, Equatable {
    public var members: [ObservedMember]?
    public var workloads: [ObservedWorkload]
    /// Learners that have been behind the leader for longer than the operator waits for one.
    public var stalledLearners: Set<UInt64>
    /// False when the platform could not be asked (its API down): workloads are then unknown.
    public var platformAnswered: Bool
    /// The voting members when a quorum was last seen (by name; nil: never seen). Without a
    /// quorum, whether one can come back is judged against these.
    public var lastVoters: [String]?
    /// The ids of the restores already carried out (or under way).
    public var restoresDone: Set<String> = []

    public init(members: [ObservedMember]?, workloads: [ObservedWorkload], stalledLearners: Set<UInt64> = [], platformAnswered: Bool = true,
                lastVoters: [String]? = nil) {
        self.members = members
        self.workloads = workloads
        self.stalledLearners = stalledLearners
        self.platformAnswered = platformAnswered
        self.lastVoters = lastVoters
    }
}

/// The next single step. Membership changes go through the etcd API; the rest through the
/// platform.
public enum PlannedAction: Sendable, Equatable {
    /// MemberAdd as a learner (peer URL on the node's address), then start it with
    /// `--initial-cluster-state existing`.
    case addLearner(name: String)
    /// Start the workload of a member that MemberAdd made but that never started (a crash
    /// between the two steps).
    case startMember(name: String)
    /// Start a stopped member on its own data.
    case restartInPlace(name: String)
    case promote(id: UInt64)
    case moveLeader(to: UInt64)
    /// MemberRemove through another member (`via`).
    case removeMember(id: UInt64, via: UInt64)
    /// Stop a workload that is no longer a member and delete its data.
    case deleteWorkload(name: String)
    /// Restart one member on the desired version, its data kept.
    case upgrade(name: String, to: String)
    /// No member holds a quorum and none can be restarted on its data: seed a new cluster from
    /// the newest snapshot (the manual `etcdlite recover` does the same).
    case restoreFromSnapshot
    /// The restore the user asked for (`spec.restore`): every member's data moves aside and a
    /// new cluster starts from the chosen snapshot, then grows to the size.
    case restore(id: String, snapshot: String)
    /// Nothing to do until something changes (the reason, for status and logs).
    case wait(String)
    case steady
}

/// The operator's planner: a pure function of what is wanted and what is observed, giving the
/// next single action. One membership change at a time; learners first; planned removals move
/// leadership away first; a member whose data is lost gets a new identity, never its old one.
public enum Planner {
    public static func next(_ desired: DesiredCluster, _ observed: Observation) -> PlannedAction {
        // Without the platform's view, a missing workload would look like one never started.
        guard observed.platformAnswered else { return .wait("the platform did not answer") }
        // A restore asked for comes first, whatever the members' state: it replaces them.
        if let restore = desired.restore, !observed.restoresDone.contains(restore.id) {
            return .restore(id: restore.id, snapshot: restore.snapshot)
        }
        let workloads = Dictionary(observed.workloads.map { ($0.name, $0) }, uniquingKeysWith: { a, _ in a })
        guard let members = observed.members else {
            // No quorum answers: bring back whatever can come back on its own data.
            if let stopped = observed.workloads.first(where: { $0.state == .stopped }) { return .restartInPlace(name: stopped.name) }
            // Once all that can run does, a majority of the last voters' data makes a quorum
            // again; less than that never will: re-seed (a survivor's store or the newest backup).
            // A voter without a workload here (the boot member) is counted as having its data.
            let voters = observed.lastVoters ?? observed.workloads.map(\.name)
            if voters.isEmpty {
                // Never a quorum and nothing started: a new cluster (the platform decides).
                return observed.workloads.isEmpty ? .restoreFromSnapshot : .wait("members are starting")
            }
            let withData = voters.filter { workloads[$0].map { $0.state != .dataLost } ?? true }.count
            if withData * 2 > voters.count { return .wait("members are starting") }
            return .restoreFromSnapshot
        }
        let voters = members.filter { !$0.isLearner }
        let quorum = voters.count / 2 + 1
        let healthyVoters = voters.filter(\.healthy)
        let leader = members.first(where: \.isLeader)

        // 1. Members whose workloads need the platform: restart on intact data, start one that
        //    MemberAdd made, or replace one whose data is gone (remove now, add anew later).
        for member in members {
            switch workloads[member.name]?.state {
            case .stopped?:
                return .restartInPlace(name: member.name)
            case nil where !member.isBootMember:
                return .startMember(name: member.name)
            case .dataLost?:
                // Removing a voter must leave a quorum of the remaining voters healthy.
                if member.isLearner || healthyVoters.filter({ $0.id != member.id }).count >= (voters.count - 1) / 2 + 1 {
                    guard let via = healthyVoters.first(where: { $0.id != member.id }) else { return .wait("no member to remove \(member.name) through") }
                    return .removeMember(id: member.id, via: via.id)
                }
                return .wait("\(member.name) lost its data, and removing it would cost the quorum")
            default:
                continue
            }
        }
        // 2. Workloads that are no longer members (removed, or a crash after MemberRemove).
        let memberNames = Set(members.map(\.name))
        if let orphan = observed.workloads.first(where: { !memberNames.contains($0.name) }) {
            return .deleteWorkload(name: orphan.name)
        }
        guard healthyVoters.count >= quorum, let leader else { return .wait("the cluster has no healthy quorum or no leader") }

        // 3. A learner: promote once caught up, remove if it never catches up.
        if let learner = members.first(where: \.isLearner) {
            if observed.stalledLearners.contains(learner.id) { return .removeMember(id: learner.id, via: leader.id) }
            if learner.healthy && learner.appliedIndex >= leader.appliedIndex { return .promote(id: learner.id) }
            return .wait("learner \(learner.name) is catching up")
        }
        // Membership changes only when every voter is healthy.
        guard healthyVoters.count == voters.count else { return .wait("a voter is unhealthy") }

        // 4. The boot member leaves once the self-hosted voters hold a quorum on their own (three
        //    of them, or the desired size when smaller).
        let selfHosted = voters.filter { !$0.isBootMember }
        if let boot = voters.first(where: \.isBootMember), selfHosted.count >= min(3, max(1, desired.size)) {
            if boot.isLeader, let target = selfHosted.first { return .moveLeader(to: target.id) }
            return .removeMember(id: boot.id, via: selfHosted.first!.id)
        }
        // 5. Scale: up through a learner, down never below one member, the leader last.
        if selfHosted.count < desired.size {
            return .addLearner(name: newName(members.map(\.name) + observed.workloads.map(\.name), prefix: desired.namePrefix))
        }
        if selfHosted.count > desired.size && voters.count > 1 {
            let target = desired.ordinalScaleDown
                ? selfHosted.max { ordinal($0.name) < ordinal($1.name) }!
                : selfHosted.last { !$0.isLeader } ?? selfHosted.last!
            if target.isLeader, let other = voters.first(where: { $0.id != target.id }) { return .moveLeader(to: other.id) }
            return .removeMember(id: target.id, via: leader.id)
        }
        // 6. Rolling upgrade: every member healthy, enough of them; followers first, leader last.
        let behind = voters.filter { workloads[$0.name].map { $0.version != desired.version } ?? false }
        if !behind.isEmpty {
            guard voters.count >= desired.minimumSizeForUpgrade else {
                return .wait("an upgrade needs \(desired.minimumSizeForUpgrade) members, there are \(voters.count)")
            }
            // The last one restarted must have caught up before the next goes down.
            if let lagging = voters.first(where: { $0.appliedIndex + desired.upgradeLagEntries < leader.appliedIndex }) {
                return .wait("\(lagging.name) is catching up")
            }
            if let follower = behind.first(where: { !$0.isLeader }) { return .upgrade(name: follower.name, to: desired.version) }
            if let other = voters.first(where: { !$0.isLeader }) { return .moveLeader(to: other.id) }
        }
        return .steady
    }

    /// The lowest `member-N` not taken by a member or a workload. A replacement may get the name
    /// of a member that was removed and whose workload is gone; MemberAdd gives it a new ID and it
    /// starts on empty data, so nothing of the old identity is reused.
    static func newName(_ taken: [String], prefix: String = "member") -> String {
        let used = Set(taken)
        var n = 0
        while used.contains("\(prefix)-\(n)") { n += 1 }
        return "\(prefix)-\(n)"
    }

    /// The N of `<prefix>-N` (-1 when the name has none).
    static func ordinal(_ name: String) -> Int {
        name.split(separator: "-").last.flatMap { Int($0) } ?? -1
    }
}
