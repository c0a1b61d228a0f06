import Crypto
import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOPosix
import Raft
import Synchronization
import EtcdLiteProto

/// One etcdlite member's state and request path. Embed it to serve etcd's KV API in process
/// (call `range`, `put`, ... directly: no socket), or run `serve()` to listen on the client URLs.
public final class EtcdLiteServer: Sendable {
    /// The etcd API version this member answers as (kube-apiserver enables watch progress requests
    /// from 3.5.13 on).
    public static let apiVersion = "3.5.21"
    public static let clusterVersion = "3.5.0"

    public let config: MemberConfig
    public let memberID: UInt64
    public let clusterID: UInt64
    let logger: Logger
    let backend: Backend
    let loop: ApplyLoop
    private let published: PublishedStatus
    let stopRequested: StopSignal
    /// Set when this member was removed from the cluster: `serve` then ends with an error.
    let removedFromCluster: NIOLockedValueBox<Bool>
    let lessor = Lessor()
    let leaseIDs: LeaseIDGenerator
    /// Threads for reads of key ranges (see `range`).
    let readers: NIOThreadPool
    let watchHub: WatchHub
    let metrics = MemberMetrics()
    private let leaseClock = OwnedTask()
    /// The auth state as of the last applied entry (users, roles, whether auth is on).
    let authBox = AuthBox()
    /// This member's simple tokens (`--auth-token simple`).
    let tokens: SimpleTokens
    /// The JWT signer and checker when `--auth-token jwt,...`.
    let jwt: JWTTokens?
    /// Held from start to close.
    private let directoryLock: DirectoryLock

