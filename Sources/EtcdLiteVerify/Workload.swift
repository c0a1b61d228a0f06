import EtcdLiteBench
import EtcdLiteClient
import EtcdLiteProto
import Foundation
import NIOCore
import Raft
import Synchronization

/// Everything the clients recorded.
final class Recorder: Sendable {
    struct State {
        var history: [KVLinearizability.Operation] = []
        var acknowledged: [AcknowledgedWrite] = []
        /// Serializable reads: key and value seen (not linearizable by design: checked for phantoms).
        var serializableReads: [(key: String, value: String?)] = []
        /// Every value any client tried to write, by key.
        var attempted: [String: Set<String>] = [:]
        var counts: [String: Int] = [:]
        var errors: [String: Int] = [:]
    }

    let state = Mutex(State())

    func count(_ name: String) { state.withLock { $0.counts[name, default: 0] += 1 } }
    func error(_ message: String) {
        // Connection failures name a port: one line for all of them.
        let key = message.contains("Connection refused") ? "connection refused" : message
        state.withLock { $0.errors[key, default: 0] += 1 }
    }
}

/// A client's connection to one member, replaced by another member's when it fails.
final class MemberConnection: @unchecked Sendable {
    let cluster: VerifyCluster
    var member = -1
    var connection: GRPCClientConnection?
    var generator: SeededRandom

    init(cluster: VerifyCluster, seed: UInt64) {
        self.cluster = cluster
        generator = SeededRandom(seed: seed)
    }

    func get() async throws -> GRPCClientConnection {
        if let connection, connection.isActive { return connection }
        let choice = Int.random(in: 0..<cluster.count, using: &generator)
        member = choice
        let connection = try await cluster.connect(choice)
        self.connection = connection
        return connection
    }

    func drop() {
        if let connection { Task { await connection.close() } }
        connection = nil
    }

    func unary(_ path: String, _ request: [UInt8], timeout: TimeAmount = .seconds(3)) async throws -> [UInt8] {
        let connection = try await get()
        do {
            return try await connection.unary(path, request, timeout: timeout)
        } catch let status as ClientStatus {
            // A member that does not answer in time or lost its connection: try another next.
            if status.code == 4 || status.code == 14 || status.code == 1 { drop() }
            throw status
        }
    }
}

enum KVClient {
    /// Runs one client until `deadline`: put, linearizable and serializable get, delete and
    /// compare-and-swap on a few keys of the current epoch (keys change every `epochSeconds`, which
    /// keeps each key's history short enough to check).
    static func run(client: Int, cluster: VerifyCluster, recorder: Recorder, prefix: String, keys: Int,
                    epochSeconds: Double, interval: Duration, seed: UInt64, start: UInt64, deadline: UInt64) async {
        let member = MemberConnection(cluster: cluster, seed: seed)
        var random = SeededRandom(seed: seed ^ 0xABCD)
        var sequence = 0
        var lastSeen: [String: String?] = [:]
        while monotonicNanos() < deadline && !Task.isCancelled {
            sequence += 1
            let epoch = Int(Double(monotonicNanos() - start) / 1e9 / epochSeconds)
            let key = "\(prefix)e\(epoch)/k\(Int.random(in: 0..<keys, using: &random))"
            let value = "c\(client)-\(sequence)"
            let choice = Int.random(in: 0..<100, using: &random)
            let input: KVLinearizability.Input
            var serializable = false
            switch choice {
            case 0..<25: input = .put(value)
            case 25..<45: input = .get
            case 45..<55:
                input = .get
                serializable = true
            case 55..<70: input = .delete
            default: input = .compareAndSwap(expected: lastSeen[key] ?? nil, new: value)
            }
            if case .put = input { recorder.state.withLock { _ = $0.attempted[key, default: []].insert(value) } }
            if case .compareAndSwap = input { recorder.state.withLock { _ = $0.attempted[key, default: []].insert(value) } }
            let invoked = monotonicNanos()
            let (output, revision) = await perform(input, key: key, serializable: serializable, on: member, recorder: recorder)
            let returned = monotonicNanos()
            if case .value(let v) = output { lastSeen[key] = v }
            if serializable {
                if case .value(let v) = output { recorder.state.withLock { $0.serializableReads.append((key, v)) } }
            } else if !(input == .get && output == .unknown) {  // a read that failed did nothing
                let operation = KVLinearizability.Operation(client: client, key: key, input: input, output: output,
                                                            invoked: invoked, returned: returned)
                recorder.state.withLock { state in
                    state.history.append(operation)
                    switch (input, output) {
                    case (.put(let v), .ok):
                        state.acknowledged.append(AcknowledgedWrite(key: key, kind: .put, value: v, revision: revision))
                    case (.compareAndSwap(_, let v), .swapped(true)):
                        state.acknowledged.append(AcknowledgedWrite(key: key, kind: .put, value: v, revision: revision))
                    case (.delete, .deleted(let n)) where n > 0:
                        state.acknowledged.append(AcknowledgedWrite(key: key, kind: .delete, value: "", revision: revision))
                    default: break
                    }
                }
            }
            try? await Task.sleep(for: interval)
        }
        member.drop()
    }

