import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Synchronization
import EtcdLiteProto

typealias Client = GRPCClient<HTTP2ClientTransport.Posix>

/// A Watch stream driven step by step from a test: send requests, wait for responses.
final class WatchSession: Sendable {
    private let requests: AsyncStream<Etcdserverpb_WatchRequest>.Continuation
    private let received = Mutex<[Etcdserverpb_WatchResponse]>([])
    let endStatus = Mutex<String?>(nil)

    init(_ requests: AsyncStream<Etcdserverpb_WatchRequest>.Continuation) {
        self.requests = requests
    }

    func append(_ response: Etcdserverpb_WatchResponse) { received.withLock { $0.append(response) } }

    var responses: [Etcdserverpb_WatchResponse] { received.withLock { $0 } }

    func send(_ request: Etcdserverpb_WatchRequest) { requests.yield(request) }

    /// Half-closes the stream: no more requests.
    func finishSending() { requests.finish() }

    func create(_ key: String, _ rangeEnd: String = "", start: Int64 = 0, prevKV: Bool = false, id: Int64 = 0,
                filters: [Etcdserverpb_WatchCreateRequest.FilterType] = [], fragment: Bool = false, progressNotify: Bool = false) {
        var create = Etcdserverpb_WatchCreateRequest()
        create.key = Data(key)
        create.rangeEnd = Data(rangeEnd)
        create.startRevision = start
        create.prevKv = prevKV
        create.watchID = id
        create.filters = filters
        create.fragment = fragment
        create.progressNotify = progressNotify
        var request = Etcdserverpb_WatchRequest()
        request.createRequest = create
        send(request)
    }

    func cancel(_ id: Int64) {
        var request = Etcdserverpb_WatchRequest()
        request.cancelRequest.watchID = id
        send(request)
    }

    func requestProgress() {
        var request = Etcdserverpb_WatchRequest()
        request.progressRequest = Etcdserverpb_WatchProgressRequest()
        send(request)
    }

    /// Waits (bounded) until `done` holds for the responses so far; returns them either way.
    @discardableResult
    func wait(timeout: Duration = .seconds(10), until done: ([Etcdserverpb_WatchResponse]) -> Bool) async -> [Etcdserverpb_WatchResponse] {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            let seen = responses
            if done(seen) { return seen }
            try? await Task.sleep(for: .milliseconds(10))
        }
        return responses
    }

    func events(of id: Int64) -> [Mvccpb_Event] {
        responses.filter { $0.watchID == id }.flatMap(\.events)
    }
}

/// Opens a Watch stream for `body`; the stream is cancelled when `body` returns.
func withWatchSession<T: Sendable>(_ client: Client, metadata: Metadata = [:], _ body: (WatchSession) async throws -> T) async throws -> T {
    let (stream, continuation) = AsyncStream.makeStream(of: Etcdserverpb_WatchRequest.self)
    let session = WatchSession(continuation)
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask {
            do {
                try await Etcdserverpb_Watch.Client(wrapping: client).watch(
                    request: StreamingClientRequest(metadata: metadata) { writer in
                        for await request in stream { try await writer.write(request) }
                    }
                ) { response in
                    for try await message in response.messages { session.append(message) }
                    session.endStatus.withLock { $0 = "ok" }
                }
            } catch let error as RPCError {
                session.endStatus.withLock { $0 = "\(error.code): \(error.message)" }
            }
        }
        let result = try await body(session)
        continuation.finish()
        group.cancelAll()
        do { try await group.waitForAll() } catch {}
        return result
    }
}

/// The end of the range that holds every key with `prefix`.
func prefixEnd(_ prefix: String) -> String {
    var bytes = Array(prefix.utf8)
    while let last = bytes.last {
        if last < 0xFF {
            bytes[bytes.count - 1] = last + 1
            return String(decoding: bytes, as: UTF8.self)
        }
        bytes.removeLast()
    }
    return "\0"
}

/// A response in words, without the ids that differ between servers: what differential tests compare.
func describe(_ response: Etcdserverpb_WatchResponse, withHeader: Bool = true) -> String {
    var parts: [String] = []
    if response.created { parts.append("created") }
    if response.canceled { parts.append("canceled") }
    if !response.cancelReason.isEmpty { parts.append("reason=\(response.cancelReason)") }
    if response.compactRevision != 0 { parts.append("compact=\(response.compactRevision)") }
    if response.fragment { parts.append("fragment") }
    if withHeader || response.events.isEmpty { parts.append("rev=\(response.header.revision)") }
    if response.events.isEmpty && !response.created && !response.canceled { parts.append("progress") }
    return parts.joined(separator: " ")
}

func describe(_ event: Mvccpb_Event) -> String {
    var text = "\(event.type == .put ? "PUT" : "DELETE") \(describe(event.kv))"
    if event.hasPrevKv { text += " prev=[\(describe(event.prevKv))]" }
    return text
}

func describe(_ kv: Mvccpb_KeyValue) -> String {
    "\(String(decoding: kv.key, as: UTF8.self))=\(String(decoding: kv.value, as: UTF8.self)) c\(kv.createRevision) m\(kv.modRevision) v\(kv.version) l\(kv.lease)"
}

/// Per watch ID: its control responses and its events, flattened (servers may batch revisions
/// differently; what each watcher sees must be the same).
func transcript(_ responses: [Etcdserverpb_WatchResponse]) -> [Int64: [String]] {
    var out: [Int64: [String]] = [:]
    for response in responses {
        if response.events.isEmpty || response.created || response.canceled {
            out[response.watchID, default: []].append(describe(response))
        }
        for event in response.events { out[response.watchID, default: []].append(describe(event)) }
    }
    return out
}