    /// Opens (or creates) the member's data directory, replays the log into the store and starts
    /// the apply loop.
    public init(config: MemberConfig, logger: Logger = Logger(label: "etcdlite")) throws {
        try config.validate()
        var config = config
        // --auto-tls / --peer-auto-tls without certificate files: generated ones in the data dir.
        let fixtures = URL(fileURLWithPath: config.effectiveDataDir).appendingPathComponent("fixtures")
        if config.clientTLS.autoTLS && config.clientTLS.isEmpty && config.listenClientURLs.contains(where: { $0.hasPrefix("https://") }) {
            let files = try AutoTLS.files(in: fixtures.appendingPathComponent("client"),
                                          hosts: AutoTLS.hosts(of: config.listenClientURLs + config.advertiseClientURLs))
            (config.clientTLS.certFile, config.clientTLS.keyFile) = files
        }
        if config.peerTLS.autoTLS && config.peerTLS.isEmpty
            && (config.listenPeerURLs + config.initialAdvertisePeerURLs).contains(where: { $0.hasPrefix("https://") }) {
            let files = try AutoTLS.files(in: fixtures.appendingPathComponent("peer"),
                                          hosts: AutoTLS.hosts(of: config.listenPeerURLs + config.initialAdvertisePeerURLs))
            (config.peerTLS.certFile, config.peerTLS.keyFile) = files
        }
        self.config = config
        self.logger = logger
        tokens = SimpleTokens(ttl: .seconds(config.authTokenTTL > 0 ? config.authTokenTTL : 300))
        jwt = try JWTTokens.parse(config.authToken)
        let dataDir = URL(fileURLWithPath: config.effectiveDataDir)
        let memberDir = dataDir.appendingPathComponent("member")
        // A join refused on a directory made by this very start leaves nothing behind: a member
        // directory on disk means a member's data (node agents count on it).
        let fresh = !FileManager.default.fileExists(atPath: memberDir.path)
        try FileManager.default.createDirectory(at: memberDir, withIntermediateDirectories: true)
        // One process per data directory (etcd locks its WAL the same way).
        directoryLock = try DirectoryLock(memberDir.appendingPathComponent("lock").path)
        backend = try Backend(path: memberDir.appendingPathComponent("store.db").path)

        // Identity: derived from the flags on first start of a new cluster, or asked of a member
        // of the running cluster when joining one; then read back from the store.
        var meta = try MemberMeta.load(backend.writer)
        var initialMembers: [Etcdserverpb_Member] = []
        var joining: [Etcdserverpb_Member] = []
        let existing = config.initialClusterState == "existing"
        if !existing {
            // Also on later starts: a first start stopped before its log was written bootstraps
            // again (the log is bootstrapped only while it is empty).
            let members = try config.initialClusterMembers()
            let ids = members.map { ClusterIdentity.memberID(peerURLs: $0.peerURLs, token: config.initialClusterToken) }
            if meta.memberID == nil {
                meta.memberID = ids[members.firstIndex { $0.name == config.name }!]
                meta.clusterID = ClusterIdentity.clusterID(memberIDs: ids)
            }
            initialMembers = zip(members, ids).map { member, id in
                var m = Etcdserverpb_Member()
                m.id = id
                m.name = member.name
                m.peerUrls = member.peerURLs
                return m
            }
        } else if try meta.memberID == nil || Membership.load(backend.writer).members.isEmpty {
            let cluster: (clusterID: UInt64, members: [Etcdserverpb_Member])
            let me: Etcdserverpb_Member
            do {
                cluster = try Self.fetchCluster(config, logger: logger)
                guard let found = cluster.members.first(where: { Set($0.peerUrls) == Set(config.initialAdvertisePeerURLs) }) else {
                    throw ConfigError("error validating peerURLs: cluster \(String(cluster.clusterID, radix: 16)) has no member with peer URLs \(config.initialAdvertisePeerURLs) (add it with member add first)")
                }
                me = found
                if let known = meta.memberID, known != me.id || meta.clusterID != cluster.clusterID {
                    throw ConfigError("cluster ID mismatch")
                }
                // etcd's rule: a member that has started before (it published its name) and has no
                // data now lost it; under its old ID it would vote without the entries it acknowledged.
                // It must be removed and added again.
                if meta.memberID == nil && !me.name.isEmpty {
                    throw ConfigError("member \(String(me.id, radix: 16)) has already been bootstrapped")
                }
            } catch {
                if fresh { try? FileManager.default.removeItem(at: memberDir) }
                throw error
            }
            meta.memberID = me.id
            meta.clusterID = cluster.clusterID
            joining = cluster.members
        }
        try meta.save(backend.writer)
        memberID = meta.memberID!
        clusterID = meta.clusterID!

        leaseIDs = LeaseIDGenerator(memberID: memberID)
        readers = NIOThreadPool(numberOfThreads: max(4, 2 * ProcessInfo.processInfo.activeProcessorCount))
        readers.start()
        let machine = try StateMachine(backend: backend, lessor: lessor, authBox: authBox, tokens: tokens)
        if machine.membership.removed.contains(memberID) {
            throw ConfigError("the member has been permanently removed from the cluster")
        }
        // The Raft log; a new one starts with no members: the bootstrap entries add them.
        let store = try RaftLogStore(directory: memberDir.appendingPathComponent("raft"), initial: ConfState())
        // Messages from peers reach the loop once it exists.
        let inbox = LoopInbox()
        let peerTLS: TLSContexts?
        do {
            peerTLS = config.peerTLS.isEmpty ? nil : try TLSContexts(config.peerTLS)
        } catch {
            throw ConfigError("peer TLS: \(error)")
        }
        let transport = PeerTransport(memberID: memberID, clusterID: clusterID, group: MultiThreadedEventLoopGroup.singleton, tls: peerTLS,
                                      deliver: { inbox.loop?.receive($0) }, unreachable: { inbox.loop?.peerUnreachable($0) })
        // Snapshot images left by a stop in the middle of a transfer are of no use.
        for name in (try? FileManager.default.contentsOfDirectory(atPath: memberDir.path)) ?? []
        where (name.hasPrefix("incoming-") || name.hasPrefix("outgoing-")) && (name.hasSuffix(".db") || name.hasSuffix(".db.crc")) {
            try? FileManager.default.removeItem(at: memberDir.appendingPathComponent(name))
        }
        transport.hooks.withLockedValue { hooks in
            hooks.snapshotDirectory = memberDir.path
            hooks.deliverApp = { inbox.loop?.receiveApp(from: $0, bytes: $1) }
            hooks.removedByPeer = { inbox.loop?.removedByPeer() }
            hooks.snapshotRefused = { [logger] error in
                logger.error("received a damaged snapshot image; refused, the leader sends it again",
                             metadata: ["file": "\(error.file)", "offset": "\(error.offset)", "error": "\(error)"])
            }
            hooks.members = {
                var list = Etcdserverpb_MemberListResponse()
                list.members = inbox.loop?.members.withLock { $0.sorted } ?? []
                return (try? list.serializedBytes()) ?? []
            }
        }
        for peer in joining where peer.id != memberID { transport.setPeer(peer) }
        let stop = StopSignal()
        stopRequested = stop
        let removed = NIOLockedValueBox(false)
        removedFromCluster = removed
        let published = PublishedStatus(StoreStatus(state: machine.state, logIndex: store.lastIndex.value, dbSize: 0, dbSizeInUse: 0, alarms: []))
        self.published = published
        let hub = WatchHub(revision: machine.state.currentRevision, header: Etcdserverpb_ResponseHeader(), queueLimit: config.watchStreamQueueBytes,
                           watcherLimit: config.maxWatchersPerStream)
        watchHub = hub
        loop = try ApplyLoop(machine: machine, store: store, memberID: memberID, initialMembers: initialMembers, transport: transport,
                             config: config, logger: logger, metrics: metrics, onBatch: { status in
            let termChanged = published.value.withLock { published -> Bool in
                defer { published = status }
                return published.raftTerm != status.raftTerm
            }
            // Watch responses carry the current term too.
            if termChanged { hub.setTerm(status.raftTerm) }
        }, onEvents: { events, revision in
            hub.publish(events, revision: revision)
        }, onRemoved: {
            removed.withLockedValue { $0 = true }
            stop.fire()
        }, onInstalled: { revision in
            hub.resync(revision: revision)
        })
        inbox.loop = loop
        try loop.bootstrap()
        var template = Etcdserverpb_ResponseHeader()
        template.clusterID = clusterID
        template.memberID = memberID
        template.raftTerm = loop.term
        hub.reset(revision: machine.state.currentRevision, header: template)
        loop.start()
        leaseClock.start { [weak self] in
            while !Task.isCancelled {
                try? await Task.sleep(for: Self.leaseCheckInterval)
                guard let self else { return }
                self.revokeExpiredLeases()
            }
        }
    }

