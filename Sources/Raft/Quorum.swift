/// Who must agree: a majority of `incoming`, and — while in a joint configuration — also a
/// majority of `outgoing` (§6 of the Raft dissertation).
struct Quorum {
    let incoming: Set<NodeID>
    let outgoing: Set<NodeID>

    init(voters: Set<NodeID>) {
        incoming = voters
        outgoing = []
    }

    init(incoming: Set<NodeID>, outgoing: Set<NodeID>) {
        self.incoming = incoming
        self.outgoing = outgoing
    }

    var voters: Set<NodeID> { incoming.union(outgoing) }
    var isJoint: Bool { !outgoing.isEmpty }

    /// The highest index both majorities have.
    func committedIndex(_ match: (NodeID) -> LogIndex) -> LogIndex {
        min(Self.majorityIndex(incoming, match), Self.majorityIndex(outgoing, match))
    }

    private static func majorityIndex(_ voters: Set<NodeID>, _ match: (NodeID) -> LogIndex) -> LogIndex {
        guard !voters.isEmpty else { return LogIndex(UInt64.max) }
        let sorted = voters.map(match).sorted(by: >)
        return sorted[voters.count / 2]
    }

    enum VoteResult { case pending, won, lost }

    func result(_ votes: [NodeID: Bool]) -> VoteResult {
        let results = [Self.majorityResult(incoming, votes), Self.majorityResult(outgoing, votes)]
        if results.contains(.lost) { return .lost }
        if results.allSatisfy({ $0 == .won }) { return .won }
        return .pending
    }

    private static func majorityResult(_ voters: Set<NodeID>, _ votes: [NodeID: Bool]) -> VoteResult {
        guard !voters.isEmpty else { return .won }
        let size = voters.count / 2 + 1
        var granted = 0
        var rejected = 0
        for voter in voters {
            switch votes[voter] {
            case true?: granted += 1
            case false?: rejected += 1
            case nil: break
            }
        }
        if granted >= size { return .won }
        if voters.count - rejected < size { return .lost }
        return .pending
    }

    /// Whether `members` hold a majority of each half.
    func hasQuorum(_ members: Set<NodeID>) -> Bool {
        result(Dictionary(uniqueKeysWithValues: members.map { ($0, true) })) == .won
    }
}
