import Foundation

/// One active operator per cluster: a coordination.k8s.io/v1 Lease, as Kubernetes' own
/// controllers elect their leader. The holder renews it every pass; another operator takes it
/// over only after it went unrenewed for its duration. Every write carries the resourceVersion
/// read, so of two operators racing for it one gets 409 Conflict and stands by.
public final class LeaderLease: @unchecked Sendable {
    public let client: KubeClient
    public let path: String
    public let identity: String
    public let durationSeconds: Int
    private let collection: String
    private let name: String
    private let namespace: String
    public private(set) var isHeld = false

    public init(client: KubeClient, namespace: String, name: String = "etcdlite-operator", identity: String, durationSeconds: Int = 15) {
        self.client = client
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.durationSeconds = durationSeconds
        collection = "/apis/coordination.k8s.io/v1/namespaces/\(namespace)/leases"
        path = collection + "/" + name
    }

    static func microTime(_ date: Date) -> String {
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        return formatter.string(from: date)
    }

    static func parse(_ text: String?) -> Date? {
        guard let text else { return nil }
        let formatter = ISO8601DateFormatter()
        formatter.formatOptions = [.withInternetDateTime, .withFractionalSeconds]
        if let date = formatter.date(from: text) { return date }
        formatter.formatOptions = [.withInternetDateTime]
        return formatter.date(from: text)
    }

    /// Takes or renews the lease; whether this operator holds it now. Any failure (the API
    /// server away, a conflict) counts as not holding it: a pass that cannot prove it leads does
    /// not act.
    @discardableResult
    public func acquireOrRenew(now: Date = Date()) async -> Bool {
        isHeld = await attempt(now)
        return isHeld
    }

    private func attempt(_ now: Date) async -> Bool {
        let stamp = Self.microTime(now)
        let current: [String: Any]
        do {
            current = try await client.get(path)
        } catch let error as KubeAPIError where error.isNotFound {
            let lease: [String: Any] = [
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": ["name": name, "namespace": namespace],
                "spec": ["holderIdentity": identity, "leaseDurationSeconds": durationSeconds, "acquireTime": stamp, "renewTime": stamp,
                         "leaseTransitions": 0],
            ]
            return (try? await client.send(.POST, collection, body: lease)) != nil
        } catch {
            return false
        }
        var spec = current["spec"] as? [String: Any] ?? [:]
        let holder = spec["holderIdentity"] as? String
        let duration = spec["leaseDurationSeconds"] as? Int ?? durationSeconds
        let renewed = Self.parse(spec["renewTime"] as? String) ?? .distantPast
        if holder != identity {
            // Someone else's, and still fresh: stand by.
            if let holder, !holder.isEmpty, renewed.addingTimeInterval(Double(duration)) > now { return false }
            spec["holderIdentity"] = identity
            spec["acquireTime"] = stamp
            spec["leaseTransitions"] = (spec["leaseTransitions"] as? Int ?? 0) + 1
        }
        spec["renewTime"] = stamp
        spec["leaseDurationSeconds"] = durationSeconds
        var lease = current
        lease["spec"] = spec
        // The resourceVersion read goes back with it: a race loses with 409.
        return (try? await client.send(.PUT, path, body: lease)) != nil
    }
}