    /// Stops the apply loop after what is queued; the store is closed when the server is released.
    public func close() {
        leaseClock.cancel()
        readers.shutdownGracefully { _ in }
        loop.stop()
        loop.transport.close()
        backend.closeReaders()
        directoryLock.release()
    }

    var status: StoreStatus { published.value.withLock { $0 } }

    /// The Raft term as last published by the apply loop.
    var term: UInt64 { status.raftTerm }

    /// Prometheus text of the member's metrics (etcd's names).
    public func metricsText() -> String {
        let keyCount = try? backend.read { view -> Int in
            let statement = try view.connection.prepared("SELECT count(*) FROM latest")
            defer { statement.reset() }
            return try statement.step() ? Int(statement.int64(0)) : 0
        }
        return metrics.render(status: status, keyCount: keyCount)
    }

    func header(revision: Int64? = nil) -> Etcdserverpb_ResponseHeader {
        var header = Etcdserverpb_ResponseHeader()
        header.clusterID = clusterID
        header.memberID = memberID
        header.raftTerm = term
        if let revision { header.revision = revision }
        return header
    }

    /// Fills the fields etcd's API layer fills: ids, term, and the revision when left at 0.
    func fill(_ header: inout Etcdserverpb_ResponseHeader) {
        header.clusterID = clusterID
        header.memberID = memberID
        header.raftTerm = term
        if header.revision == 0 { header.revision = status.state.currentRevision }
    }

