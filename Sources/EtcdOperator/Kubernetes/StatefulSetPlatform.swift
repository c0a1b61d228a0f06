import Foundation
import NIOConcurrencyHelpers
import NIOHTTP1

/// Members as the pods of a plain StatefulSet (deploy/statefulset.json): etcdlite in a cluster
/// that does not store that cluster's own state. The EtcdLiteCluster still says the size, image
/// and backups (its `spec.statefulSet` names the set); the StatefulSet runs the pods.
///
/// - A member is pod `<set>-N`, its URLs the pod's stable DNS names under the set's headless
///   Service, its data the claim `<template>-<set>-N`.
/// - The ConfigMap `<set>-join` holds, per member the operator added, the `--initial-cluster`
///   MemberAdd answered; the pod's script reads it (a ConfigMap volume) and joins as an existing
///   member. Once the operator has written it (`managed`), a pod without its key waits instead
///   of founding a cluster from the ordinals.
/// - Scaling changes `replicas` only around learner-first membership changes: MemberAdd, the key,
///   then replicas up to the new ordinal; MemberRemove, then replicas down to the highest member
///   left. A member whose claim is lost (etcdlite refuses the old identity on empty data) is
///   removed; its pod and claim are deleted, the StatefulSet makes both anew, and the pod waits
///   until the operator adds it again under a new ID.
/// - Upgrades: the set's update strategy becomes OnDelete and its template gets the image; the
///   operator deletes one pod at a time in its own order (followers first, the leader last).
/// - Re-seeding (no quorum of data left, or a restore asked for): the operator offers the
///   snapshot on its metrics server (`/snapshots/<token>.db`), writes `reseed-token` and
///   `reseed-snapshot` (that URL) to `<set>-join` with member 0's key alone, scales the set to 1
///   and deletes pod 0. Each pod's script, once per token, moves its data aside in its claim;
///   pod 0 restores the snapshot and founds the new cluster alone, the others wait to be added.
public final class StatefulSetPlatform: MemberPlatform, @unchecked Sendable {
    /// The EtcdLiteCluster: spec, status and events.
    public let base: KubernetesPlatform
    public let setName: String
    var client: KubeClient { base.client }
    var namespace: String { base.namespace }

    private(set) var statefulSet: [String: Any] = [:]
    private(set) var pods: [String: [String: Any]] = [:]
    /// The ConfigMap `<set>-join` the pods read.
    private let joinMap: VersionedConfigMap
    /// `--initial-cluster` of each member the operator added (or adopted), by member name.
    var joins: [String: String] { joinMap.data.filter { isOurs($0.key) } }
    private var viewOK = false

    static let managedKey = "managed"
    static let reseedTokenKey = "reseed-token"
    static let reseedSnapshotKey = "reseed-snapshot"
    /// Where pods reach this operator's metrics server (`http://<pod IP>:<port>`); without it,
    /// no re-seed.
    public var snapshotBaseURL: String?
    /// Snapshots offered to re-seeding pods, by the name they are served under.
    private let offered = NIOLockedValueBox<[String: String]>([:])

    /// The file served as `/snapshots/<name>` (nil: none).
    public func offeredSnapshot(_ name: String) -> String? { offered.withLockedValue { $0[name] } }

    public init(client: KubeClient, namespace: String, clusterName: String, setName: String, operatorNode: String? = nil) {
        base = KubernetesPlatform(client: client, namespace: namespace, clusterName: clusterName, operatorNode: operatorNode)
        self.setName = setName
        joinMap = VersionedConfigMap(client: client, namespace: namespace, name: "\(setName)-join",
                                     labels: ["app.kubernetes.io/managed-by": "etcdlite-operator"])
    }

    // MARK: Paths and names

    var setPath: String { "/apis/apps/v1/namespaces/\(namespace)/statefulsets/\(setName)" }
    var podsPath: String { "/api/v1/namespaces/\(namespace)/pods" }
    var pdbPath: String { "/apis/policy/v1/namespaces/\(namespace)/poddisruptionbudgets/\(setName)" }
    func claimPath(_ member: String) -> String { "/api/v1/namespaces/\(namespace)/persistentvolumeclaims/\(claimTemplate)-\(member)" }

