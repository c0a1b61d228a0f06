import Foundation
import CoreMetrics
import Metrics
import Prometheus
import Synchronization

/// The member's metrics under etcd's names, so existing etcd dashboards and alerts work. They are
/// recorded through swift-metrics into this member's own Prometheus registry (no global
/// bootstrap, so several embedded members keep theirs apart) and served at `/metrics`.
final class MemberMetrics: Sendable {
    let registry: PrometheusCollectorRegistry
    private let factory: PrometheusMetricsFactory

    let hasLeader: CoreMetrics.Gauge
    let isLeader: CoreMetrics.Gauge
    let leaderChanges: CoreMetrics.Counter
    let proposalsCommitted: CoreMetrics.Counter
    let proposalsApplied: CoreMetrics.Counter
    let proposalsPending: CoreMetrics.Gauge
    let proposalsFailed: CoreMetrics.Counter
    let walFsync: CoreMetrics.Timer
    let backendCommit: CoreMetrics.Timer
    let dbSize: CoreMetrics.Gauge
    let dbSizeInUse: CoreMetrics.Gauge
    let keys: CoreMetrics.Gauge
    private let processCPU: CoreMetrics.FloatingPointCounter
    private let residentMemory: CoreMetrics.Gauge
    private let virtualMemory: CoreMetrics.Gauge
    private let openFDs: CoreMetrics.Gauge
    private let maxFDs: CoreMetrics.Gauge
    private let startTime: CoreMetrics.Gauge
    private let cpuSeen = Mutex<Double>(0)
    private struct RPCKey: Hashable {
        let handled: Bool
        let path: String
        let code: Int
    }
    private let grpc = Mutex<[RPCKey: CoreMetrics.Counter]>([:])

    /// etcd's buckets for disk latencies: 1 ms doubling to ~8 s.
    static let diskBuckets: [Duration] = (0..<14).map { .microseconds(1_000 << $0) }

    init() {
        registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.durationHistogramBuckets = [
            "etcd_disk_wal_fsync_duration_seconds": Self.diskBuckets,
            "etcd_disk_backend_commit_duration_seconds": Self.diskBuckets,
        ]
        self.factory = factory
        hasLeader = CoreMetrics.Gauge(label: "etcd_server_has_leader", factory: factory)
        isLeader = CoreMetrics.Gauge(label: "etcd_server_is_leader", factory: factory)
        leaderChanges = CoreMetrics.Counter(label: "etcd_server_leader_changes_seen_total", factory: factory)
        proposalsCommitted = CoreMetrics.Counter(label: "etcd_server_proposals_committed_total", factory: factory)
        proposalsApplied = CoreMetrics.Counter(label: "etcd_server_proposals_applied_total", factory: factory)
        proposalsPending = CoreMetrics.Gauge(label: "etcd_server_proposals_pending", factory: factory)
        proposalsFailed = CoreMetrics.Counter(label: "etcd_server_proposals_failed_total", factory: factory)
        walFsync = CoreMetrics.Timer(label: "etcd_disk_wal_fsync_duration_seconds", factory: factory)
        backendCommit = CoreMetrics.Timer(label: "etcd_disk_backend_commit_duration_seconds", factory: factory)
        dbSize = CoreMetrics.Gauge(label: "etcd_mvcc_db_total_size_in_bytes", factory: factory)
        dbSizeInUse = CoreMetrics.Gauge(label: "etcd_mvcc_db_total_size_in_use_in_bytes", factory: factory)
        keys = CoreMetrics.Gauge(label: "etcd_debugging_mvcc_keys_total", factory: factory)
        processCPU = CoreMetrics.FloatingPointCounter(label: "process_cpu_seconds_total", factory: factory)
        residentMemory = CoreMetrics.Gauge(label: "process_resident_memory_bytes", factory: factory)
        virtualMemory = CoreMetrics.Gauge(label: "process_virtual_memory_bytes", factory: factory)
        openFDs = CoreMetrics.Gauge(label: "process_open_fds", factory: factory)
        maxFDs = CoreMetrics.Gauge(label: "process_max_fds", factory: factory)
        startTime = CoreMetrics.Gauge(label: "process_start_time_seconds", factory: factory)
        startTime.record(Date().timeIntervalSince1970)
        proposalsFailed.increment(by: 0)
    }

    // MARK: - gRPC (go-grpc-prometheus's names and labels)

    static func type(of path: String) -> String {
        switch path {
        case "/etcdserverpb.Watch/Watch", "/etcdserverpb.Lease/LeaseKeepAlive": "bidi_stream"
        case "/etcdserverpb.Maintenance/Snapshot": "server_stream"
        default: "unary"
        }
    }

    static let codeNames = ["OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound", "AlreadyExists",
                            "PermissionDenied", "ResourceExhausted", "FailedPrecondition", "Aborted", "OutOfRange",
                            "Unimplemented", "Internal", "Unavailable", "DataLoss", "Unauthenticated"]

    private func grpcCounter(_ name: String, _ path: String, code: Int?) -> CoreMetrics.Counter {
        let key = RPCKey(handled: code != nil, path: path, code: code ?? -1)
        if let counter = grpc.withLock({ $0[key] }) { return counter }
        let parts = path.dropFirst().split(separator: "/")
        // Labels in go-grpc-prometheus's (alphabetical) order.
        var dimensions = [("grpc_method", parts.count > 1 ? String(parts[1]) : path),
                          ("grpc_service", String(parts.first ?? "")), ("grpc_type", Self.type(of: path))]
        if let code { dimensions.insert(("grpc_code", code < Self.codeNames.count ? Self.codeNames[code] : "Unknown"), at: 0) }
        let counter = CoreMetrics.Counter(label: name, dimensions: dimensions, factory: factory)
        grpc.withLock { $0[key] = counter }
        return counter
    }

    func rpcStarted(_ path: String) {
        grpcCounter("grpc_server_started_total", path, code: nil).increment()
    }

    func rpcHandled(_ path: String, code: Int) {
        grpcCounter("grpc_server_handled_total", path, code: code).increment()
    }

    // MARK: - Exposition

    /// Prometheus text, after refreshing what is sampled at scrape time.
    func render(status: StoreStatus, keyCount: Int?) -> String {
        dbSize.record(Double(status.dbSize))
        dbSizeInUse.record(Double(status.dbSizeInUse))
        if let keyCount { keys.record(Double(keyCount)) }
        sampleProcess()
        return registry.emitToString()
    }

    private func sampleProcess() {
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        if let stat = try? String(contentsOfFile: "/proc/self/stat", encoding: .utf8),
           let close = stat.lastIndex(of: ")") {
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            // Fields after the command: state is 0, utime 11, stime 12, vsize 20, rss 21 (pages).
            if fields.count > 21, let user = Double(fields[11]), let system = Double(fields[12]) {
                let total = (user + system) / ticks
                let delta = cpuSeen.withLock { seen -> Double in
                    defer { seen = max(seen, total) }
                    return max(0, total - seen)
                }
                processCPU.increment(by: delta)
                if let vsize = Double(fields[20]) { virtualMemory.record(vsize) }
                if let rss = Double(fields[21]) { residentMemory.record(rss * Double(sysconf(Int32(_SC_PAGESIZE)))) }
            }
        }
        if let fds = try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd") { openFDs.record(Double(fds.count)) }
        var limit = rlimit()
        if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &limit) == 0 { maxFDs.record(Double(limit.rlim_cur)) }
    }
}
