/// A Raft term: grows with every election.
public struct Term: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public init(integerLiteral value: UInt64) { self.value = value }
    public static func < (a: Term, b: Term) -> Bool { a.value < b.value }
    public var description: String { "\(value)" }
    public static let zero = Term(0)
    public var next: Term { Term(value + 1) }
}

/// A position in the log (1-based; 0 means "before the first entry").
public struct LogIndex: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public init(integerLiteral value: UInt64) { self.value = value }
    public static func < (a: LogIndex, b: LogIndex) -> Bool { a.value < b.value }
    public var description: String { "\(value)" }
    public static let zero = LogIndex(0)
    public static func + (a: LogIndex, b: UInt64) -> LogIndex { LogIndex(a.value + b) }
    public static func - (a: LogIndex, b: UInt64) -> LogIndex { LogIndex(a.value - b) }
    public var next: LogIndex { LogIndex(value + 1) }
    public var previous: LogIndex { LogIndex(value - 1) }
}

/// A member's identity; 0 is "nobody".
public struct NodeID: Hashable, Comparable, Sendable, CustomStringConvertible, ExpressibleByIntegerLiteral {
    public var value: UInt64
    public init(_ value: UInt64) { self.value = value }
    public init(integerLiteral value: UInt64) { self.value = value }
    public static func < (a: NodeID, b: NodeID) -> Bool { a.value < b.value }
    public var description: String { "\(value)" }
    public static let none = NodeID(0)
}

public struct Entry: Hashable, Sendable {
    public enum Kind: UInt8, Sendable { case normal, configChange }
    public var term: Term
    public var index: LogIndex
    public var kind: Kind
    public var data: [UInt8]

    public init(term: Term, index: LogIndex, kind: Kind = .normal, data: [UInt8] = []) {
        self.term = term
        self.index = index
        self.kind = kind
        self.data = data
    }

    /// Bytes counted against size limits.
    var size: Int { data.count + 24 }
}

/// What must be durable before votes and acknowledgements leave the node.
public struct HardState: Hashable, Sendable {
    public var term: Term
    public var vote: NodeID
    public var commit: LogIndex
    public init(term: Term = .zero, vote: NodeID = .none, commit: LogIndex = .zero) {
        self.term = term
        self.vote = vote
        self.commit = commit
    }
}

public enum Role: Sendable, Hashable {
    case follower, preCandidate, candidate, leader
}

/// Volatile state the application may display (who leads, our role).
public struct SoftState: Hashable, Sendable {
    public var leader: NodeID
    public var role: Role
}

public struct Message: Hashable, Sendable {
    public enum Kind: Sendable, Hashable {
        case append, appendResponse
        case vote, voteResponse, preVote, preVoteResponse
        case heartbeat, heartbeatResponse
        case propose
        case snapshot
        case readIndex, readIndexResponse
        /// From a leader handing over: campaign now, skipping pre-vote and the leader lease.
        case timeoutNow
        // Local inputs that travel through `step` like messages.
        case hup, beat, checkQuorum, transferLeader
    }
    public var kind: Kind
    public var from: NodeID
    public var to: NodeID
    public var term: Term
    /// append: the term of the entry before `entries`; vote: the candidate's last term.
    public var logTerm: Term
    /// append: the index before `entries`; vote: the candidate's last index; appendResponse: the
    /// last index matched (or the rejected index).
    public var index: LogIndex
    public var entries: [Entry]
    public var commit: LogIndex
    public var reject: Bool
    /// On a rejected append: the follower's last index, a hint where to probe next.
    public var rejectHint: LogIndex
    /// readIndex: the request's context, echoed by heartbeats and their responses. vote: set on a
    /// campaign a leader asked for (transfer), which the leader lease must not block.
    public var context: [UInt8]
    /// snapshot: the state to install.
    public var snapshot: Snapshot?

    public init(kind: Kind, from: NodeID = .none, to: NodeID = .none, term: Term = .zero, logTerm: Term = .zero,
                index: LogIndex = .zero, entries: [Entry] = [], commit: LogIndex = .zero, reject: Bool = false,
                rejectHint: LogIndex = .zero, context: [UInt8] = [], snapshot: Snapshot? = nil) {
        self.kind = kind
        self.from = from
        self.to = to
        self.term = term
        self.logTerm = logTerm
        self.index = index
        self.entries = entries
        self.commit = commit
        self.reject = reject
        self.rejectHint = rejectHint
        self.context = context
        self.snapshot = snapshot
    }

    static let transferContext = Array("CampaignTransfer".utf8)
}

/// A linearizable read may be served at `index` once the application has applied it.
public struct ReadState: Hashable, Sendable {
    public var index: LogIndex
    public var context: [UInt8]
}

public enum RaftError: Error, Equatable, Sendable {
    /// No leader is known to forward a proposal to, or this node cannot take proposals now.
    case proposalDropped
    /// The requested entries were compacted away.
    case compacted
    /// The requested entries are not in the log yet.
    case unavailable
}

/// Randomness from the application (seeded in tests): nothing in the core reads a clock or the
/// system's random source.
public protocol RaftRandom {
    mutating func next(below bound: Int) -> Int
}

/// A small seeded generator (SplitMix64) for tests and simulations.
public struct SeededRandom: RaftRandom, Sendable {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func nextUInt64() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    public mutating func next(below bound: Int) -> Int {
        precondition(bound > 0)
        return Int(nextUInt64() % UInt64(bound))
    }
}

extension SeededRandom: RandomNumberGenerator {
    public mutating func next() -> UInt64 { nextUInt64() }
}

/// The application's state as of `index`, with the configuration then: what replaces a compacted
/// log prefix and what a far-behind follower installs.
public struct Snapshot: Hashable, Sendable {
    public var index: LogIndex
    public var term: Term
    public var confState: ConfState
    public var data: [UInt8]
    public init(index: LogIndex, term: Term, confState: ConfState, data: [UInt8]) {
        self.index = index
        self.term = term
        self.confState = confState
        self.data = data
    }
}
