/// An error with etcd's gRPC status code and etcd's exact message. Mapped to a gRPC status (and an
/// HTTP status on the gateway) only at the API edge.
public struct EtcdError: Error, Equatable, Sendable, CustomStringConvertible {
    public enum Code: Int, Sendable {
        case canceled = 1, unknown = 2, invalidArgument = 3, deadlineExceeded = 4, notFound = 5
        case alreadyExists = 6, permissionDenied = 7, resourceExhausted = 8, failedPrecondition = 9
        case aborted = 10, outOfRange = 11, unimplemented = 12, `internal` = 13, unavailable = 14
        case dataLoss = 15, unauthenticated = 16
    }

    public let code: Code
    public let message: String

    public init(_ code: Code, _ message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { message }

    public static let emptyKey = EtcdError(.invalidArgument, "etcdserver: key is not provided")
    public static let keyNotFound = EtcdError(.invalidArgument, "etcdserver: key not found")
    public static let valueProvided = EtcdError(.invalidArgument, "etcdserver: value is provided")
    public static let leaseProvided = EtcdError(.invalidArgument, "etcdserver: lease is provided")
    public static let tooManyOps = EtcdError(.invalidArgument, "etcdserver: too many operations in txn request")
    public static let duplicateKey = EtcdError(.invalidArgument, "etcdserver: duplicate key given in txn request")
    public static let invalidSortOption = EtcdError(.invalidArgument, "etcdserver: invalid sort option")
    public static let requestTooLarge = EtcdError(.invalidArgument, "etcdserver: request is too large")
    public static let compacted = EtcdError(.outOfRange, "etcdserver: mvcc: required revision has been compacted")
    public static let futureRevision = EtcdError(.outOfRange, "etcdserver: mvcc: required revision is a future revision")
    public static let leaseNotFound = EtcdError(.notFound, "etcdserver: requested lease not found")
    public static let leaseExists = EtcdError(.failedPrecondition, "etcdserver: lease already exists")
    public static let leaseTTLTooLarge = EtcdError(.outOfRange, "etcdserver: too large lease TTL")
    public static let noSpace = EtcdError(.resourceExhausted, "etcdserver: mvcc: database space exceeded")
    public static let memberNotFound = EtcdError(.notFound, "etcdserver: member not found")
    public static let notCapable = EtcdError(.failedPrecondition, "etcdserver: not capable")
    public static let notLeader = EtcdError(.failedPrecondition, "etcdserver: not leader")
    public static let stopped = EtcdError(.unavailable, "etcdserver: server stopped")
    public static let noLeader = EtcdError(.unavailable, "etcdserver: no leader")
    public static let requestTimedOut = EtcdError(.unavailable, "etcdserver: request timed out")
    public static let leaderTransferTimeout = EtcdError(.unavailable, "etcdserver: request timed out, leader transfer took too long")
    public static let badLeaderTransferee = EtcdError(.failedPrecondition, "etcdserver: bad leader transferee")
    public static let memberExists = EtcdError(.failedPrecondition, "etcdserver: member ID already exist")
    public static let peerURLExists = EtcdError(.failedPrecondition, "etcdserver: Peer URLs already exists")
    public static let memberBadURLs = EtcdError(.invalidArgument, "etcdserver: given member URLs are invalid")
    public static let notEnoughStartedMembers = EtcdError(.failedPrecondition, "etcdserver: re-configuration failed due to not enough started members")
    public static let memberNotLearner = EtcdError(.failedPrecondition, "etcdserver: can only promote a learner member")
    public static let learnerNotReady = EtcdError(.failedPrecondition, "etcdserver: can only promote a learner member which is in sync with leader")
    public static let tooManyLearners = EtcdError(.failedPrecondition, "etcdserver: too many learner members in cluster")
    public static let notSupportedForLearner = EtcdError(.failedPrecondition, "etcdserver: rpc not supported for learner")
    public static let leaderChanged = EtcdError(.unavailable, "etcdserver: leader changed")
    public static let unhealthy = EtcdError(.unavailable, "etcdserver: unhealthy cluster")
}

// etcd's auth errors (auth/store.go, mapped by v3rpc/util.go).
extension EtcdError {
    public static let rootUserNotExist = EtcdError(.failedPrecondition, "etcdserver: root user does not exist")
    public static let rootRoleNotExist = EtcdError(.failedPrecondition, "etcdserver: root user does not have root role")
    public static let userAlreadyExist = EtcdError(.failedPrecondition, "etcdserver: user name already exists")
    public static let userEmpty = EtcdError(.invalidArgument, "etcdserver: user name is empty")
    public static let userNotFound = EtcdError(.failedPrecondition, "etcdserver: user name not found")
    public static let roleAlreadyExist = EtcdError(.failedPrecondition, "etcdserver: role name already exists")
    public static let roleNotFound = EtcdError(.failedPrecondition, "etcdserver: role name not found")
    public static let roleEmpty = EtcdError(.invalidArgument, "etcdserver: role name is empty")
    public static let authFailed = EtcdError(.invalidArgument, "etcdserver: authentication failed, invalid user ID or password")
    public static let permissionNotGiven = EtcdError(.invalidArgument, "etcdserver: permission not given")
    public static let permissionDenied = EtcdError(.permissionDenied, "etcdserver: permission denied")
    public static let roleNotGranted = EtcdError(.failedPrecondition, "etcdserver: role is not granted to the user")
    public static let permissionNotGranted = EtcdError(.failedPrecondition, "etcdserver: permission is not granted to the role")
    public static let authNotEnabled = EtcdError(.failedPrecondition, "etcdserver: authentication is not enabled")
    public static let invalidAuthToken = EtcdError(.unauthenticated, "etcdserver: invalid auth token")
    public static let invalidAuthManagement = EtcdError(.invalidArgument, "etcdserver: invalid auth management")
    public static let authOldRevision = EtcdError(.invalidArgument, "etcdserver: revision of auth store is old")
    /// etcd returns these without mapping them (code Unknown, the auth package's own text).
    public static let noPasswordUser = EtcdError(.unknown, "auth: authentication failed, password was given for no password user")
    public static let verifyOnlyKey = EtcdError(.unknown, "auth: token signing attempted with verify-only key")

    /// The form etcd's Maintenance Defragment/Hash/HashKV/Snapshot give auth errors: not mapped to
    /// a gRPC code, so Unknown with the auth package's text ("auth: permission denied").
    var unmapped: EtcdError {
        guard message.hasPrefix("etcdserver: ") else { return self }
        let text = message.dropFirst("etcdserver: ".count)
        let internalText = switch self {
        case .userAlreadyExist: "user already exists"
        case .userNotFound: "user not found"
        case .roleAlreadyExist: "role already exists"
        case .roleNotFound: "role not found"
        case .authOldRevision: "revision in header is old"
        default: String(text)
        }
        return EtcdError(.unknown, "auth: \(internalText)")
    }
}
