@testable import EtcdOperator
import Foundation
import Testing

/// One active operator: the Lease against an API server that follows the conventions.
@Suite struct LeaderLeaseTests {
    static let path = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/etcdlite-operator"

    static func lease(_ server: FakeAPIServer, _ identity: String) -> LeaderLease {
        LeaderLease(client: KubeClient(host: "127.0.0.1", port: server.port, token: "operator-token"), namespace: "kube-system",
                    identity: identity, durationSeconds: 15)
    }

    @Test func oneHolderRenewsOthersWaitForItToLapse() async throws {
        let server = try KubernetesPlatformTests.server()
        defer { server.stop() }
        let a = Self.lease(server, "operator-a"), b = Self.lease(server, "operator-b")
        let start = Date()
        #expect(await a.acquireOrRenew(now: start))
        #expect(await !b.acquireOrRenew(now: start.addingTimeInterval(1)))
        // Renewed within its duration: still a's.
        #expect(await a.acquireOrRenew(now: start.addingTimeInterval(10)))
        #expect(await !b.acquireOrRenew(now: start.addingTimeInterval(20)))
        var spec = server.object(Self.path)?["spec"] as? [String: Any] ?? [:]
        #expect(spec["holderIdentity"] as? String == "operator-a" && spec["leaseTransitions"] as? Int == 0)
        // a stopped renewing: after its duration b takes over, and a knows it lost the lease.
        #expect(await b.acquireOrRenew(now: start.addingTimeInterval(26)))
        spec = server.object(Self.path)?["spec"] as? [String: Any] ?? [:]
        #expect(spec["holderIdentity"] as? String == "operator-b" && spec["leaseTransitions"] as? Int == 1)
        #expect(await !a.acquireOrRenew(now: start.addingTimeInterval(27)))
        #expect(!a.isHeld && b.isHeld)
    }

    @Test func ofTwoRacingForALapsedLeaseOneWins() async throws {
        let server = try KubernetesPlatformTests.server()
        defer { server.stop() }
        let old = Self.lease(server, "operator-old")
        let start = Date()
        #expect(await old.acquireOrRenew(now: start))
        // Both read the lapsed lease; the first write wins, the other gets 409 Conflict.
        let a = Self.lease(server, "operator-a"), b = Self.lease(server, "operator-b")
        server.beforeNextPut(Self.path) {
            server.modify(Self.path) { lease in
                var spec = lease["spec"] as? [String: Any] ?? [:]
                spec["holderIdentity"] = "operator-b"
                spec["renewTime"] = LeaderLease.microTime(start.addingTimeInterval(30))
                lease["spec"] = spec
            }
        }
        #expect(await !a.acquireOrRenew(now: start.addingTimeInterval(30)))
        #expect(await b.acquireOrRenew(now: start.addingTimeInterval(31)))
        // The API server away: nobody may act.
        server.stop()
        #expect(await !b.acquireOrRenew(now: start.addingTimeInterval(32)))
    }
}
