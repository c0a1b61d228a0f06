import Foundation

/// Re-seeding without the API server: when no quorum of the members' data survives, the API
/// server (stored in etcdlite) is gone too, so neither the operator nor the member records can
/// be read. The node agents then decide among themselves, from the records each last read and
/// from what each finds on its own node, served to the others on `GET /recovery`.
///
/// The rules (`RecoveryPlan.decide`), all of which must hold before anything changes:
/// - the API server has not answered any agent for the grace period;
/// - every node that hosts a member has answered (a node that is down may hold the newest data,
///   or the data that still makes a quorum: it is never presumed lost);
/// - no member answers with a leader;
/// - every member whose data directory is there answers (a member still starting is waited for);
/// - the voters whose data is gone are a majority of the voters, as the survivor that applied the
///   most knows them (a lost learner never counts).
/// A node that will never come back can be declared lost by a person (`etcdlite recover --agent
/// URL --presume-lost NODE`): its members then count as without data, and it holds no checkpoint.
/// The store to re-seed from is the newest by revision among the surviving members and the
/// node checkpoints; the agent on its node is the coordinator, the only one that acts. Without a
/// leader no revision moves, so every agent that hears the same reports picks the same one.
public struct RecoveryReport: Codable, Sendable, Equatable {
    public var node: String
    /// Which records this agent last read (`RecoveryReport.digest`): agents that read different
    /// ones do not act together.
    public var records: String
    /// The token of a re-seed this agent takes part in, until the records carry it.
    public var reseeding: String?
    /// Seconds since this agent last read the records from the API server (nil: never).
    public var apiSilentSeconds: Double?
    public var members: [Member] = []
    public var checkpoints: [Checkpoint] = []
    /// The agent's last decision, in words (for people and `etcdlite recover --agent`).
    public var plan: String?
    /// Nodes a person declared lost to this agent.
    public var presumedLost: [String]?

    /// The member records, by name and data directory.
    public static func digest(_ records: [MemberRecord]) -> String {
        records.filter(\.started).map { "\($0.name)=\($0.dataName ?? "")" }.sorted().joined(separator: ",")
    }

    public struct Member: Codable, Sendable, Equatable {
        public var name: String
        /// Its data directory is on the node (`<hostPath>/<dataName>/member`).
        public var dataPresent: Bool
        /// It answered Status (nil: it did not).
        public var status: LiveStatus?
    }

    public struct LiveStatus: Codable, Sendable, Equatable {
        public var revision: Int64
        public var leader: UInt64
        public var isLearner: Bool
        /// The members it knows (serializable MemberList): peer URL → learner.
        public var voters: [String]
        public var learners: [String]
    }

    public struct Checkpoint: Codable, Sendable, Equatable {
        public var member: String
        public var path: String
        public var revision: Int64
    }
}

public enum RecoveryPlan: Equatable, Sendable {
    case wait(String)
    /// Re-seed from `source` (a checkpoint's path, or nil: a snapshot of the live `member`) on
    /// `node`, as `member`.
    case reseed(node: String, member: String, source: String?, revision: Int64)

    /// The decision every agent makes from the records and the agents' reports (keyed by node).
    public static func decide(records: [MemberRecord], reports given: [String: RecoveryReport], grace: Double,
                              presumedLost: Set<String> = []) -> RecoveryPlan {
        let started = records.filter { $0.started && $0.node != nil }
        guard !started.isEmpty else { return .wait("no member records") }
        // A node declared lost that does not answer: its members without data, no checkpoint.
        var reports = given
        for node in presumedLost.sorted() where reports[node] == nil {
            var report = RecoveryReport(node: node, records: RecoveryReport.digest(records), apiSilentSeconds: .greatestFiniteMagnitude)
            report.members = started.filter { $0.node == node }.map { .init(name: $0.name, dataPresent: false, status: nil) }
            reports[node] = report
        }
        for node in Set(started.compactMap(\.node)).sorted() where reports[node] == nil {
            return .wait("the agent of \(node) does not answer")
        }
        for report in reports.values.sorted(by: { $0.node < $1.node }) {
            guard let silent = report.apiSilentSeconds, silent >= grace else {
                return .wait("the API server answered \(report.node)'s agent within \(Int(grace)) s")
            }
        }
        if let busy = reports.values.sorted(by: { $0.node < $1.node }).first(where: { $0.reseeding != nil }) {
            return .wait("\(busy.node)'s agent takes part in a re-seed (\(busy.reseeding!))")
        }
        let digests = Set(reports.values.map(\.records))
        guard digests == [RecoveryReport.digest(records)] else { return .wait("the agents last read different member records") }
        var live: [(node: String, member: Member, status: RecoveryReport.LiveStatus)] = []
        var lostPeers = Set<String>()
        for record in started {
            guard let report = reports[record.node!] else { continue }
            guard let member = report.members.first(where: { $0.name == record.name }) else {
                return .wait("\(record.node!)'s agent does not report \(record.name)")
            }
            if !member.dataPresent {
                lostPeers.insert(record.peerURL)
                continue
            }
            guard let status = member.status else { return .wait("\(record.name) has its data but does not answer") }
            if status.leader != 0 { return .wait("\(record.name) has a leader") }
            live.append((record.node!, member, status))
        }
        // The voters as the survivor that applied the most knows them; with no survivor, every
        // member's data is gone.
        let newest = live.max { ($0.status.revision, $1.node) < ($1.status.revision, $0.node) }
        let voters = newest.map { Set($0.status.voters) } ?? Set(started.map(\.peerURL))
        let lostVoters = voters.intersection(lostPeers)
        guard lostVoters.count * 2 > voters.count else {
            return .wait("\(voters.count - lostVoters.count) of \(voters.count) voters keep their data: a quorum may come back")
        }
        // The newest store: a live survivor, or a checkpoint (a survivor first on equal revisions).
        var best: RecoveryPlan?
        var bestKey: (Int64, Int, String) = (-1, -1, "")
        for survivor in live where survivor.status.isLearner == false {
            let key = (survivor.status.revision, 1, survivor.node)
            if key > bestKey { (bestKey, best) = (key, .reseed(node: survivor.node, member: survivor.member.name, source: nil, revision: survivor.status.revision)) }
        }
        for report in reports.values {
            for checkpoint in report.checkpoints where started.contains(where: { $0.name == checkpoint.member && $0.node == report.node }) {
                let key = (checkpoint.revision, 0, report.node)
                if key > bestKey { (bestKey, best) = (key, .reseed(node: report.node, member: checkpoint.member, source: checkpoint.path, revision: checkpoint.revision)) }
            }
        }
        return best ?? .wait("no quorum of data survives, and there is no store or checkpoint to re-seed from")
    }

    typealias Member = RecoveryReport.Member
}
