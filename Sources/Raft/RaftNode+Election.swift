// Elections (§5.2, pre-vote §9.6) and leadership transfer (§3.10).

extension RaftNode {
    func campaignIfAllowed() {
        guard role != .leader, isPromotable, !hasUnappliedConfChange else { return }
        if config.preVote { campaign(pre: true) } else { campaign(pre: false) }
    }

    func campaign(pre: Bool, transfer: Bool = false) {
        let campaignTerm: Term
        if pre {
            becomePreCandidate()
            campaignTerm = term.next
            receiveVote(from: id, granted: true)
        } else {
            becomeCandidate()
            campaignTerm = term
            // Our own vote counts once the hard state holding it is durable (see `advance`).
            selfVotePending = true
        }
        if role == .leader { return }
        for voter in quorum.voters.sorted() where voter != id {
            send(Message(kind: pre ? .preVote : .vote, to: voter, term: campaignTerm,
                         logTerm: log.lastTerm, index: log.lastIndex, context: transfer ? Message.transferContext : []))
        }
    }

    func handleVoteRequest(_ m: Message) {
        let canVote = vote == m.from || (vote == .none && leader == .none) || (m.kind == .preVote && m.term > term)
        let responseKind: Message.Kind = m.kind == .vote ? .voteResponse : .preVoteResponse
        if canVote && log.isUpToDate(lastIndex: m.index, lastTerm: m.logTerm) {
            // A granted pre-vote answers with the term it was asked about.
            send(Message(kind: responseKind, to: m.from, term: m.kind == .vote ? term : m.term))
            if m.kind == .vote {
                electionElapsed = 0
                vote = m.from
            }
        } else {
            send(Message(kind: responseKind, to: m.from, term: term, reject: true))
        }
    }

    func receiveVote(from voter: NodeID, granted: Bool) {
        guard votes[voter] == nil else { return }
        votes[voter] = granted
        switch quorum.result(votes) {
        case .won:
            if role == .preCandidate { campaign(pre: false) } else if role == .candidate { becomeLeader() }
        case .lost:
            becomeFollower(term: term, leader: .none)
        case .pending:
            break
        }
    }

    /// Leadership transfer: catch the target up, then tell it to campaign now.
    func handleTransfer(to target: NodeID) {
        guard quorum.voters.contains(target), target != id, leadTransferee != target else { return }
        leadTransferee = target
        electionElapsed = 0
        if progress[target]?.match == log.lastIndex {
            send(Message(kind: .timeoutNow, to: target))
        } else {
            sendAppend(to: target)
        }
    }
}
