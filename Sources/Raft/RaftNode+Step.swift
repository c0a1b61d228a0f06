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

    // MARK: - Elections

    func campaignIfAllowed() {
        guard role != .leader, isPromotable, !hasUnappliedConfChange else { return }
        if config.preVote { campaign(pre: true) } else { campaign(pre: false) }
    }

    /// A committed change not yet applied may remove us or change the quorum: no campaign before
    /// it is applied.
    var hasUnappliedConfChange: Bool {
        guard log.committed > log.applied,
              let pending = try? log.slice(log.applied.next, log.committed.next, maxBytes: Int.max) else { return false }
        return pending.contains { $0.kind == .configChange }
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

    // MARK: - Following

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

    func handleAppend(_ m: Message) {
        if m.index < log.committed {
            // Old news: everything up to our commit index already matches.
            send(Message(kind: .appendResponse, to: m.from, term: term, index: log.committed))
            return
        }
        if let lastNew = log.maybeAppend(prevIndex: m.index, prevTerm: m.logTerm, commit: m.commit, entries: m.entries) {
            send(Message(kind: .appendResponse, to: m.from, term: term, index: lastNew))
        } else {
            send(Message(kind: .appendResponse, to: m.from, term: term, index: m.index, reject: true,
                         rejectHint: min(m.index, log.lastIndex)))
        }
    }

    /// Installs the leader's snapshot unless our log already holds what it covers.
    func handleSnapshot(_ m: Message) {
        guard let snapshot = m.snapshot else { return }
        if snapshot.index <= log.committed {
            send(Message(kind: .appendResponse, to: m.from, term: term, index: log.committed))
            return
        }
        if log.matchTerm(snapshot.index, snapshot.term) {
            // We have the entries: just learn that they are committed.
            log.commit(to: snapshot.index)
        } else {
            log.restore(snapshot)
            let conf = snapshot.confState
            quorum = Quorum(incoming: conf.voters, outgoing: conf.outgoingVoters)
            learners = conf.learners
            learnersNext = conf.learnersNext
            autoLeave = conf.autoLeave
        }
        send(Message(kind: .appendResponse, to: m.from, term: term, index: snapshot.index))
    }

    func handleHeartbeat(_ m: Message) {
        // A heartbeat carries min(leader's commit, our match): safe to commit up to.
        log.commit(to: min(m.commit, log.lastIndex))
        send(Message(kind: .heartbeatResponse, to: m.from, term: term, context: m.context))
    }

    // MARK: - Leading

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
            broadcastAppend()
        case .readIndex:
            handleReadIndex(m)
        case .transferLeader:
            handleTransfer(to: NodeID(m.index.value))
        case .appendResponse:
            // Progress is mutated in place: a copy would copy its in-flight queue too.
            guard progress[m.from] != nil else { return }
            progress[m.from]!.recentActive = true
            if m.reject {
                if progress[m.from]!.maybeDecrease(rejected: m.index, hint: m.rejectHint) {
                    if progress[m.from]!.state == .replicate { progress[m.from]!.becomeProbe() }
                    sendAppend(to: m.from)
                }
                return
            }
            let updated = progress[m.from]!.maybeUpdate(m.index)
            if progress[m.from]!.state == .snapshot && progress[m.from]!.match >= progress[m.from]!.pendingSnapshot {
                progress[m.from]!.becomeProbe()
            }
            if updated && progress[m.from]!.state == .probe { progress[m.from]!.becomeReplicate() }
            if updated {
                if maybeCommit() { broadcastAppend(sendIfEmpty: true) } else { sendAppend(to: m.from) }
            }
            if m.from == leadTransferee, progress[m.from]?.match == log.lastIndex {
                send(Message(kind: .timeoutNow, to: m.from))
            }
            if let q = progress[m.from], q.match == log.lastIndex, q.sentCommit < log.committed {
                sendAppend(to: m.from, sendIfEmpty: true)  // it has everything but the news of a commit
            }
            stepDownIfRemoved()
            guard role == .leader else { return }
            // Keep a follower that is behind fed while there is room.
            while let q = progress[m.from], q.match < log.lastIndex, !q.isPaused(maxInflight: config.maxInflightMessages),
                  q.next <= log.lastIndex {
                if !sendAppend(to: m.from) { break }
            }
        case .heartbeatResponse:
            guard progress[m.from] != nil else { return }
            progress[m.from]!.recentActive = true
            progress[m.from]!.probeSent = false
            // Appends may have been lost: free a slot so replication can resume (a gap makes the
            // follower reject, which sends it back to probing).
            if progress[m.from]!.state == .replicate && progress[m.from]!.inflights.count >= config.maxInflightMessages {
                progress[m.from]!.inflights.removeFirst()
            }
            if progress[m.from]!.match < log.lastIndex { sendAppend(to: m.from) }
            if !m.context.isEmpty, let acks = readOnly.acknowledge(m.context, from: m.from),
               quorum.hasQuorum(acks) {
                for released in readOnly.release(through: m.context) { answerRead(released.request, at: released.index) }
            }
        default:
            break
        }
    }

    /// Assigns terms and indexes to proposed entries and appends them (durable once the
    /// application persists them; the leader counts itself then).
    func appendEntries(_ proposed: [Entry]) {
        var entries = proposed
        var index = log.lastIndex
        for i in entries.indices {
            index = index.next
            entries[i].term = term
            entries[i].index = index
        }
        log.append(entries)
    }

    /// Recomputes the commit index from the voters' match indexes.
    @discardableResult
    func maybeCommit() -> Bool {
        let index = quorum.committedIndex { self.progress[$0]?.match ?? .zero }
        guard log.maybeCommit(index, term: term) else { return false }
        // The first commit of our term: reads that waited for it may go ahead.
        let waiting = pendingReads
        pendingReads = []
        for read in waiting { handleReadIndex(read) }
        return true
    }

    var committedInCurrentTerm: Bool { log.term(at: log.committed) == term }

    /// ReadIndex (§6.4): answered at the current commit index once a quorum confirms we still
    /// lead, and never before an entry of our own term has committed.
    func handleReadIndex(_ m: Message) {
        guard committedInCurrentTerm else {
            pendingReads.append(m)
            return
        }
        if quorum.voters == [id] {
            answerRead(m, at: log.committed)
            return
        }
        if readOnly.add(index: log.committed, request: m, selfID: id) {
            broadcastHeartbeat(context: m.context)
        }
    }

    func answerRead(_ request: Message, at index: LogIndex) {
        if request.from == id {
            readStates.append(ReadState(index: index, context: request.context))
        } else {
            send(Message(kind: .readIndexResponse, to: request.from, index: index, context: request.context))
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

    /// `sendIfEmpty`: also tell followers that are up to date (a new commit index).
    func broadcastAppend(sendIfEmpty: Bool = false) {
        for member in progress.keys.sorted() where member != id { sendAppend(to: member, sendIfEmpty: sendIfEmpty) }
    }

    func broadcastHeartbeat(context: [UInt8] = []) {
        let context = context.isEmpty ? (readOnly.lastContext ?? []) : context
        for voter in progress.keys.sorted() where voter != id {
            let commit = min(progress[voter]?.match ?? .zero, log.committed)
            if let p = progress[voter] { p.sentCommit = max(p.sentCommit, commit) }
            send(Message(kind: .heartbeat, to: voter, term: term, commit: commit, context: context))
        }
    }

    /// Sends the follower what it lacks from `next` on; false when paused or nothing to send.
    @discardableResult
    func sendAppend(to peer: NodeID, sendIfEmpty: Bool = false) -> Bool {
        guard let state = progress[peer], !state.isPaused(maxInflight: config.maxInflightMessages) else { return false }
        let prevIndex = state.next.previous
        guard let prevTerm = log.term(at: prevIndex),
              let entries = try? log.entries(from: state.next, maxBytes: config.maxMessageBytes) else {
            // What the follower needs next was compacted away: send the latest snapshot.
            guard let snapshot = log.storage.snapshot() else { return false }
            progress[peer]!.becomeSnapshot(snapshot.index)
            send(Message(kind: .snapshot, to: peer, term: term, snapshot: snapshot))
            return true
        }
        if state.state == .replicate && entries.isEmpty && !sendIfEmpty { return false }
        let last = entries.last?.index ?? prevIndex
        send(Message(kind: .append, to: peer, term: term, logTerm: prevTerm, index: prevIndex, entries: entries,
                     commit: log.committed))
        progress[peer]!.sent(through: last, entries: entries.count)
        progress[peer]!.sentCommit = max(progress[peer]!.sentCommit, min(log.committed, last))
        return true
    }

    /// Queues a message. The leader's appends and heartbeats may leave before this Ready's persist
    /// completes; everything else (votes, acknowledgements) only after it.
    func send(_ message: Message) {
        var m = message
        m.from = id
        if m.term == .zero && m.kind != .propose { m.term = term }
        if m.kind == .propose { m.term = .zero }
        if m.kind == .append || m.kind == .heartbeat {
            messages.append(m)
        } else {
            messagesAfterPersist.append(m)
        }
    }
}
