// Dispatch of messages and local inputs: terms first (§5.1), then by role.

extension RaftNode {
    /// Handles a message from a peer or a local input (`hup`, `beat`, `checkQuorum`, `propose`).
    public func step(_ m: Message) {
        if m.term > term && m.term != .zero {
            if m.kind == .vote || m.kind == .preVote {
                // A leader we heard from within the election timeout is alive: ignore the
                // disruption (§4.2.3). Not for a pre-vote we just started ourselves.
                if config.checkQuorum && leader != .none && electionElapsed < config.electionTicks
                    && m.context != Message.transferContext { return }
            }
            switch m.kind {
            case .preVote:
                break  // a pre-vote does not change our term
            case .preVoteResponse where !m.reject:
                break  // the term in a granted pre-vote is the one we would campaign at
            case .append, .heartbeat:
                becomeFollower(term: m.term, leader: m.from)
            default:
                becomeFollower(term: m.term, leader: .none)
            }
        } else if m.term < term && m.term != .zero {
            if (config.checkQuorum || config.preVote) && (m.kind == .heartbeat || m.kind == .append) {
                // A leader from an old term (perhaps partitioned): tell it about ours so it steps
                // down, instead of letting it wait for votes that never come.
                send(Message(kind: .appendResponse, to: m.from, term: term))
            } else if m.kind == .preVote {
                send(Message(kind: .preVoteResponse, to: m.from, term: term, reject: true))
            }
            return
        }

        switch m.kind {
        case .hup:
            campaignIfAllowed()
        case .vote, .preVote:
            handleVoteRequest(m)
        default:
            switch role {
            case .leader: stepLeader(m)
            case .candidate, .preCandidate: stepCandidate(m)
            case .follower: stepFollower(m)
            }
        }
    }

    func stepCandidate(_ m: Message) {
        switch m.kind {
        case .propose:
            break  // no leader to take it
        case .append:
            becomeFollower(term: m.term, leader: m.from)
            handleAppend(m)
        case .heartbeat:
            becomeFollower(term: m.term, leader: m.from)
            handleHeartbeat(m)
        case .snapshot:
            becomeFollower(term: m.term, leader: m.from)
            handleSnapshot(m)
        case .voteResponse where role == .candidate, .preVoteResponse where role == .preCandidate:
            receiveVote(from: m.from, granted: !m.reject)
        default:
            break
        }
    }

    func stepFollower(_ m: Message) {
        switch m.kind {
        case .propose:
            guard leader != .none else { return }
            var forwarded = m
            forwarded.to = leader
            send(forwarded)
        case .append:
            electionElapsed = 0
            leader = m.from
            handleAppend(m)
        case .heartbeat:
            electionElapsed = 0
            leader = m.from
            handleHeartbeat(m)
        case .snapshot:
            electionElapsed = 0
            leader = m.from
            handleSnapshot(m)
        case .readIndex, .transferLeader:
            guard leader != .none else { return }
            var forwarded = m
            forwarded.to = leader
            send(forwarded)
        case .readIndexResponse:
            readStates.append(ReadState(index: m.index, context: m.context))
        case .timeoutNow:
            // The leader hands over: campaign at once, without pre-vote, past the leader lease.
            if isPromotable && !hasUnappliedConfChange { campaign(pre: false, transfer: true) }
        default:
            break
        }
    }

    func stepLeader(_ m: Message) {
        switch m.kind {
        case .beat:
            broadcastHeartbeat()
        case .checkQuorum:
            let active = quorum.voters.filter { $0 == id || progress[$0]?.recentActive == true }
            for voter in quorum.voters where voter != id { progress[voter]?.recentActive = false }
            if !quorum.hasQuorum(Set(active)) { becomeFollower(term: term, leader: .none) }
        case .propose:
            guard leadTransferee == .none else { return }  // handing over: refuse
            let bytes = m.entries.reduce(0) { $0 + $1.data.count }
            guard canTakeUncommitted(bytes) else { return }  // too much not yet committed
            uncommittedBytes += bytes
            appendEntries(m.entries)
            // Sent with the next Ready: proposals made before it go out in one append per follower.
            appendsPending = true
        case .readIndex:
            handleReadIndex(m)
        case .transferLeader:
            handleTransfer(to: NodeID(m.index.value))
        case .appendResponse:
            handleAppendResponse(m)
        case .heartbeatResponse:
            handleHeartbeatResponse(m)
        default:
            break
        }
    }
}
