// Linearizable reads through ReadIndex (§6.4).

extension RaftNode {
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

    /// A heartbeat response carrying a read's context: once a quorum has acknowledged it, that read
    /// and every earlier one are answered.
    func acknowledgeRead(_ m: Message) {
        guard !m.context.isEmpty, let acks = readOnly.acknowledge(m.context, from: m.from), quorum.hasQuorum(acks) else { return }
        for released in readOnly.release(through: m.context) { answerRead(released.request, at: released.index) }
    }
}
