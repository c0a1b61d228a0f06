import Foundation

/// What `etcdlite bootstrap render` needs to know.
public struct BootstrapOptions: Sendable {
    public var image: String
    public var namespace = "kube-system"
    /// The node the boot member runs on (its address goes into the peer URLs, not a DNS name).
    public var bootNodeIP: String
    /// Self-hosted members wanted (the boot member leaves once three of them hold a quorum).
    public var size = 3
    /// Where members keep their data and recovery checkpoints on their nodes.
    public var hostPath = "/var/lib/etcdlite"
    /// The boot member's ports: beside the self-hosted members' 2379/2380 (bootkube's habit).
    public var bootClientPort = 12379
    public var bootPeerPort = 12380

    public init(image: String, bootNodeIP: String) {
        self.image = image
        self.bootNodeIP = bootNodeIP
    }
}

/// The manifests of a self-hosted etcdlite: the boot member's static pod, and the objects the
/// cluster itself runs (CRD, RBAC, the operator, Services, a quorum-keeping disruption budget,
/// the EtcdLiteCluster). JSON, which kubectl reads as YAML.
public enum Manifests {
    public static let group = "etcdlite.dev"
    public static let version = "v1alpha1"
    static var labels: [String: Any] { ["app.kubernetes.io/name": "etcdlite"] }

    /// File name → object.
    public static func render(_ options: BootstrapOptions) -> [(file: String, object: [String: Any])] {
        [
            // Copied to the boot node's kubelet manifest directory under this name, which the
            // node agent deletes once the boot member has left.
            (NodeAgent.bootManifest, bootPod(options)),
            ("crd.json", crd()),
            ("rbac.json", list(rbac(options))),
            ("operator.json", operatorDeployment(options)),
            ("node-agent.json", nodeAgent(options)),
            ("services.json", list(services(options))),
            ("pdb.json", disruptionBudget(options)),
            ("cluster.json", cluster(options)),
        ]
    }

