// Membership changes: single-server changes and joint consensus (§4 and §6 of the dissertation).

extension RaftNode {
    public var confState: ConfState {
        ConfState(voters: quorum.incoming, learners: learners, outgoingVoters: quorum.outgoing,
                  learnersNext: learnersNext, autoLeave: autoLeave)
    }

    /// A leader's view of how far `node`'s log matches its own (nil: not a member, or not the
    /// leader). Used to tell whether a learner has caught up before promoting it.
    public func matchIndex(of node: NodeID) -> LogIndex? {
        guard role == .leader else { return nil }
        return node == id ? log.lastIndex : progress[node]?.match
    }

    /// Whether this leader may propose a membership change now (none pending, an entry of its
    /// term committed, not handing over or removed).
    public var canProposeConfChange: Bool {
        role == .leader && leadTransferee == .none && removedAt == nil && committedInCurrentTerm && pendingConfIndex <= log.applied
    }

    /// Proposes a single membership change (see `proposeConfChange(_: ConfChangeSet)`).
    public func proposeConfChange(_ change: ConfChange) throws {
        try proposeConfChange(ConfChangeSet([change]))
    }

    /// Proposes membership changes: one simple change, or several through a joint configuration
    /// (an empty set leaves it). Refused while another change is pending (not yet applied), until
    /// this leader has committed an entry of its own term, when entering a joint configuration
    /// twice or leaving one that was not entered, and when no voter would remain.
    public func proposeConfChange(_ set: ConfChangeSet) throws {
        guard role == .leader, leadTransferee == .none, removedAt == nil, committedInCurrentTerm,
              pendingConfIndex <= log.applied, set.isLeave == quorum.isJoint,
              set.isLeave || !Self.apply(set.changes, to: quorum.incoming, learners: learners).voters.isEmpty else {
            throw RaftError.proposalDropped
        }
        appendEntries([Entry(term: term, index: .zero, kind: .configChange, data: set.encoded)])
        pendingConfIndex = log.lastIndex
        broadcastAppend()
    }

    /// Applies a committed single change (the application calls this when it applies the entry).
    @discardableResult
    public func applyConfChange(_ change: ConfChange) -> ConfState {
        applyConfChange(ConfChangeSet([change]))
    }

    /// Applies a committed change entry's set and returns the configuration to persist with the
    /// applied state.
    @discardableResult
    public func applyConfChange(_ set: ConfChangeSet) -> ConfState {
        if set.isLeave {
            guard quorum.isJoint else { return confState }
            quorum = Quorum(voters: quorum.incoming)
            learners.formUnion(learnersNext)
            learnersNext = []
            autoLeave = false
        } else if set.isSimple && !quorum.isJoint {
            let next = Self.apply(set.changes, to: quorum.incoming, learners: learners)
            quorum = Quorum(voters: next.voters)
            learners = next.learners
        } else if !quorum.isJoint {
            // Enter the joint configuration: the old voters must agree too until it is left.
            let outgoing = quorum.incoming
            var next = Self.apply(set.changes, to: quorum.incoming, learners: learners, demote: true)
            // Voters demoted to learners stay voters of the outgoing half until the leave.
            learnersNext = next.learners.intersection(outgoing)
            next.learners.subtract(learnersNext)
            quorum = Quorum(incoming: next.voters, outgoing: outgoing)
            learners = next.learners
            autoLeave = !set.explicitLeave
        }
        if role == .leader { leaderAppliedConfChange() }
        return confState
    }

    /// The voters and learners after `changes`.
    static func apply(_ changes: [ConfChange], to voters: Set<NodeID>, learners: Set<NodeID>, demote: Bool = false)
        -> (voters: Set<NodeID>, learners: Set<NodeID>) {
        var voters = voters
        var learners = learners
        for change in changes {
            switch change.kind {
            case .addVoter:
                voters.insert(change.node)
                learners.remove(change.node)
            case .addLearner:
                // Demoting a voter takes a joint change.
                guard demote || !voters.contains(change.node) else { continue }
                voters.remove(change.node)
                learners.insert(change.node)
            case .remove:
                voters.remove(change.node)
                learners.remove(change.node)
            }
        }
        return (voters, learners)
    }

    func leaderAppliedConfChange() {
        let members = quorum.voters.union(learners).union(learnersNext)
        for gone in progress.keys where !members.contains(gone) { progress[gone] = nil }
        for new in members.sorted() where progress[new] == nil { progress[new] = Progress(next: log.lastIndex.next) }
        if !quorum.voters.contains(id) {
            // Removed: keep leading until the remaining voters know the change committed (they
            // may need our appends to learn it), then step down (see `stepDownIfRemoved`).
            removedAt = log.applied.next
            broadcastAppend(sendIfEmpty: true)
            stepDownIfRemoved()
        } else if maybeCommit() {
            broadcastAppend(sendIfEmpty: true)
        } else {
            broadcastAppend()
        }
    }

    /// A leader in a joint configuration that should be left by itself proposes the leave once the
    /// entering change is applied.
    func maybeAutoLeave() {
        guard role == .leader, quorum.isJoint, autoLeave, pendingConfIndex <= log.applied, committedInCurrentTerm,
              leadTransferee == .none, removedAt == nil else { return }
        appendEntries([Entry(term: term, index: .zero, kind: .configChange, data: ConfChangeSet.leaveJoint.encoded)])
        pendingConfIndex = log.lastIndex
        broadcastAppend()
    }

    /// A removed leader steps down once every remaining voter has been told the removal committed.
    func stepDownIfRemoved() {
        guard role == .leader, let index = removedAt else { return }
        let told = quorum.voters.allSatisfy { voter in
            guard let p = progress[voter] else { return true }
            return p.match >= index && p.sentCommit >= index
        }
        if told { becomeFollower(term: term, leader: .none) }
    }

    /// A committed change not yet applied may remove us or change the quorum: no campaign before
    /// it is applied.
    var hasUnappliedConfChange: Bool {
        guard log.committed > log.applied,
              let pending = try? log.slice(log.applied.next, log.committed.next, maxBytes: Int.max) else { return false }
        return pending.contains { $0.kind == .configChange }
    }
}
