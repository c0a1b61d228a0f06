import EtcdLiteClient
import EtcdLiteProto
import Foundation
import Histogram
import Synchronization

/// A mix modelled on how kube-apiserver's etcd3 storage uses etcd: creates (Txn: mod_revision = 0
/// → put, else get), compare-and-swap updates on the mod_revision last seen (else get), gets,
/// paginated lists at a pinned revision (limit 500, continuing after the last key), count-only
/// ranges, events written with one reused lease, and one shared watch stream over the prefix
/// that receives every change.
public struct ApiserverBench: Sendable {
    public var endpoints: [Endpoint]
    public var conns = 2
    public var clients = 16
    public var duration = 10.0
    public var objects = 1_000
    public var valueSize = 1_024
    public var prefix = "/registry-bench/"
    /// Keep the shared watch stream open (as kube-apiserver's watch cache does).
    public var watch = true

    public init(endpoints: [Endpoint]) { self.endpoints = endpoints }

    public enum Kind: String, CaseIterable, Sendable, Codable {
        case create, update, get, list, count, event
        /// Share of the mix, in percent.
        var weight: Int {
            switch self {
            case .create: 10
            case .update: 35
            case .get: 20
            case .list: 5
            case .count: 5
            case .event: 25
            }
        }
    }

    public struct Result: Sendable, Codable {
        public struct PerKind: Sendable, Codable {
            public var kind: Kind
            public var requests: Int
            public var p50: Double
            public var p99: Double
            public var slowest: Double
        }
        public var seconds: Double
        public var operations: Int
        public var operationsPerSecond: Double
        public var kinds: [PerKind]
        /// Changes the shared watch stream reported, and the writes that succeeded.
        public var watchEvents: Int
        public var writes: Int
        public var conflicts: Int
        public var errors: [String: Int]

        public var text: String {
            var lines = [String(format: "apiserver mix: %d operations in %.2f s = %.0f/s; %d writes, %d conflicts (CAS lost), watch saw %d events",
                                operations, seconds, operationsPerSecond, writes, conflicts, watchEvents),
                         "kind        requests      p50 ms      p99 ms  slowest ms"]
            for k in kinds {
                lines.append(k.kind.rawValue.padding(toLength: 10, withPad: " ", startingAt: 0)
                             + String(format: " %9d %11.3f %11.3f %11.3f", k.requests, k.p50, k.p99, k.slowest))
            }
            lines.append("errors: \(errors.isEmpty ? "none" : errors.sorted { $0.key < $1.key }.map { "[\($0.value)] \($0.key)" }.joined(separator: ", "))")
            return lines.joined(separator: "\n")
        }
    }

    final class Stats: Sendable {
        struct State {
            var histograms: [Kind: Histogram<UInt64>] = [:]
            var errors: [String: Int] = [:]
            var writes = 0
            var conflicts = 0
        }
        let state = Mutex(State())
        /// Each object's mod_revision as last seen by anyone.
        let revisions = Mutex<[Int: Int64]>([:])
        /// The next event's number.
        let nextEvent = Atomic<Int>(0)

        func record(_ kind: Kind, _ nanos: UInt64) {
            state.withLock { state in
                _ = state.histograms[kind, default: Histogram(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)]
                    .record(max(1, nanos))
            }
        }
        func error(_ message: String) { state.withLock { $0.errors[message, default: 0] += 1 } }
        func wrote(conflict: Bool) {
            state.withLock {
                if conflict { $0.conflicts += 1 } else { $0.writes += 1 }
            }
        }
    }

    public func run() async throws -> Result {
        var connections: [GRPCClientConnection] = []
        for n in 0..<max(1, conns) { connections.append(try await endpoints[n % endpoints.count].connect()) }
        defer { for connection in connections { Task { await connection.close() } } }
        let first = connections[0]
        // A clean prefix, one lease for the events (as the apiserver reuses one per minute).
        var clear = Etcdserverpb_DeleteRangeRequest()
        clear.key = Data(prefix.utf8)
        clear.rangeEnd = LinearizabilityBench.prefixEnd(Data(prefix.utf8))
        _ = try await first.unary("/etcdserverpb.KV/DeleteRange", try clear.serializedBytes())
        var grant = Etcdserverpb_LeaseGrantRequest()
        grant.ttl = 3_600
        let lease = try Etcdserverpb_LeaseGrantResponse(serializedBytes: try await first.unary("/etcdserverpb.Lease/LeaseGrant", try grant.serializedBytes())).id

        // The shared watch: every change under the prefix.
        let watched = WatchCounter()
        var create = Etcdserverpb_WatchCreateRequest()
        create.key = Data(prefix.utf8)
        create.rangeEnd = clear.rangeEnd
        var watchRequest = Etcdserverpb_WatchRequest()
        watchRequest.createRequest = create
        let stream = watch ? connections[connections.count - 1].start("/etcdserverpb.Watch/Watch", messages: [try watchRequest.serializedBytes()],
                                                                       endRequest: false, observer: watched) : nil
        defer { stream?.cancel() }
        if watch { _ = await waitUntil(timeout: 5) { watched.created } }

        let stats = Stats()
        let value = Data(repeating: 0x70, count: valueSize)
        let start = monotonicNanos()
        let deadline = start + UInt64(duration * 1e9)
        await withTaskGroup(of: Void.self) { group in
            for client in 0..<clients {
                let connection = connections[client % connections.count]
                group.addTask {
                    while monotonicNanos() < deadline {
                        let kind = Self.pick()
                        let began = monotonicNanos()
                        do {
                            try await self.perform(kind, on: connection, stats: stats, value: value, lease: lease)
                            stats.record(kind, monotonicNanos() - began)
                        } catch {
                            stats.error("\(kind.rawValue): \((error as? ClientStatus)?.message ?? "\(error)")")
                        }
                    }
                }
            }
        }
        let seconds = Double(monotonicNanos() - start) / 1e9
        let writes = stats.state.withLock { $0.writes }
        // The watch has until a second after the load to report every write.
        if watch { _ = await waitUntil(timeout: 2) { watched.events >= writes } }
        return stats.state.withLock { state in
            let kinds = Kind.allCases.compactMap { kind -> Result.PerKind? in
                guard let h = state.histograms[kind] else { return nil }
                return Result.PerKind(kind: kind, requests: Int(h.totalCount), p50: Double(h.valueAtPercentile(50)) / 1e6,
                                      p99: Double(h.valueAtPercentile(99)) / 1e6, slowest: Double(h.max) / 1e6)
            }
            let operations = kinds.reduce(0) { $0 + $1.requests }
            return Result(seconds: seconds, operations: operations, operationsPerSecond: Double(operations) / seconds, kinds: kinds,
                          watchEvents: watched.events, writes: state.writes, conflicts: state.conflicts, errors: state.errors)
        }
    }

