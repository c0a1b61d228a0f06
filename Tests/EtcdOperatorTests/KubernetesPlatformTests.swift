@testable import EtcdOperator
import Foundation
import NIOConcurrencyHelpers
import Testing

/// The Kubernetes platform against an API server that follows the API conventions (no
/// kube-apiserver runs here): the requests it makes, and how it takes answers, watch events,
/// conflicts and errors.
@Suite(.serialized) struct KubernetesPlatformTests {
    static let ns = "kube-system"
    static let clusterPath = "/apis/etcdlite.dev/v1alpha1/namespaces/kube-system/etcdliteclusters"
    static let podsPath = "/api/v1/namespaces/kube-system/pods"
    static let recordsPath = "/api/v1/namespaces/kube-system/configmaps/etcdlite-members"

    /// A server with an EtcdLiteCluster and nodes: three Ready control-plane nodes, one not
    /// Ready, one cordoned, one worker (not matching the nodeSelector).
    static func server(bootEndpoint: String? = nil) throws -> FakeAPIServer {
        let server = FakeAPIServer()
        try server.start()
        // The operator and the node agents with what the rendered RBAC grants them, nothing more.
        server.grant("operator-token", FakeAPIServer.renderedRules("etcdlite-operator"))
        server.grant("agent-token", FakeAPIServer.renderedRules("etcdlite-node-agent"))
        var spec: [String: Any] = ["size": 3, "image": "etcdlite:1", "storage": ["hostPath": "/var/lib/etcdlite"],
                                   "nodeSelector": ["node-role.kubernetes.io/control-plane": ""],
                                   "backup": ["intervalSeconds": 600, "retention": 4, "destination": "/var/lib/etcdlite/backups"]]
        if let bootEndpoint { spec["bootstrap"] = ["bootMemberEndpoint": bootEndpoint, "selfHosted": true] }
        server.seed(clusterPath, ["apiVersion": "etcdlite.dev/v1alpha1", "kind": "EtcdLiteCluster",
                                  "metadata": ["name": "etcdlite", "namespace": ns], "spec": spec])
        func node(_ name: String, ip: String, ready: Bool = true, cordoned: Bool = false, controlPlane: Bool = true) {
            var labels = ["kubernetes.io/hostname": name]
            if controlPlane { labels["node-role.kubernetes.io/control-plane"] = "" }
            server.seed("/api/v1/nodes", ["apiVersion": "v1", "kind": "Node", "metadata": ["name": name, "labels": labels],
                                          "spec": ["unschedulable": cordoned],
                                          "status": ["conditions": [["type": "Ready", "status": ready ? "True" : "False"]],
                                                     "addresses": [["type": "InternalIP", "address": ip], ["type": "Hostname", "address": name]]]])
        }
        node("cp-a", ip: "10.0.0.1")
        node("cp-b", ip: "10.0.0.2")
        node("cp-c", ip: "10.0.0.3")
        node("cp-down", ip: "10.0.0.4", ready: false)
        node("cp-cordoned", ip: "10.0.0.5", cordoned: true)
        node("worker", ip: "10.0.0.6", controlPlane: false)
        return server
    }

    /// A port nothing listened on a moment ago (bound to 0 and released).
    static func freePort() -> Int {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        defer { close(fd) }
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
        return Int(UInt16(bigEndian: address.sin_port))
    }