    // MARK: - KV

    public func range(_ request: Etcdserverpb_RangeRequest) async throws -> Etcdserverpb_RangeResponse {
        try await range(request, as: .internal)
    }

    /// A read for `caller`, checked against the auth state before it and after (etcd's
    /// doSerialize).
    func range(_ request: Etcdserverpb_RangeRequest, as caller: AuthInfo) async throws -> Etcdserverpb_RangeResponse {
        if status.isLearner && !request.serializable { throw EtcdError.notSupportedForLearner }
        try RequestValidation.check(request)
        try checkRead(caller, key: request.key, rangeEnd: request.rangeEnd)
        // One member: everything acknowledged is applied, so the committed state is linearizable.
        // With peers, a linearizable read waits for ReadIndex and the apply to reach it.
        if !status.alone && !request.serializable { try await loop.linearizableRead() }
        let backend = self.backend
        let read: @Sendable () throws -> Etcdserverpb_RangeResponse = { try backend.read { try Applier.range(request, $0) } }
        // A range of keys may read and encode megabytes (a kube-apiserver list): it runs on the
        // reader threads, so that it does not hold one of the few task threads that every other
        // request needs (single-key reads stay on the task).
        var response = request.rangeEnd.isEmpty ? try read() : try await readers.runIfActive(read)
        try checkAuthUnchanged(caller)
        fill(&response.header)
        return response
    }

    // The async forms (the embedding API) wait for the callback forms below, so both paths run
    // the same validation, quota check and header filling.

    public func put(_ request: Etcdserverpb_PutRequest) async throws -> Etcdserverpb_PutResponse {
        try await withCheckedThrowingContinuation { continuation in put(request) { continuation.resume(with: $0) } }
    }

    public func deleteRange(_ request: Etcdserverpb_DeleteRangeRequest) async throws -> Etcdserverpb_DeleteRangeResponse {
        try await withCheckedThrowingContinuation { continuation in deleteRange(request) { continuation.resume(with: $0) } }
    }

    public func txn(_ request: Etcdserverpb_TxnRequest) async throws -> Etcdserverpb_TxnResponse {
        if RequestValidation.isReadOnly(request) { return try await readOnlyTxn(request, as: .internal) }
        return try await withCheckedThrowingContinuation { continuation in txn(request) { continuation.resume(with: $0) } }
    }

    /// A txn without writes reads the committed state directly; it never enters the log.
    private func readOnlyTxn(_ request: Etcdserverpb_TxnRequest, as caller: AuthInfo) async throws -> Etcdserverpb_TxnResponse {
        // A txn's reads are linearizable (etcd makes every txn linearizable).
        if !status.alone { try await loop.linearizableRead() }
        try RequestValidation.check(request, maxTxnOps: config.maxTxnOps)
        try checkReadOnlyTxn(request, caller)
        var response = try backend.read { try Applier.readOnlyTxn(request, $0) }
        try checkAuthUnchanged(caller)
        fill(&response.header)
        return response
    }

    public func compact(_ request: Etcdserverpb_CompactionRequest) async throws -> Etcdserverpb_CompactionResponse {
        guard case .compaction(var response) = try await propose(.compaction(request)) else { throw unexpected() }
        if request.physical {
            // Compaction deletes rows inside the apply transaction; make that durable too.
            try await loop.onLoop { try $0.backend.syncCommitted() }
        }
        fill(&response.header)
        return response
    }

