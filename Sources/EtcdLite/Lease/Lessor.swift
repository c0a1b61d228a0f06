import Synchronization

/// The member's lease clocks: which leases exist, their TTLs and when each expires. Existence
/// follows the apply order (the state machine grants and revokes); expiry times live only in
/// memory on monotonic time and are renewed in full after a restart, as etcd's lessor does when a
/// member becomes leader. Shared by the apply loop and the request handlers.
final class Lessor: Sendable {
    struct Lease {
        /// The TTL the lease was granted with, in seconds (already raised to the minimum).
        var ttl: Int64
        var expiry: ContinuousClock.Instant
        /// Set while a revoke of the expired lease is in the log; retried after it passes.
        var revokeRetry: ContinuousClock.Instant?
    }

    /// etcd's bound on lease TTLs (seconds).
    static let maxTTL: Int64 = 9_000_000_000
    /// How long an expired lease waits for its revoke to apply before it is proposed again.
    static let revokeRetryInterval = Duration.seconds(3)

    private let leases = Mutex<[Int64: Lease]>([:])
    private let clock = ContinuousClock()

    func contains(_ id: Int64) -> Bool {
        leases.withLock { $0[id] != nil }
    }

    var ids: [Int64] {
        leases.withLock { Array($0.keys) }.sorted()
    }

    var count: Int { leases.withLock { $0.count } }

    /// A lease came into existence (grant applied, or loaded at start): its clock starts now.
    func granted(_ id: Int64, ttl: Int64) {
        let expiry = clock.now + .seconds(ttl)
        leases.withLock { $0[id] = Lease(ttl: ttl, expiry: expiry) }
    }

    /// Exactly these leases exist (a snapshot from the leader replaced the store): new ones start
    /// their clocks now, the others keep theirs.
    func replaceAll(_ granted: [Int64: Int64]) {
        let expiry = clock.now
        leases.withLock { leases in
            leases = leases.filter { granted[$0.key] != nil }
            for (id, ttl) in granted where leases[id] == nil { leases[id] = Lease(ttl: ttl, expiry: expiry + .seconds(ttl)) }
        }
    }

    func revoked(_ id: Int64) {
        _ = leases.withLock { $0.removeValue(forKey: id) }
    }

    /// Restarts every clock (a new leader must not expire what the old one was keeping alive).
    func renewAll() {
        let now = clock.now
        leases.withLock { leases in
            for id in leases.keys {
                leases[id]!.expiry = now + .seconds(leases[id]!.ttl)
                leases[id]!.revokeRetry = nil
            }
        }
    }

    /// Renews a live lease and returns its TTL; nil when it does not exist or already expired.
    func renew(_ id: Int64) -> Int64? {
        let now = clock.now
        return leases.withLock { leases -> Int64? in
            guard let lease = leases[id], lease.expiry > now else { return nil }
            leases[id]!.expiry = now + .seconds(lease.ttl)
            return lease.ttl
        }
    }

    /// The granted TTL and the whole seconds left (etcd truncates); nil when unknown.
    func timeToLive(_ id: Int64) -> (granted: Int64, remaining: Int64)? {
        let now = clock.now
        return leases.withLock { leases -> (Int64, Int64)? in
            guard let lease = leases[id] else { return nil }
            let left = lease.expiry - now
            return (lease.ttl, left.components.seconds)
        }
    }

    /// Up to `limit` leases whose time is up and whose revoke is not already on its way (the
    /// oldest first). Each is marked so it is not proposed again before the retry interval.
    func expired(limit: Int) -> [Int64] {
        let now = clock.now
        return leases.withLock { leases -> [Int64] in
            var due: [(ContinuousClock.Instant, Int64)] = []
            for (id, lease) in leases where lease.expiry <= now {
                if let retry = lease.revokeRetry, retry > now { continue }
                due.append((lease.expiry, id))
            }
            if due.count > limit {
                due.sort { $0.0 < $1.0 }
                due.removeLast(due.count - limit)
            }
            for (_, id) in due { leases[id]!.revokeRetry = now + Self.revokeRetryInterval }
            return due.map(\.1)
        }
    }
}
