import Foundation
import Synchronization
import EtcdLiteProto

extension EtcdLiteServer {
    /// etcd's minimum lease TTL: ⌈1.5 election timeouts⌉ in seconds, counted in heartbeat ticks.
    var minLeaseTTL: Int64 {
        let electionTicks = config.electionTimeoutMilliseconds / config.heartbeatIntervalMilliseconds
        let milliseconds = (3 * electionTicks / 2) * config.heartbeatIntervalMilliseconds
        return Int64((Double(milliseconds) / 1000).rounded(.up))
    }

    public func leaseGrant(_ request: Etcdserverpb_LeaseGrantRequest) async throws -> Etcdserverpb_LeaseGrantResponse {
        var grant = request
        if grant.ttl > Lessor.maxTTL { throw EtcdError.leaseTTLTooLarge }
        grant.ttl = max(grant.ttl, minLeaseTTL)
        if grant.id == 0 {
            repeat { grant.id = leaseIDs.next() } while lessor.contains(grant.id)
        } else if lessor.contains(grant.id) {
            throw EtcdError.leaseExists
        }
        guard case .leaseGrant(var response) = try await propose(.leaseGrant(grant)) else { throw unexpected() }
        fill(&response.header)
        return response
    }

    public func leaseRevoke(_ request: Etcdserverpb_LeaseRevokeRequest) async throws -> Etcdserverpb_LeaseRevokeResponse {
        try await leaseRevoke(request, as: .internal)
    }

    /// While auth is on, a caller who is not an admin must be able to write every attached key
    /// (checked at apply).
    func leaseRevoke(_ request: Etcdserverpb_LeaseRevokeRequest, as caller: AuthInfo) async throws -> Etcdserverpb_LeaseRevokeResponse {
        if !lessor.contains(request.id) { throw EtcdError.leaseNotFound }
        guard case .leaseRevoke(var response) = try await propose(entry(.leaseRevoke(request), from: caller)) else { throw unexpected() }
        fill(&response.header)
        return response
    }

    /// One keep-alive: renews the lease and answers its TTL; an unknown or expired lease gets TTL 0.
    /// Only the leader's clocks count: a follower asks the leader (as etcd's followers forward
    /// keep-alives to it), and the leader answers once a quorum confirmed it still leads
    /// (ReadIndex). That puts any later leader's election, and its restart of every clock, after
    /// the renewal: a client is never promised a renewal the cluster did not make.
    public func leaseKeepAlive(_ request: Etcdserverpb_LeaseKeepAliveRequest) async throws -> Etcdserverpb_LeaseKeepAliveResponse {
        var response = Etcdserverpb_LeaseKeepAliveResponse()
        response.id = request.id
        // The header is read before the renewal, as etcd's is.
        response.header = header(revision: status.state.currentRevision)
        if status.alone {
            response.ttl = lessor.renew(request.id) ?? 0
        } else {
            response.ttl = try await askLeader(.renew(request.id)).remaining
        }
        return response
    }

    /// A LeaseKeepAlive stream: each request answered in turn. While auth is on, each renewal needs
    /// a user who may write every key of the lease (or an admin); a refusal ends the stream with
    /// its error, as etcd's.
    func leaseKeepAliveStream(_ requests: AsyncStream<[UInt8]>, _ writer: ResponseWriter, _ context: CallContext) async throws {
        for await bytes in requests {
            let request: Etcdserverpb_LeaseKeepAliveRequest = try GRPCMethods.decode(bytes)
            if authBox.enabled {
                let caller = try await caller(context)
                try requireUser(caller)
                try checkLeaseKeys(request.id, caller, .write)
            }
            let response = try await leaseKeepAlive(request)
            try await writer.write([try response.serializedBytes()])
        }
    }

    /// Asks the leader's lease clocks; while there is no leader (or it just changed) asks again
    /// until etcd's request timeout, as etcd's follower waits for a leader.
    private func askLeader(_ question: ApplyLoop.LeaseQuestion) async throws -> ApplyLoop.LeaseAnswer {
        let deadline = ContinuousClock.now + .seconds(loop.requestTimeout)
        while true {
            do {
                return try await loop.askLeader(question)
            } catch let error as EtcdError where error == .noLeader || error == .notLeader {
                guard ContinuousClock.now < deadline else { throw EtcdError.requestTimedOut }
                try await Task.sleep(for: .milliseconds(50))
            }
        }
    }

    /// The remaining and granted TTL (from the leader, whose clocks count), and the attached keys
    /// when asked; an unknown lease is TTL -1.
    public func leaseTimeToLive(_ request: Etcdserverpb_LeaseTimeToLiveRequest) async throws -> Etcdserverpb_LeaseTimeToLiveResponse {
        var response = Etcdserverpb_LeaseTimeToLiveResponse()
        response.id = request.id
        response.header = header(revision: status.state.currentRevision)
        let answer: ApplyLoop.LeaseAnswer
        if status.alone {
            guard let clock = lessor.timeToLive(request.id) else {
                response.ttl = -1
                return response
            }
            answer = ApplyLoop.LeaseAnswer(remaining: clock.remaining, granted: clock.granted)
        } else {
            answer = try await askLeader(.timeToLive(request.id))
        }
        response.ttl = answer.remaining
        guard answer.remaining != -1 else { return response }
        response.grantedTtl = answer.granted
        if request.keys {
            response.keys = try backend.withReader { try StateMachine.attachedKeys(request.id, $0) }
        }
        return response
    }

    public func leaseLeases() -> Etcdserverpb_LeaseLeasesResponse {
        var response = Etcdserverpb_LeaseLeasesResponse()
        response.header = header(revision: status.state.currentRevision)
        response.leases = lessor.ids.map { id in
            var status = Etcdserverpb_LeaseStatus()
            status.id = id
            return status
        }
        return response
    }

    /// The leader's clock: proposes revokes of expired leases, at most `leaseRevokeBatch` per tick
    /// so that a mass expiry is spread out instead of stalling writes (etcd limits it likewise).
    func revokeExpiredLeases() {
        // Only the leader's clocks count.
        guard status.leader == memberID else { return }
        for id in lessor.expired(limit: Self.leaseRevokeBatch) {
            var revoke = Etcdserverpb_LeaseRevokeRequest()
            revoke.id = id
            loop.proposeAsLeader(.leaseRevoke(revoke))
        }
    }

    static let leaseCheckInterval = Duration.milliseconds(50)
    static let leaseRevokeBatch = 100
}

/// etcd's request ID scheme, used for server-chosen lease IDs: the member ID's low 16 bits, then
/// the start time in milliseconds (40 bits) and an 8-bit counter that carries into it.
final class LeaseIDGenerator: Sendable {
    private let prefix: UInt64
    private let suffix: Mutex<UInt64>

    init(memberID: UInt64) {
        prefix = (memberID & 0xFFFF) << 48
        let milliseconds = UInt64(Date().timeIntervalSince1970 * 1000)
        suffix = Mutex((milliseconds & (1 << 40 - 1)) << 8)
    }

    func next() -> Int64 {
        let count = suffix.withLock { value -> UInt64 in
            value &+= 1
            return value
        }
        let id = prefix | (count & (1 << 48 - 1))
        return Int64(bitPattern: id & (1 << 63 - 1))
    }
}

/// A background task owned by the server and cancelled when it closes.
final class OwnedTask: Sendable {
    private let task = Mutex<Task<Void, Never>?>(nil)

    func start(_ body: @escaping @Sendable () async -> Void) {
        task.withLock { $0 = Task.detached { await body() } }
    }

    func cancel() {
        task.withLock { $0?.cancel() }
    }
}
