import Foundation
import NIOHPACK
import Synchronization
import Testing
@testable import EtcdLite
import EtcdLiteProto

/// A Watch stream whose client reads slowly, driven in process: the member's own watch handler
/// with a response writer that the test throttles or holds.
final class SlowReader: Sendable {
    private let received = Mutex<[Etcdserverpb_WatchResponse]>([])
    private let held = Mutex<Bool>(false)
    let delay: Duration

    init(delay: Duration, held: Bool = false) {
        self.delay = delay
        self.held.withLock { $0 = held }
    }

    func release() { held.withLock { $0 = false } }
    func hold() { held.withLock { $0 = true } }

    var responses: [Etcdserverpb_WatchResponse] { received.withLock { $0 } }

    var writer: ResponseWriter {
        ResponseWriter { messages in
            while self.held.withLock({ $0 }) { try await Task.sleep(for: .milliseconds(5)) }
            try await Task.sleep(for: self.delay)
            let decoded = try messages.map { try Etcdserverpb_WatchResponse(serializedBytes: $0) }
            self.received.withLock { $0 += decoded }
        }
    }

    func wait(timeout: Duration = .seconds(20), until done: ([Etcdserverpb_WatchResponse]) -> Bool) async -> [Etcdserverpb_WatchResponse] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if done(responses) { break }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return responses
    }
}

func createRequest(_ key: String, _ end: String, prevKV: Bool = false) -> [UInt8] {
    var request = Etcdserverpb_WatchRequest()
    request.createRequest.key = Data(key)
    request.createRequest.rangeEnd = Data(end)
    request.createRequest.prevKv = prevKV
    return try! request.serializedBytes()
}

@Suite(.serialized, .timeLimit(.minutes(2))) struct WatchBacklogTests {
    @Test func aSlowWatcherNeverBlocksWritersAndCatchesUpFromHistory() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let server = try makeServer(dir) { $0.watchStreamQueueBytes = 16 << 10 }
        defer { server.close() }
        let reader = SlowReader(delay: .milliseconds(20))
        let (requests, input) = AsyncStream.makeStream(of: [UInt8].self)
        let stream = Task { try await server.watch(requests, reader.writer, CallContext(headers: HPACKHeaders())) }
        defer { stream.cancel() }
        input.yield(createRequest("s", "t", prevKV: true))
        // The writes must come after the watcher exists (on a loaded machine the answer may take a
        // while: writing before it came made the watcher start at revision 3, not 2).
        let created = await reader.wait(timeout: .seconds(90)) { $0.contains(where: \.created) }
        let wasCreated = created.contains(where: \.created)
        try #require(wasCreated, "the watch was not created")
        // 1,200 writes of 200 bytes each: far more than the stream may queue. The client stops
        // reading during the first 400 (so its queue overflows whatever the machine's speed), then
        // reads slowly. (With 3,000 sequential durable writes the test once ran past its
        // two-minute limit in CI, beside the cluster tests; alone it takes about 2 s.)
        let writes = 1_200
        reader.hold()
        let started = ContinuousClock.now
        for i in 0..<writes {
            if i == 400 { reader.release() }
            _ = try await server.put(put("s\(i % 10)", "\(i)" + String(repeating: ".", count: 200)))
        }
        let writing = ContinuousClock.now - started
        let seen = await reader.wait { $0.flatMap(\.events).count >= writes }
        let events = seen.flatMap(\.events)
        let revisions = events.map(\.kv.modRevision)
        // On a failure, say where the sequence breaks rather than printing 3,000 numbers.
        let firstBreak = zip(revisions, Int64(2)...).first { $0 != $1 }
        #expect(revisions == Array(2...Int64(writes + 1)),
                "in order, no gaps, no duplicates: \(revisions.count) events, first \(revisions.first ?? -1), last \(revisions.last ?? -1), first break \(String(describing: firstBreak)), \(seen.count) responses, stats \(server.watchHub.stats)")
        for (n, event) in events.enumerated() {
            #expect(event.kv.value.starts(with: Data("\(n)".utf8)))
            if n >= 10 { #expect(event.prevKv.modRevision == event.kv.modRevision - 10) }
        }
        let stats = server.watchHub.stats
        #expect(stats.fallbacks > 0, "the watcher fell back to history")
        #expect(stats.peakQueuedBytes <= (16 << 10) + 2_000, "the queue stayed bounded")
        // The reader took at least 20 ms per write call; the writers did not wait for it.
        #expect(seen.count >= 2)
        print("\(writes) writes took \(writing) with a slow watcher; \(stats.fallbacks) fallbacks, \(seen.count) responses")
    }

    @Test func compactionPassingABehindWatcherCancelsIt() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let server = try makeServer(dir) { $0.watchStreamQueueBytes = 4 << 10 }
        defer { server.close() }
        let reader = SlowReader(delay: .zero, held: true)
        let (requests, input) = AsyncStream.makeStream(of: [UInt8].self)
        let stream = Task { try await server.watch(requests, reader.writer, CallContext(headers: HPACKHeaders())) }
        defer { stream.cancel() }
        input.yield(createRequest("c", "d"))
        while server.watchHub.watcherCount == 0 { try await Task.sleep(for: .milliseconds(5)) }
        for i in 0..<200 { _ = try await server.put(put("c\(i)", String(repeating: "x", count: 100))) }
        var compact = Etcdserverpb_CompactionRequest()
        compact.revision = 150
        _ = try await server.compact(compact)
        reader.release()
        let seen = await reader.wait { $0.contains { $0.canceled } }
        let events = seen.flatMap(\.events)
        let cancel = seen.last!
        #expect(cancel.canceled && cancel.compactRevision == 150)
        // What arrived before the cancel is a gap-free prefix from the start.
        #expect(!events.isEmpty && events.map(\.kv.modRevision) == Array(2...Int64(events.count + 1)))
        #expect(events.count < 149)
    }

    /// Streams cancelled (a client going away) while writes wake their senders: the hub used to
    /// resume a sender under its lock while a cancellation, holding the task's status lock, waited
    /// for that lock — a deadlock found by `etcdlite verify` (a member stopped answering).
    @Test(.timeLimit(.minutes(1))) func cancellingStreamsWhileWritesWakeThemDoesNotDeadlock() async throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let server = try makeServer(dir)
        defer { server.close() }
        let writer = Task {
            var n = 0
            while !Task.isCancelled {
                n += 1
                _ = try? await server.put(put("d\(n % 50)", "\(n)"))
            }
        }
        defer { writer.cancel() }
        for _ in 0..<300 {
            let reader = SlowReader(delay: .zero)
            let (requests, input) = AsyncStream.makeStream(of: [UInt8].self)
            let stream = Task { try await server.watch(requests, reader.writer, CallContext(headers: HPACKHeaders())) }
            input.yield(createRequest("d", "e"))
            try await Task.sleep(for: .milliseconds(Int.random(in: 0...3)))
            stream.cancel()
            _ = await stream.result
        }
        // The hub still serves: a new watcher gets the next write.
        let reader = SlowReader(delay: .zero)
        let (requests, input) = AsyncStream.makeStream(of: [UInt8].self)
        let stream = Task { try await server.watch(requests, reader.writer, CallContext(headers: HPACKHeaders())) }
        defer { stream.cancel() }
        input.yield(createRequest("d", "e"))
        let seen = await reader.wait { !$0.flatMap(\.events).isEmpty }
        #expect(!seen.flatMap(\.events).isEmpty)
    }
}
