// Log replication (§5.3): the follower's side, the leader's pipeline per follower, commitment.

extension RaftNode {
    // MARK: - Following

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

    /// A follower acknowledged (or rejected) an append.
    func handleAppendResponse(_ m: Message) {
        guard let p = progress[m.from] else { return }
        p.recentActive = true
        if m.reject {
            if p.maybeDecrease(rejected: m.index, hint: m.rejectHint) {
                if p.state == .replicate { p.becomeProbe() }
                sendAppend(to: m.from)
            }
            return
        }
        let updated = p.maybeUpdate(m.index)
        if p.state == .snapshot && p.match >= p.pendingSnapshot { p.becomeProbe() }
        if updated && p.state == .probe { p.becomeReplicate() }
        if updated {
            if maybeCommit() { broadcastAppend(sendIfEmpty: true) } else { sendAppend(to: m.from) }
        }
        if m.from == leadTransferee, p.match == log.lastIndex {
            send(Message(kind: .timeoutNow, to: m.from))
        }
        if p.match == log.lastIndex, p.sentCommit < log.committed {
            sendAppend(to: m.from, sendIfEmpty: true)  // it has everything but the news of a commit
        }
        stepDownIfRemoved()
        guard role == .leader, progress[m.from] === p else { return }
        // Keep a follower that is behind fed while there is room.
        while p.match < log.lastIndex, !isPaused(p), p.next <= log.lastIndex {
            if !sendAppend(to: m.from) { break }
        }
    }

    func handleHeartbeatResponse(_ m: Message) {
        guard let p = progress[m.from] else { return }
        p.recentActive = true
        p.probeSent = false
        // Appends may have been lost: free a slot so replication can resume (a gap makes the
        // follower reject, which sends it back to probing).
        if p.state == .replicate && isPaused(p) { p.inflights.removeFirst() }
        if p.match < log.lastIndex { sendAppend(to: m.from) }
        acknowledgeRead(m)
    }

    /// The pipeline to `p` is full (in-flight messages or bytes), or it is probing or snapshotting.
    func isPaused(_ p: Progress) -> Bool {
        p.isPaused(maxInflight: config.maxInflightMessages, maxBytes: config.maxInflightBytes)
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
        guard let state = progress[peer], !isPaused(state) else { return false }
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
        progress[peer]!.sent(through: last, entries: entries.count, bytes: entries.reduce(0) { $0 + $1.size })
        progress[peer]!.sentCommit = max(progress[peer]!.sentCommit, min(log.committed, last))
        return true
    }

    func canTakeUncommitted(_ bytes: Int) -> Bool {
        let limit = config.maxUncommittedEntriesBytes
        return limit == 0 || uncommittedBytes == 0 || uncommittedBytes + bytes <= limit
    }

    /// How sending a snapshot to `peer` ended (the transport reports it).
    public func reportSnapshot(_ peer: NodeID, success: Bool) {
        guard role == .leader, let p = progress[peer], p.state == .snapshot else { return }
        if !success { p.pendingSnapshot = .zero }
        p.becomeProbe()
        // After a failure wait for the next heartbeat; after success probe at once.
        p.probeSent = !success
        if success { sendAppend(to: peer) }
    }

    /// The transport could not deliver to `peer` (its stream broke): appends sent optimistically
    /// may be lost, so go back to probing its match point.
    public func reportUnreachable(_ peer: NodeID) {
        guard role == .leader, peer != id, let p = progress[peer] else { return }
        if p.state == .replicate { p.becomeProbe() }
        p.probeSent = false
    }

    /// Queues a message. Answers that promise durable state — an append acknowledgement (the
    /// entries are on disk), a granted vote (the vote is on disk) and pre-vote answers — leave only
    /// after this Ready's persist completes; everything else (appends, heartbeats and their
    /// answers, vote requests, snapshots, forwarded requests) may leave at once.
    func send(_ message: Message) {
        var m = message
        m.from = id
        if m.term == .zero && m.kind != .propose { m.term = term }
        if m.kind == .propose { m.term = .zero }
        switch m.kind {
        case .appendResponse, .voteResponse, .preVoteResponse:
            messagesAfterPersist.append(m)
        default:
            messages.append(m)
        }
    }
}
