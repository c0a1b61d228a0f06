@testable import EtcdOperator
import Foundation
import Testing

/// deploy/statefulset.json: etcdlite as a plain StatefulSet (not self-hosted), and
/// deploy/statefulset-operator.json: the operator that manages it.
@Suite struct DeployManifestTests {
    static func items(_ file: String = "statefulset.json") throws -> [[String: Any]] {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let data = try Data(contentsOf: root.appendingPathComponent("deploy/" + file))
        let list = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        return list["items"] as? [[String: Any]] ?? []
    }

    static func find(_ items: [[String: Any]], _ kind: String, _ name: String) -> [String: Any]? {
        items.first { $0["kind"] as? String == kind && ($0["metadata"] as? [String: Any])?["name"] as? String == name }
    }

    @Test func theObjectsFitTogether() throws {
        let items = try Self.items()
        let set = try #require(Self.find(items, "StatefulSet", "etcdlite"))
        let spec = set["spec"] as? [String: Any] ?? [:]
        let replicas = spec["replicas"] as? Int ?? 0
        let template = spec["template"] as? [String: Any] ?? [:]
        let podLabels = (template["metadata"] as? [String: Any])?["labels"] as? [String: String] ?? [:]
        let selector = (spec["selector"] as? [String: Any])?["matchLabels"] as? [String: String] ?? [:]
        #expect(!selector.isEmpty && selector.allSatisfy { podLabels[$0.key] == $0.value }, "the selector matches the pods")
        // Stable names through a headless Service that lists members before they are ready
        // (peers must find each other to become ready at all).
        let headless = try #require(Self.find(items, "Service", spec["serviceName"] as? String ?? ""))
        let headlessSpec = headless["spec"] as? [String: Any] ?? [:]
        #expect(headlessSpec["clusterIP"] as? String == "None" && headlessSpec["publishNotReadyAddresses"] as? Bool == true)
        #expect(spec["podManagementPolicy"] as? String == "Parallel", "all members start together to form the first quorum")
        // One claim per member, mounted where the data directory is.
        let podSpec = template["spec"] as? [String: Any] ?? [:]
        let container = try #require((podSpec["containers"] as? [[String: Any]])?.first)
        let claims = (spec["volumeClaimTemplates"] as? [[String: Any]] ?? []).compactMap { ($0["metadata"] as? [String: Any])?["name"] as? String }
        let mounts = container["volumeMounts"] as? [[String: Any]] ?? []
        let podVolumes = (podSpec["volumes"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
        #expect(mounts.allSatisfy { claims.contains($0["name"] as? String ?? "") || podVolumes.contains($0["name"] as? String ?? "") })
        #expect(mounts.contains { $0["mountPath"] as? String == "/var/lib/etcdlite" && claims.contains($0["name"] as? String ?? "") })
        // The operator's join answers (optional: a set without the operator runs without them).
        let join = (podSpec["volumes"] as? [[String: Any]] ?? []).first { $0["name"] as? String == "join" }?["configMap"] as? [String: Any]
        #expect(join?["name"] as? String == "etcdlite-join" && join?["optional"] as? Bool == true)
        #expect(mounts.contains { $0["name"] as? String == "join" && $0["mountPath"] as? String == "/etc/etcdlite-join" })
        // etcdlite's refusal of an old identity on empty data shows in the pod's status.
        #expect(container["terminationMessagePolicy"] as? String == "FallbackToLogsOnError")
        #expect(((container["readinessProbe"] as? [String: Any])?["httpGet"] as? [String: Any])?["path"] as? String == "/readyz")
        let env = Dictionary(uniqueKeysWithValues: (container["env"] as? [[String: Any]] ?? []).compactMap { e in
            (e["name"] as? String).map { ($0, e["value"] as? String ?? "") }
        })
        #expect(env["REPLICAS"] == String(replicas) && env["SET"] == "etcdlite" && env["SERVICE"] == spec["serviceName"] as? String)
        // The budget keeps a quorum.
        let pdb = try #require(Self.find(items, "PodDisruptionBudget", "etcdlite"))
        #expect((pdb["spec"] as? [String: Any])?["minAvailable"] as? Int == replicas / 2 + 1)
        for item in items {
            let name = (item["metadata"] as? [String: Any])?["name"] as? String ?? ""
            #expect(ManifestTests.isDNSSubdomain(name) && (item["apiVersion"] as? String)?.isEmpty == false)
        }
    }

    /// What the API server keeps of an object under a structural schema: fields the schema does
    /// not know are pruned. Returns the paths that would be.
    static func pruned(_ value: Any, _ schema: [String: Any], path: String = "") -> [String] {
        if schema["x-kubernetes-preserve-unknown-fields"] as? Bool == true { return [] }
        if let object = value as? [String: Any] {
            let properties = schema["properties"] as? [String: Any]
            let additional = schema["additionalProperties"] as? [String: Any]
            return object.flatMap { key, child -> [String] in
                if let sub = properties?[key] as? [String: Any] { return pruned(child, sub, path: path + "." + key) }
                if let additional { return pruned(child, additional, path: path + "." + key) }
                return [path + "." + key]
            }
        }
        if let array = value as? [Any], let items = schema["items"] as? [String: Any] {
            return array.enumerated().flatMap { pruned($1, items, path: path + "[\($0)]") }
        }
        return []
    }

    /// The operator for the StatefulSet: the same CRD as `bootstrap render`, an EtcdLiteCluster
    /// whose every field survives that CRD's schema, a Deployment with the flags and the pod IP a
    /// re-seed needs, and its Role (which the StatefulSet platform's tests run under).
    @Test func theStatefulSetsOperatorFitsTheSetAndTheCRD() throws {
        let items = try Self.items("statefulset-operator.json")
        let crd = try #require(items.first { $0["kind"] as? String == "CustomResourceDefinition" })
        let rendered = Manifests.crd()
        let encode = { (object: Any) in try JSONSerialization.data(withJSONObject: object, options: [.sortedKeys]) }
        #expect(try encode(crd) == encode(rendered), "deploy/statefulset-operator.json has the CRD `etcdlite bootstrap render` writes")
        let versions = (crd["spec"] as? [String: Any])?["versions"] as? [[String: Any]] ?? []
        let schema = try #require(((versions.first?["schema"] as? [String: Any])?["openAPIV3Schema"] as? [String: Any]))
        let cluster = try #require(items.first { $0["kind"] as? String == "EtcdLiteCluster" })
        #expect(Self.pruned(["spec": cluster["spec"] ?? [:]], schema).isEmpty, "\(Self.pruned(["spec": cluster["spec"] ?? [:]], schema))")
        let selfHosted = Manifests.cluster(BootstrapOptions(image: "etcdlite:1", bootNodeIP: "10.0.0.1"))
        #expect(Self.pruned(["spec": selfHosted["spec"] ?? [:]], schema).isEmpty)
        #expect(Self.pruned(["spec": ["statefulSet": ["name": "x"], "unknown": 1]], schema) == [".spec.unknown"], "the check sees pruning")

        let set = try #require(Self.find(try Self.items(), "StatefulSet", "etcdlite"))
        #expect(((cluster["spec"] as? [String: Any])?["statefulSet"] as? [String: Any])?["name"] as? String == "etcdlite")
        let deployment = try #require(Self.find(items, "Deployment", "etcdlite-operator"))
        let podSpec = (((deployment["spec"] as? [String: Any])?["template"] as? [String: Any])?["spec"] as? [String: Any]) ?? [:]
        #expect(podSpec["serviceAccountName"] as? String == "etcdlite-operator")
        let container = try #require((podSpec["containers"] as? [[String: Any]])?.first)
        let command = container["command"] as? [String] ?? []
        #expect(Self.value(command, "--platform") == "statefulset" && Self.value(command, "--statefulset") == (set["metadata"] as? [String: Any])?["name"] as? String)
        #expect(Self.value(command, "--metrics-address") == "0.0.0.0:8080")
        let env = container["env"] as? [[String: Any]] ?? []
        #expect(env.contains { $0["name"] as? String == "POD_IP" && (($0["valueFrom"] as? [String: Any])?["fieldRef"] as? [String: Any])?["fieldPath"] as? String == "status.podIP" })
        // Backups where the spec says, on a claim of their own.
        let destination = ((cluster["spec"] as? [String: Any])?["backup"] as? [String: Any])?["destination"] as? String
        let mounts = container["volumeMounts"] as? [[String: Any]] ?? []
        #expect(mounts.contains { $0["mountPath"] as? String == destination && $0["name"] as? String == "backups" })
        let claim = ((podSpec["volumes"] as? [[String: Any]])?.first { $0["name"] as? String == "backups" }?["persistentVolumeClaim"] as? [String: Any])?["claimName"] as? String
        #expect(claim.flatMap { Self.find(items, "PersistentVolumeClaim", $0) } != nil)
        #expect(!FakeAPIServer.rules("etcdlite-operator", in: items).isEmpty)
    }

    /// The container's script, run by /bin/sh with a stand-in `etcdlite` that prints its
    /// arguments; `during` runs while the script does (after `settle` seconds).
    static func runScript(_ extra: [String: String], settle: Double = 0, during: () throws -> Void = {}) throws -> (status: Int32, args: [String], waitedAtLeast: Bool) {
        let items = try Self.items()
        let container = try #require(((((Self.find(items, "StatefulSet", "etcdlite")?["spec"] as? [String: Any])?["template"] as? [String: Any])?["spec"] as? [String: Any])?["containers"] as? [[String: Any]])?.first)
        let command = container["command"] as? [String] ?? []
        #expect(command.prefix(2) == ["/bin/sh", "-c"])
        let bin = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-deploy-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: bin, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: bin) }
        let fake = bin.appendingPathComponent("etcdlite")
        // `snapshot restore SRC --data-dir DIR` makes DIR, as the real one does.
        try "#!/bin/sh\nfor a in \"$@\"; do echo \"$a\"; done\nif [ \"$1\" = snapshot ]; then mkdir -p \"$5\"; fi\n"
            .write(to: fake, atomically: true, encoding: .utf8)
        chmod(fake.path, 0o755)
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/sh")
        process.arguments = ["-c", command[2]]
        process.environment = ["PATH": bin.path + ":/usr/bin:/bin", "HOSTNAME": "etcdlite-1", "SET": "etcdlite", "SERVICE": "etcdlite-peers",
                               "REPLICAS": "3", "NAMESPACE": "db", "DATA_DIR": bin.appendingPathComponent("data").path,
                               "JOIN_DIR": bin.appendingPathComponent("absent").path].merging(extra) { $1 }
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = FileHandle.nullDevice
        try process.run()
        var waited = true
        if settle > 0 {
            Thread.sleep(forTimeInterval: settle)
            waited = process.isRunning
            try during()
        }
        let output = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        return (process.terminationStatus, output.split(separator: "\n").map(String.init), waited)
    }

