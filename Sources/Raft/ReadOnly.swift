/// ReadIndex requests waiting for a quorum to confirm the leader is still the leader (§6.4): each
/// is answered at the commit index it arrived at, once a heartbeat round carrying its context is
/// acknowledged by a quorum; acknowledging a later request confirms the earlier ones too.
struct ReadOnly {
    struct Pending {
        let index: LogIndex
        let request: Message
        var acks: Set<NodeID>
    }

    private var pending: [[UInt8]: Pending] = [:]
    private var queue: [[UInt8]] = []

    var isEmpty: Bool { queue.isEmpty }
    var lastContext: [UInt8]? { queue.last }

    /// Records a request at `index`; false when its context is already pending.
    mutating func add(index: LogIndex, request: Message, selfID: NodeID) -> Bool {
        guard pending[request.context] == nil else { return false }
        pending[request.context] = Pending(index: index, request: request, acks: [selfID])
        queue.append(request.context)
        return true
    }

    /// Records `from`'s acknowledgement of `context`; returns who has acknowledged it.
    mutating func acknowledge(_ context: [UInt8], from: NodeID) -> Set<NodeID>? {
        guard pending[context] != nil else { return nil }
        pending[context]!.acks.insert(from)
        return pending[context]!.acks
    }

    /// Removes and returns every request up to and including `context`.
    mutating func release(through context: [UInt8]) -> [Pending] {
        guard let position = queue.firstIndex(of: context) else { return [] }
        let released = queue[...position].compactMap { pending.removeValue(forKey: $0) }
        queue.removeFirst(position + 1)
        return released
    }
}
