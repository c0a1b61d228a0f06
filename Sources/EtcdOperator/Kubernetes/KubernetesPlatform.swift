import Foundation
import NIOConcurrencyHelpers
import NIOHTTP1

/// Members as pods, through the Kubernetes API with the operator's service account.
///
/// - The spec is the EtcdLiteCluster (size, image, storage.hostPath, backup, nodeSelector,
///   tolerations, bootstrap.bootMemberEndpoint).
/// - Each member's record (its node, URLs, ID, `--initial-cluster`, image) lives in the ConfigMap
///   `<cluster>-members`, written before MemberAdd so a crash after it still knows whose peer URL
///   is whose; every write carries the resourceVersion it read (a conflict re-reads and retries).
/// - A member's pod is pinned to its node (`nodeName`), on the host network, its peer URL on the
///   node's InternalIP (not DNS), its data in `<hostPath>/<name>-<id>`: a member added again
///   gets a new ID and so a new directory, never an old identity's data.
/// - Status goes to the status subresource (with the object's resourceVersion), events to the
///   core Events API.
public final class KubernetesPlatform: MemberPlatform, @unchecked Sendable {
    public let client: KubeClient
    public let namespace: String
    public let clusterName: String
    /// The node the operator runs on (backups and re-seeds happen there): the downward API's NODE_NAME.
    public let operatorNode: String?

    private(set) var cluster: [String: Any] = [:]
    private(set) var records: [String: MemberRecord] = [:]
    /// The records' ConfigMap: keys that are not our records are written back untouched.
    private let recordsMap: VersionedConfigMap
    private var nodes: [[String: Any]] = []
    private var pods: [String: [String: Any]] = [:]
    private var nodesOK = false

    public init(client: KubeClient, namespace: String, clusterName: String = "etcdlite", operatorNode: String? = nil) {
        self.client = client
        self.namespace = namespace
        self.clusterName = clusterName
        self.operatorNode = operatorNode
        recordsMap = VersionedConfigMap(client: client, namespace: namespace, name: "\(clusterName)-members",
                                        labels: ["app.kubernetes.io/name": "etcdlite", "etcdlite.dev/cluster": clusterName])
    }

    // MARK: Paths

    var clusterPath: String { "/apis/\(Manifests.group)/\(Manifests.version)/namespaces/\(namespace)/etcdliteclusters/\(clusterName)" }
    var podsPath: String { "/api/v1/namespaces/\(namespace)/pods" }
    var memberSelector: String { "app.kubernetes.io/component=member,etcdlite.dev/cluster=\(clusterName)" }
    func podName(_ member: String) -> String { "\(clusterName)-\(member)" }

    // MARK: Spec

    /// Reads the cluster, the records, the member pods and the nodes; the view counts only when
    /// every read succeeded (a pass never plans on half of an old view and half of a new one).
    public func refresh() async throws {
        nodesOK = false
        let freshCluster = try await client.get(clusterPath)
        try await loadRecords()
        let podList = try await client.get(podsPath + "?labelSelector=" + Self.escape(memberSelector))
        let freshNodes = try await client.get("/api/v1/nodes")["items"] as? [[String: Any]] ?? []
        cluster = freshCluster
        pods = [:]
        for pod in podList["items"] as? [[String: Any]] ?? [] {
            guard let member = Self.labels(pod)["etcdlite.dev/member"] else { continue }
            pods[member] = pod
        }
        nodes = freshNodes
        nodesOK = true
        try await settleBootstrapped()
    }

    /// A member that bootstrapped a cluster (`--initial-cluster-state new`: the first member, or a
    /// re-seeded one) and runs Ready becomes an existing member in its manifest, its snapshot
    /// restore dropped: with its data lost, the kubelet would otherwise start it as a new empty
    /// cluster under the same identity (or restore an old snapshot again). Its pod restarts once.
    func settleBootstrapped() async throws {
        for record in records.values.sorted(by: { $0.name < $1.name }) where record.started && record.initialClusterState == "new" {
            guard let pod = pods[record.name], Self.isReady(pod) else { continue }
            try await updateMember(record.name) {
                $0.initialClusterState = "existing"
                $0.restoreFrom = nil
            }
        }
    }