    static func value(_ args: [String], _ flag: String) -> String? { args.firstIndex(of: flag).map { args[$0 + 1] } }

    /// Member 1 of 3 gets its own name and every member's peer URL by stable DNS name.
    @Test func theScriptDerivesTheInitialClusterFromTheOrdinals() throws {
        let run = try Self.runScript([:])
        #expect(run.status == 0)
        #expect(Self.value(run.args, "--name") == "etcdlite-1")
        #expect(Self.value(run.args, "--initial-cluster") == "etcdlite-0=http://etcdlite-0.etcdlite-peers.db.svc:2380,etcdlite-1=http://etcdlite-1.etcdlite-peers.db.svc:2380,etcdlite-2=http://etcdlite-2.etcdlite-peers.db.svc:2380")
        #expect(Self.value(run.args, "--initial-advertise-peer-urls") == "http://etcdlite-1.etcdlite-peers.db.svc:2380")
        #expect(Self.value(run.args, "--advertise-client-urls") == "http://etcdlite-1.etcdlite-peers.db.svc:2379")
        #expect(Self.value(run.args, "--initial-cluster-state") == "new")
    }

    /// A re-seed by the operator, once per token: member 0 moves its data aside, restores the
    /// snapshot from the operator's URL and founds the new cluster alone; another member moves its
    /// data aside and waits to be added; a restart after that starts on the data as usual.
    @Test func theScriptReseedsOncePerToken() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-reseed-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let join = dir.appendingPathComponent("join")
        try FileManager.default.createDirectory(at: join, withIntermediateDirectories: true)
        let url = "http://10.1.2.3:8080/snapshots/etcdlite-123.db"
        for (key, value) in ["managed": "true", "etcdlite-0": "etcdlite-0=http://etcdlite-0.etcdlite-peers.db.svc:2380",
                             "reseed-token": "etcdlite-123", "reseed-snapshot": url] {
            try value.write(to: join.appendingPathComponent(key), atomically: true, encoding: .utf8)
        }
        let data0 = dir.appendingPathComponent("data0")
        try FileManager.default.createDirectory(at: data0, withIntermediateDirectories: true)
        try "old".write(to: data0.appendingPathComponent("old"), atomically: true, encoding: .utf8)
        let first = try Self.runScript(["JOIN_DIR": join.path, "DATA_DIR": data0.path, "HOSTNAME": "etcdlite-0"])
        #expect(first.status == 0)
        #expect(Array(first.args.prefix(5)) == ["snapshot", "restore", url, "--data-dir", data0.path], "\(first.args)")
        let started = Array(first.args.dropFirst(5))
        #expect(Self.value(started, "--initial-cluster") == "etcdlite-0=http://etcdlite-0.etcdlite-peers.db.svc:2380")
        #expect(Self.value(started, "--initial-cluster-state") == "new" && Self.value(started, "--initial-cluster-token") == "etcdlite-123")
        #expect(FileManager.default.fileExists(atPath: data0.path + ".before-etcdlite-123/old"), "the old data is kept aside")
        #expect((try? String(contentsOfFile: data0.path + ".reseed", encoding: .utf8)) == "etcdlite-123\n")
        // Restarted: the same token, nothing restored again.
        let again = try Self.runScript(["JOIN_DIR": join.path, "DATA_DIR": data0.path, "HOSTNAME": "etcdlite-0"])
        #expect(again.args.first == "--name" && Self.value(again.args, "--initial-cluster-token") == "etcdlite-123", "\(again.args)")