    var setSpec: [String: Any] { statefulSet["spec"] as? [String: Any] ?? [:] }
    var replicas: Int { setSpec["replicas"] as? Int ?? 0 }
    var serviceName: String { setSpec["serviceName"] as? String ?? setName }
    var claimTemplate: String {
        ((setSpec["volumeClaimTemplates"] as? [[String: Any]])?.first?["metadata"] as? [String: Any])?["name"] as? String ?? "data"
    }

    func host(_ member: String) -> String { "\(member).\(serviceName).\(namespace).svc" }
    func peerURL(_ member: String) -> String { "http://\(host(member)):2380" }
    func clientURL(_ member: String) -> String { "http://\(host(member)):2379" }
    func isOurs(_ member: String) -> Bool { member.hasPrefix(setName + "-") && Int(member.dropFirst(setName.count + 1)) != nil }

    // MARK: The view

    public func refresh() async throws {
        viewOK = false
        try await base.refreshClusterObject()
        if let named = (base.spec["statefulSet"] as? [String: Any])?["name"] as? String, named != setName {
            throw OperatorError("spec.statefulSet.name is \(named), but this operator manages the StatefulSet \(setName) (--statefulset)")
        }
        let freshSet = try await client.get(setPath)
        try await joinMap.load()
        let labels = ((freshSet["spec"] as? [String: Any])?["selector"] as? [String: Any])?["matchLabels"] as? [String: String] ?? [:]
        let selector = labels.sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: ",")
        let podList = try await client.get(podsPath + "?labelSelector=" + KubernetesPlatform.escape(selector))
        statefulSet = freshSet
        pods = [:]
        for pod in podList["items"] as? [[String: Any]] ?? [] {
            guard let name = (pod["metadata"] as? [String: Any])?["name"] as? String, isOurs(name) else { continue }
            pods[name] = pod
        }
        viewOK = true
    }

    public var desired: DesiredCluster {
        var desired = base.desired
        desired.namePrefix = setName
        desired.ordinalScaleDown = true
        return desired
    }

    public var bootMemberName: String? { nil }

    public var endpoints: [String] {
        let names = Set((0..<replicas).map { "\(setName)-\($0)" }).union(joins.keys)
        return names.sorted { Planner.ordinal($0) < Planner.ordinal($1) }.map(clientURL)
    }

    public var settings: OperatorSettings { base.settings }
    public var backupDir: String { base.backupDir }

    // MARK: Workloads

    /// Every member the operator added or adopted: stopped while its ordinal is beyond the set's
    /// replicas or its pod is gone, data lost when etcdlite refused the old identity on an empty
    /// claim, running otherwise.
    public func workloads() async throws -> [ObservedWorkload] {
        guard viewOK else { throw OperatorError("the StatefulSet was not read") }
        return joins.keys.sorted { Planner.ordinal($0) < Planner.ordinal($1) }.map { name in
            let pod = pods[name]
            let version = pod.flatMap(KubernetesPlatform.runningImage) ?? ""
            let state = Planner.ordinal(name) < replicas ? KubernetesPlatform.state(of: pod) : .stopped
            return ObservedWorkload(name: name, state: state, version: version)
        }
    }

    /// The pod a peer URL names (`http://<set>-N.<service>...`).
    public func memberName(peerURLs: [String]) -> String? {
        for url in peerURLs {
            guard let host = URLComponents(string: url)?.host, let first = host.split(separator: ".").first else { continue }
            if isOurs(String(first)) && host == self.host(String(first)) { return String(first) }
        }
        return nil
    }

    /// The member's URL is its pod's DNS name: nothing to record before MemberAdd.
    public func prepare(_ name: String) async throws -> String {
        guard isOurs(name) else { throw OperatorError("\(name) is not a pod name of StatefulSet \(setName)") }
        return peerURL(name)
    }

    public func joined(_ name: String, id: UInt64, initialCluster: String) async throws {
        try await joinMap.update({ data in
            data[name] = initialCluster
            data[Self.managedKey] = "true"
        }, what: "the join ConfigMap")
    }

    public func hasJoined(_ name: String) -> Bool { joins[name] != nil }

    /// Replicas up to the member's ordinal (the StatefulSet starts its pod), and the disruption
    /// budget kept at a quorum of the members.
    public func start(_ name: String) async throws {
        let wanted = Planner.ordinal(name) + 1
        if replicas < wanted { try await scale(to: wanted) }
        if pods[name] != nil, let cluster = joins[name] {
            // A pod already waiting for its key: a change to the pod makes its kubelet sync it,
            // ConfigMap volume included, instead of at its next periodic sync (up to a minute).
            let patch: [String: Any] = ["metadata": ["annotations": ["etcdlite.dev/initial-cluster": cluster]]]
            _ = try? await client.send(.PATCH, podsPath + "/" + name, body: patch, contentType: "application/strategic-merge-patch+json")
        }
        await keepQuorumBudget()
    }

    /// The member is no longer one: its key goes; the highest ordinal leaves through replicas, a
    /// lower one by deleting its pod; its claim is deleted either way, so the pod that comes next
    /// in its place starts on empty data and waits to be added anew.
    public func delete(_ name: String) async throws {
        try await joinMap.update({ data in data[name] = nil }, what: "the join ConfigMap")
        let ordinal = Planner.ordinal(name)
        if ordinal == replicas - 1 {
            let highest = joins.keys.map(Planner.ordinal).filter { $0 < ordinal }.max() ?? -1
            try await scale(to: highest + 1)
        }
        try await deleteIgnoringAbsence(claimPath(name))
        if ordinal < replicas { try await deleteIgnoringAbsence(podsPath + "/" + name) }
        await keepQuorumBudget()
    }

    /// OnDelete updates and the new image in the template (one patch), then this pod goes: the
    /// StatefulSet brings it back on the new image and the same claim.
    public func upgrade(_ name: String, to version: String) async throws {
        let patch: [String: Any] = ["spec": ["updateStrategy": ["type": "OnDelete"],
                                             "template": ["spec": ["containers": [["name": "etcdlite", "image": version]]]]]]
        try await client.send(.PATCH, setPath, body: patch, contentType: "application/strategic-merge-patch+json")
        try await deleteIgnoringAbsence(podsPath + "/" + name)
    }

    public func runningClientURLs() async -> [String] {
        joins.keys.filter { pods[$0] != nil }.sorted { Planner.ordinal($0) < Planner.ordinal($1) }.map(clientURL)
    }

    public func reseed(from snapshot: String) async throws {
        guard let base = snapshotBaseURL else {
            throw OperatorError("re-seeding from \(snapshot) needs the operator's metrics server and its pod IP (--metrics-address, POD_IP) to offer the snapshot to member 0")
        }
        let token = "\(setName)-\(Int(Date().timeIntervalSince1970))"
        offered.withLockedValue { $0[token + ".db"] = snapshot }
        let first = "\(setName)-0"
        try await joinMap.update({ data in
            data = [Self.managedKey: "true", first: "\(first)=\(self.peerURL(first))", Self.reseedTokenKey: token,
                    Self.reseedSnapshotKey: "\(base)/snapshots/\(token).db"]
        }, what: "the join ConfigMap")
        try await scale(to: 1)
        try await deleteIgnoringAbsence(podsPath + "/" + first)
        await keepQuorumBudget()
    }

    /// The StatefulSet founds the cluster itself (its pods' `--initial-cluster` from the ordinals).
    public func createFirstMember() async throws -> String? { nil }

    public func verifySnapshot(_ path: String) async -> String? { KubernetesPlatform.checkSnapshot(path) }
    public func publish(_ status: ClusterStatus) async { await base.publish(status) }
    public func event(_ reason: String, _ message: String, warning: Bool) async { await base.event(reason, message, warning: warning) }

    // MARK: Requests

    func scale(to count: Int) async throws {
        try await client.send(.PATCH, setPath, body: ["spec": ["replicas": count]], contentType: "application/strategic-merge-patch+json")
        var spec = setSpec
        spec["replicas"] = count
        statefulSet["spec"] = spec
    }

    /// minAvailable = a quorum of the members (when the set has a budget of that name).
    func keepQuorumBudget() async {
        let members = max(joins.count, 1)
        _ = try? await client.send(.PATCH, pdbPath, body: ["spec": ["minAvailable": members / 2 + 1]],
                                   contentType: "application/strategic-merge-patch+json")
    }

    func deleteIgnoringAbsence(_ path: String) async throws {
        do {
            try await client.send(.DELETE, path)
        } catch let error as KubeAPIError where error.isNotFound {}
    }
}