    static func isReady(_ pod: [String: Any]) -> Bool {
        ((pod["status"] as? [String: Any])?["conditions"] as? [[String: Any]] ?? []).contains {
            $0["type"] as? String == "Ready" && $0["status"] as? String == "True"
        }
    }

    /// Reads the EtcdLiteCluster alone (for a platform that keeps its members elsewhere).
    func refreshClusterObject() async throws {
        cluster = try await client.get(clusterPath)
    }

    var spec: [String: Any] { cluster["spec"] as? [String: Any] ?? [:] }
    var hostPath: String { (spec["storage"] as? [String: Any])?["hostPath"] as? String ?? "/var/lib/etcdlite" }
    var image: String { spec["image"] as? String ?? spec["version"] as? String ?? "" }
    /// Members' ports on their nodes (2379/2380 unless the spec says otherwise).
    var clientPort: Int { spec["clientPort"] as? Int ?? 2379 }
    var peerPort: Int { spec["peerPort"] as? Int ?? 2380 }

    public var desired: DesiredCluster {
        var desired = DesiredCluster(size: spec["size"] as? Int ?? 3, version: image)
        desired.generation = ((cluster["metadata"] as? [String: Any])?["generation"] as? Int).map(String.init)
        if let restore = spec["restore"] as? [String: Any], let id = restore["id"] as? String, let snapshot = restore["snapshot"] as? String {
            desired.restore = RestoreRequest(id: id, snapshot: snapshot)
        }
        return desired
    }

    /// The boot member's name while its endpoint is in the spec (the rendered boot pod's `--name`).
    public var bootMemberName: String? { bootEndpoint == nil ? nil : "boot" }
    var bootEndpoint: String? { (spec["bootstrap"] as? [String: Any])?["bootMemberEndpoint"] as? String }

    public var endpoints: [String] {
        (bootEndpoint.map { [$0] } ?? []) + records.values.sorted { $0.name < $1.name }.map(\.clientURL)
    }

    public var settings: OperatorSettings {
        var settings = OperatorSettings()
        settings.reconcileInterval = .seconds(2)
        let backup = spec["backup"] as? [String: Any]
        settings.backupIntervalSeconds = (backup?["intervalSeconds"] as? Int).map(Double.init)
        settings.backupRetain = backup?["retention"] as? Int ?? 5
        return settings
    }

    public var backupDir: String {
        (spec["backup"] as? [String: Any])?["destination"] as? String ?? hostPath + "/backups"
    }

    // MARK: Records (the ConfigMap)

    func loadRecords() async throws {
        try await recordsMap.load()
        records = Self.records(in: recordsMap.data)
    }

    /// The member records among a ConfigMap's data (`member-N.json`).
    static func records(in data: [String: String]) -> [String: MemberRecord] {
        var records: [String: MemberRecord] = [:]
        for (key, json) in data where key.hasSuffix(".json") && key != NodeAgent.bootKey {
            if let record = try? JSONDecoder().decode(MemberRecord.self, from: Data(json.utf8)) { records[record.name] = record }
        }
        return records
    }

    /// Changes the records and writes them back with the version read; on a conflict (someone
    /// else wrote in between) reads again and applies the change again, a few times.
    func updateRecords(_ change: (inout [String: MemberRecord]) throws -> Void) async throws {
        try await updateRecordsData { data in
            let before = Self.records(in: data)
            var next = before
            try change(&next)
            for name in before.keys where next[name] == nil { data[name + ".json"] = nil }
            for (name, record) in next {
                data[name + ".json"] = String(decoding: try JSONEncoder.status.encode(record), as: UTF8.self)
            }
        }
    }