    func propose(_ request: InternalRequest) async throws -> InternalResponse {
        try await loop.propose(request, data: try encode(request)).get()
    }

    private func encode(_ request: InternalRequest) throws -> [UInt8] {
        let data: [UInt8]
        do { data = try request.encoded() } catch { throw EtcdError(.internal, "etcdserver: \(error)") }
        if data.count > config.maxRequestBytes { throw EtcdError.requestTooLarge }
        return data
    }

    // MARK: - Writes without a task
    //
    // The gRPC path starts writes on the connection's event loop and is answered from the apply
    // loop's thread: no task and two fewer thread wake-ups per write than awaiting them.

    func put(_ request: Etcdserverpb_PutRequest, as caller: AuthInfo = .internal,
             completion: @escaping @Sendable (Result<Etcdserverpb_PutResponse, any Error>) -> Void) {
        submit(.put(request), caller, completion, validate: {
            try RequestValidation.check(request)
            try self.checkQuota(cost: 256 + request.key.count + request.value.count)
        }) { response in
            guard case .put(let put) = response else { return nil }
            return put
        }
    }

    func deleteRange(_ request: Etcdserverpb_DeleteRangeRequest, as caller: AuthInfo = .internal,
                     completion: @escaping @Sendable (Result<Etcdserverpb_DeleteRangeResponse, any Error>) -> Void) {
        submit(.deleteRange(request), caller, completion, validate: { try RequestValidation.check(request) }) { response in
            guard case .deleteRange(let delete) = response else { return nil }
            return delete
        }
    }

    /// Read-only txns read SQLite, which does not belong on an event loop: they run as a task.
    func txn(_ request: Etcdserverpb_TxnRequest, as caller: AuthInfo = .internal,
             completion: @escaping @Sendable (Result<Etcdserverpb_TxnResponse, any Error>) -> Void) {
        if RequestValidation.isReadOnly(request) {
            Task {
                do { completion(.success(try await self.readOnlyTxn(request, as: caller))) } catch { completion(.failure(error)) }
            }
            return
        }
        submit(.txn(request), caller, completion, validate: {
            try RequestValidation.check(request, maxTxnOps: self.config.maxTxnOps)
            let cost = Self.putCost(request)
            if cost > 0 { try self.checkQuota(cost: cost) }
        }) { response in
            guard case .txn(let txn) = response else { return nil }
            return txn
        }
    }

    private func submit<Response: HasHeader>(
        _ request: InternalRequest, _ caller: AuthInfo, _ completion: @escaping @Sendable (Result<Response, any Error>) -> Void,
        validate: () throws -> Void, extract: @escaping @Sendable (InternalResponse) -> Response?
    ) {
        let data: [UInt8]
        let request = entry(request, from: caller)
        do {
            try validate()
            data = try encode(request)
        } catch {
            return completion(.failure(error))
        }
        loop.propose(request, data: data) { result in
            switch result {
            case .success(let response):
                guard var typed = extract(response) else { return completion(.failure(self.unexpected())) }
                self.fill(&typed.header)
                completion(.success(typed))
            case .failure(let error):
                completion(.failure(error))
            }
        }
    }

    /// etcd's quota check: a write that would push the database past the quota raises NOSPACE and
    /// fails; while the alarm is active the apply step rejects writes too.
    func checkQuota(cost: Int) throws {
        guard let quota = config.effectiveQuotaBytes else { return }
        if status.dbSize + Int64(cost) <= quota { return }
        var alarm = Etcdserverpb_AlarmRequest()
        alarm.action = .activate
        alarm.memberID = memberID
        alarm.alarm = .nospace
        loop.proposeDetached(.alarm(alarm))
        throw EtcdError.noSpace
    }

    static func putCost(_ request: Etcdserverpb_TxnRequest) -> Int {
        (request.success + request.failure).reduce(0) { total, op in
            switch op.request {
            case .requestPut(let put): total + 256 + put.key.count + put.value.count
            case .requestTxn(let nested): total + putCost(nested)
            default: total
            }
        }
    }

