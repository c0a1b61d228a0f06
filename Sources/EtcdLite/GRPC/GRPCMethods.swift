import Foundation
import NIOCore
import NIOHPACK
import SwiftProtobuf

/// What a call sees of its request besides the messages.
struct CallContext: Sendable {
    let headers: HPACKHeaders
    /// The CN of the client's verified certificate (TLS with --client-cert-auth, gRPC only: etcd
    /// ignores it for the JSON gateway): the user when the call carries no token.
    var commonName: String? = nil

    /// A request metadata value (names are lowercase), e.g. `hasleader`, `token`, `authorization`.
    func metadata(_ name: String) -> String? {
        headers.first(name: name)
    }
}

/// A server-side gRPC method over raw message bytes.
enum GRPCMethod: Sendable {
    /// One request, one response.
    case unary(@Sendable ([UInt8], CallContext) async throws -> [UInt8])
    /// One request, one response, started on the connection's event loop without a task: for
    /// calls that only hand work to another thread (writes go to the apply loop). The completion
    /// may run on any thread.
    case unaryDirect(@Sendable ([UInt8], CallContext, @escaping @Sendable (Result<[UInt8], GRPCStatus>) -> Void) -> Void)
    /// Requests and responses as streams (server-streaming calls see one request).
    case streaming(@Sendable (AsyncStream<[UInt8]>, ResponseWriter, CallContext) async throws -> Void)
}

/// Sends response messages of a streaming call; each write waits until the frames are handed to
/// the connection (so a slow reader slows the writer down).
struct ResponseWriter: Sendable {
    let writeMessages: @Sendable ([[UInt8]]) async throws -> Void

    func write(_ message: [UInt8]) async throws { try await writeMessages([message]) }
    func write(_ messages: [[UInt8]]) async throws { try await writeMessages(messages) }
}

/// The method table, keyed by `/package.Service/Method`.
struct GRPCMethods: Sendable {
    private(set) var table: [String: GRPCMethod] = [:]
    /// etcd's gRPC receive limit: --max-request-bytes plus 512 KiB.
    let receiveLimit: Int
    /// Where calls are counted (grpc_server_started_total, grpc_server_handled_total).
    var metrics: MemberMetrics?

    init(receiveLimit: Int) {
        self.receiveLimit = receiveLimit
    }

    subscript(path: String) -> GRPCMethod? { table[path] }

    mutating func unary<Request: Message, Response: Message>(
        _ path: String, _ handler: @escaping @Sendable (Request, CallContext) async throws -> Response
    ) {
        table[path] = .unary { bytes, context in
            let request: Request = try Self.decode(bytes)
            return try await handler(request, context).serializedBytes()
        }
    }

    mutating func unaryDirect<Request: Message, Response: Message>(
        _ path: String,
        _ handler: @escaping @Sendable (Request, CallContext, @escaping @Sendable (Result<Response, any Error>) -> Void) -> Void
    ) {
        table[path] = .unaryDirect { bytes, context, completion in
            let request: Request
            do { request = try Self.decode(bytes) } catch { return completion(.failure(GRPCStatus(error))) }
            handler(request, context) { result in
                completion(result.flatMap { response in
                    Result { try response.serializedBytes() as [UInt8] }
                }.mapError { GRPCStatus($0) })
            }
        }
    }

    mutating func serverStreaming<Request: Message, Response: Message>(
        _ path: String, _ handler: @escaping @Sendable (Request, CallContext, @Sendable (Response) async throws -> Void) async throws -> Void
    ) {
        table[path] = .streaming { requests, writer, context in
            var iterator = requests.makeAsyncIterator()
            guard let bytes = await iterator.next() else {
                throw GRPCStatus(code: 13, message: "grpc: no request message")
            }
            let request: Request = try Self.decode(bytes)
            try await handler(request, context) { response in try await writer.write(try response.serializedBytes()) }
        }
    }

    mutating func streaming(
        _ path: String, _ handler: @escaping @Sendable (AsyncStream<[UInt8]>, ResponseWriter, CallContext) async throws -> Void
    ) {
        table[path] = .streaming(handler)
    }

    /// Runs `check` before every method but `except` (etcd's interceptors: a learner refuses).
    mutating func guardAll(except: Set<String>, _ check: @escaping @Sendable () throws -> Void) {
        for (path, method) in table where !except.contains(path) {
            switch method {
            case .unary(let body):
                table[path] = .unary { bytes, context in
                    try check()
                    return try await body(bytes, context)
                }
            case .unaryDirect(let body):
                table[path] = .unaryDirect { bytes, context, completion in
                    do { try check() } catch { return completion(.failure(GRPCStatus(error))) }
                    body(bytes, context, completion)
                }
            case .streaming(let body):
                table[path] = .streaming { requests, writer, context in
                    try check()
                    try await body(requests, writer, context)
                }
            }
        }
    }

    /// Runs `check` (which may wait, and sees the call's metadata) before each method in `paths`,
    /// as an interceptor would: etcd's permission checks of whole methods.
    mutating func guardEach(_ paths: [String], _ check: @escaping @Sendable (CallContext) async throws -> Void) {
        for path in paths {
            switch table[path] {
            case .unary(let body)?:
                table[path] = .unary { bytes, context in
                    try await check(context)
                    return try await body(bytes, context)
                }
            case .streaming(let body)?:
                table[path] = .streaming { requests, writer, context in
                    try await check(context)
                    try await body(requests, writer, context)
                }
            case .unaryDirect?, nil:
                // Direct methods start on the event loop without a task: they check for themselves.
                preconditionFailure("no task-based method \(path) to guard")
            }
        }
    }

    /// grpc-go's wording for an undecodable request.
    static func decode<Request: Message>(_ bytes: [UInt8]) throws -> Request {
        do {
            return try Request(serializedBytes: bytes)
        } catch {
            throw GRPCStatus(code: 13, message: "grpc: error unmarshalling request: \(error)")
        }
    }
}