    /// Changes the ConfigMap's data (keys that are not ours are kept as read).
    func updateRecordsData(_ change: (inout [String: String]) throws -> Void) async throws {
        try await recordsMap.update(change, what: "the member records")
        records = Self.records(in: recordsMap.data)
    }

    // MARK: Workloads

    public func workloads() async throws -> [ObservedWorkload] {
        guard nodesOK else { throw OperatorError("nodes not listed") }
        let nodeNames = Set(nodes.compactMap { ($0["metadata"] as? [String: Any])?["name"] as? String })
        return records.values.filter(\.started).sorted { $0.name < $1.name }.map { record in
            let pod = pods[record.name]
            // The image the container runs (after a patch, the old one until the kubelet restarted it).
            let version = pod.flatMap(Self.runningImage) ?? record.binary
            if let node = record.node, !nodeNames.contains(node) {
                // Its node is gone, and the host path with it.
                return ObservedWorkload(name: record.name, state: .dataLost, version: version)
            }
            return ObservedWorkload(name: record.name, state: Self.state(of: pod), version: version)
        }
    }

    /// A member's state from its pod: stopped when there is none (or it is going), data lost
    /// when etcdlite refused to start, running (or starting) otherwise.
    static func state(of pod: [String: Any]?) -> ObservedWorkload.State {
        guard let pod, (pod["metadata"] as? [String: Any])?["deletionTimestamp"] == nil else { return .stopped }
        // It started once, its data is gone, and etcdlite refuses to come back under the old ID
        // ("has already been bootstrapped"): remove it and add it anew.
        if refusedForLostData(pod) { return .dataLost }
        let phase = (pod["status"] as? [String: Any])?["phase"] as? String ?? "Pending"
        return phase == "Failed" || phase == "Succeeded" ? .stopped : .running
    }

    public func memberName(peerURLs: [String]) -> String? {
        records.values.first { peerURLs.contains($0.peerURL) }?.name
    }

    /// Picks a node for a new member: Ready, schedulable, matching the spec's nodeSelector, and
    /// hosting no other member (one member per node).
    func chooseNode(excluding taken: Set<String>) -> (name: String, ip: String)? {
        let selector = spec["nodeSelector"] as? [String: String] ?? [:]
        let candidates = nodes.compactMap { node -> (String, String)? in
            let metadata = node["metadata"] as? [String: Any] ?? [:]
            guard let name = metadata["name"] as? String, !taken.contains(name) else { return nil }
            let labels = metadata["labels"] as? [String: String] ?? [:]
            guard selector.allSatisfy({ labels[$0.key] == $0.value }), Self.nodeAffinityAllows(spec["affinity"], labels: labels) else { return nil }
            if (node["spec"] as? [String: Any])?["unschedulable"] as? Bool == true { return nil }
            let status = node["status"] as? [String: Any] ?? [:]
            let ready = (status["conditions"] as? [[String: Any]] ?? []).contains { $0["type"] as? String == "Ready" && $0["status"] as? String == "True" }
            let ip = (status["addresses"] as? [[String: Any]] ?? []).first { $0["type"] as? String == "InternalIP" }?["address"] as? String
            guard ready, let ip else { return nil }
            return (name, ip)
        }
        return candidates.sorted { $0.0 < $1.0 }.first
    }

