import Foundation

/// Where members run and how the operator changes that: local processes or Kubernetes pods.
/// The reconciler observes members through the etcd API and workloads through the platform,
/// plans one action, and carries it out through both.
public protocol MemberPlatform: AnyObject, Sendable {
    /// Reads the spec again (a bad spec keeps the last good one; the error is reported).
    func refresh() async throws
    var desired: DesiredCluster { get }
    /// The boot member's MemberList name, while the cluster has one.
    var bootMemberName: String? { get }
    /// Client URLs to ask for the member list.
    var endpoints: [String] { get }
    var settings: OperatorSettings { get }

    /// Every started member's workload: running, stopped on intact data, or with its data lost.
    func workloads() async throws -> [ObservedWorkload]
    /// The member a peer URL belongs to (a member that MemberAdd made but that has not started
    /// has no name in MemberList).
    func memberName(peerURLs: [String]) -> String?
    /// Records a new member before MemberAdd; returns its peer URL.
    func prepare(_ name: String) async throws -> String
    /// Records what MemberAdd answered: the member's ID and its `--initial-cluster`.
    func joined(_ name: String, id: UInt64, initialCluster: String) async throws
    /// Whether `joined` was recorded for it.
    func hasJoined(_ name: String) -> Bool
    func start(_ name: String) async throws
    /// Stops a workload that is no longer a member and deletes its data and record.
    func delete(_ name: String) async throws
    /// Restarts it on `version`, its data kept.
    func upgrade(_ name: String, to version: String) async throws
    /// Client URLs of members whose workloads run (a re-seed takes a survivor's store first).
    func runningClientURLs() async -> [String]
    /// Moves every member's data aside and starts a new one-member cluster on the snapshot.
    func reseed(from snapshot: String) async throws
    /// A new one-member cluster when there was never anything (nil when there was).
    func createFirstMember() async throws -> String?
    /// Nil when the snapshot file is good; what is wrong otherwise.
    func verifySnapshot(_ path: String) async -> String?
    /// Where backups go.
    var backupDir: String { get }
    /// Publishes the status (before each mutation and after each pass).
    func publish(_ status: ClusterStatus) async
    /// A note for people (a Kubernetes Event; a log line locally).
    func event(_ reason: String, _ message: String, warning: Bool) async
    /// The boot member was removed from the cluster (its static pod manifest can go).
    func bootMemberRemoved() async
}

extension MemberPlatform {
    /// Locally the boot member stops by itself once removed.
    public func bootMemberRemoved() async {}
}

/// The operator's knobs, from the spec.
public struct OperatorSettings: Sendable, Equatable {
    public var reconcileInterval: Duration = .milliseconds(500)
    /// A learner not promoted after this long is removed.
    public var learnerCatchUpSeconds: Double = 120
    /// Defragment a member whose database is larger than this with less than half in use.
    public var defragmentAboveBytes: Int64 = 64 << 20
    public var backupIntervalSeconds: Double?
    public var backupRetain = 5

    public init() {}
}