    /// Writes each manifest to `directory` (sorted keys, so renders compare).
    public static func write(_ options: BootstrapOptions, to directory: String) throws -> [String] {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        return try render(options).map { file, object in
            let path = (directory as NSString).appendingPathComponent(file)
            let data = try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes])
            try data.write(to: URL(fileURLWithPath: path))
            return path
        }
    }

    static func list(_ items: [[String: Any]]) -> [String: Any] {
        ["apiVersion": "v1", "kind": "List", "items": items]
    }

    static func metadata(_ name: String, _ options: BootstrapOptions, labels extra: [String: Any] = [:]) -> [String: Any] {
        ["name": name, "namespace": options.namespace, "labels": labels.merging(extra) { $1 }]
    }

    static func bootPod(_ options: BootstrapOptions) -> [String: Any] {
        let ip = options.bootNodeIP
        let peer = "http://\(ip):\(options.bootPeerPort)"
        let probe: (String) -> [String: Any] = { path in
            ["httpGet": ["host": "127.0.0.1", "path": path, "port": options.bootClientPort, "scheme": "HTTP"],
             "initialDelaySeconds": 5, "periodSeconds": 5, "failureThreshold": 6]
        }
        return [
            "apiVersion": "v1", "kind": "Pod",
            "metadata": metadata("etcdlite-boot", options, labels: ["app.kubernetes.io/component": "boot-member"]),
            "spec": [
                "hostNetwork": true,
                "priorityClassName": "system-node-critical",
                "containers": [[
                    "name": "etcdlite",
                    "image": options.image,
                    "command": [
                        "etcdlite", "--name", "boot", "--data-dir", "\(options.hostPath)/boot",
                        "--listen-client-urls", "http://\(ip):\(options.bootClientPort),http://127.0.0.1:\(options.bootClientPort)",
                        "--advertise-client-urls", "http://\(ip):\(options.bootClientPort)",
                        "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                        "--initial-cluster", "boot=\(peer)", "--initial-cluster-state", "new",
                    ],
                    "volumeMounts": [["name": "data", "mountPath": options.hostPath]],
                    "livenessProbe": probe("/livez"),
                    "readinessProbe": probe("/readyz"),
                ] as [String: Any]],
                "volumes": [["name": "data", "hostPath": ["path": options.hostPath, "type": "DirectoryOrCreate"]]],
            ] as [String: Any],
        ]
    }

    static func crd() -> [String: Any] {
        let string: [String: Any] = ["type": "string"]
        let integer: [String: Any] = ["type": "integer"]
        let boolean: [String: Any] = ["type": "boolean"]
        let free: [String: Any] = ["type": "object", "x-kubernetes-preserve-unknown-fields": true]
        let spec: [String: Any] = [
            "type": "object", "required": ["size"],
            "properties": [
                "size": ["type": "integer", "minimum": 1],
                "version": string,
                "image": string,
                "clientPort": integer,
                "peerPort": integer,
                "storage": ["type": "object", "properties": ["hostPath": string, "persistentVolumeClaim": free]],
                "backup": ["type": "object", "properties": ["intervalSeconds": integer, "retention": integer, "destination": string]],
                // Re-seed from a chosen snapshot (a path on the operator's node), once per id.
                "restore": ["type": "object", "required": ["id", "snapshot"], "properties": ["id": string, "snapshot": string]],
                "resources": free,
                "nodeSelector": ["type": "object", "additionalProperties": string],
                "affinity": free,
                "tolerations": ["type": "array", "items": free],
                "bootstrap": ["type": "object", "properties": ["bootMemberEndpoint": string, "selfHosted": boolean]],
                // A StatefulSet's members (etcdlite operator --platform statefulset): which set.
                "statefulSet": ["type": "object", "properties": ["name": string]],
            ] as [String: Any],
        ]
        let member: [String: Any] = [
            "type": "object",
            "properties": ["id": string, "name": string, "pod": string, "node": string, "leader": boolean, "learner": boolean,
                           "healthy": boolean, "appliedIndex": integer],
        ]
        let condition: [String: Any] = [
            "type": "object", "required": ["type", "status"],
            "properties": ["type": string, "status": ["type": "string", "enum": ["True", "False", "Unknown"]], "reason": string,
                           "message": string, "lastTransitionTime": ["type": "string", "format": "date-time"]],
        ]
        let status: [String: Any] = [
            "type": "object",
            "properties": [
                "phase": string, "leader": string, "observedGeneration": integer, "lastBackup": string, "lastRestore": string,
                "members": ["type": "array", "items": member],
                "conditions": ["type": "array", "items": condition],
                "plannedAction": string,
            ] as [String: Any],
        ]
        return [
            "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": ["name": "etcdliteclusters.\(group)"],
            "spec": [
                "group": group,
                "scope": "Namespaced",
                "names": ["kind": "EtcdLiteCluster", "listKind": "EtcdLiteClusterList", "plural": "etcdliteclusters",
                          "singular": "etcdlitecluster", "shortNames": ["elc"]],
                "versions": [[
                    "name": version, "served": true, "storage": true,
                    "subresources": ["status": [String: Any]()],
                    "schema": ["openAPIV3Schema": ["type": "object", "properties": ["spec": spec, "status": status]]],
                    "additionalPrinterColumns": [
                        ["name": "Size", "type": "integer", "jsonPath": ".spec.size"],
                        ["name": "Phase", "type": "string", "jsonPath": ".status.phase"],
                        ["name": "Leader", "type": "string", "jsonPath": ".status.leader"],
                    ],
                ] as [String: Any]],
            ] as [String: Any],
        ]
    }

    static func rbac(_ options: BootstrapOptions) -> [[String: Any]] {
        let rules: [[String: Any]] = [
            ["apiGroups": [group], "resources": ["etcdliteclusters"], "verbs": ["get", "list", "watch", "update", "patch"]],
            ["apiGroups": [group], "resources": ["etcdliteclusters/status"], "verbs": ["get", "update", "patch"]],
            // Self-hosted members are static pods (written by the node agents): the operator reads their
            // mirror pods. A StatefulSet's members are its pods: the operator deletes one to upgrade
            // or replace it.
            ["apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "delete"]],
            ["apiGroups": [""], "resources": ["persistentvolumeclaims"], "verbs": ["get", "list", "watch", "create", "delete"]],
            ["apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]],
            // One active operator (a leader lease).
            ["apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]],
            // The members' records (`<cluster>-members`).
            ["apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "update"]],
            ["apiGroups": ["apps"], "resources": ["statefulsets", "statefulsets/scale"], "verbs": ["get", "list", "watch", "update", "patch"]],
            ["apiGroups": ["policy"], "resources": ["poddisruptionbudgets"], "verbs": ["get", "list", "watch", "update", "patch"]],
        ]
        return [
            ["apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata("etcdlite-operator", options)],
            ["apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata("etcdlite-operator", options), "rules": rules],
            ["apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": metadata("etcdlite-operator", options),
             "roleRef": ["apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "etcdlite-operator"],
             "subjects": [["kind": "ServiceAccount", "name": "etcdlite-operator", "namespace": options.namespace]]],
            // The node agents read the members' records (and the coordinator of a re-seed writes them).
            ["apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata("etcdlite-node-agent", options)],
            ["apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": metadata("etcdlite-node-agent", options),
             // Reading the records; after a re-seed without the API server, its coordinator writes them.
             "rules": [["apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "update"]],
                       ["apiGroups": [group], "resources": ["etcdliteclusters"], "verbs": ["get"]]]],
            ["apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": metadata("etcdlite-node-agent", options),
             "roleRef": ["apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "etcdlite-node-agent"],
             "subjects": [["kind": "ServiceAccount", "name": "etcdlite-node-agent", "namespace": options.namespace]]],
            // Nodes are cluster-scoped: a Role cannot grant them. The operator reads their
            // addresses and readiness to place members.
            ["apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
             "metadata": ["name": "etcdlite-operator-nodes", "labels": labels],
             "rules": [["apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]]]],
            ["apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
             "metadata": ["name": "etcdlite-operator-nodes", "labels": labels],
             "roleRef": ["apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "etcdlite-operator-nodes"],
             "subjects": [["kind": "ServiceAccount", "name": "etcdlite-operator", "namespace": options.namespace]]],
        ]
    }

    /// A Deployment or DaemonSet of one container on the control-plane nodes.
    static func controller(_ kind: String, _ name: String, _ options: BootstrapOptions, spec extra: [String: Any],
                           pod: [String: Any]) -> [String: Any] {
        let podLabels: [String: Any] = ["app.kubernetes.io/name": name]
        let podSpec: [String: Any] = [
            "serviceAccountName": name,
            "nodeSelector": ["node-role.kubernetes.io/control-plane": ""],
        ].merging(pod) { $1 }
        return [
            "apiVersion": "apps/v1", "kind": kind,
            "metadata": metadata(name, options),
            "spec": extra.merging([
                "selector": ["matchLabels": podLabels],
                "template": ["metadata": ["labels": podLabels], "spec": podSpec] as [String: Any],
            ]) { $1 },
        ]
    }

    /// Where the operator serves /metrics and /healthz.
    static let operatorMetricsPort = 8080

    static func operatorDeployment(_ options: BootstrapOptions) -> [String: Any] {
        controller("Deployment", "etcdlite-operator", options, spec: ["replicas": 1, "strategy": ["type": "Recreate"]], pod: [
            "priorityClassName": "system-cluster-critical",
            "tolerations": [["key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"]],
            "containers": [["name": "operator", "image": options.image,
                            "command": ["etcdlite", "operator", "--platform", "kubernetes", "--namespace", options.namespace, "--cluster", "etcdlite",
                                        "--metrics-address", "0.0.0.0:\(Self.operatorMetricsPort)"],
                            // Reconciles, actions by kind, members by state, for a Prometheus scrape.
                            "ports": [["name": "metrics", "containerPort": Self.operatorMetricsPort, "protocol": "TCP"]],
                            "livenessProbe": ["httpGet": ["path": "/healthz", "port": "metrics"], "periodSeconds": 10, "failureThreshold": 6],
                            // Backups and re-seeds happen on the operator's node.
                            "env": [["name": "NODE_NAME", "valueFrom": ["fieldRef": ["fieldPath": "spec.nodeName"]]],
                                    // Its identity in the leader lease.
                                    ["name": "POD_NAME", "valueFrom": ["fieldRef": ["fieldPath": "metadata.name"]]]],
                            "volumeMounts": [["name": "backups", "mountPath": "\(options.hostPath)/backups"]]] as [String: Any]],
            "volumes": [["name": "backups", "hostPath": ["path": "\(options.hostPath)/backups", "type": "DirectoryOrCreate"]]],
        ])
    }

    /// The node agents: on every control-plane node, the members' static pod manifests from
    /// their records (they must run where the kubelet reads its manifests).
    static func nodeAgent(_ options: BootstrapOptions) -> [String: Any] {
        controller("DaemonSet", "etcdlite-node-agent", options, spec: [:], pod: [
            "priorityClassName": "system-node-critical",
            "tolerations": [["operator": "Exists"]],
            // The agents reach each other on their nodes' addresses when the API server is gone.
            "hostNetwork": true,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "containers": [["name": "node-agent", "image": options.image,
                            "command": ["etcdlite", "node-agent", "--node", "$(NODE_NAME)", "--namespace", options.namespace,
                                        "--cluster", "etcdlite", "--manifests", "/etc/kubernetes/manifests", "--host-path", options.hostPath,
                                        "--recovery-port", "\(NodeAgent.recoveryPort)"],
                            "ports": [["name": "recovery", "containerPort": NodeAgent.recoveryPort]],
                            "env": [["name": "NODE_NAME", "valueFrom": ["fieldRef": ["fieldPath": "spec.nodeName"]]]],
                            "volumeMounts": [["name": "manifests", "mountPath": "/etc/kubernetes/manifests"],
                                             ["name": "data", "mountPath": options.hostPath]]] as [String: Any]],
            "volumes": [["name": "manifests", "hostPath": ["path": "/etc/kubernetes/manifests", "type": "DirectoryOrCreate"]],
                        ["name": "data", "hostPath": ["path": options.hostPath, "type": "DirectoryOrCreate"]]],
        ])
    }

    static func services(_ options: BootstrapOptions) -> [[String: Any]] {
        [
            ["apiVersion": "v1", "kind": "Service", "metadata": metadata("etcdlite-client", options),
             "spec": ["selector": ["app.kubernetes.io/name": "etcdlite", "app.kubernetes.io/component": "member"],
                      "ports": [["name": "client", "port": 2379, "targetPort": 2379, "protocol": "TCP"]]]],
            // Peers reach each other by node address; this headless Service lists them, ready or not.
            ["apiVersion": "v1", "kind": "Service", "metadata": metadata("etcdlite-peers", options),
             "spec": ["clusterIP": "None", "publishNotReadyAddresses": true,
                      "selector": ["app.kubernetes.io/name": "etcdlite", "app.kubernetes.io/component": "member"],
                      "ports": [["name": "peer", "port": 2380, "targetPort": 2380, "protocol": "TCP"]]] as [String: Any]],
            ["apiVersion": "v1", "kind": "Service", "metadata": metadata("etcdlite-boot", options),
             "spec": ["selector": ["app.kubernetes.io/name": "etcdlite", "app.kubernetes.io/component": "boot-member"],
                      "ports": [["name": "client", "port": options.bootClientPort, "targetPort": options.bootClientPort, "protocol": "TCP"]]]],
        ]
    }

    /// At most one member down at a time by choice: the rest keep a quorum (size/2 + 1).
    static func disruptionBudget(_ options: BootstrapOptions) -> [String: Any] {
        [
            "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": metadata("etcdlite", options),
            "spec": ["minAvailable": options.size / 2 + 1,
                     "selector": ["matchLabels": ["app.kubernetes.io/name": "etcdlite", "app.kubernetes.io/component": "member"]]],
        ]
    }

    static func cluster(_ options: BootstrapOptions) -> [String: Any] {
        [
            "apiVersion": "\(group)/\(version)", "kind": "EtcdLiteCluster",
            "metadata": metadata("etcdlite", options),
            "spec": [
                "size": options.size,
                "image": options.image,
                "storage": ["hostPath": options.hostPath],
                "backup": ["intervalSeconds": 1800, "retention": 5, "destination": "\(options.hostPath)/backups"],
                "bootstrap": ["bootMemberEndpoint": "http://\(options.bootNodeIP):\(options.bootClientPort)", "selfHosted": true],
                "nodeSelector": ["node-role.kubernetes.io/control-plane": ""],
                "tolerations": [["key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"]],
                // One member per node.
                "affinity": ["podAntiAffinity": ["requiredDuringSchedulingIgnoredDuringExecution": [[
                    "labelSelector": ["matchLabels": ["app.kubernetes.io/name": "etcdlite", "app.kubernetes.io/component": "member"]],
                    "topologyKey": "kubernetes.io/hostname",
                ]]]],
            ] as [String: Any],
        ]
    }
}