    /// `spec.affinity.nodeAffinity`'s required terms, as the scheduler reads them (static pods are
    /// not scheduled: the operator places members itself): one term whose every expression holds
    /// for the node's labels (In, NotIn, Exists, DoesNotExist, Gt, Lt). No terms: any node.
    static func nodeAffinityAllows(_ affinity: Any?, labels: [String: String]) -> Bool {
        let required = (((affinity as? [String: Any])?["nodeAffinity"] as? [String: Any])?["requiredDuringSchedulingIgnoredDuringExecution"]
            as? [String: Any])?["nodeSelectorTerms"] as? [[String: Any]]
        guard let terms = required, !terms.isEmpty else { return true }
        return terms.contains { term in
            (term["matchExpressions"] as? [[String: Any]] ?? []).allSatisfy { expression in
                let key = expression["key"] as? String ?? ""
                let values = expression["values"] as? [String] ?? []
                let value = labels[key]
                switch expression["operator"] as? String {
                case "In": return value.map(values.contains) ?? false
                case "NotIn": return value.map { !values.contains($0) } ?? true
                case "Exists": return value != nil
                case "DoesNotExist": return value == nil
                case "Gt": return Int(value ?? "").flatMap { v in values.first.flatMap(Int.init).map { v > $0 } } ?? false
                case "Lt": return Int(value ?? "").flatMap { v in values.first.flatMap(Int.init).map { v < $0 } } ?? false
                default: return false
                }
            }
        }
    }

    public func prepare(_ name: String) async throws -> String {
        // The boot member's node may take a member too: the boot member uses other ports.
        let taken = Set(records.values.filter { $0.name != name }.compactMap(\.node))
        guard let node = chooseNode(excluding: taken) else { throw OperatorError("no Ready node without a member matches the nodeSelector") }
        let record = MemberRecord(name: name, id: nil, clientURL: "http://\(node.ip):\(clientPort)", peerURL: "http://\(node.ip):\(peerPort)", binary: image,
                                  initialCluster: "", initialClusterState: "existing", clusterToken: clusterName, started: false, node: node.name,
                                  dataName: Self.dataName(name))
        try await updateRecords { $0[name] = record }
        return record.peerURL
    }

    public func joined(_ name: String, id: UInt64, initialCluster: String) async throws {
        try await updateRecords { records in
            guard var record = records[name] else { throw OperatorError("no record of \(name)") }
            record.id = id
            record.initialCluster = initialCluster
            records[name] = record
        }
    }

    public func hasJoined(_ name: String) -> Bool { records[name].map { !$0.initialCluster.isEmpty } ?? false }

    /// A member runs as a static pod: the operator puts its manifest in its record, and the node
    /// agent on its node writes it to the kubelet's manifest directory. The kubelet runs it with
    /// or without the API server: after a power-off the members come back on their own data
    /// before the API server (which needs them) does.
    public func start(_ name: String) async throws {
        try await updateMember(name) { $0.started = true }
    }

    /// Changes a member's record and renders its manifest again from it.
    func updateMember(_ name: String, _ change: @escaping (inout MemberRecord) -> Void) async throws {
        guard records[name] != nil else { throw OperatorError("no record of \(name)") }
        let manifest = try staticPodManifest
        try await updateRecords { records in
            guard var record = records[name] else { return }
            change(&record)
            record.manifest = try manifest(record)
            records[name] = record
        }
    }

    /// The record goes; the node agent removes the manifest, and the data once no process holds it.
    public func delete(_ name: String) async throws {
        try await updateRecords { $0[name] = nil }
    }

    /// The manifest with the new image: the kubelet restarts the member on the same node and data.
    public func upgrade(_ name: String, to version: String) async throws {
        try await updateMember(name) { $0.binary = version }
    }

    public func runningClientURLs() async -> [String] {
        records.values.filter { pods[$0.name] != nil }.sorted { $0.name < $1.name }.map(\.clientURL)
    }

    /// Every member's record goes (their node agents stop them and move their data aside);
    /// member-0 starts a new cluster on the operator's node from the snapshot (an init container
    /// restores it into a new data directory).
    public func reseed(from snapshot: String) async throws {
        // The backups are on the operator's node.
        guard let node = operatorNode, let ip = nodeIP(node) else { throw OperatorError("no node to re-seed on (NODE_NAME unset or unknown)") }
        let token = "\(clusterName)-\(Int(Date().timeIntervalSince1970))"
        var record = MemberRecord(name: "member-0", id: nil, clientURL: "http://\(ip):\(clientPort)", peerURL: "http://\(ip):\(peerPort)", binary: image,
                                  initialCluster: "member-0=http://\(ip):\(peerPort)", initialClusterState: "new", clusterToken: token, started: true,
                                  node: node, dataName: Self.dataName("member-0"))
        record.restoreFrom = snapshot
        record.manifest = try staticPodManifest(record)
        let seeded = record
        try await updateRecords { records in
            records = ["member-0": seeded]
        }
    }