    func unexpected() -> EtcdError { EtcdError(.internal, "etcdserver: unexpected response type") }
}

/// Responses whose header the API layer fills.
protocol HasHeader {
    var header: Etcdserverpb_ResponseHeader { get set }
}

extension Etcdserverpb_PutResponse: HasHeader {}
extension Etcdserverpb_DeleteRangeResponse: HasHeader {}
extension Etcdserverpb_TxnResponse: HasHeader {}

extension EtcdLiteServer {
    /// Asks the members named by --initial-cluster (other than this one) for the running cluster.
    static func fetchCluster(_ config: MemberConfig, logger: Logger) throws -> (clusterID: UInt64, members: [Etcdserverpb_Member]) {
        let own = Set(config.initialAdvertisePeerURLs)
        let tls = config.peerTLS.isEmpty ? nil : try TLSContexts(config.peerTLS)
        for member in try config.initialClusterMembers() {
            for text in member.peerURLs where !own.contains(text) {
                guard let address = MemberConfig.address(text, defaultPort: 2380) else { continue }
                do {
                    let reply = try PeerTransport.fetchMembers(host: address.host, port: address.port, group: MultiThreadedEventLoopGroup.singleton,
                                                               tls: text.hasPrefix("https://") ? tls : nil)
                    let list = try Etcdserverpb_MemberListResponse(serializedBytes: reply.members)
                    return (reply.clusterID, list.members)
                } catch {
                    logger.warning("could not get the cluster's members", metadata: ["peer": "\(text)", "error": "\(error)"])
                }
            }
        }
        throw ConfigError("cannot fetch cluster info from peer urls: could not retrieve cluster information from the given URLs")
    }
}

/// Per-member facts kept beside the data: identity and the last term.
struct MemberMeta {
    var memberID: UInt64?
    var clusterID: UInt64?
    var term: UInt64?

    static func load(_ connection: SQLiteConnection) throws -> MemberMeta {
        var meta = MemberMeta()
        let statement = try connection.prepared("SELECT name, value FROM member_meta")
        while try statement.step() {
            let value = UInt64(statement.text(1))
            switch statement.text(0) {
            case "member_id": meta.memberID = value
            case "cluster_id": meta.clusterID = value
            case "term": meta.term = value
            default: break
            }
        }
        statement.reset()
        return meta
    }

    func save(_ connection: SQLiteConnection) throws {
        let statement = try connection.prepared("INSERT OR REPLACE INTO member_meta(name, value) VALUES (?1, ?2)")
        for (name, value) in [("member_id", memberID), ("cluster_id", clusterID), ("term", term)] {
            guard let value else { continue }
            statement.bind(1, name)
            statement.bind(2, String(value))
            try statement.run()
        }
    }
}

/// The latest `StoreStatus`, shared between the apply loop and request handlers.
final class PublishedStatus: Sendable {
    let value: Mutex<StoreStatus>
    init(_ status: StoreStatus) { value = Mutex(status) }
}

/// Lets the peer transport reach the apply loop, which is made after it.
final class LoopInbox: @unchecked Sendable {
    var loop: ApplyLoop?
}

/// An exclusive `flock` on a file in the data directory: a second process on the same data is
/// refused at start instead of writing the same log and database.
final class DirectoryLock: Sendable {
    private let fd: Mutex<Int32>

    init(_ path: String) throws {
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw ConfigError("cannot open \(path): \(String(cString: strerror(errno)))") }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0 else {
            close(fd)
            throw ConfigError("data directory \((path as NSString).deletingLastPathComponent) is in use by another process")
        }
        self.fd = Mutex(fd)
    }

    func release() {
        fd.withLock { fd in
            if fd >= 0 { close(fd) }
            fd = -1
        }
    }

    deinit { release() }
}
