import Foundation

/// A ConfigMap's data read and written whole: every write carries the resourceVersion read, and a
/// conflict (someone else wrote in between) reads again and applies the change again, a few times.
/// Keys the change does not touch are written back as read.
final class VersionedConfigMap: @unchecked Sendable {
    let client: KubeClient
    let namespace: String
    let name: String
    let labels: [String: String]
    /// The data as last read or written.
    private(set) var data: [String: String] = [:]
    /// Nil while the ConfigMap does not exist.
    private(set) var version: String?

    init(client: KubeClient, namespace: String, name: String, labels: [String: String]) {
        self.client = client
        self.namespace = namespace
        self.name = name
        self.labels = labels
    }

    var path: String { "/api/v1/namespaces/\(namespace)/configmaps/\(name)" }

    func load() async throws {
        do {
            let map = try await client.get(path)
            version = (map["metadata"] as? [String: Any])?["resourceVersion"] as? String
            data = map["data"] as? [String: String] ?? [:]
        } catch let error as KubeAPIError where error.isNotFound {
            version = nil
            data = [:]
        }
    }

    /// Applies `change` to the data and writes it (creating the ConfigMap when there is none).
    func update(_ change: (inout [String: String]) throws -> Void, what: String) async throws {
        for _ in 0..<5 {
            var next = data
            try change(&next)
            var metadata: [String: Any] = ["name": name, "namespace": namespace, "labels": labels]
            let object: [String: Any]
            do {
                if let version {
                    metadata["resourceVersion"] = version
                    object = try await client.send(.PUT, path, body: ["apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": next])
                } else {
                    object = try await client.send(.POST, "/api/v1/namespaces/\(namespace)/configmaps",
                                                   body: ["apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": next])
                }
            } catch let error as KubeAPIError where error.isConflict || error.isAlreadyExists {
                try await load()
                continue
            }
            version = (object["metadata"] as? [String: Any])?["resourceVersion"] as? String
            data = next
            return
        }
        throw OperatorError("\(what) kept changing under us (conflicts)")
    }
}
