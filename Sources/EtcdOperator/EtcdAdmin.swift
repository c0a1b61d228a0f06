import EtcdLiteClient
import EtcdLiteProto
import Foundation
import NIOConcurrencyHelpers
import NIOCore
import SwiftProtobuf

/// The operator's calls to members: the etcd API as any client makes them, one connection per
/// call (the operator makes a few calls a second at most).
public struct EtcdAdmin: Sendable {
    public var timeout: TimeAmount

    public init(timeout: TimeAmount = .seconds(3)) {
        self.timeout = timeout
    }

    /// MemberAdd as a learner (or a voter); the response lists every member, the new one included.
    public func addMember(via endpoint: String, peerURL: String, learner: Bool = true) async throws -> Etcdserverpb_MemberAddResponse {
        var request = Etcdserverpb_MemberAddRequest()
        request.peerUrls = [peerURL]
        request.isLearner = learner
        return try await call(endpoint, "/etcdserverpb.Cluster/MemberAdd", request)
    }

    public func promote(via endpoint: String, id: UInt64) async throws {
        var request = Etcdserverpb_MemberPromoteRequest()
        request.id = id
        let _: Etcdserverpb_MemberPromoteResponse = try await call(endpoint, "/etcdserverpb.Cluster/MemberPromote", request)
    }

    public func remove(via endpoint: String, id: UInt64) async throws {
        var request = Etcdserverpb_MemberRemoveRequest()
        request.id = id
        let _: Etcdserverpb_MemberRemoveResponse = try await call(endpoint, "/etcdserverpb.Cluster/MemberRemove", request)
    }

    /// MoveLeader, sent to the leader (only the leader takes it).
    public func moveLeader(leader endpoint: String, to target: UInt64) async throws {
        var request = Etcdserverpb_MoveLeaderRequest()
        request.targetID = target
        let _: Etcdserverpb_MoveLeaderResponse = try await call(endpoint, "/etcdserverpb.Maintenance/MoveLeader", request)
    }

    public func status(_ endpoint: String) async throws -> Etcdserverpb_StatusResponse {
        try await call(endpoint, "/etcdserverpb.Maintenance/Status", Etcdserverpb_StatusRequest())
    }

    /// `linearizable`: confirmed with the leader first (etcd 3.5's field; 3.4 ignores it).
    public func memberList(_ endpoint: String, linearizable: Bool = false) async throws -> Etcdserverpb_MemberListResponse {
        var request = Etcdserverpb_MemberListRequest()
        request.linearizable = linearizable
        return try await call(endpoint, "/etcdserverpb.Cluster/MemberList", request)
    }

    public func defragment(_ endpoint: String) async throws {
        let _: Etcdserverpb_DefragmentResponse = try await call(endpoint, "/etcdserverpb.Maintenance/Defragment",
                                                                Etcdserverpb_DefragmentRequest(), timeout: .seconds(60))
    }

    /// Maintenance.Snapshot into `path`: the chunks as they come (the image, then its SHA-256),
    /// written to `<path>.part` and renamed when the stream ended well. Returns the bytes written.
    @discardableResult
    public func snapshot(_ endpoint: String, to path: String, timeout: TimeAmount = .seconds(120)) async throws -> Int {
        let partial = path + ".part"
        FileManager.default.createFile(atPath: partial, contents: nil)
        guard let handle = FileHandle(forWritingAtPath: partial) else { throw ClientStatus(code: 13, message: "cannot write \(partial)") }
        let connection: GRPCClientConnection
        do {
            connection = try await Self.connect(endpoint, timeout: self.timeout)
        } catch {
            try? handle.close()
            try? FileManager.default.removeItem(atPath: partial)
            throw error
        }
        defer { Task { await connection.close() } }
        let observer = ChunkWriter(handle: handle)
        let status: ClientStatus = await withCheckedContinuation { continuation in
            observer.done = continuation
            let call = connection.start("/etcdserverpb.Maintenance/Snapshot", messages: [try! Etcdserverpb_SnapshotRequest().serializedBytes()],
                                        endRequest: true, observer: observer)
            connection.eventLoop.scheduleTask(in: timeout) { call.cancel() }
        }
        try? handle.close()
        guard status.code == 0, observer.failure == nil else {
            try? FileManager.default.removeItem(atPath: partial)
            throw observer.failure ?? status
        }
        if FileManager.default.fileExists(atPath: path) { try FileManager.default.removeItem(atPath: path) }
        try FileManager.default.moveItem(atPath: partial, toPath: path)
        return observer.written
    }

    /// `snapshot`, then `verify` (nil: it checks out) on the file; a snapshot that does not
    /// verify is removed and thrown as an error. Returns the bytes written.
    @discardableResult
    public func verifiedSnapshot(_ endpoint: String, to path: String, verify: (String) async -> String?) async throws -> Int {
        let bytes = try await snapshot(endpoint, to: path)
        if let problem = await verify(path) {
            try? FileManager.default.removeItem(atPath: path)
            throw OperatorError("the snapshot did not verify: \(problem)")
        }
        return bytes
    }

    public func call<Request: Message, Response: Message>(_ endpoint: String, _ path: String, _ request: Request,
                                                          timeout: TimeAmount? = nil) async throws -> Response {
        let connection = try await Self.connect(endpoint, timeout: self.timeout)
        defer { Task { await connection.close() } }
        return try Response(serializedBytes: try await connection.unary(path, try request.serializedBytes(), timeout: timeout ?? self.timeout))
    }

    /// "host:port" or "http://host:port".
    public static func connect(_ endpoint: String, timeout: TimeAmount) async throws -> GRPCClientConnection {
        var rest = Substring(endpoint)
        if let scheme = rest.range(of: "://") { rest = rest[scheme.upperBound...] }
        let parts = rest.split(separator: ":")
        guard parts.count == 2, let port = Int(parts[1]) else { throw ClientStatus(code: 3, message: "bad endpoint \(endpoint)") }
        return try await GRPCClientConnection.connect(host: String(parts[0]), port: port, connectTimeout: timeout)
    }
}

/// Writes Snapshot chunks to a file as they arrive (on the connection's event loop).
private final class ChunkWriter: ClientCallObserver, @unchecked Sendable {
    let handle: FileHandle
    var done: CheckedContinuation<ClientStatus, Never>?
    var written = 0
    var failure: (any Error)?

    init(handle: FileHandle) { self.handle = handle }

    func received(_ message: [UInt8]) {
        guard failure == nil else { return }
        do {
            let chunk = try Etcdserverpb_SnapshotResponse(serializedBytes: message)
            try handle.write(contentsOf: chunk.blob)
            written += chunk.blob.count
        } catch {
            failure = error
        }
    }

    func closed(_ status: ClientStatus) {
        done?.resume(returning: status)
        done = nil
    }
}
