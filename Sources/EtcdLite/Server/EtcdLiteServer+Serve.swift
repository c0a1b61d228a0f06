import NIOConcurrencyHelpers
import Foundation
import NIOCore
import NIOPosix
import EtcdLiteProto

extension EtcdLiteServer {
    /// Serves gRPC and HTTP on every --listen-client-urls address until the task is cancelled or
    /// `shutdown` is called; then stops accepting, lets in-flight calls finish and closes the store.
    /// `onListening` receives the bound ports (useful with port 0).
    public func serve(onListening: @Sendable ([Int]) -> Void = { _ in }) async throws {
        let methods = makeMethods()
        var listeners: [ClientListener] = []
        let clientTLS: TLSContexts?
        do {
            clientTLS = config.listenClientURLs.contains { $0.hasPrefix("https://") } ? try TLSContexts(config.clientTLS) : nil
        } catch {
            close()
            throw ConfigError("client TLS: \(error)")
        }
        for text in config.listenClientURLs {
            guard let address = MemberConfig.address(text, defaultPort: 2379) else { throw ConfigError("invalid URL \(text)") }
            if text.hasPrefix("http://") && !config.clientTLS.isEmpty {
                logger.warning("scheme is HTTP while key and cert files are present; ignoring key and cert files", metadata: ["client-url": "\(text)"])
            }
            listeners.append(ClientListener(
                host: address.host, port: address.port,
                group: MultiThreadedEventLoopGroup.singleton, methods: methods, tls: text.hasPrefix("https://") ? clientTLS : nil,
                maxConcurrentStreams: config.maxConcurrentStreams,
                minPingInterval: TimeAmount(config.grpcKeepaliveMinTime),
                maxConnectionsPerClient: config.maxConnectionsPerClient
            ) { [self] in HTTPHandler(server: self, methods: methods) })
        }
        // Peers are listened for even by a lone member: a member may be added to it. Peers first:
        // a peer's start-up check may ask this member for its hash before it serves clients.
        loop.transport.hooks.withLockedValue { $0.hashKV = { [weak self] in self?.hashAnswer(revision: $0) ?? HashAnswer(status: .unavailable) } }
        do {
            for text in config.listenPeerURLs {
                guard let address = MemberConfig.address(text, defaultPort: 2380) else { throw ConfigError("invalid URL \(text)") }
                let port = try await loop.transport.listen(host: address.host, port: address.port, secure: text.hasPrefix("https://"))
                logger.info("listening for peers", metadata: ["address": "\(address.host):\(port)"])
            }
            if config.initialCorruptCheck {
                // Blocking network round trips: on a thread of their own.
                try await withCheckedThrowingContinuation { (done: CheckedContinuation<Void, any Error>) in
                    Thread.detachNewThread { done.resume(with: Result { try self.initialCorruptionCheck() }) }
                }
            }
        } catch {
            close()
            throw error
        }
        var ports: [Int] = []
        do {
            for listener in listeners { ports.append(try await listener.bind()) }
        } catch {
            for listener in listeners { await listener.shutdown(grace: .zero) }
            close()
            throw error
        }
        let armed = Failpoints.armed
        if !armed.isEmpty { logger.warning("failpoint armed", metadata: armed.mapValues { .string($0) }) }
        logger.info("ready to serve client requests", metadata: ["listen-client-urls": "\(config.listenClientURLs)", "ports": "\(ports)"])
        onListening(ports)
        let retention = try config.autoCompactionRetentionValue()
        await withTaskGroup(of: Void.self) { group in
            if let retention {
                group.addTask { await AutoCompactor(server: self, retention: retention).run() }
            }
            group.addTask { await self.publishAttributes() }
            await withTaskCancellationHandler {
                await stopRequested.wait()
            } onCancel: {
                stopRequested.fire()
            }
            group.cancelAll()
        }
        // A planned stop: leadership goes to another voter first.
        loop.handOverLeadership()
        for listener in listeners { await listener.shutdown() }
        close()
        if removedFromCluster.withLockedValue({ $0 }) { throw MemberRemovedError() }
    }