    static func perform(_ input: KVLinearizability.Input, key: String, serializable: Bool, on member: MemberConnection,
                        recorder: Recorder) async -> (KVLinearizability.Output, Int64) {
        do {
            let result = try await LinearizabilityBench.perform(input, key: key, serializable: serializable) {
                try await member.unary($0, $1)
            }
            switch input {
            case .put: recorder.count("put")
            case .get: recorder.count(serializable ? "get-serializable" : "get")
            case .delete: recorder.count("delete")
            case .compareAndSwap: recorder.count("txn")
            }
            return result
        } catch {
            recorder.error("\(error)")
            return (.unknown, 0)
        }
    }
}

/// A watcher of the workload's prefix that moves between members: it opens a stream on a random
/// member from the revision after the last event it saw, keeps it for a while (or until it
/// breaks), and records each stream as a session.
final class Watcher: @unchecked Sendable {
    let name: String
    let cluster: VerifyCluster
    let prefix: String
    private(set) var sessions: [WatchStreamRecord] = []
    private let nextRevision: Mutex<Int64>
    /// The revision the watcher asks for next (read by other tasks).
    var next: Int64 {
        get { nextRevision.withLock { $0 } }
        set { nextRevision.withLock { $0 = newValue } }
    }
    private var random: SeededRandom

    init(name: String, cluster: VerifyCluster, prefix: String, from: Int64, seed: UInt64) {
        self.name = name
        self.cluster = cluster
        self.prefix = prefix
        nextRevision = Mutex(from)
        random = SeededRandom(seed: seed)
    }

    /// Runs until `stop()` says so and the watcher has reached `through()` (or `giveUp` passes).
    func run(stop: @escaping @Sendable () -> Bool, through: @escaping @Sendable () -> Int64?, giveUp: @escaping @Sendable () -> Bool) async {
        while !Task.isCancelled {
            if stop(), let through = through(), next > through || giveUp() { return }
            let member = Int.random(in: 0..<cluster.count, using: &random)
            let keep = Double.random(in: 5...15, using: &random)
            guard let connection = try? await cluster.connect(member) else {
                try? await Task.sleep(for: .milliseconds(200))
                continue
            }
            let observer = StreamObserver()
            let call = connection.start("/etcdserverpb.Watch/Watch", messages: [LinearizabilityBench.watchPrefix(prefix, from: next)],
                                        endRequest: false, observer: observer)
            let started = Date()
            var session = WatchStreamRecord(member: member, start: next, events: [])
            var consumed = 0
            while !Task.isCancelled {
                try? await Task.sleep(for: .milliseconds(50))
                let (messages, closed) = observer.take(from: consumed)
                consumed += messages.count
                var canceled = false
                for bytes in messages {
                    guard let response = try? Etcdserverpb_WatchResponse(serializedBytes: bytes) else { continue }
                    if response.canceled { canceled = true }
                    for event in response.events { session.events.append(Self.record(event)) }
                }
                if let last = session.events.last { next = last.modRevision + 1 }
                if closed || canceled { break }
                if Date().timeIntervalSince(started) > keep { break }
                if stop(), let through = through(), next > through || giveUp() { break }
            }
            call.cancel()
            await connection.close()
            sessions.append(session)
        }
    }

    static func record(_ event: Mvccpb_Event) -> WatchedEvent {
        WatchedEvent(key: String(decoding: event.kv.key, as: UTF8.self), isPut: event.type == .put,
                     value: String(decoding: event.kv.value, as: UTF8.self), modRevision: event.kv.modRevision,
                     createRevision: event.kv.createRevision, version: event.kv.version,
                     prevValue: event.hasPrevKv ? String(decoding: event.prevKv.value, as: UTF8.self) : nil,
                     prevModRevision: event.hasPrevKv ? event.prevKv.modRevision : 0)
    }
}

/// Collects a streaming call's messages (on the connection's event loop) for a task to read.
final class StreamObserver: ClientCallObserver, Sendable {
    private let state = Mutex<(messages: [[UInt8]], closed: Bool)>(([], false))

    func received(_ message: [UInt8]) { state.withLock { $0.messages.append(message) } }
    func closed(_ status: ClientStatus) { state.withLock { $0.closed = true } }

    func take(from index: Int) -> ([[UInt8]], Bool) {
        state.withLock { (Array($0.messages[index...]), $0.closed) }
    }

    var count: Int { state.withLock { $0.messages.count } }
}
