import Foundation
import EtcdLiteProto

extension EtcdLiteServer {
    /// One Watch stream: requests (create, cancel, progress) are handled as they arrive; a sender
    /// writes what the hub queues for the stream and catches its unsynced watchers up from
    /// history; a ticker sends progress notifications. Like etcd, the stream stays open after the
    /// client stops sending, until the call is cancelled.
    func watch(_ requests: AsyncStream<[UInt8]>, _ writer: ResponseWriter, _ context: CallContext) async throws {
        if context.metadata("hasleader") == "true" && !hasLeader { throw EtcdError.noLeader }
        let server = self
        let hub = watchHub
        let stream = hub.openStream()
        defer { hub.closeStream(stream) }
        let maxBytes = config.maxRequestBytes
        let interval = config.watchProgressNotifyInterval
        await withTaskGroup(of: Void.self) { group in
            group.addTask {
                for await bytes in requests {
                    guard let request = try? Etcdserverpb_WatchRequest(serializedBytes: bytes) else { break }
                    switch request.requestUnion {
                    case .createRequest(let create):
                        // Permission is checked at each create with the stream's credentials;
                        // events of a created watcher are not checked again (as etcd).
                        if let refusal = await server.watchRefusal(create, context) {
                            hub.reject(stream, reason: refusal)
                        } else {
                            hub.create(stream, create)
                        }
                    case .cancelRequest(let cancel): hub.cancel(stream, watchID: cancel.watchID)
                    case .progressRequest: hub.requestProgress(stream)
                    case nil: break
                    }
                }
            }
            group.addTask {
                while !Task.isCancelled {
                    try? await Task.sleep(for: interval)
                    hub.progressTick(stream)
                }
            }
            // The sender runs until the call is cancelled (the client resets the stream or goes
            // away): a client that only half-closes keeps receiving events, as from etcd.
            await send(stream, writer, maxBytes: maxBytes)
            group.cancelAll()
        }
    }

    private func send(_ stream: UInt64, _ writer: ResponseWriter, maxBytes: Int) async {
        let hub = watchHub
        while !Task.isCancelled {
            switch hub.next(stream) {
            case .closed:
                return
            case .wait:
                await hub.wait(stream)
            case .send(let items):
                var messages: [[UInt8]] = []
                messages.reserveCapacity(items.count)
                for item in items {
                    switch item {
                    case .encoded(let bytes):
                        messages.append(bytes)
                    case .message(let response, let fragment):
                        for piece in fragment ? Self.fragments(response, maxBytes: maxBytes) : [response] {
                            guard let bytes: [UInt8] = try? piece.serializedBytes() else { continue }
                            messages.append(bytes)
                        }
                    }
                }
                do { try await writer.write(messages) } catch { return }
            case .catchUp(let behind):
                for catchUp in behind {
                    do {
                        let result = try backend.read { try WatchHistory.read($0, catchUp, byteLimit: hub.queueLimit) }
                        hub.deliverHistory(stream, catchUp, events: result.events, readThrough: result.readThrough,
                                           compactedAt: result.compactedAt)
                    } catch {
                        logger.error("watch history read failed", metadata: ["error": "\(error)"])
                        try? await Task.sleep(for: .milliseconds(100))
                    }
                }
            }
        }
    }

    /// etcd's fragmenting: a response over the request limit with more than one event, for a
    /// watcher that asked for fragments, goes out in pieces of at least one event that stay under
    /// the limit; all but the last carry `fragment: true`.
    static func fragments(_ response: Etcdserverpb_WatchResponse, maxBytes: Int) -> [Etcdserverpb_WatchResponse] {
        guard response.events.count > 1, (try? response.serializedBytes() as [UInt8])?.count ?? 0 >= maxBytes else {
            return [response]
        }
        var empty = response
        empty.events = []
        let base = (try? empty.serializedBytes() as [UInt8])?.count ?? 0
        var pieces: [Etcdserverpb_WatchResponse] = []
        var current = empty
        var size = base
        for event in response.events {
            let eventSize = ((try? event.serializedBytes() as [UInt8])?.count ?? 0) + 6  // tag and length
            if !current.events.isEmpty && size + eventSize >= maxBytes {
                current.fragment = true
                pieces.append(current)
                current = empty
                size = base
            }
            current.events.append(event)
            size += eventSize
        }
        pieces.append(current)
        return pieces
    }

    /// Whether this member knows of a leader.
    var hasLeader: Bool { status.leader != 0 }
}