    /// Stops accepting connections; `serve` returns once in-flight calls are done.
    public func shutdown() {
        stopRequested.fire()
    }

    /// etcd's services over gRPC. Methods not listed answer Unimplemented.
    func makeMethods() -> GRPCMethods {
        var m = GRPCMethods(receiveLimit: config.maxRequestBytes + 512 * 1024)
        m.metrics = metrics
        // With auth on, each method checks its caller as etcd 3.4.44 does: reads and writes
        // against the caller's key permissions (writes at apply), maintenance and membership
        // changes for admins (role root), the rest for any user.
        m.unary("/etcdserverpb.KV/Range") { (r: Etcdserverpb_RangeRequest, c) in try await self.range(r, as: try await self.caller(c)) }
        m.unaryDirect("/etcdserverpb.KV/Put") { (r: Etcdserverpb_PutRequest, c, done) in
            self.withCaller(c, failure: { done(.failure($0)) }) { self.put(r, as: $0, completion: done) }
        }
        m.unaryDirect("/etcdserverpb.KV/DeleteRange") { (r: Etcdserverpb_DeleteRangeRequest, c, done) in
            self.withCaller(c, failure: { done(.failure($0)) }) { self.deleteRange(r, as: $0, completion: done) }
        }
        m.unaryDirect("/etcdserverpb.KV/Txn") { (r: Etcdserverpb_TxnRequest, c, done) in
            self.withCaller(c, failure: { done(.failure($0)) }) { self.txn(r, as: $0, completion: done) }
        }
        m.unary("/etcdserverpb.KV/Compact") { (r: Etcdserverpb_CompactionRequest, _) in try await self.compact(r) }
        m.unary("/etcdserverpb.Maintenance/Alarm") { (r: Etcdserverpb_AlarmRequest, c) in
            let caller = try await self.caller(c)
            if r.action == .get { try self.requireUser(caller) } else { try self.requireAdmin(caller) }
            return try await self.alarm(r)
        }
        m.unary("/etcdserverpb.Maintenance/Status") { (_: Etcdserverpb_StatusRequest, _) in self.statusResponse() }
        m.unary("/etcdserverpb.Maintenance/Defragment") { (_: Etcdserverpb_DefragmentRequest, _) in try await self.defragment() }
        m.unary("/etcdserverpb.Maintenance/Hash") { (_: Etcdserverpb_HashRequest, _) in try self.hash() }
        m.unary("/etcdserverpb.Maintenance/HashKV") { (r: Etcdserverpb_HashKVRequest, _) in try self.hashKV(r) }
        m.unary("/etcdserverpb.Maintenance/MoveLeader") { (r: Etcdserverpb_MoveLeaderRequest, _) in try await self.moveLeader(r) }
        m.serverStreaming("/etcdserverpb.Maintenance/Snapshot") { (_: Etcdserverpb_SnapshotRequest, _, send) in
            try await self.snapshotChunks(send)
        }
        m.unary("/etcdserverpb.Lease/LeaseGrant") { (r: Etcdserverpb_LeaseGrantRequest, _) in try await self.leaseGrant(r) }
        m.unary("/etcdserverpb.Lease/LeaseRevoke") { (r: Etcdserverpb_LeaseRevokeRequest, c) in
            let caller = try await self.caller(c)
            try self.requireUser(caller)
            return try await self.leaseRevoke(r, as: caller)
        }
        m.unary("/etcdserverpb.Lease/LeaseTimeToLive") { (r: Etcdserverpb_LeaseTimeToLiveRequest, c) in
            let caller = try await self.caller(c)
            try self.requireUser(caller)
            if r.keys { try self.checkLeaseKeys(r.id, caller, .read) }
            return try await self.leaseTimeToLive(r)
        }
        m.unary("/etcdserverpb.Lease/LeaseLeases") { (_: Etcdserverpb_LeaseLeasesRequest, c) in
            let caller = try await self.caller(c)
            try self.requireUser(caller)
            let response = self.leaseLeases()
            // A caller who is not an admin must be able to read every key of every lease.
            for lease in response.leases { try self.checkLeaseKeys(lease.id, caller, .read) }
            return response
        }
        m.streaming("/etcdserverpb.Lease/LeaseKeepAlive") { requests, writer, c in try await self.leaseKeepAliveStream(requests, writer, c) }
        m.streaming("/etcdserverpb.Watch/Watch") { requests, writer, context in try await self.watch(requests, writer, context) }
        m.unary("/etcdserverpb.Cluster/MemberList") { (r: Etcdserverpb_MemberListRequest, _) in try await self.memberList(r) }
        m.unary("/etcdserverpb.Cluster/MemberAdd") { (r: Etcdserverpb_MemberAddRequest, _) in try await self.memberAdd(r) }
        m.unary("/etcdserverpb.Cluster/MemberRemove") { (r: Etcdserverpb_MemberRemoveRequest, _) in try await self.memberRemove(r) }
        m.unary("/etcdserverpb.Cluster/MemberUpdate") { (r: Etcdserverpb_MemberUpdateRequest, _) in try await self.memberUpdate(r) }
        m.unary("/etcdserverpb.Cluster/MemberPromote") { (r: Etcdserverpb_MemberPromoteRequest, _) in try await self.memberPromote(r) }
        addAuthMethods(&m)
        // Whole methods for admins (role root), or for any user.
        m.guardEach(["/etcdserverpb.KV/Compact", "/etcdserverpb.Maintenance/Status", "/etcdserverpb.Maintenance/MoveLeader",
                     "/etcdserverpb.Cluster/MemberAdd", "/etcdserverpb.Cluster/MemberRemove", "/etcdserverpb.Cluster/MemberUpdate",
                     "/etcdserverpb.Cluster/MemberPromote"]) { c in
            try self.requireAdmin(try await self.caller(c))
        }
        m.guardEach(["/etcdserverpb.Maintenance/Defragment", "/etcdserverpb.Maintenance/Hash", "/etcdserverpb.Maintenance/HashKV",
                     "/etcdserverpb.Maintenance/Snapshot"]) { c in
            try await self.requireAdminUnmapped(c)
        }
        m.guardEach(["/etcdserverpb.Lease/LeaseGrant", "/etcdserverpb.Cluster/MemberList"]) { c in
            try self.requireUser(try await self.caller(c))
        }
        // A learner serves only Status and serializable Range (etcd 3.4's rule); Range checks for
        // itself.
        m.guardAll(except: ["/etcdserverpb.Maintenance/Status", "/etcdserverpb.KV/Range"]) { [self] in
            if status.isLearner { throw EtcdError.notSupportedForLearner }
        }
        return m
    }

