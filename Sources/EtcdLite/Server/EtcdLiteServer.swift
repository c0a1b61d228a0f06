import Crypto
import Foundation
import Logging
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
    /// The initial members other than this one: ID and peer URLs (empty: a single member).
    let peers: [(id: UInt64, name: String, peerURLs: [String])]
    private let published: PublishedStatus
    let stopRequested = StopSignal()
    let lessor = Lessor()
    let leaseIDs: LeaseIDGenerator
    let watchHub: WatchHub
    let metrics = MemberMetrics()
    private let leaseClock = OwnedTask()

    /// Opens (or creates) the member's data directory, replays the log into the store and starts
    /// the apply loop.
    public init(config: MemberConfig, logger: Logger = Logger(label: "etcdlite")) throws {
        try config.validate()
        self.config = config
        self.logger = logger
        let dataDir = URL(fileURLWithPath: config.effectiveDataDir)
        let memberDir = dataDir.appendingPathComponent("member")
        try FileManager.default.createDirectory(at: memberDir, withIntermediateDirectories: true)
        backend = try Backend(path: memberDir.appendingPathComponent("store.db").path)

        // Identity: derived from the flags on first start, then read back from the store.
        let members = try config.initialClusterMembers()
        let ids = members.map { ClusterIdentity.memberID(peerURLs: $0.peerURLs, token: config.initialClusterToken) }
        var meta = try MemberMeta.load(backend.writer)
        if meta.memberID == nil {
            meta.memberID = ids[members.firstIndex { $0.name == config.name }!]
            meta.clusterID = ClusterIdentity.clusterID(memberIDs: ids)
        }
        try meta.save(backend.writer)
        memberID = meta.memberID!
        clusterID = meta.clusterID!

        leaseIDs = LeaseIDGenerator(memberID: memberID)
        let machine = try StateMachine(backend: backend, lessor: lessor)
        // The Raft log; its first start records the bootstrap configuration: every member of
        // --initial-cluster is a voter.
        let store = try RaftLogStore(directory: memberDir.appendingPathComponent("raft"),
                                     initial: ConfState(voters: Set(ids.map { NodeID($0) })))
        let me = memberID
        peers = zip(members, ids).filter { $0.1 != me }.map { (id: $0.1, name: $0.0.name, peerURLs: $0.0.peerURLs) }
        // Messages from peers reach the loop once it exists.
        let inbox = LoopInbox()
        var transport: PeerTransport?
        if !peers.isEmpty {
            let peerTransport = PeerTransport(memberID: memberID, clusterID: clusterID, group: MultiThreadedEventLoopGroup.singleton,
                                              deliver: { inbox.loop?.receive($0) }, unreachable: { inbox.loop?.peerUnreachable($0) })
            for peer in peers {
                guard let url = peer.peerURLs.first.flatMap(URLComponents.init(string:)), let host = url.host else { continue }
                peerTransport.setPeer(peer.id, host: host == "localhost" ? "127.0.0.1" : host, port: url.port ?? 2380)
            }
            transport = peerTransport
        }
        let published = PublishedStatus(StoreStatus(state: machine.state, logIndex: store.lastIndex.value, dbSize: 0, dbSizeInUse: 0, alarms: []))
        self.published = published
        let hub = WatchHub(revision: machine.state.currentRevision, header: Etcdserverpb_ResponseHeader(), queueLimit: config.watchStreamQueueBytes)
        watchHub = hub
        loop = try ApplyLoop(machine: machine, store: store, memberID: memberID, members: ids, transport: transport,
                             config: config, logger: logger, metrics: metrics, onBatch: { status in
            let termChanged = published.value.withLock { published -> Bool in
                defer { published = status }
                return published.raftTerm != status.raftTerm
            }
            // Watch responses carry the current term too.
            if termChanged { hub.setTerm(status.raftTerm) }
        }, onEvents: { events, revision in
            hub.publish(events, revision: revision)
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
        loop.stop()
        loop.transport?.close()
        backend.closeReaders()
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
        try RequestValidation.check(request)
        // One member: everything acknowledged is applied, so the committed state is linearizable.
        // With peers, a linearizable read waits for ReadIndex and the apply to reach it.
        if !peers.isEmpty && !request.serializable { try await loop.linearizableRead() }
        var response = try backend.read { try Applier.range(request, $0) }
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
        if RequestValidation.isReadOnly(request) { return try await readOnlyTxn(request) }
        return try await withCheckedThrowingContinuation { continuation in txn(request) { continuation.resume(with: $0) } }
    }

    /// A txn without writes reads the committed state directly; it never enters the log.
    private func readOnlyTxn(_ request: Etcdserverpb_TxnRequest) async throws -> Etcdserverpb_TxnResponse {
        // A txn's reads are linearizable (etcd makes every txn linearizable).
        if !peers.isEmpty { try await loop.linearizableRead() }
        try RequestValidation.check(request, maxTxnOps: config.maxTxnOps)
        var response = try backend.read { try Applier.readOnlyTxn(request, $0) }
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

    func put(_ request: Etcdserverpb_PutRequest, completion: @escaping @Sendable (Result<Etcdserverpb_PutResponse, any Error>) -> Void) {
        submit(.put(request), completion, validate: {
            try RequestValidation.check(request)
            try self.checkQuota(cost: 256 + request.key.count + request.value.count)
        }) { response in
            guard case .put(let put) = response else { return nil }
            return put
        }
    }

    func deleteRange(_ request: Etcdserverpb_DeleteRangeRequest, completion: @escaping @Sendable (Result<Etcdserverpb_DeleteRangeResponse, any Error>) -> Void) {
        submit(.deleteRange(request), completion, validate: { try RequestValidation.check(request) }) { response in
            guard case .deleteRange(let delete) = response else { return nil }
            return delete
        }
    }

    /// Read-only txns read SQLite, which does not belong on an event loop: they run as a task.
    func txn(_ request: Etcdserverpb_TxnRequest, completion: @escaping @Sendable (Result<Etcdserverpb_TxnResponse, any Error>) -> Void) {
        if RequestValidation.isReadOnly(request) {
            Task {
                do { completion(.success(try await self.readOnlyTxn(request))) } catch { completion(.failure(error)) }
            }
            return
        }
        submit(.txn(request), completion, validate: {
            try RequestValidation.check(request, maxTxnOps: self.config.maxTxnOps)
            let cost = Self.putCost(request)
            if cost > 0 { try self.checkQuota(cost: cost) }
        }) { response in
            guard case .txn(let txn) = response else { return nil }
            return txn
        }
    }

    private func submit<Response: HasHeader>(
        _ request: InternalRequest, _ completion: @escaping @Sendable (Result<Response, any Error>) -> Void,
        validate: () throws -> Void, extract: @escaping @Sendable (InternalResponse) -> Response?
    ) {
        let data: [UInt8]
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
