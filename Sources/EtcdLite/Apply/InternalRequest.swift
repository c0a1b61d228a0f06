import EtcdLiteProto
import SwiftProtobuf

/// A request that changes replicated state: what one log entry carries.
enum InternalRequest: Sendable {
    case put(Etcdserverpb_PutRequest)
    case deleteRange(Etcdserverpb_DeleteRangeRequest)
    case txn(Etcdserverpb_TxnRequest)
    case compaction(Etcdserverpb_CompactionRequest)
    case alarm(Etcdserverpb_AlarmRequest)
    /// A grant whose ID and TTL the API layer has settled (server-chosen ID, minimum TTL).
    case leaseGrant(Etcdserverpb_LeaseGrantRequest)
    /// A client's revoke, or the leader's for an expired lease.
    case leaseRevoke(Etcdserverpb_LeaseRevokeRequest)
    /// A keep-alive a follower received, as earlier versions passed it through the log (followers
    /// now ask the leader directly): kept so that such entries in an existing log still apply.
    case leaseRenew(Etcdserverpb_LeaseKeepAliveRequest)
    /// A member's name and client URLs, published by the member through the log after it starts
    /// (as etcd does): what MemberList shows of it.
    case memberAttributes(Etcdserverpb_Member)
    /// Membership changes: add (the member as MemberAdd made it), remove, promote (by ID) travel
    /// as the context of a Raft configuration change; update (new peer URLs) as a normal entry.
    case memberAdd(Etcdserverpb_Member)
    case memberRemove(Etcdserverpb_Member)
    case memberPromote(Etcdserverpb_Member)
    case memberUpdate(Etcdserverpb_Member)
    /// A change of users, roles or the auth flag, or an Authenticate.
    case auth(AuthRequest)
    /// A client's request proposed while auth was on, with who sent it: applying it first checks
    /// the sender's permission against the auth state of that moment (etcd's RequestHeader with
    /// username and auth revision).
    indirect case authorized(AuthInfo, InternalRequest)

    /// Whether applying it changes what MemberList shows without a Raft configuration change.
    var changesMembers: Bool {
        switch self {
        case .memberAttributes, .memberUpdate: true
        default: false
        }
    }

    private var tag: UInt8 {
        switch self {
        case .put: 1
        case .deleteRange: 2
        case .txn: 3
        case .compaction: 4
        case .alarm: 5
        case .leaseGrant: 6
        case .leaseRevoke: 7
        case .leaseRenew: 8
        case .memberAttributes: 9
        case .memberAdd: 10
        case .memberRemove: 11
        case .memberPromote: 12
        case .memberUpdate: 13
        case .auth: 14
        case .authorized: 15
        }
    }

    /// One tag byte followed by the request's protobuf encoding.
    func encoded() throws -> [UInt8] {
        let body: [UInt8]
        switch self {
        case .put(let r): body = try r.serializedBytes()
        case .deleteRange(let r): body = try r.serializedBytes()
        case .txn(let r): body = try r.serializedBytes()
        case .compaction(let r): body = try r.serializedBytes()
        case .alarm(let r): body = try r.serializedBytes()
        case .leaseGrant(let r): body = try r.serializedBytes()
        case .leaseRevoke(let r): body = try r.serializedBytes()
        case .leaseRenew(let r): body = try r.serializedBytes()
        case .memberAttributes(let r), .memberAdd(let r), .memberRemove(let r), .memberPromote(let r), .memberUpdate(let r):
            body = try r.serializedBytes()
        case .auth(let r): body = try r.encoded()
        case .authorized(let info, let inner):
            // Revision, user name length, name, the inner request (tag and body).
            let name = Array(info.user.utf8)
            var w = ByteWriter()
            w.u64(info.revision)
            w.u32le(UInt32(name.count))
            w.bytes += name
            w.bytes += try inner.encoded()
            body = w.bytes
        }
        return [tag] + body
    }

    init(encoded bytes: [UInt8]) throws {
        guard let tag = bytes.first else { throw EntryDecodingError(message: "empty entry") }
        let body = bytes[1...]
        switch tag {
        case 1: self = .put(try .init(serializedBytes: body))
        case 2: self = .deleteRange(try .init(serializedBytes: body))
        case 3: self = .txn(try .init(serializedBytes: body))
        case 4: self = .compaction(try .init(serializedBytes: body))
        case 5: self = .alarm(try .init(serializedBytes: body))
        case 6: self = .leaseGrant(try .init(serializedBytes: body))
        case 7: self = .leaseRevoke(try .init(serializedBytes: body))
        case 8: self = .leaseRenew(try .init(serializedBytes: body))
        case 9: self = .memberAttributes(try .init(serializedBytes: body))
        case 10: self = .memberAdd(try .init(serializedBytes: body))
        case 11: self = .memberRemove(try .init(serializedBytes: body))
        case 12: self = .memberPromote(try .init(serializedBytes: body))
        case 13: self = .memberUpdate(try .init(serializedBytes: body))
        case 14: self = .auth(try AuthRequest(encoded: body))
        case 15:
            var reader = ByteReader(Array(body))
            guard let revision = try? reader.u64(), let length = try? reader.u32le(), let nameBytes = try? reader.take(Int(length)),
                  let name = String(validating: nameBytes, as: UTF8.self) else {
                throw EntryDecodingError(message: "bad authorized entry")
            }
            let inner = try InternalRequest(encoded: reader.rest())
            if case .authorized = inner { throw EntryDecodingError(message: "nested authorized entry") }
            self = .authorized(AuthInfo(user: name, revision: revision), inner)
        default: throw EntryDecodingError(message: "unknown entry type \(tag)")
        }
    }
}

struct EntryDecodingError: Error {
    let message: String
}

/// What applying an entry produced for the client that proposed it.
enum InternalResponse: Sendable {
    case put(Etcdserverpb_PutResponse)
    case deleteRange(Etcdserverpb_DeleteRangeResponse)
    case txn(Etcdserverpb_TxnResponse)
    case compaction(Etcdserverpb_CompactionResponse)
    case alarm(Etcdserverpb_AlarmResponse)
    case leaseGrant(Etcdserverpb_LeaseGrantResponse)
    case leaseRevoke(Etcdserverpb_LeaseRevokeResponse)
    case leaseRenew(Etcdserverpb_LeaseKeepAliveResponse)
    case memberAttributes
    case auth(AuthAnswer)
    /// After a membership change: the member it concerned and every member.
    case membership(member: Etcdserverpb_Member, members: [Etcdserverpb_Member])
}