    /// etcd's MoveLeader: only the leader hands over, and only to a voter.
    func moveLeader(_ request: Etcdserverpb_MoveLeaderRequest) async throws -> Etcdserverpb_MoveLeaderResponse {
        guard status.leader == memberID else { throw EtcdError.notLeader }
        let voter = loop.members.withLock { $0[request.targetID].map { !$0.isLearner } ?? false }
        guard voter else {
            throw EtcdError.badLeaderTransferee
        }
        try await loop.transferLeadership(to: request.targetID)
        var response = Etcdserverpb_MoveLeaderResponse()
        response.header = header()
        return response
    }
}

/// `serve` ended because this member was removed from its cluster.
public struct MemberRemovedError: Error, CustomStringConvertible {
    public var description: String { "the member has been permanently removed from the cluster" }
}

/// A one-shot signal that many tasks can wait for.
final class StopSignal: Sendable {
    private let state = NIOLockedValueBox<(fired: Bool, waiters: [CheckedContinuation<Void, Never>])>((false, []))

    func fire() {
        let waiters = state.withLockedValue { state -> [CheckedContinuation<Void, Never>] in
            state.fired = true
            defer { state.waiters = [] }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    func wait() async {
        await withCheckedContinuation { continuation in
            let fired = state.withLockedValue { state -> Bool in
                if !state.fired { state.waiters.append(continuation) }
                return state.fired
            }
            if fired { continuation.resume() }
        }
    }
}
