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
    public var admin = EtcdAdmin(timeout: .seconds(2))

    public init(endpoints: [String], bootMemberName: String? = nil) {
        self.endpoints = endpoints
        self.bootMemberName = bootMemberName
    }

    /// The members, or nil when no endpoint answered a linearizable MemberList (no quorum, or
    /// nobody up: a member cut off from the rest would show a list that may be stale). A
    /// member that MemberAdd made but that has not started yet has no name (etcd shows it so);
    /// the reconciler knows it by its ID from its own records.
    public func observe() async -> [ObservedMember]? {
        var list: Etcdserverpb_MemberListResponse?
        for endpoint in endpoints {
            if let answer = try? await admin.memberList(endpoint, linearizable: true) {
                list = answer
                break
            }
        }
        guard let list else { return nil }
        var members: [ObservedMember] = []
        for member in list.members {
            var observed = ObservedMember(id: member.id, name: member.name, isLearner: member.isLearner, healthy: false,
                                          isBootMember: bootMemberName != nil && member.name == bootMemberName)
            observed.peerURLs = member.peerUrls
            observed.clientURLs = member.clientUrls
            for url in member.clientUrls {
                guard let status = try? await admin.status(url) else { continue }
                observed.healthy = true
                observed.isLeader = status.leader == status.header.memberID && status.leader != 0
                observed.appliedIndex = status.raftAppliedIndex
                break
            }
            members.append(observed)
        }
        return members
    }
}
