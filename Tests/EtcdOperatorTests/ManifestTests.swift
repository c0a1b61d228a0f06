import Foundation
import Testing
@testable import EtcdOperator

/// Every rendered manifest parses and is a Kubernetes object with the fields its API requires
/// (no API server runs here: the checks follow the API's validation rules for these kinds).
struct ManifestTests {
    static func objects() throws -> [[String: Any]] {
        var options = BootstrapOptions(image: "registry.local/etcdlite:0.1", bootNodeIP: "10.0.0.5")
        options.size = 3
        let dir = NSTemporaryDirectory() + "manifests-\(UUID().uuidString)"
        defer { try? FileManager.default.removeItem(atPath: dir) }
        var objects: [[String: Any]] = []
        for path in try Manifests.write(options, to: dir) {
            let object = try JSONSerialization.jsonObject(with: Data(contentsOf: URL(fileURLWithPath: path))) as? [String: Any] ?? [:]
            if object["kind"] as? String == "List" {
                objects += object["items"] as? [[String: Any]] ?? []
            } else {
                objects.append(object)
            }
        }
        return objects
    }

    static func isDNSSubdomain(_ name: String) -> Bool {
        name.wholeMatch(of: /[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/) != nil && name.count <= 253
    }

    @Test func everyObjectHasTheFieldsItsAPIRequires() throws {
        let objects = try Self.objects()
        let kinds = objects.compactMap { $0["kind"] as? String }
        #expect(Set(kinds) == ["Pod", "CustomResourceDefinition", "ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding",
                               "Deployment", "DaemonSet", "Service", "PodDisruptionBudget", "EtcdLiteCluster"])
        for object in objects {
            let kind = object["kind"] as? String ?? "?"
            let metadata = object["metadata"] as? [String: Any] ?? [:]
            let name = metadata["name"] as? String ?? ""
            #expect((object["apiVersion"] as? String)?.isEmpty == false, "\(kind) has no apiVersion")
            #expect(Self.isDNSSubdomain(name), "\(kind) name \(name)")
            let spec = object["spec"] as? [String: Any] ?? [:]
            switch kind {
            case "Pod":
                let containers = spec["containers"] as? [[String: Any]] ?? []
                #expect(!containers.isEmpty && containers.allSatisfy { $0["name"] is String && $0["image"] is String })
                let volumes = Set((spec["volumes"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String })
                for mount in containers.flatMap({ $0["volumeMounts"] as? [[String: Any]] ?? [] }) {
                    #expect(volumes.contains(mount["name"] as? String ?? ""), "a mount without its volume")
                }
                let command = containers.first?["command"] as? [String] ?? []
                #expect(command.contains("--initial-cluster") && command.contains("boot=http://10.0.0.5:12380"))
            case "Deployment", "DaemonSet":
                let selector = (spec["selector"] as? [String: Any])?["matchLabels"] as? [String: String] ?? [:]
                let template = spec["template"] as? [String: Any] ?? [:]
                let labels = (template["metadata"] as? [String: Any])?["labels"] as? [String: String] ?? [:]
                #expect(!selector.isEmpty && selector.allSatisfy { labels[$0.key] == $0.value }, "selector must match the template")
                let podSpec = template["spec"] as? [String: Any] ?? [:]
                #expect(!(podSpec["containers"] as? [[String: Any]] ?? []).isEmpty)
                if name == "etcdlite-operator", let container = (podSpec["containers"] as? [[String: Any]])?.first {
                    // Its metrics endpoint: the port named in the liveness probe, and the flag that serves it.
                    let ports = container["ports"] as? [[String: Any]] ?? []
                    #expect(ports.contains { $0["name"] as? String == "metrics" && $0["containerPort"] as? Int == 8080 })
                    let command = container["command"] as? [String] ?? []
                    #expect(command.firstIndex(of: "--metrics-address").map { command[$0 + 1] } == "0.0.0.0:8080")
                    let probe = (container["livenessProbe"] as? [String: Any])?["httpGet"] as? [String: Any]
                    #expect(probe?["path"] as? String == "/healthz" && probe?["port"] as? String == "metrics")
                }
            case "Service":
                let ports = spec["ports"] as? [[String: Any]] ?? []
                #expect(!ports.isEmpty && ports.allSatisfy { ($0["port"] as? Int).map { 1...65535 ~= $0 } ?? false })
            case "PodDisruptionBudget":
                #expect(spec["minAvailable"] as? Int == 2)  // three members: two keep the quorum
                #expect(spec["selector"] is [String: Any])
            case "Role", "ClusterRole":
                for rule in object["rules"] as? [[String: Any]] ?? [] {
                    #expect(rule["apiGroups"] is [String] && !(rule["resources"] as? [String] ?? []).isEmpty && !(rule["verbs"] as? [String] ?? []).isEmpty)
                    // A namespaced Role cannot grant cluster-scoped resources.
                    if kind == "Role" { #expect(!(rule["resources"] as? [String] ?? []).contains("nodes"), "nodes need a ClusterRole") }
                }
                #expect((kind == "Role") == (metadata["namespace"] != nil))
            case "RoleBinding", "ClusterRoleBinding":
                let roleRef = object["roleRef"] as? [String: Any] ?? [:]
                let role = objects.first { $0["kind"] as? String == roleRef["kind"] as? String
                    && ($0["metadata"] as? [String: Any])?["name"] as? String == roleRef["name"] as? String }
                #expect(role != nil && roleRef["kind"] as? String == (kind == "RoleBinding" ? "Role" : "ClusterRole"), "a binding names a rendered role")
            case "CustomResourceDefinition":
                let names = spec["names"] as? [String: Any] ?? [:]
                #expect(name == "\(names["plural"] as? String ?? "").\(spec["group"] as? String ?? "")", "a CRD is named plural.group")
                let versions = spec["versions"] as? [[String: Any]] ?? []
                #expect(versions.filter { $0["storage"] as? Bool == true }.count == 1)
                let schema = (versions.first?["schema"] as? [String: Any])?["openAPIV3Schema"] as? [String: Any] ?? [:]
                #expect(Self.isStructural(schema), "the schema must be structural (a type at every level)")
            case "EtcdLiteCluster":
                #expect(object["apiVersion"] as? String == "etcdlite.dev/v1alpha1" && spec["size"] as? Int == 3)
            default:
                break
            }
        }
    }

    /// Kubernetes' structural-schema rule, simplified: every node names a type (or preserves
    /// unknown fields), down through properties and items.
    static func isStructural(_ node: [String: Any]) -> Bool {
        guard node["type"] is String || node["x-kubernetes-preserve-unknown-fields"] as? Bool == true else { return false }
        for (_, child) in node["properties"] as? [String: Any] ?? [:] {
            guard let child = child as? [String: Any], isStructural(child) else { return false }
        }
        if let items = node["items"] as? [String: Any], !isStructural(items) { return false }
        if let additional = node["additionalProperties"] as? [String: Any], !isStructural(additional) { return false }
        return true
    }

    /// The EtcdLiteCluster object validates against the CRD's own schema (types of its fields).
    @Test func theClusterObjectFitsTheCRDSchema() throws {
        let objects = try Self.objects()
        let crd = objects.first { $0["kind"] as? String == "CustomResourceDefinition" }!
        let versions = ((crd["spec"] as? [String: Any])?["versions"] as? [[String: Any]]) ?? []
        let schema = ((versions.first?["schema"] as? [String: Any])?["openAPIV3Schema"] as? [String: Any]) ?? [:]
        let cluster = objects.first { $0["kind"] as? String == "EtcdLiteCluster" }!
        let specSchema = (schema["properties"] as? [String: Any])?["spec"] as? [String: Any] ?? [:]
        #expect(Self.fits(cluster["spec"] as Any, specSchema))
        #expect(!Self.fits(["size": "three"], specSchema))  // the check can fail
    }

    static func fits(_ value: Any, _ schema: [String: Any]) -> Bool {
        if schema["x-kubernetes-preserve-unknown-fields"] as? Bool == true { return true }
        switch schema["type"] as? String {
        case "object":
            guard let object = value as? [String: Any] else { return false }
            for required in schema["required"] as? [String] ?? [] where object[required] == nil { return false }
            let properties = schema["properties"] as? [String: Any] ?? [:]
            for (key, child) in object {
                if let childSchema = properties[key] as? [String: Any] {
                    if !fits(child, childSchema) { return false }
                } else if let additional = schema["additionalProperties"] as? [String: Any] {
                    if !fits(child, additional) { return false }
                } else {
                    return false  // an unknown field would be pruned
                }
            }
            return true
        case "array":
            guard let array = value as? [Any] else { return false }
            let items = schema["items"] as? [String: Any] ?? [:]
            return array.allSatisfy { fits($0, items) }
        case "string": return value is String
        // JSON numbers decode as NSNumber; a Bool is not an integer, nor is a fraction.
        case "integer":
            guard let number = value as? NSNumber, String(cString: number.objCType) != "c" else { return false }
            return number.doubleValue == number.doubleValue.rounded()
        case "boolean":
            guard let number = value as? NSNumber else { return false }
            return String(cString: number.objCType) == "c"
        default: return false
        }
    }
}