    public func createFirstMember() async throws -> String? {
        // Only when there was never anything: no records ever written (the ConfigMap does not
        // exist) and no member pod of this cluster. A lost ConfigMap beside running members
        // needs a person, not a second cluster.
        guard bootEndpoint == nil, recordsMap.version == nil, records.isEmpty, pods.isEmpty, nodesOK else { return nil }
        _ = try await prepare("member-0")
        guard var record = records["member-0"] else { return nil }
        record.initialCluster = "member-0=\(record.peerURL)"
        record.initialClusterState = "new"
        let fixed = record
        try await updateRecords { $0["member-0"] = fixed }
        try await start("member-0")
        return "member-0"
    }

    func nodeIP(_ name: String) -> String? {
        let node = nodes.first { ($0["metadata"] as? [String: Any])?["name"] as? String == name }
        return ((node?["status"] as? [String: Any])?["addresses"] as? [[String: Any]] ?? [])
            .first { $0["type"] as? String == "InternalIP" }?["address"] as? String
    }

    public func verifySnapshot(_ path: String) async -> String? { Self.checkSnapshot(path) }

    /// `etcdlite snapshot status` of this very binary on `path`: nil when it checks out.
    static func checkSnapshot(_ path: String) -> String? {
        guard let exe = try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe"),
              let result = try? LocalPlatform.run(exe, ["snapshot", "status", path]) else { return "cannot run the snapshot check" }
        return result.code == 0 ? nil : result.output
    }

    // MARK: The member's pod

    /// A member's static pod manifest (JSON), as its node agent writes it.
    var staticPodManifest: (MemberRecord) throws -> String {
        { record in
            String(decoding: try JSONSerialization.data(withJSONObject: self.memberPod(record), options: [.sortedKeys, .withoutEscapingSlashes]),
                   as: UTF8.self)
        }
    }

    /// A member's manifest without the API server (a re-seed by the node agents), from the spec
    /// last read (JSON; nil: the defaults), the agent's host path and the ports of its URLs.
    static func staticPodManifest(_ record: MemberRecord, spec json: String?, hostPath: String, namespace: String, clusterName: String) throws -> String {
        var spec = json.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
        var storage = spec["storage"] as? [String: Any] ?? [:]
        if storage["hostPath"] == nil { storage["hostPath"] = hostPath }
        spec["storage"] = storage
        if spec["clientPort"] == nil, let port = URL(string: record.clientURL)?.port { spec["clientPort"] = port }
        if spec["peerPort"] == nil, let port = URL(string: record.peerURL)?.port { spec["peerPort"] = port }
        let platform = KubernetesPlatform(client: KubeClient(host: "127.0.0.1", port: 0), namespace: namespace, clusterName: clusterName)
        platform.cluster = ["spec": spec]
        return try platform.staticPodManifest(record)
    }

