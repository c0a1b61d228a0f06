// Becoming follower, pre-candidate, candidate or leader: what each role starts with.

extension RaftNode {
    func resetRandomizedElectionTimeout() {
        randomizedElectionTimeout = config.electionTicks + random.next(below: config.electionTicks)
    }

    func reset(term newTerm: Term) {
        if term != newTerm {
            term = newTerm
            vote = .none
        }
        leader = .none
        electionElapsed = 0
        heartbeatElapsed = 0
        resetRandomizedElectionTimeout()
        votes = [:]
        selfVotePending = false
        readOnly = ReadOnly()
        pendingReads = []
        leadTransferee = .none
        removedAt = nil
        uncommittedBytes = 0
        appendsPending = false
        progress = ProgressMap()
        for member in quorum.voters.union(learners).union(learnersNext).sorted() {
            let p = Progress(next: log.lastIndex.next)
            if member == id { p.match = log.persistedIndex }
            progress[member] = p
        }
    }

    func becomeFollower(term newTerm: Term, leader newLeader: NodeID) {
        reset(term: newTerm)
        leader = newLeader
        role = .follower
    }

    func becomePreCandidate() {
        // A pre-vote changes neither term nor vote.
        votes = [:]
        selfVotePending = false
        leader = .none
        role = .preCandidate
    }

    func becomeCandidate() {
        reset(term: term.next)
        vote = id
        role = .candidate
    }

    func becomeLeader() {
        reset(term: term)
        leader = id
        role = .leader
        for member in progress.keys where member != id { progress[member]!.recentActive = true }
        // Our own log needs no probing: what we persist we match.
        progress[id]?.becomeReplicate()
        // Changes in the log we have not applied may be pending: wait for them before another.
        pendingConfIndex = log.lastIndex
        // An entry of the new term: committing it commits everything before (§5.4.2).
        appendEntries([Entry(term: term, index: .zero)])
        broadcastAppend()
    }
}