    /// A member's record as the operator wrote it, and its static pod manifest.
    static func record(_ server: FakeAPIServer, _ member: String) -> (record: MemberRecord?, pod: [String: Any]) {
        let data = server.object(recordsPath)?["data"] as? [String: String] ?? [:]
        let record = data[member + ".json"].flatMap { try? JSONDecoder().decode(MemberRecord.self, from: Data($0.utf8)) }
        let pod = record?.manifest.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] } ?? [:]
        return (record, pod)
    }

    /// The mirror pod the kubelet of `node` shows for a member's static pod.
    static func mirror(_ server: FakeAPIServer, _ member: String, on node: String, status: [String: Any]) {
        server.seed(podsPath, ["apiVersion": "v1", "kind": "Pod",
                               "metadata": ["name": "etcdlite-\(member)-\(node)", "namespace": ns,
                                            "annotations": ["kubernetes.io/config.mirror": "x"],
                                            "labels": ["app.kubernetes.io/name": "etcdlite", "app.kubernetes.io/component": "member",
                                                       "etcdlite.dev/cluster": "etcdlite", "etcdlite.dev/member": member]],
                               "spec": ["nodeName": node, "containers": [["name": "etcdlite", "image": "etcdlite:1"]]],
                               "status": status])
    }

    /// A platform that placed and started `count` members (IDs 1, 2, ...).
    static func withMembers(_ server: FakeAPIServer, _ count: Int) async throws -> KubernetesPlatform {
        let platform = Self.platform(server)
        try await platform.refresh()
        for n in 0..<count {
            _ = try await platform.prepare("member-\(n)")
            try await platform.joined("member-\(n)", id: UInt64(n + 1), initialCluster: "x")
            try await platform.start("member-\(n)")
        }
        return platform
    }

    static func container(_ pod: [String: Any]) -> [String: Any] {
        ((pod["spec"] as? [String: Any])?["containers"] as? [[String: Any]])?.first ?? [:]
    }

    static func platform(_ server: FakeAPIServer, token: String = "operator-token") -> KubernetesPlatform {
        KubernetesPlatform(client: KubeClient(host: "127.0.0.1", port: server.port, token: token), namespace: ns, operatorNode: "cp-a")
    }

    @Test func membersArePlacedOnReadyNodesByAddressAsStaticPods() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        #expect(platform.desired.size == 3 && platform.desired.version == "etcdlite:1" && platform.desired.generation == "1")
        #expect(platform.backupDir == "/var/lib/etcdlite/backups" && platform.settings.backupRetain == 4)

        var peers: [String] = []
        for (n, id) in [(0, UInt64(0xa1)), (1, 0xb2), (2, 0xc3)] {
            let peer = try await platform.prepare("member-\(n)")
            peers.append(peer)
            try await platform.joined("member-\(n)", id: id, initialCluster: "member-\(n)=\(peer)")
            try await platform.start("member-\(n)")
        }
        // One member per node, only on Ready, schedulable nodes that match the nodeSelector; peer
        // URLs on the nodes' addresses.
        #expect(peers == ["http://10.0.0.1:2380", "http://10.0.0.2:2380", "http://10.0.0.3:2380"])
        await #expect(throws: OperatorError.self) { _ = try await platform.prepare("member-3") }

        let (record1, pod) = Self.record(server, "member-1")
        #expect(record1?.node == "cp-b" && record1?.started == true)
        let spec = pod["spec"] as? [String: Any] ?? [:]
        #expect(spec["hostNetwork"] as? Bool == true && spec["nodeName"] == nil, "a static pod runs where its manifest is")
        let container = Self.container(pod)
        let command = container["command"] as? [String] ?? []
        #expect(container["image"] as? String == "etcdlite:1")
        #expect(command.contains("--initial-cluster-state") && command.contains("existing") && command.contains("member-1=http://10.0.0.2:2380"))
        let dataDir = command.firstIndex(of: "--data-dir").map { command[$0 + 1] } ?? ""
        #expect(dataDir == "/var/lib/etcdlite/" + (record1?.dataName ?? "?") && dataDir.hasPrefix("/var/lib/etcdlite/member-1-"),
                "a data directory of this identity: \(command)")
        // Added again (after its data was lost), the same name gets another directory.
        try await platform.delete("member-1")
        _ = try await platform.prepare("member-1")
        try await platform.joined("member-1", id: 0xd4, initialCluster: "member-1=http://10.0.0.2:2380")
        try await platform.start("member-1")
        #expect(Self.record(server, "member-1").record.map { $0.dataName != record1?.dataName && $0.dataName?.hasPrefix("member-1-") == true } == true)
        let mounts = (container["volumeMounts"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        let volumes = (spec["volumes"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        #expect(!mounts.isEmpty && mounts.allSatisfy(volumes.contains))
        let metadata = pod["metadata"] as? [String: Any] ?? [:]
        #expect((metadata["labels"] as? [String: String])?["etcdlite.dev/member"] == "member-1")
        #expect(server.objects(in: Self.podsPath).isEmpty, "the operator makes no pods: node agents write static pods")

        // The records: created once, then replaced with the version read; every request carried the token.
        let writes = server.locked { server.requests.filter { $0.path.hasPrefix("/api/v1/namespaces/kube-system/configmaps") && $0.method != "GET" } }
        #expect(writes.first?.method == "POST" && writes.dropFirst().allSatisfy { $0.method == "PUT" && ($0.body?["metadata"] as? [String: Any])?["resourceVersion"] != nil })
        #expect(server.locked { server.requests.allSatisfy { $0.authorization == "Bearer operator-token" } })

        // A second operator (or a restart) reads the same records back.
        let other = Self.platform(server)
        try await other.refresh()
        #expect(other.memberName(peerURLs: ["http://10.0.0.3:2380"]) == "member-2" && other.hasJoined("member-2"))
        #expect(other.endpoints == ["http://10.0.0.1:2379", "http://10.0.0.2:2379", "http://10.0.0.3:2379"])
    }

    /// spec.affinity's required node affinity narrows where members go, as the nodeSelector does.
    @Test func requiredNodeAffinityNarrowsThePlacement() async throws {
        let server = try Self.server()
        defer { server.stop() }
        server.modify("/api/v1/nodes/cp-a") { node in
            var metadata = node["metadata"] as? [String: Any] ?? [:]
            var labels = metadata["labels"] as? [String: String] ?? [:]
            labels["disk"] = "slow"
            metadata["labels"] = labels
            node["metadata"] = metadata
        }
        server.modify(Self.clusterPath + "/etcdlite") { object in
            var spec = object["spec"] as? [String: Any] ?? [:]
            spec["affinity"] = ["nodeAffinity": ["requiredDuringSchedulingIgnoredDuringExecution": ["nodeSelectorTerms": [
                ["matchExpressions": [["key": "disk", "operator": "NotIn", "values": ["slow"]],
                                      ["key": "kubernetes.io/hostname", "operator": "Exists"]]],
            ]]]]
            object["spec"] = spec
        }
        let platform = Self.platform(server)
        try await platform.refresh()
        #expect(try await platform.prepare("member-0") == "http://10.0.0.2:2380", "cp-a is excluded by the affinity")
        let labels = ["disk": "ssd", "zone": "3"]
        func allows(_ expressions: [[String: Any]]) -> Bool {
            KubernetesPlatform.nodeAffinityAllows(["nodeAffinity": ["requiredDuringSchedulingIgnoredDuringExecution": ["nodeSelectorTerms": [
                ["matchExpressions": expressions]]]]], labels: labels)
        }
        #expect(allows([["key": "disk", "operator": "In", "values": ["ssd", "nvme"]]]))
        #expect(!allows([["key": "disk", "operator": "In", "values": ["nvme"]]]))
        #expect(allows([["key": "gpu", "operator": "DoesNotExist"]]) && !allows([["key": "gpu", "operator": "Exists"]]))
        #expect(allows([["key": "zone", "operator": "Gt", "values": ["2"]]]) && !allows([["key": "zone", "operator": "Lt", "values": ["2"]]]))
        #expect(KubernetesPlatform.nodeAffinityAllows(nil, labels: labels))
    }

    /// A re-seeded (or first) member bootstraps with `new` and its snapshot; once its pod is Ready
    /// it is an existing member, so that a later loss of its data cannot start an empty cluster
    /// (or the old snapshot) under the same identity.
    @Test func aBootstrappedMemberBecomesAnExistingOneOnceReady() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = try await Self.withMembers(server, 3)
        try await platform.reseed(from: "/var/lib/etcdlite/backups/snapshot-1.db")
        var (record, pod) = Self.record(server, "member-0")
        #expect(record?.initialClusterState == "new" && record?.restoreFrom != nil)
        #expect((pod["spec"] as? [String: Any])?["initContainers"] != nil)
        // Running but not Ready yet: unchanged.
        Self.mirror(server, "member-0", on: "cp-a", status: ["phase": "Running", "conditions": [["type": "Ready", "status": "False"]]])
        try await platform.refresh()
        #expect(Self.record(server, "member-0").record?.initialClusterState == "new")
        server.modify(Self.podsPath + "/etcdlite-member-0-cp-a") { $0["status"] = ["phase": "Running", "conditions": [["type": "Ready", "status": "True"]]] }
        try await platform.refresh()
        (record, pod) = Self.record(server, "member-0")
        #expect(record?.initialClusterState == "existing" && record?.restoreFrom == nil)
        #expect((pod["spec"] as? [String: Any])?["initContainers"] == nil)
        let command = Self.container(pod)["command"] as? [String] ?? []
        #expect(command.firstIndex(of: "--initial-cluster-state").map { command[$0 + 1] } == "existing")
        // spec.restore is the planner's restore request; status.lastRestore says which one ran.
        #expect(platform.desired.restore == nil)
        server.modify(Self.clusterPath + "/etcdlite") { object in
            var spec = object["spec"] as? [String: Any] ?? [:]
            spec["restore"] = ["id": "r1", "snapshot": "/var/lib/etcdlite/backups/chosen.db"]
            object["spec"] = spec
        }
        try await platform.refresh()
        #expect(platform.desired.restore == RestoreRequest(id: "r1", snapshot: "/var/lib/etcdlite/backups/chosen.db"))
        var status = ClusterStatus()
        status.lastRestore = "r1"
        await platform.publish(status)
        #expect((server.object(Self.clusterPath + "/etcdlite")?["status"] as? [String: Any])?["lastRestore"] as? String == "r1")
    }

    @Test func workloadStatesFollowMirrorPodsAndNodes() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = try await Self.withMembers(server, 3)
        // No mirror pod yet: stopped (the node agent has not written it, or the node is down).
        try await platform.refresh()
        #expect(try await platform.workloads().map(\.state) == [.stopped, .stopped, .stopped])
        Self.mirror(server, "member-0", on: "cp-a", status: ["phase": "Running"])
        Self.mirror(server, "member-1", on: "cp-b", status: ["phase": "Failed"])
        server.remove("/api/v1/nodes/cp-c")
        try await platform.refresh()
        var states = Dictionary(uniqueKeysWithValues: try await platform.workloads().map { ($0.name, $0.state) })
        #expect(states == ["member-0": .running, "member-1": .stopped, "member-2": .dataLost])
        // A member whose data was wiped under it: etcdlite refuses the old ID, the container's
        // termination message says so, and the member counts as lost.
        server.modify(Self.podsPath + "/etcdlite-member-0-cp-a") { pod in
            pod["status"] = ["phase": "Running", "containerStatuses": [[
                "name": "etcdlite", "ready": false, "image": "etcdlite:1",
                "lastState": ["terminated": ["exitCode": 1, "message": "{\"msg\":\"failed to start\",\"error\":\"member a1 has already been bootstrapped\"}"]],
            ]]]
        }
        try await platform.refresh()
        states = Dictionary(uniqueKeysWithValues: try await platform.workloads().map { ($0.name, $0.state) })
        #expect(states["member-0"] == .dataLost)
        // Starting a started member changes nothing (the kubelet restarts its static pod).
        let before = server.object(Self.recordsPath)?["data"] as? [String: String]
        try await platform.start("member-1")
        #expect(server.object(Self.recordsPath)?["data"] as? [String: String] == before)
        // Deleting a member: its record goes (its node agent removes the manifest, then the data);
        // deleting again is not an error.
        try await platform.delete("member-2")
        try await platform.delete("member-2")
        try await platform.refresh()
        #expect(try await platform.workloads().map(\.name) == ["member-0", "member-1"])
    }

    @Test func statusWritesSurviveAConflictAndKeepOthersSpecEdits() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        // Someone edits the spec between our read and our status write: 409, read again, write again.
        server.beforeNextPut(Self.clusterPath + "/etcdlite/status") {
            server.modify(Self.clusterPath + "/etcdlite") { object in
                var spec = object["spec"] as? [String: Any] ?? [:]
                spec["size"] = 5
                object["spec"] = spec
            }
        }
        var status = ClusterStatus()
        status.phase = "Running"
        status.leader = "member-0"
        status.members = [.init(id: "a1", name: "member-0", clientURL: nil, leader: true, learner: false, healthy: true, appliedIndex: 9, version: "etcdlite:1")]
        status.conditions = [.init(type: "Available", status: "True", reason: "QuorumHealthy", message: "3 of 3")]
        status.observedGeneration = "1"
        await platform.publish(status)
        let puts = server.locked { server.requests.filter { $0.method == "PUT" && $0.path.hasSuffix("/status") } }
        #expect(puts.count == 2, "one conflict, one retry")
        let stored = try #require(server.object(Self.clusterPath + "/etcdlite"))
        #expect((stored["spec"] as? [String: Any])?["size"] as? Int == 5, "the other writer's spec edit stays")
        let written = stored["status"] as? [String: Any] ?? [:]
        #expect(written["phase"] as? String == "Running" && written["leader"] as? String == "member-0" && written["observedGeneration"] as? Int == 1)
        // The status fits the CRD's schema.
        let crd = Manifests.crd()
        let schema = ((((crd["spec"] as? [String: Any])?["versions"] as? [[String: Any]])?.first?["schema"] as? [String: Any])?["openAPIV3Schema"] as? [String: Any])
        let statusSchema = (schema?["properties"] as? [String: Any])?["status"] as? [String: Any] ?? [:]
        #expect(ManifestTests.fits(written, statusSchema))
        // A condition keeps its transition time while its status stays.
        let firstTime = (written["conditions"] as? [[String: Any]])?.first?["lastTransitionTime"] as? String
        try await Task.sleep(for: .milliseconds(1100))
        status.updated = Date()
        await platform.publish(status)
        let again = (server.object(Self.clusterPath + "/etcdlite")?["status"] as? [String: Any])?["conditions"] as? [[String: Any]]
        #expect(again?.first?["lastTransitionTime"] as? String == firstTime)

        // The records, too: a conflicting writer's record is kept, ours is added on top.
        _ = try await platform.prepare("member-0")
        server.modify(Self.recordsPath) { object in
            var data = object["data"] as? [String: String] ?? [:]
            data["note.json"] = "{}"
            object["data"] = data
        }
        _ = try await platform.prepare("member-1")
        let data = server.object(Self.recordsPath)?["data"] as? [String: String] ?? [:]
        #expect(Set(data.keys) == ["note.json", "member-0.json", "member-1.json"])
    }

    @Test func watchesDeliverEventsInOrderAndAnOldVersionIsGone() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let client = KubeClient(host: "127.0.0.1", port: server.port, token: server.token)
        let from = server.currentVersion
        for n in 0..<3 {
            server.seed(Self.podsPath, ["apiVersion": "v1", "kind": "Pod", "metadata": ["name": "p\(n)", "labels": ["app": n == 1 ? "other" : "x"]]])
        }
        server.remove(Self.podsPath + "/p0")
        let seen = NIOLockedValueBox<[String]>([])
        try await client.watch(Self.podsPath + "?labelSelector=app%3Dx", resourceVersion: String(from)) { event in
            let name = (event.object["metadata"] as? [String: Any])?["name"] as? String ?? "?"
            seen.withLockedValue { $0.append("\(event.type) \(name)") }
            return seen.withLockedValue { $0.count } < 3
        }
        #expect(seen.withLockedValue { $0 } == ["ADDED p0", "ADDED p2", "DELETED p0"])

        server.compact()
        await #expect(throws: KubeAPIError.self) {
            try await client.watch(Self.podsPath, resourceVersion: String(from)) { _ in true }
        }
        do {
            try await client.watch(Self.podsPath, resourceVersion: String(from)) { _ in true }
        } catch let error as KubeAPIError {
            #expect(error.isGone && error.reason == "Gone")
        }

        // The platform's watch lists again after a 410 and goes on: a change after that still
        // wakes the operator.
        let platform = Self.platform(server)
        let wakes = NIOLockedValueBox(0)
        let stop = NIOLockedValueBox(false)
        let watching = Task { await platform.watch(shouldStop: { stop.withLockedValue { $0 } }, changed: { wakes.withLockedValue { $0 += 1 } }) }
        try await Task.sleep(for: .milliseconds(300))
        let before = wakes.withLockedValue { $0 }
        server.modify(Self.clusterPath + "/etcdlite") { object in
            var spec = object["spec"] as? [String: Any] ?? [:]
            spec["size"] = 5
            object["spec"] = spec
        }
        let deadline = Date().addingTimeInterval(5)
        while wakes.withLockedValue({ $0 }) == before && Date() < deadline { try await Task.sleep(for: .milliseconds(20)) }
        #expect(wakes.withLockedValue { $0 } > before)
        stop.withLockedValue { $0 = true }
        await watching.value
        let lists = server.locked { server.requests.filter { $0.query["watch"] == nil && $0.path == Self.clusterPath }.count }
        #expect(lists >= 1)
    }

    @Test func errorsCarryTheAPIServersStatus() async throws {
        let server = try Self.server()
        defer { server.stop() }
        // A bad token: 401 with the Status reason.
        let stranger = Self.platform(server, token: "wrong")
        do {
            try await stranger.refresh()
            Issue.record("expected 401")
        } catch let error as KubeAPIError {
            #expect(error.code == 401 && error.reason == "Unauthorized")
        }
        let platform = Self.platform(server)
        try await platform.refresh()
        _ = try await platform.prepare("member-0")
        try await platform.joined("member-0", id: 1, initialCluster: "member-0=http://10.0.0.1:2380")
        // Forbidden (RBAC): the error names it, and nothing changed.
        server.inject("PUT", Self.recordsPath, code: 403, reason: "Forbidden")
        do {
            try await platform.start("member-0")
            Issue.record("expected 403")
        } catch let error as KubeAPIError {
            #expect(error.code == 403 && error.reason == "Forbidden" && error.message == "injected Forbidden")
        }
        try await platform.refresh()
        #expect(try await platform.workloads().isEmpty)
        // Two writers from the same old view (an operator that restarted): the second write is a
        // conflict, read again and applied on top.
        let late = Self.platform(server)
        try await late.refresh()
        try await platform.start("member-0")
        try await late.start("member-0")
        try await platform.refresh()
        #expect(try await platform.workloads().map(\.name) == ["member-0"])
        #expect(server.locked { server.requests.filter { $0.method == "PUT" && $0.path == Self.recordsPath }.count } >= 3)
        // The API server down: workloads are unknown, and the planner waits rather than act.
        server.stop()
        await #expect(throws: (any Error).self) { try await platform.refresh() }
    }

    @Test func upgradesRewriteTheManifestAndEventsReferenceTheCluster() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        _ = try await platform.prepare("member-0")
        try await platform.joined("member-0", id: 1, initialCluster: "member-0=http://10.0.0.1:2380")
        try await platform.start("member-0")
        let dataBefore = Self.record(server, "member-0").record?.dataName
        try await platform.upgrade("member-0", to: "etcdlite:2")
        let (record, pod) = Self.record(server, "member-0")
        #expect(Self.container(pod)["image"] as? String == "etcdlite:2" && record?.binary == "etcdlite:2" && record?.dataName == dataBefore)
        // Its version is what its Ready container runs: the old image until the kubelet restarted it.
        Self.mirror(server, "member-0", on: "cp-a", status: ["phase": "Running", "containerStatuses": [["name": "etcdlite", "ready": true, "image": "etcdlite:1"]]])
        try await platform.refresh()
        #expect(try await platform.workloads().first?.version == "etcdlite:1")
        server.modify(Self.podsPath + "/etcdlite-member-0-cp-a") { pod in
            pod["status"] = ["phase": "Running", "containerStatuses": [["name": "etcdlite", "ready": true, "image": "etcdlite:2"]]]
        }
        try await platform.refresh()
        #expect(try await platform.workloads().first?.version == "etcdlite:2")

        await platform.event("RemovingMember", "removeMember(id: 1, via: 2)", warning: true)
        let event = try #require(server.objects(in: "/api/v1/namespaces/kube-system/events").first)
        let involved = event["involvedObject"] as? [String: Any] ?? [:]
        #expect(involved["kind"] as? String == "EtcdLiteCluster" && involved["name"] as? String == "etcdlite" && (involved["uid"] as? String)?.isEmpty == false)
        #expect(event["type"] as? String == "Warning" && event["reason"] as? String == "RemovingMember")

        // The same Event again: its count goes up (a strategic merge patch), no second object.
        await platform.event("RemovingMember", "removeMember(id: 1, via: 2)", warning: true)
        await platform.event("RemovingMember", "removeMember(id: 1, via: 2)", warning: true)
        var events = server.objects(in: "/api/v1/namespaces/kube-system/events")
        #expect(events.count == 1 && events.first?["count"] as? Int == 3, "\(events)")
        #expect(events.first?["firstTimestamp"] as? String == event["firstTimestamp"] as? String)
        // Another message is another Event.
        await platform.event("RemovingMember", "removeMember(id: 2, via: 1)", warning: true)
        events = server.objects(in: "/api/v1/namespaces/kube-system/events")
        #expect(events.count == 2)
        // An Event that expired meanwhile (the API server deletes them after an hour) is made anew.
        let name = (event["metadata"] as? [String: Any])?["name"] as? String ?? ""
        _ = try await KubeClient(host: "127.0.0.1", port: server.port, token: "test-token").send(.DELETE, "/api/v1/namespaces/kube-system/events/\(name)")
        await platform.event("RemovingMember", "removeMember(id: 1, via: 2)", warning: true)
        events = server.objects(in: "/api/v1/namespaces/kube-system/events")
        #expect(events.count == 2 && events.allSatisfy { $0["count"] as? Int == 1 }, "\(events)")
    }

    /// A whole pass of the reconciler on an empty cluster (no boot member, nothing recorded):
    /// it creates member-0's pod as a new cluster, says so in an Event, and writes the status.
    @Test func aPassOnAnEmptyClusterStartsTheFirstMember() async throws {
        let server = try Self.server()
        defer { server.stop() }
        // The reconciler dials members: on loopback only, at ports nothing listens on.
        let client = Self.freePort(), peer = Self.freePort()
        for node in ["cp-a", "cp-b", "cp-c", "cp-down", "cp-cordoned", "worker"] {
            server.modify("/api/v1/nodes/\(node)") { object in
                var status = object["status"] as? [String: Any] ?? [:]
                status["addresses"] = [["type": "InternalIP", "address": "127.0.0.1"]]
                object["status"] = status
            }
        }
        server.modify(Self.clusterPath + "/etcdlite") { object in
            var spec = object["spec"] as? [String: Any] ?? [:]
            spec["clientPort"] = client
            spec["peerPort"] = peer
            object["spec"] = spec
        }
        let platform = Self.platform(server)
        let reconciler = Reconciler(platform: platform)
        let action = await reconciler.pass()
        #expect(action == .restoreFromSnapshot)
        let (record, pod) = Self.record(server, "member-0")
        #expect(record?.node == "cp-a" && record?.started == true)
        let command = Self.container(pod)["command"] as? [String] ?? []
        #expect(command.contains("new") && command.contains("member-0=http://127.0.0.1:\(peer)"))
        let reasons = server.objects(in: "/api/v1/namespaces/kube-system/events").compactMap { $0["reason"] as? String }
        #expect(reasons.contains("ClusterCreated"))
        let status = server.object(Self.clusterPath + "/etcdlite")?["status"] as? [String: Any]
        #expect(status?["phase"] as? String == "Recovering" && status?["plannedAction"] as? String == "restoreFromSnapshot")
        // The next pass (no mirror pod yet: its node agent has not written it) starts it again,
        // which changes nothing; no second cluster is made.
        #expect(await reconciler.pass() == .restartInPlace(name: "member-0"))
        #expect((server.object(Self.recordsPath)?["data"] as? [String: String])?.count == 1)
    }
}