        // Member 1 on its old claim: its data aside, then it waits until the operator adds it.
        let data1 = dir.appendingPathComponent("data1")
        try FileManager.default.createDirectory(at: data1, withIntermediateDirectories: true)
        let answered = "etcdlite-0=http://etcdlite-0.etcdlite-peers.db.svc:2380,etcdlite-1=http://etcdlite-1.etcdlite-peers.db.svc:2380"
        let second = try Self.runScript(["JOIN_DIR": join.path, "DATA_DIR": data1.path], settle: 2) {
            try answered.write(to: join.appendingPathComponent("etcdlite-1"), atomically: true, encoding: .utf8)
        }
        #expect(second.waitedAtLeast && !second.args.contains("snapshot"))
        #expect(Self.value(second.args, "--initial-cluster") == answered && Self.value(second.args, "--initial-cluster-state") == "existing")
        #expect(FileManager.default.fileExists(atPath: data1.path + ".before-etcdlite-123"))
    }

    /// Under the operator: a member it added joins the cluster MemberAdd answered; one it has not
    /// added (a pod back on a new, empty claim) waits for it instead of founding a cluster; one
    /// with data starts on it.
    @Test func underTheOperatorTheScriptJoinsWhatMemberAddAnsweredOrWaits() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-join-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let answered = "etcdlite-0=http://etcdlite-0.etcdlite-peers.db.svc:2380,etcdlite-1=http://etcdlite-1.etcdlite-peers.db.svc:2380"
        try "true".write(to: dir.appendingPathComponent("managed"), atomically: true, encoding: .utf8)
        try answered.write(to: dir.appendingPathComponent("etcdlite-1"), atomically: true, encoding: .utf8)
        let joined = try Self.runScript(["JOIN_DIR": dir.path])
        #expect(Self.value(joined.args, "--initial-cluster") == answered)
        #expect(Self.value(joined.args, "--initial-cluster-state") == "existing")

        // Not added yet: the script waits (5 s polls) until the key appears.
        try FileManager.default.removeItem(at: dir.appendingPathComponent("etcdlite-1"))
        let waited = try Self.runScript(["JOIN_DIR": dir.path], settle: 2) {
            try answered.write(to: dir.appendingPathComponent("etcdlite-1"), atomically: true, encoding: .utf8)
        }
        #expect(waited.waitedAtLeast, "the script did not wait for its key")
        #expect(Self.value(waited.args, "--initial-cluster-state") == "existing")

        // A member with data starts on it (the flags are ignored then; no waiting).
        try FileManager.default.removeItem(at: dir.appendingPathComponent("etcdlite-1"))
        let data = dir.appendingPathComponent("data")
        try FileManager.default.createDirectory(at: data, withIntermediateDirectories: true)
        let restarted = try Self.runScript(["JOIN_DIR": dir.path, "DATA_DIR": data.path])
        #expect(restarted.status == 0 && Self.value(restarted.args, "--data-dir") == data.path)
    }
}
