@testable import EtcdOperator
import Foundation
import Testing

/// The StatefulSet platform against an API server that follows the API conventions: adopting the
/// set's first members, replicas changed only around membership changes, the join answers its
/// pods read, a lost claim, upgrades one pod at a time, and the disruption budget.
@Suite(.serialized) struct StatefulSetPlatformTests {
    static let ns = "db"
    static let clusterPath = "/apis/etcdlite.dev/v1alpha1/namespaces/db/etcdliteclusters"
    static let setsPath = "/apis/apps/v1/namespaces/db/statefulsets"
    static let podsPath = "/api/v1/namespaces/db/pods"
    static let claimsPath = "/api/v1/namespaces/db/persistentvolumeclaims"
    static let joinPath = "/api/v1/namespaces/db/configmaps/etcdlite-join"
    static let budgetsPath = "/apis/policy/v1/namespaces/db/poddisruptionbudgets"

    /// The objects of deploy/statefulset.json as the API would hold them after `kubectl apply`
    /// (three pods running, their claims bound), and an EtcdLiteCluster that asks for `size`.
    static func server(size: Int = 3) throws -> FakeAPIServer {
        let server = FakeAPIServer()
        try server.start()
        // The operator with what deploy/statefulset-operator.json grants it, nothing more.
        server.grant("operator-token", FakeAPIServer.rules("etcdlite-operator", in: try DeployManifestTests.items("statefulset-operator.json")))
        server.seed(clusterPath, ["apiVersion": "etcdlite.dev/v1alpha1", "kind": "EtcdLiteCluster",
                                  "metadata": ["name": "etcdlite", "namespace": ns],
                                  "spec": ["size": size, "image": "etcdlite:1", "statefulSet": ["name": "etcdlite"]]])
        let items = try DeployManifestTests.items()
        for item in items where item["kind"] as? String == "StatefulSet" { server.seed(setsPath, item) }
        for item in items where item["kind"] as? String == "PodDisruptionBudget" { server.seed(budgetsPath, item) }
        for n in 0..<3 { addPod(server, n) }
        return server
    }

    static func addPod(_ server: FakeAPIServer, _ n: Int, image: String = "etcdlite:1", refused: Bool = false) {
        var status: [String: Any] = ["name": "etcdlite", "ready": !refused, "image": image, "state": ["running": [String: Any]()]]
        if refused {
            status["state"] = ["waiting": ["reason": "CrashLoopBackOff"]]
            status["lastState"] = ["terminated": ["exitCode": 1, "message": "etcdlite: member etcdlite-\(n) has already been bootstrapped"]]
        }
        server.seed(podsPath, ["apiVersion": "v1", "kind": "Pod",
                               "metadata": ["name": "etcdlite-\(n)", "namespace": ns,
                                            "labels": ["app.kubernetes.io/instance": "etcdlite", "app.kubernetes.io/name": "etcdlite"]],
                               "spec": ["containers": [["name": "etcdlite", "image": image]]],
                               "status": ["phase": "Running", "containerStatuses": [status]]])
        server.seed(claimsPath, ["apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": ["name": "data-etcdlite-\(n)", "namespace": ns]])
    }

    static func platform(_ server: FakeAPIServer) -> StatefulSetPlatform {
        StatefulSetPlatform(client: KubeClient(host: "127.0.0.1", port: server.port, token: "operator-token"), namespace: ns,
                            clusterName: "etcdlite", setName: "etcdlite")
    }

    static func replicas(_ server: FakeAPIServer) -> Int? {
        (server.object(setsPath + "/etcdlite")?["spec"] as? [String: Any])?["replicas"] as? Int
    }

    static func minAvailable(_ server: FakeAPIServer) -> Int? {
        (server.object(budgetsPath + "/etcdlite")?["spec"] as? [String: Any])?["minAvailable"] as? Int
    }

    static func joins(_ server: FakeAPIServer) -> [String: String] {
        server.object(joinPath)?["data"] as? [String: String] ?? [:]
    }

    static func peer(_ n: Int) -> String { "http://etcdlite-\(n).etcdlite-peers.db.svc:2380" }

    @Test func theSetsMembersAreAdoptedAndNamedByTheirPods() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        // Before the operator has recorded anything, no workload is its own (the planner asks to
        // start the members MemberList shows, and the reconciler records them from it).
        #expect(try await platform.workloads().isEmpty)
        #expect(platform.desired.size == 3 && platform.desired.namePrefix == "etcdlite" && platform.desired.ordinalScaleDown)
        #expect(platform.endpoints == (0..<3).map { "http://etcdlite-\($0).etcdlite-peers.db.svc:2379" })
        #expect(platform.memberName(peerURLs: [Self.peer(2)]) == "etcdlite-2")
        #expect(platform.memberName(peerURLs: ["http://10.0.0.1:2380"]) == nil)
        #expect(platform.memberName(peerURLs: ["http://etcdlite-2.elsewhere.db.svc:2380"]) == nil)
        await #expect(throws: OperatorError.self) { _ = try await platform.prepare("member-0") }

