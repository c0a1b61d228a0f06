/// Who votes and who only learns. In a joint configuration both `voters` (incoming) and
/// `outgoingVoters` must agree; `learnersNext` become learners when the joint configuration is
/// left (voters being demoted).
public struct ConfState: Hashable, Sendable {
    public var voters: Set<NodeID>
    public var learners: Set<NodeID>
    public var outgoingVoters: Set<NodeID>
    public var learnersNext: Set<NodeID>
    /// Leave the joint configuration without an explicit request.
    public var autoLeave: Bool

    public init(voters: Set<NodeID> = [], learners: Set<NodeID> = [], outgoingVoters: Set<NodeID> = [],
                learnersNext: Set<NodeID> = [], autoLeave: Bool = false) {
        self.voters = voters
        self.learners = learners
        self.outgoingVoters = outgoingVoters
        self.learnersNext = learnersNext
        self.autoLeave = autoLeave
    }
}

/// Several membership changes made together through a joint configuration; an empty set leaves
/// the joint configuration. A set of one change without `explicitLeave` is a simple change.
public struct ConfChangeSet: Hashable, Sendable {
    public var changes: [ConfChange]
    /// Stay joint until an empty set is proposed (otherwise the leader leaves by itself).
    public var explicitLeave: Bool
    /// The application's bytes carried with the change (etcd's ConfChange context: who the member
    /// is, who proposed the change); opaque to Raft.
    public var context: [UInt8]

    public init(_ changes: [ConfChange], explicitLeave: Bool = false, context: [UInt8] = []) {
        self.changes = changes
        self.explicitLeave = explicitLeave
        self.context = context
    }

    public static let leaveJoint = ConfChangeSet([])

    var isLeave: Bool { changes.isEmpty }
    var isSimple: Bool { changes.count == 1 && !explicitLeave }

    /// A simple change without context is its change's 9 bytes; otherwise `0xFF | explicitLeave |
    /// changes` without context, or `0xFE | explicitLeave | count u8 | changes | context`.
    public var encoded: [UInt8] {
        if context.isEmpty {
            if isSimple { return changes[0].encoded }
            return [0xFF, explicitLeave ? 1 : 0] + changes.flatMap(\.encoded)
        }
        precondition(changes.count <= 255, "at most 255 changes travel with a context")
        return [0xFE, explicitLeave ? 1 : 0, UInt8(changes.count)] + changes.flatMap(\.encoded) + context
    }

    public init?(encoded bytes: [UInt8]) {
        if let single = ConfChange(encoded: bytes) {
            self.init([single])
            return
        }
        guard bytes.count >= 2 else { return nil }
        let count: Int
        var offset: Int
        switch bytes[0] {
        case 0xFF:
            guard (bytes.count - 2) % 9 == 0 else { return nil }
            count = (bytes.count - 2) / 9
            offset = 2
        case 0xFE:
            guard bytes.count >= 3, bytes.count >= 3 + 9 * Int(bytes[2]) else { return nil }
            count = Int(bytes[2])
            offset = 3
        default:
            return nil
        }
        var changes: [ConfChange] = []
        for _ in 0..<count {
            guard let change = ConfChange(encoded: Array(bytes[offset..<offset + 9])) else { return nil }
            changes.append(change)
            offset += 9
        }
        self.init(changes, explicitLeave: bytes[1] == 1, context: Array(bytes[offset...]))
    }
}

/// A single-server membership change, carried by a `.configChange` entry.
public struct ConfChange: Hashable, Sendable {
    public enum Kind: UInt8, Sendable {
        /// Adds a voter, or promotes a learner.
        case addVoter = 1
        case addLearner = 2
        case remove = 3
    }
    public var kind: Kind
    public var node: NodeID

    public init(_ kind: Kind, _ node: NodeID) {
        self.kind = kind
        self.node = node
    }

    public var encoded: [UInt8] {
        [kind.rawValue] + (0..<8).map { UInt8(truncatingIfNeeded: node.value >> (56 - 8 * $0)) }
    }

    public init?(encoded bytes: [UInt8]) {
        guard bytes.count == 9, let kind = Kind(rawValue: bytes[0]) else { return nil }
        self.kind = kind
        node = NodeID(bytes[1...].reduce(0) { $0 << 8 | UInt64($1) })
    }
}
