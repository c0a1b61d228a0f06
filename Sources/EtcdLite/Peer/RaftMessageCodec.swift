import Raft

/// Raft messages between members, in our own compact binary form (little-endian; a peer stream
/// carries each one length-prefixed). Decoding never traps: anything malformed is an error, and the
/// stream that sent it is closed.
enum RaftMessageCodec {
    struct Malformed: Error, CustomStringConvertible {
        let reason: String
        var description: String { "malformed raft message: \(reason)" }
    }

    /// The kinds that travel between members (local inputs never do).
    private static let kinds: [Message.Kind] = [
        .append, .appendResponse, .vote, .voteResponse, .preVote, .preVoteResponse, .heartbeat,
        .heartbeatResponse, .propose, .snapshot, .readIndex, .readIndexResponse, .timeoutNow, .transferLeader,
    ]

    static func encode(_ m: Message) -> [UInt8] {
        var w = ByteWriter()
        w.u8(UInt8(kinds.firstIndex(of: m.kind) ?? 0xFF))
        for value in [m.from.value, m.to.value, m.term.value, m.logTerm.value, m.index.value, m.commit.value, m.rejectHint.value] {
            w.u64(value)
        }
        w.u8(m.reject ? 1 : 0)
        w.blob(m.context)
        w.u64(UInt64(m.entries.count))
        for entry in m.entries {
            w.u64(entry.term.value)
            w.u64(entry.index.value)
            w.u8(entry.kind.rawValue)
            w.blob(entry.data)
        }
        if let snapshot = m.snapshot {
            w.u8(1)
            w.u64(snapshot.index.value)
            w.u64(snapshot.term.value)
            w.confState(snapshot.confState)
            w.blob(snapshot.data)
        } else {
            w.u8(0)
        }
        return w.bytes
    }

    static func decode(_ bytes: [UInt8]) throws -> Message {
        var r = ByteReader(bytes)
        do {
            let kindByte = Int(try r.u8())
            guard kindByte < kinds.count else { throw Malformed(reason: "unknown kind \(kindByte)") }
            var m = Message(kind: kinds[kindByte])
            m.from = NodeID(try r.u64())
            m.to = NodeID(try r.u64())
            m.term = Term(try r.u64())
            m.logTerm = Term(try r.u64())
            m.index = LogIndex(try r.u64())
            m.commit = LogIndex(try r.u64())
            m.rejectHint = LogIndex(try r.u64())
            m.reject = try r.u8() == 1
            m.context = try r.blob()
            let count = try r.u64()
            // Each entry takes at least 25 bytes: a count beyond what is left is a lie.
            guard count <= UInt64(r.remaining / 25) else { throw Malformed(reason: "\(count) entries in \(r.remaining) bytes") }
            m.entries.reserveCapacity(Int(count))
            for _ in 0..<count {
                let term = Term(try r.u64())
                let index = LogIndex(try r.u64())
                guard let kind = Entry.Kind(rawValue: try r.u8()) else { throw Malformed(reason: "unknown entry kind") }
                m.entries.append(Entry(term: term, index: index, kind: kind, data: try r.blob()))
            }
            if try r.u8() == 1 {
                let index = LogIndex(try r.u64())
                let term = Term(try r.u64())
                let conf = try r.confState()
                m.snapshot = Snapshot(index: index, term: term, confState: conf, data: try r.blob())
            }
            guard r.remaining == 0 else { throw Malformed(reason: "\(r.remaining) trailing bytes") }
            return m
        } catch is ByteReader.Truncated {
            throw Malformed(reason: "truncated")
        }
    }
}

extension ByteWriter {
    /// A length-prefixed byte string.
    mutating func blob(_ data: [UInt8]) {
        u64(UInt64(data.count))
        bytes += data
    }

    mutating func confState(_ conf: ConfState) {
        for set in [conf.voters, conf.learners, conf.outgoingVoters, conf.learnersNext] { ids(Set(set.map(\.value))) }
        u8(conf.autoLeave ? 1 : 0)
    }
}

extension ByteReader {
    var remaining: Int { bytes.count - position }

    mutating func blob() throws -> [UInt8] {
        let count = try u64()
        guard count <= UInt64(remaining) else { throw Truncated() }
        defer { position += Int(count) }
        return Array(bytes[position..<(position + Int(count))])
    }

    mutating func confState() throws -> ConfState {
        func nodes(_ ids: Set<UInt64>) -> Set<NodeID> { Set(ids.map { NodeID($0) }) }
        let voters = try ids(), learners = try ids(), outgoing = try ids(), next = try ids()
        return ConfState(voters: nodes(voters), learners: nodes(learners), outgoingVoters: nodes(outgoing),
                         learnersNext: nodes(next), autoLeave: try u8() == 1)
    }
}