        let cluster = (0..<3).map { "etcdlite-\($0)=\(Self.peer($0))" }.joined(separator: ",")
        for n in 0..<3 {
            try await platform.joined("etcdlite-\(n)", id: UInt64(10 + n), initialCluster: cluster)
            try await platform.start("etcdlite-\(n)")
        }
        #expect(Self.joins(server) == ["etcdlite-0": cluster, "etcdlite-1": cluster, "etcdlite-2": cluster, "managed": "true"])
        #expect(Self.replicas(server) == 3, "adopting changes no replicas")
        try await platform.refresh()
        #expect(try await platform.workloads() == (0..<3).map { ObservedWorkload(name: "etcdlite-\($0)", state: .running, version: "etcdlite:1") })
        #expect(platform.hasJoined("etcdlite-1") && !platform.hasJoined("etcdlite-3"))
    }

    @Test func scalingUpRaisesReplicasOnlyAfterMemberAddAndDownOnlyAfterMemberRemove() async throws {
        let server = try Self.server(size: 4)
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        let three = (0..<3).map { "etcdlite-\($0)=\(Self.peer($0))" }.joined(separator: ",")
        for n in 0..<3 { try await platform.joined("etcdlite-\(n)", id: UInt64(10 + n), initialCluster: three) }

        // addLearner: the URL is the pod's DNS name; nothing changes before MemberAdd answered.
        #expect(try await platform.prepare("etcdlite-3") == Self.peer(3))
        #expect(Self.replicas(server) == 3 && Self.joins(server)["etcdlite-3"] == nil)
        let four = three + ",etcdlite-3=\(Self.peer(3))"
        try await platform.joined("etcdlite-3", id: 13, initialCluster: four)
        #expect(Self.replicas(server) == 3, "replicas wait for start")
        try await platform.start("etcdlite-3")
        #expect(Self.replicas(server) == 4)
        #expect(Self.joins(server)["etcdlite-3"] == four)
        #expect(Self.minAvailable(server) == 3, "a quorum of four")

        // The StatefulSet starts the pod; it runs.
        Self.addPod(server, 3)
        try await platform.refresh()
        #expect(try await platform.workloads().map(\.state) == [.running, .running, .running, .running])

        // Scale down (after MemberRemove): the highest ordinal leaves through replicas, its claim goes.
        try await platform.delete("etcdlite-3")
        #expect(Self.replicas(server) == 3)
        #expect(server.object(Self.claimsPath + "/data-etcdlite-3") == nil)
        #expect(server.object(Self.podsPath + "/etcdlite-3") != nil, "the StatefulSet removes the pod itself")
        #expect(Self.joins(server)["etcdlite-3"] == nil)
        #expect(Self.minAvailable(server) == 2)
    }

    @Test func aMemberWhoseClaimIsLostIsReplacedByItsPodUnderANewIdentity() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        let three = (0..<3).map { "etcdlite-\($0)=\(Self.peer($0))" }.joined(separator: ",")
        for n in 0..<3 { try await platform.joined("etcdlite-\(n)", id: UInt64(10 + n), initialCluster: three) }

        // etcdlite-1's pod came back on an empty claim and etcdlite refused its old identity.
        server.remove(Self.podsPath + "/etcdlite-1")
        server.remove(Self.claimsPath + "/data-etcdlite-1")
        Self.addPod(server, 1, refused: true)
        try await platform.refresh()
        #expect(try await platform.workloads().map(\.state) == [.running, .dataLost, .running])

        // After MemberRemove: its key, pod and claim go; replicas stay (etcdlite-2 is above it).
        try await platform.delete("etcdlite-1")
        #expect(Self.replicas(server) == 3)
        #expect(server.object(Self.podsPath + "/etcdlite-1") == nil && server.object(Self.claimsPath + "/data-etcdlite-1") == nil)
        #expect(Self.joins(server)["etcdlite-1"] == nil && Self.joins(server)["managed"] == "true",
                "the new pod waits for its key instead of founding a cluster")
        try await platform.refresh()
        #expect(try await platform.workloads().map(\.name) == ["etcdlite-0", "etcdlite-2"])
        // The planner adds it again under the lowest free ordinal: its own name, a new ID.
        #expect(try await platform.prepare("etcdlite-1") == Self.peer(1))
        try await platform.joined("etcdlite-1", id: 21, initialCluster: three)
        Self.addPod(server, 1)  // the StatefulSet's new pod, waiting for its key
        try await platform.refresh()
        try await platform.start("etcdlite-1")
        #expect(Self.joins(server)["etcdlite-1"] == three && Self.replicas(server) == 3)
        // The waiting pod is touched, so its kubelet syncs the ConfigMap volume now.
        let annotations = (server.object(Self.podsPath + "/etcdlite-1")?["metadata"] as? [String: Any])?["annotations"] as? [String: String]
        #expect(annotations?["etcdlite.dev/initial-cluster"] == three)

        // A member whose ordinal is beyond the replicas (scaled down by someone) is stopped, and
        // starting it raises the replicas again.
        server.modify(Self.setsPath + "/etcdlite") { set in
            var spec = set["spec"] as? [String: Any] ?? [:]
            spec["replicas"] = 2
            set["spec"] = spec
        }
        try await platform.refresh()
        #expect(try await platform.workloads().last == ObservedWorkload(name: "etcdlite-2", state: .stopped, version: "etcdlite:1"))
        try await platform.start("etcdlite-2")
        #expect(Self.replicas(server) == 3)
    }

    @Test func anUpgradeSwitchesToOnDeleteAndReplacesOnePod() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        try await platform.upgrade("etcdlite-2", to: "etcdlite:2")
        let spec = server.object(Self.setsPath + "/etcdlite")?["spec"] as? [String: Any] ?? [:]
        #expect((spec["updateStrategy"] as? [String: Any])?["type"] as? String == "OnDelete", "the StatefulSet does not roll the pods itself")
        let containers = ((spec["template"] as? [String: Any])?["spec"] as? [String: Any])?["containers"] as? [[String: Any]] ?? []
        #expect(containers.count == 1 && containers.first?["image"] as? String == "etcdlite:2")
        #expect(containers.first?["command"] != nil, "the patch merges into the container")
        #expect(server.object(Self.podsPath + "/etcdlite-2") == nil)
        #expect(server.object(Self.podsPath + "/etcdlite-1") != nil && server.object(Self.podsPath + "/etcdlite-0") != nil)
        #expect(server.object(Self.claimsPath + "/data-etcdlite-2") != nil, "its data stays")
        #expect(try await platform.createFirstMember() == nil)
    }

    /// A re-seed: the snapshot offered on the operator's metrics server, member 0's key alone with
    /// the re-seed's token and URL in `<set>-join`, the set down to one and pod 0 deleted (its
    /// script restores the snapshot). Without a URL to offer it at, the platform says so.
    @Test func aReseedOffersTheSnapshotToMemberZeroAndScalesToOne() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        await #expect(throws: OperatorError.self) { try await platform.reseed(from: "/backups/x.db") }
        platform.snapshotBaseURL = "http://10.1.2.3:8080"
        try await platform.reseed(from: "/backups/x.db")
        let joins = Self.joins(server)
        let token = try #require(joins["reseed-token"])
        #expect(token.hasPrefix("etcdlite-"))
        #expect(joins == ["managed": "true", "etcdlite-0": "etcdlite-0=\(Self.peer(0))", "reseed-token": token,
                          "reseed-snapshot": "http://10.1.2.3:8080/snapshots/\(token).db"])
        #expect(platform.offeredSnapshot("\(token).db") == "/backups/x.db" && platform.offeredSnapshot("x.db") == nil)
        #expect(Self.replicas(server) == 1 && Self.minAvailable(server) == 1)
        #expect(server.object(Self.podsPath + "/etcdlite-0") == nil, "pod 0 starts again on the new keys")
        #expect(server.object(Self.claimsPath + "/data-etcdlite-1") != nil, "claims stay: their data moves aside in them")
        // The operator then sees one member to grow from.
        try await platform.refresh()
        #expect(platform.endpoints == ["http://etcdlite-0.etcdlite-peers.db.svc:2379"])
    }

    @Test func theClusterMustNameTheSetTheOperatorManages() async throws {
        let server = try Self.server()
        defer { server.stop() }
        server.modify(Self.clusterPath + "/etcdlite") { object in
            object["spec"] = ["size": 3, "image": "etcdlite:1", "statefulSet": ["name": "other"]]
        }
        await #expect(throws: OperatorError.self) { try await Self.platform(server).refresh() }
    }

    @Test func theJoinAnswersSurviveAConcurrentWriter() async throws {
        let server = try Self.server()
        defer { server.stop() }
        let platform = Self.platform(server)
        try await platform.refresh()
        try await platform.joined("etcdlite-0", id: 10, initialCluster: "a")
        // Someone else writes the ConfigMap between our read and our write: a 409, read, retry.
        server.beforeNextPut(Self.joinPath) {
            server.modify(Self.joinPath) { map in
                var data = map["data"] as? [String: String] ?? [:]
                data["note"] = "kept"
                map["data"] = data
            }
        }
        try await platform.joined("etcdlite-1", id: 11, initialCluster: "b")
        #expect(Self.joins(server) == ["etcdlite-0": "a", "etcdlite-1": "b", "managed": "true", "note": "kept"])
    }
}