    /// A member's static pod: on the host network, its data on the host path. The kubelet of its
    /// node runs it and shows it as a mirror pod named `<name>-<node>`.
    func memberPod(_ record: MemberRecord) -> [String: Any] {
        let dataDir = "\(hostPath)/\(record.dataName ?? "\(record.name)-\(record.id.map { String($0, radix: 16) } ?? record.clusterToken)")"
        var command = ["etcdlite", "--name", record.name, "--data-dir", dataDir,
                       "--listen-client-urls", "http://0.0.0.0:\(clientPort)", "--advertise-client-urls", record.clientURL,
                       "--listen-peer-urls", "http://0.0.0.0:\(peerPort)", "--initial-advertise-peer-urls", record.peerURL,
                       "--initial-cluster-token", record.clusterToken]
        if !record.initialCluster.isEmpty {
            command += ["--initial-cluster", record.initialCluster, "--initial-cluster-state", record.initialClusterState]
        }
        var volumes: [[String: Any]] = [["name": "data", "hostPath": ["path": hostPath, "type": "DirectoryOrCreate"]]]
        var podSpec: [String: Any] = [
            "hostNetwork": true,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "priorityClassName": "system-node-critical",
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "containers": [[
                "name": "etcdlite",
                "image": record.binary,
                "command": command,
                "ports": [["name": "client", "containerPort": clientPort], ["name": "peer", "containerPort": peerPort]],
                "readinessProbe": ["httpGet": ["host": "127.0.0.1", "path": "/readyz", "port": clientPort], "periodSeconds": 5],
                "livenessProbe": ["httpGet": ["host": "127.0.0.1", "path": "/livez", "port": clientPort], "periodSeconds": 10,
                                  "failureThreshold": 6, "initialDelaySeconds": 15],
                "volumeMounts": [["name": "data", "mountPath": hostPath]],
                // The last log lines tell a refused start ("has already been bootstrapped").
                "terminationMessagePolicy": "FallbackToLogsOnError",
            ] as [String: Any]],
        ]
        if let snapshot = record.restoreFrom {
            let dir = (snapshot as NSString).deletingLastPathComponent
            volumes.append(["name": "backups", "hostPath": ["path": dir, "type": "Directory"]])
            podSpec["initContainers"] = [[
                "name": "restore",
                "image": record.binary,
                // Idempotent: a restarted pod finds the directory restored already.
                "command": ["sh", "-c", "test -d \(dataDir)/member || etcdlite snapshot restore \(snapshot) --data-dir \(dataDir)"],
                "volumeMounts": [["name": "data", "mountPath": hostPath], ["name": "backups", "mountPath": dir, "readOnly": true]],
            ] as [String: Any]]
        }
        podSpec["volumes"] = volumes
        if let tolerations = spec["tolerations"] { podSpec["tolerations"] = tolerations }
        if let resources = spec["resources"], var containers = podSpec["containers"] as? [[String: Any]] {
            containers[0]["resources"] = resources
            podSpec["containers"] = containers
        }
        return [
            "apiVersion": "v1", "kind": "Pod",
            "metadata": [
                "name": podName(record.name), "namespace": namespace,
                "labels": ["app.kubernetes.io/name": "etcdlite", "app.kubernetes.io/component": "member",
                           "etcdlite.dev/cluster": clusterName, "etcdlite.dev/member": record.name],
            ] as [String: Any],
            "spec": podSpec,
        ]
    }

    /// The boot member left the cluster: the node agents delete its static pod manifest.
    public func bootMemberRemoved() async {
        _ = try? await updateRecordsData { $0[NodeAgent.bootKey] = "{\"removed\":true}" }
    }

    // MARK: Status and events

    /// The status subresource, written with the resourceVersion last read; a conflict (the
    /// object changed: a spec edit, another writer) reads it again and writes once more.
    public func publish(_ status: ClusterStatus) async {
        for _ in 0..<3 {
            var object = cluster
            object["status"] = statusObject(status)
            do {
                cluster = try await client.send(.PUT, clusterPath + "/status", body: object)
                return
            } catch let error as KubeAPIError where error.isConflict {
                guard let fresh = try? await client.get(clusterPath) else { return }
                cluster = fresh
            } catch {
                return
            }
        }
    }

