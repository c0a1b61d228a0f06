import EtcdLiteClient
import EtcdLiteProto
import Foundation
import NIOCore
import SwiftProtobuf

/// What the members say of themselves, through the etcd API only (as any client): MemberList
/// from the first member that answers, then Status from each member's client URL.
public struct MemberObserver: Sendable {
    /// Client endpoints to ask first ("host:port" or "http://host:port").
    public var endpoints: [String]
    /// The boot member's name (its MemberList name), if the cluster has one.
    public var bootMemberName: String?
    public var timeout: TimeAmount = .seconds(2)

    public init(endpoints: [String], bootMemberName: String? = nil) {
        self.endpoints = endpoints
        self.bootMemberName = bootMemberName
    }

    /// The members, or nil when no endpoint answered MemberList (no quorum, or nobody up). A
    /// member that MemberAdd made but that has not started yet has no name (etcd shows it so);
    /// the reconciler knows it by its ID from its own records.
    public func observe() async -> [ObservedMember]? {
        var list: Etcdserverpb_MemberListResponse?
        for endpoint in endpoints {
            if let answer: Etcdserverpb_MemberListResponse = try? await call(endpoint, "/etcdserverpb.Cluster/MemberList",
                                                                              Etcdserverpb_MemberListRequest()) {
                list = answer
                break
            }
        }
        guard let list else { return nil }
        var members: [ObservedMember] = []
        for member in list.members {
            var observed = ObservedMember(id: member.id, name: member.name, isLearner: member.isLearner, healthy: false,
                                          isBootMember: bootMemberName != nil && member.name == bootMemberName)
            for url in member.clientUrls {
                guard let status: Etcdserverpb_StatusResponse = try? await call(url, "/etcdserverpb.Maintenance/Status",
                                                                                Etcdserverpb_StatusRequest()) else { continue }
                observed.healthy = true
                observed.isLeader = status.leader == status.header.memberID && status.leader != 0
                observed.appliedIndex = status.raftAppliedIndex
                break
            }
            members.append(observed)
        }
        return members
    }

    private func call<Request: Message, Response: Message>(_ endpoint: String, _ path: String, _ request: Request) async throws -> Response {
        var rest = Substring(endpoint)
        if let scheme = rest.range(of: "://") { rest = rest[scheme.upperBound...] }
        let parts = rest.split(separator: ":")
        guard parts.count == 2, let port = Int(parts[1]) else { throw ClientStatus(code: 3, message: "bad endpoint \(endpoint)") }
        let connection = try await GRPCClientConnection.connect(host: String(parts[0]), port: port, connectTimeout: timeout)
        defer { Task { await connection.close() } }
        return try Response(serializedBytes: try await connection.unary(path, try request.serializedBytes(), timeout: timeout))
    }
}