    static func pick() -> Kind {
        var roll = Int.random(in: 0..<100)
        for kind in Kind.allCases {
            if roll < kind.weight { return kind }
            roll -= kind.weight
        }
        return .get
    }

    private func key(_ object: Int) -> Data { Data("\(prefix)pods/default/pod-\(object)".utf8) }

    private func perform(_ kind: Kind, on connection: GRPCClientConnection, stats: Stats, value: Data, lease: Int64) async throws {
        switch kind {
        case .create, .update:
            let object = Int.random(in: 0..<objects)
            let known = kind == .create ? 0 : (stats.revisions.withLock { $0[object] } ?? 0)
            var compare = Etcdserverpb_Compare()
            compare.key = key(object)
            compare.target = .mod
            compare.result = .equal
            compare.modRevision = known
            var put = Etcdserverpb_PutRequest()
            put.key = key(object)
            put.value = value
            var get = Etcdserverpb_RangeRequest()
            get.key = key(object)
            var txn = Etcdserverpb_TxnRequest()
            txn.compare = [compare]
            txn.success = [Etcdserverpb_RequestOp.with { $0.requestPut = put }]
            txn.failure = [Etcdserverpb_RequestOp.with { $0.requestRange = get }]
            let response = try Etcdserverpb_TxnResponse(serializedBytes: try await connection.unary("/etcdserverpb.KV/Txn", try txn.serializedBytes()))
            // The object's new resource version, or the one that won (the apiserver retries with it).
            let revision = response.succeeded ? response.header.revision : (response.responses.first?.responseRange.kvs.first?.modRevision ?? 0)
            stats.revisions.withLock { $0[object] = revision }
            stats.wrote(conflict: !response.succeeded)
        case .get:
            var get = Etcdserverpb_RangeRequest()
            get.key = key(Int.random(in: 0..<objects))
            _ = try await connection.unary("/etcdserverpb.KV/Range", try get.serializedBytes())
        case .list:
            // Pages of 500 at the revision of the first page.
            let begin = Data("\(prefix)pods/".utf8)
            var range = Etcdserverpb_RangeRequest()
            range.key = begin
            range.rangeEnd = LinearizabilityBench.prefixEnd(begin)
            range.limit = 500
            var pages = 0
            while pages < 100 {
                let page = try Etcdserverpb_RangeResponse(serializedBytes: try await connection.unary("/etcdserverpb.KV/Range", try range.serializedBytes()))
                pages += 1
                guard page.more, let last = page.kvs.last else { break }
                if range.revision == 0 { range.revision = page.header.revision }
                range.key = last.key + Data([0])
            }
        case .count:
            var range = Etcdserverpb_RangeRequest()
            range.key = Data("\(prefix)pods/".utf8)
            range.rangeEnd = LinearizabilityBench.prefixEnd(range.key)
            range.countOnly = true
            _ = try await connection.unary("/etcdserverpb.KV/Range", try range.serializedBytes())
        case .event:
            var put = Etcdserverpb_PutRequest()
            put.key = Data("\(prefix)events/default/event-\(stats.nextEvent.wrappingAdd(1, ordering: .relaxed).oldValue)".utf8)
            put.value = value.prefix(256)
            put.lease = lease
            _ = try await connection.unary("/etcdserverpb.KV/Put", try put.serializedBytes())
            stats.wrote(conflict: false)
        }
    }
}

/// Counts the events of a watch stream (and notices its creation).
final class WatchCounter: ClientCallObserver, @unchecked Sendable {
    private let state = Mutex((created: false, events: 0))
    var created: Bool { state.withLock { $0.created } }
    var events: Int { state.withLock { $0.events } }

    func received(_ message: [UInt8]) {
        guard let response = try? Etcdserverpb_WatchResponse(serializedBytes: message) else { return }
        state.withLock {
            if response.created { $0.created = true }
            $0.events += response.events.count
        }
    }

    func closed(_ status: ClientStatus) {}
}
