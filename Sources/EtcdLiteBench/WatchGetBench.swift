import EtcdLiteClient
import EtcdLiteProto
import Foundation
import Synchronization

/// etcd's `watch-get`: gets of a key while many watchers of it are unsynced, replaying its
/// history from the first revision (the cost a watch catch-up puts on reads).
public struct WatchGetBench: Sendable {
    public var endpoint: Endpoint
    public var watchers = 1_000
    public var streams = 4
    /// Revisions of the key written first (what each watcher replays).
    public var revisions = 1_000
    public var gets = 1_000
    public var clients = 8

    public init(endpoint: Endpoint) { self.endpoint = endpoint }

    public struct Result: Sendable, Codable {
        public var watchers: Int
        public var eventsExpected: Int
        public var eventsReceived: Int
        public var gets: Int
        public var getLatency: LatencySummary
        public var getsPerSecond: Double
        public var errors: [String: Int]
    }

    public func run() async throws -> Result {
        let key = Data("watch-get-key".utf8)
        let setup = try await endpoint.connect()
        defer { Task { await setup.close() } }
        var put = Etcdserverpb_PutRequest()
        put.key = key
        var first: Int64 = 0
        for n in 0..<revisions {
            put.value = Data("value-\(n)".utf8)
            let response = try Etcdserverpb_PutResponse(serializedBytes: try await setup.unary("/etcdserverpb.KV/Put", try put.serializedBytes()))
            if n == 0 { first = response.header.revision }
        }
        // The watchers, each from the key's first revision: all of them start unsynced.
        var connections: [GRPCClientConnection] = []
        var calls: [ClientCall] = []
        let counter = EventCounter()
        for s in 0..<max(1, streams) {
            let connection = try await endpoint.connect()
            connections.append(connection)
            var create = Etcdserverpb_WatchCreateRequest()
            create.key = key
            create.startRevision = first
            var request = Etcdserverpb_WatchRequest()
            request.createRequest = create
            let count = watchers / max(1, streams) + (s < watchers % max(1, streams) ? 1 : 0)
            let message = try request.serializedBytes() as [UInt8]
            calls.append(connection.start("/etcdserverpb.Watch/Watch", messages: Array(repeating: message, count: count),
                                          endRequest: false, observer: counter))
        }
        defer {
            for call in calls { call.cancel() }
            for connection in connections { Task { await connection.close() } }
        }
        // Meanwhile, gets of the key.
        let recorder = LatencyRecorder()
        let errors = ErrorCounter()
        var get = Etcdserverpb_RangeRequest()
        get.key = key
        let body = try get.serializedBytes() as [UInt8]
        let start = monotonicNanos()
        counter.remainingGets.store(gets, ordering: .relaxed)
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<max(1, clients) {
                group.addTask {
                    while counter.remainingGets.subtract(1, ordering: .relaxed).newValue >= 0 {
                        let began = monotonicNanos()
                        do {
                            _ = try await setup.unary("/etcdserverpb.KV/Range", body)
                            recorder.record(monotonicNanos() - began)
                        } catch {
                            errors.add("\(error)")
                        }
                    }
                }
            }
        }
        let seconds = Double(monotonicNanos() - start) / 1e9
        let expected = watchers * revisions
        _ = await waitUntil(timeout: 30) { counter.events >= expected }
        return Result(watchers: watchers, eventsExpected: expected, eventsReceived: counter.events, gets: recorder.count,
                      getLatency: recorder.summary(), getsPerSecond: Double(recorder.count) / seconds, errors: errors.all)
    }

    final class EventCounter: ClientCallObserver, @unchecked Sendable {
        private let count = Atomic<Int>(0)
        /// Gets still to send (shared by the get clients).
        let remainingGets = Atomic<Int>(0)
        var events: Int { count.load(ordering: .relaxed) }
        func received(_ message: [UInt8]) {
            guard let response = try? Etcdserverpb_WatchResponse(serializedBytes: message) else { return }
            count.add(response.events.count, ordering: .relaxed)
        }
        func closed(_ status: ClientStatus) {}
    }
}