    func statusObject(_ status: ClusterStatus) -> [String: Any] {
        let time = ISO8601DateFormatter().string(from: status.updated ?? Date())
        let previous = Dictionary(((cluster["status"] as? [String: Any])?["conditions"] as? [[String: Any]] ?? []).compactMap { c in
            (c["type"] as? String).map { ($0, c) }
        }, uniquingKeysWith: { a, _ in a })
        var object: [String: Any] = [
            "phase": status.phase,
            "members": status.members.map { m -> [String: Any] in
                var member: [String: Any] = ["id": m.id, "name": m.name, "pod": podName(m.name), "leader": m.leader, "learner": m.learner,
                                             "healthy": m.healthy, "appliedIndex": Int(m.appliedIndex)]
                if let node = records[m.name]?.node { member["node"] = node }
                if m.name == bootMemberName { member["pod"] = "etcdlite-boot" }
                return member
            },
            // A condition's transition time moves only when its status changes.
            "conditions": status.conditions.map { c -> [String: Any] in
                let old = previous[c.type]
                let since = old?["status"] as? String == c.status ? old?["lastTransitionTime"] as? String ?? time : time
                return ["type": c.type, "status": c.status, "reason": c.reason, "message": c.message, "lastTransitionTime": since]
            },
        ]
        if let leader = status.leader { object["leader"] = leader }
        if let action = status.action { object["plannedAction"] = action }
        if let backup = status.lastBackup { object["lastBackup"] = backup }
        if let restore = status.lastRestore { object["lastRestore"] = restore }
        if let generation = status.observedGeneration.flatMap(Int.init) { object["observedGeneration"] = generation }
        return object
    }

    /// Events recently emitted, by type, reason and message: a repeat within `eventAggregationWindow`
    /// raises the first one's count instead of adding another (as client-go's event correlator
    /// does), so a step retried every pass does not fill the namespace with Events.
    private let recentEvents = NIOLockedValueBox<[String: (name: String, count: Int, last: Date)]>([:])
    static let eventAggregationWindow: TimeInterval = 600
    static let recentEventsKept = 64

    public func event(_ reason: String, _ message: String, warning: Bool) async {
        let type = warning ? "Warning" : "Normal"
        let text = String(message.prefix(1024))
        let key = "\(type)|\(reason)|\(text)"
        let now = Date()
        let stamp = ISO8601DateFormatter().string(from: now)
        let eventsPath = "/api/v1/namespaces/\(namespace)/events"
        if let seen = recentEvents.withLockedValue({ $0[key] }), now.timeIntervalSince(seen.last) < Self.eventAggregationWindow {
            let patch: [String: Any] = ["count": seen.count + 1, "lastTimestamp": stamp]
            if (try? await client.send(.PATCH, "\(eventsPath)/\(seen.name)", body: patch,
                                       contentType: "application/strategic-merge-patch+json")) != nil {
                recentEvents.withLockedValue { $0[key] = (seen.name, seen.count + 1, now) }
                return
            }
            // Gone (Events expire) or refused: a new one.
        }
        let metadata = cluster["metadata"] as? [String: Any] ?? [:]
        let name = "\(clusterName).\(String(UInt64(now.timeIntervalSince1970 * 1e9), radix: 16))"
        let event: [String: Any] = [
            "apiVersion": "v1", "kind": "Event",
            "metadata": ["name": name, "namespace": namespace],
            "involvedObject": ["apiVersion": "\(Manifests.group)/\(Manifests.version)", "kind": "EtcdLiteCluster", "name": clusterName,
                               "namespace": namespace, "uid": metadata["uid"] as? String ?? "",
                               "resourceVersion": metadata["resourceVersion"] as? String ?? ""],
            "reason": reason, "message": text, "type": type,
            "source": ["component": "etcdlite-operator"], "reportingComponent": "etcdlite-operator",
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        ]
        guard (try? await client.send(.POST, eventsPath, body: event)) != nil else { return }
        recentEvents.withLockedValue { recent in
            recent[key] = (name, 1, now)
            if recent.count > Self.recentEventsKept, let oldest = recent.min(by: { $0.value.last < $1.value.last })?.key {
                recent[oldest] = nil
            }
        }
    }

