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
