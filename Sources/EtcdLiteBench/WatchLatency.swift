import Foundation
import EtcdLiteClient
import EtcdLiteProto
import Synchronization

/// Watch fan-out: `watchers` watchers of one key spread over `streams` Watch streams, one writer
/// putting the key at `rate` per second. Each put carries its intended send time; each event's
/// latency is its arrival time minus that (open loop: a slow server cannot hide queueing).
public struct WatchLatencyBench: Sendable {
    public var endpoint: Endpoint
    public var watchers = 1_000
    public var streams = 10
    public var puts = 1_000
    public var rate = 100
    public var valueSize = 64

    public init(endpoint: Endpoint) { self.endpoint = endpoint }

    public struct Result: Sendable, Codable {
        public var watchers: Int
        public var streams: Int
        public var puts: Int
        public var eventsExpected: Int
        public var eventsReceived: Int
        public var latency: LatencySummary
        public var putLatency: LatencySummary
        public var errors: [String: Int]
    }

    final class StreamObserver: ClientCallObserver, @unchecked Sendable {
        let recorder: LatencyRecorder
        let created = Atomic<Int>(0)
        let events = Atomic<Int>(0)
        private var local: [UInt64] = []

        init(recorder: LatencyRecorder) { self.recorder = recorder }

        func received(_ message: [UInt8]) {
            guard let response = try? Etcdserverpb_WatchResponse(serializedBytes: message) else { return }
            if response.created { created.add(1, ordering: .relaxed) }
            guard !response.events.isEmpty else { return }
            let now = monotonicNanos()
            for event in response.events where event.kv.value.count >= 8 {
                let sent = event.kv.value.withUnsafeBytes { $0.loadUnaligned(as: UInt64.self) }
                local.append(now &- sent)
            }
            events.add(response.events.count, ordering: .relaxed)
            if local.count >= 1_000 { flush() }
        }

        func flush() {
            recorder.record(contentsOf: local)
            local.removeAll(keepingCapacity: true)
        }

        func closed(_ status: ClientStatus) {}
    }

    public func run() async throws -> Result {
        let recorder = LatencyRecorder()
        let putRecorder = LatencyRecorder()
        let errors = ErrorCounter()
        let key = Data("bench/watch-latency".utf8)
        var connections: [GRPCClientConnection] = []
        for _ in 0..<streams { connections.append(try await endpoint.connect()) }
        let writer = try await endpoint.connect()
        defer {
            let all = connections + [writer]
            Task { for connection in all { await connection.close() } }
        }
        var observers: [StreamObserver] = []
        var calls: [ClientCall] = []
        for s in 0..<streams {
            let count = watchers / streams + (s < watchers % streams ? 1 : 0)
            var create = Etcdserverpb_WatchRequest()
            create.createRequest.key = key
            let message: [UInt8] = try create.serializedBytes()
            let observer = StreamObserver(recorder: recorder)
            observers.append(observer)
            calls.append(connections[s].start("/etcdserverpb.Watch/Watch", messages: Array(repeating: message, count: count),
                                              endRequest: false, observer: observer))
        }
        guard await waitUntil(timeout: 30, { observers.reduce(0) { $0 + $1.created.load(ordering: .relaxed) } == watchers }) else {
            throw BenchError("watchers were not all created within 30 s")
        }
        let start = monotonicNanos() + 100_000_000
        let interval = 1_000_000_000 / UInt64(rate)
        for i in 0..<puts {
            let intended = start + UInt64(i) * interval
            await sleep(until: intended)
            var put = Etcdserverpb_PutRequest()
            put.key = key
            var value = Data(count: max(8, valueSize))
            value.withUnsafeMutableBytes { $0.storeBytes(of: intended, as: UInt64.self) }
            put.value = value
            _ = writer.start("/etcdserverpb.KV/Put", messages: [try put.serializedBytes()], endRequest: true,
                             observer: TimedCall(intended: intended, errors: errors) { _, latency in putRecorder.record(latency) })
        }
        let expected = puts * watchers
        _ = await waitUntil(timeout: 20) { observers.reduce(0) { $0 + $1.events.load(ordering: .relaxed) } >= expected }
        for call in calls { call.cancel() }
        // Let the cancels land on the event loops before reading the observers' last samples.
        try? await Task.sleep(for: .milliseconds(100))
        for (observer, connection) in zip(observers, connections) {
            try await connection.eventLoop.submit { observer.flush() }.get()
        }
        return Result(watchers: watchers, streams: streams, puts: puts, eventsExpected: expected,
                      eventsReceived: observers.reduce(0) { $0 + $1.events.load(ordering: .relaxed) },
                      latency: recorder.summary(), putLatency: putRecorder.summary(), errors: errors.all)
    }
}