    // MARK: Watching

    /// Watches the EtcdLiteCluster and the member pods and calls `changed` on every event; lists
    /// again when the server says the version is gone (410), and watches again when a watch
    /// ends. Returns when `shouldStop` says so.
    public func watch(shouldStop: @escaping @Sendable () -> Bool, changed: @escaping @Sendable () -> Void) async {
        let listPath = "/apis/\(Manifests.group)/\(Manifests.version)/namespaces/\(namespace)/etcdliteclusters?fieldSelector="
            + Self.escape("metadata.name=\(clusterName)")
        let podList = podsPath + "?labelSelector=" + Self.escape(memberSelector)
        await withTaskGroup(of: Void.self) { group in
            for path in [listPath, podList] {
                group.addTask { [client] in
                    var version: String?
                    while !shouldStop() {
                        do {
                            if version == nil {
                                let list = try await client.get(path)
                                version = (list["metadata"] as? [String: Any])?["resourceVersion"] as? String
                                changed()
                            }
                            let latest = LatestVersion(version)
                            let isCluster = path == listPath
                            try await client.watch(path, resourceVersion: version, timeoutSeconds: 60) { event in
                                let metadata = event.object["metadata"] as? [String: Any]
                                if let v = metadata?["resourceVersion"] as? String { latest.value = v }
                                guard event.type != "BOOKMARK" else { return !shouldStop() }
                                // The cluster object changes with every status write of ours:
                                // only a new generation (a spec edit) is news.
                                if isCluster {
                                    let generation = metadata?["generation"] as? Int
                                    if generation != latest.generation || event.type != "MODIFIED" { changed() }
                                    latest.generation = generation
                                } else {
                                    changed()
                                }
                                return !shouldStop()
                            }
                            version = latest.value
                        } catch let error as KubeAPIError where error.isGone {
                            version = nil
                        } catch {
                            try? await Task.sleep(for: .seconds(1))
                        }
                    }
                }
            }
        }
    }

    // MARK: Helpers

    static func labels(_ object: [String: Any]) -> [String: String] {
        (object["metadata"] as? [String: Any])?["labels"] as? [String: String] ?? [:]
    }

    /// A data directory name of one identity alone.
    static func dataName(_ member: String) -> String { "\(member)-\(String(UInt32.random(in: 0...UInt32.max), radix: 16))" }

    /// The image the etcdlite container runs: its status's while it is Ready, else unknown ("").
    static func runningImage(_ pod: [String: Any]) -> String? {
        let statuses = (pod["status"] as? [String: Any])?["containerStatuses"] as? [[String: Any]]
        guard let status = statuses?.first(where: { $0["name"] as? String == "etcdlite" }) else { return image(pod) }
        return status["ready"] as? Bool == true ? status["image"] as? String : ""
    }

    /// The container ended because etcdlite refused to start on lost data.
    static func refusedForLostData(_ pod: [String: Any]) -> Bool {
        let statuses = (pod["status"] as? [String: Any])?["containerStatuses"] as? [[String: Any]] ?? []
        return statuses.contains { status in
            let terminated = [(status["state"] as? [String: Any])?["terminated"], (status["lastState"] as? [String: Any])?["terminated"]]
            return terminated.contains { ($0 as? [String: Any])?["message"].map { "\($0)".contains("has already been bootstrapped") } ?? false }
        }
    }

    static func image(_ pod: [String: Any]) -> String? {
        ((pod["spec"] as? [String: Any])?["containers"] as? [[String: Any]])?.first { $0["name"] as? String == "etcdlite" }?["image"] as? String
    }

    static func escape(_ query: String) -> String {
        query.addingPercentEncoding(withAllowedCharacters: .alphanumerics.union(CharacterSet(charactersIn: "-._~"))) ?? query
    }
}

private final class LatestVersion: @unchecked Sendable {
    var value: String?
    var generation: Int?
    init(_ value: String?) { self.value = value }
}
