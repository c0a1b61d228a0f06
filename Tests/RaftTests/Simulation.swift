import Foundation
import Testing
@testable import Raft

/// A seeded simulation of a cluster: random message loss, duplication, reordering and delay,
/// partitions, crashes that lose whatever was not persisted, and ticks; invariants checked after
/// every step.
final class Simulation {
    final class Node {
        let id: NodeID
        var storage: MemoryStorage
        var raft: RaftNode<SeededRandom>
        var applied: [Entry] = []
        var alive = true
        /// Term and commit index last seen (in memory, until a crash) and last persisted.
        var seenTerm: Term = .zero
        var seenCommit: LogIndex = .zero

        init(id: NodeID, storage: MemoryStorage, raft: RaftNode<SeededRandom>) {
            self.id = id
            self.storage = storage
            self.raft = raft
        }
    }

    var random: SeededRandom
    let seed: UInt64
    var nodes: [NodeID: Node] = [:]
    var ids: [NodeID]
    var inFlight: [Message] = []
    /// Pairs (from, to) whose messages are dropped.
    var blocked: Set<[UInt64]> = []
    var leaders: [Term: NodeID] = [:]
    /// What was applied at each index by anyone: every node must apply the same.
    var appliedAt: [LogIndex: Entry] = [:]
    /// The term of every index known committed (by the leader that committed it).
    var committedAt: [LogIndex: Term] = [:]
    var highestCommitted: LogIndex = .zero
    /// Each (index, term) names one entry, whoever holds it (log matching, first half).
    var entryAt: [[UInt64]: Entry] = [:]
    var proposed = 0
    /// The client oracle: who took each proposal, and the proposals answered to their client (applied
    /// by the member that took them). Every answered one must end up applied exactly once everywhere.
    var proposer: [[UInt8]: NodeID] = [:]
    var acknowledged: Set<[UInt8]> = []
    /// For each read: the highest index applied anywhere when it was asked (its answer may not be lower).
    var readFloor: [[UInt8]: LogIndex] = [:]
    var readsAnswered = 0
    var changesApplied = 0
    var snapshotsInstalled = 0
    /// A snapshot's data is its index; the applied entries it stands for are kept here.
    var snapshotStates: [LogIndex: [Entry]] = [:]
    var dropRate = 5, duplicateRate = 2
    var steps = 0
    var failure: String?

    init(seed: UInt64, size: Int) {
        self.seed = seed
        random = SeededRandom(seed: seed)
        let voters = (1...UInt64(size)).map { NodeID($0) }
        // Two spare nodes start with an empty log and the bootstrap configuration (as a member
        // joining with the cluster's initial membership): not members, they learn every change
        // after it from the log (or a snapshot) and join only through membership changes.
        ids = voters + [NodeID(UInt64(size) + 1), NodeID(UInt64(size) + 2)]
        for id in ids {
            let storage = MemoryStorage(members: voters)
            nodes[id] = Node(id: id, storage: storage, raft: makeRaft(id, storage, applied: .zero))
        }
    }

    func makeRaft(_ id: NodeID, _ storage: MemoryStorage, applied: LogIndex) -> RaftNode<SeededRandom> {
        var config = RaftConfig(id: id)
        config.applied = applied
        config.maxInflightMessages = 4
        config.maxInflightBytes = 600
        config.maxMessageBytes = 256
        config.maxUncommittedEntriesBytes = 64
        return RaftNode(config: config, storage: storage, random: SeededRandom(seed: seed &* 31 &+ id.value))
    }

    func check(_ condition: Bool, _ message: @autoclosure () -> String) {
        if !condition && failure == nil { failure = "seed \(seed) step \(steps): \(message())" }
    }

    /// Persists, sends and applies one node's Ready (the application's loop).
    func processReady(_ node: Node) {
        guard node.alive, node.raft.hasReady else { return }
        let ready = node.raft.ready()
        if let snapshot = ready.snapshot {
            node.storage.applySnapshot(snapshot)
            guard let state = snapshotStates[snapshot.index] else {
                check(false, "unknown snapshot \(snapshot.index)")
                return
            }
            check(state.count == Int(snapshot.index.value), "snapshot state has \(state.count) entries for index \(snapshot.index)")
            check(state.count >= node.applied.count && Array(state.prefix(node.applied.count)) == node.applied,
                  "snapshot \(snapshot.index) contradicts what \(node.id) applied")
            node.applied = state
            snapshotsInstalled += 1
        }
        for entry in ready.entries {
            if let other = entryAt[[entry.index.value, entry.term.value]] {
                check(other == entry, "log matching: \(entry.index)@\(entry.term) is \(other) and \(entry)")
            } else {
                entryAt[[entry.index.value, entry.term.value]] = entry
            }
        }
        node.storage.append(ready.entries)
        if let hard = ready.hardState {
            let durable = node.storage.hardState
            check(hard.term >= durable.term && hard.commit >= durable.commit,
                  "persisted term or commit went back on \(node.id): \(durable) -> \(hard)")
            node.storage.setHardState(hard)
        }
        inFlight += ready.messages + ready.messagesAfterPersist
        for read in ready.readStates {
            readsAnswered += 1
            if let floor = readFloor[read.context] {
                check(read.index >= floor, "stale read \(read.context): index \(read.index) < \(floor) applied before it was asked")
            }
        }
        for entry in ready.committedEntries {
            check(entry.index == (node.applied.last?.index ?? .zero).next, "node \(node.id) applied \(entry.index) out of order")
            if let other = appliedAt[entry.index] {
                check(other == entry, "state machine safety: index \(entry.index) applied as \(other) and \(entry)")
            } else {
                appliedAt[entry.index] = entry
            }
            if entry.kind == .configChange {
                node.storage.confState = node.raft.applyConfChange(ConfChangeSet(encoded: entry.data)!)
                changesApplied += 1
            } else if !entry.data.isEmpty {
                check(!node.applied.contains { $0.data == entry.data }, "proposal \(entry.data) applied twice on \(node.id)")
                if proposer[entry.data] == node.id { acknowledged.insert(entry.data) }
            }
            node.applied.append(entry)
        }
        node.raft.advance(ready)
    }

    func checkInvariants() {
        for node in nodes.values where node.alive {
            let raft = node.raft
            check(raft.term >= node.seenTerm && raft.commitIndex >= node.seenCommit,
                  "term or commit went back on \(node.id): \(node.seenTerm)/\(node.seenCommit) -> \(raft.term)/\(raft.commitIndex)")
            node.seenTerm = raft.term
            node.seenCommit = raft.commitIndex
            if raft.role == .leader, raft.commitIndex > highestCommitted {
                // Record what this leader committed: no later leader may lack it.
                for index in highestCommitted.value + 1...raft.commitIndex.value {
                    if let term = raft.log.term(at: LogIndex(index)) { committedAt[LogIndex(index)] = term }
                }
                highestCommitted = raft.commitIndex
            }
            // What a node holds at a committed index is the committed entry.
            if raft.commitIndex > .zero, let term = committedAt[raft.commitIndex], let mine = raft.log.term(at: raft.commitIndex) {
                check(mine == term, "node \(node.id) commits \(raft.commitIndex)@\(mine) but \(term) was committed there")
            }
            if raft.role == .leader {
                if let other = leaders[raft.term] {
                    check(other == node.id, "election safety: \(other) and \(node.id) both lead term \(raft.term)")
                } else {
                    leaders[raft.term] = node.id
                    // Leader completeness: every applied entry is in the new leader's log.
                    // (Compacted entries are in its snapshot, which holds only applied ones.)
                    for (index, entry) in appliedAt where index >= raft.log.firstIndex {
                        check(raft.log.term(at: index) == entry.term, "leader completeness: leader \(node.id) of \(raft.term) lacks \(index)")
                    }
                    // Committed entries are never lost: every one is in the new leader's log.
                    for (index, term) in committedAt where index >= raft.log.firstIndex {
                        check(raft.log.term(at: index) == term, "committed \(index)@\(term) lost: leader \(node.id) of \(raft.term) lacks it")
                    }
                    check(raft.log.firstIndex.previous <= raft.appliedIndex || raft.log.pendingSnapshot != nil,
                          "leader \(node.id) compacted what it has not applied")
                }
            }
            check(raft.commitIndex <= raft.lastIndex, "commit beyond the log on \(node.id)")
        }
        if steps % 50 == 0 { checkLogMatching() }
    }

    /// Log matching (second half): two logs that hold the same entry at an index hold the same
    /// entries before it.
    func checkLogMatching() {
        let alive = ids.compactMap { nodes[$0] }.filter(\.alive)
        for (i, a) in alive.enumerated() {
            for b in alive[(i + 1)...] {
                let low = max(a.raft.log.firstIndex, b.raft.log.firstIndex)
                var index = min(a.raft.lastIndex, b.raft.lastIndex)
                // The highest index where both hold the same entry...
                while index >= low, a.raft.log.term(at: index) != b.raft.log.term(at: index) { index = index.previous }
                // ...and everything before it (as far as both still hold) must match.
                while index > low {
                    index = index.previous
                    check(a.raft.log.term(at: index) == b.raft.log.term(at: index),
                          "log matching: \(a.id) and \(b.id) differ at \(index) below a common entry")
                }
            }
        }
    }

    func crash(_ node: Node) {
        // Whatever the node had not persisted is gone; its state machine survives to `applied`.
        let durable = node.storage.copy()
        node.storage = durable
        node.raft = makeRaft(node.id, durable, applied: node.applied.last?.index ?? .zero)
        // What was not persisted is gone; what was persisted is the floor from now on.
        node.seenTerm = durable.hardState.term
        node.seenCommit = durable.hardState.commit
        // Streams to it broke: senders hear of it, as from a real transport.
        for m in inFlight where m.to == node.id {
            nodes[m.from]?.raft.reportUnreachable(m.to)
            if m.kind == .snapshot { nodes[m.from]?.raft.reportSnapshot(m.to, success: false) }
        }
        inFlight.removeAll { $0.to == node.id }
    }

    func deliver(_ index: Int) {
        let m = inFlight.remove(at: index)
        guard let target = nodes[m.to], target.alive, !blocked.contains([m.from.value, m.to.value]),
              random.next(below: 100) >= dropRate else {
            // Peers talk over streams: a lost message is a broken stream, which the transport
            // reports to the sender.
            nodes[m.from]?.raft.reportUnreachable(m.to)
            if m.kind == .snapshot { nodes[m.from]?.raft.reportSnapshot(m.to, success: false) }
            return
        }
        defer { if m.kind == .snapshot { nodes[m.from]?.raft.reportSnapshot(m.to, success: true) } }
        // Peers talk over streams: a forwarded proposal is never delivered twice (the member
        // matches proposals by request ID); Raft's own messages may be.
        if m.kind != .propose && random.next(below: 100) < duplicateRate { inFlight.append(m) }
        target.raft.step(m)
    }

    func randomStep() {
        steps += 1
        let roll = random.next(below: 100)
        let node = nodes[ids[random.next(below: ids.count)]]!
        switch roll {
        case 0..<48:
            if !inFlight.isEmpty { deliver(random.next(below: min(inFlight.count, 8))) }
        case 48..<67:
            if node.alive { node.raft.tick() }
        case 67..<85:
            processReady(node)
        case 85..<90:
            if node.alive, node.raft.role == .leader || node.raft.leader != .none {
                proposed += 1
                let data = Array("p\(proposed)".utf8)
                proposer[data] = node.id
                try? node.raft.propose(data)
            }
        case 90..<93:
            let context = Array("r\(steps)".utf8)
            readFloor[context] = appliedAt.keys.max() ?? .zero
            node.raft.readIndex(context: context)
        case 93:
            if random.next(below: 2) == 0 {
                node.raft.transferLeadership(to: ids[random.next(below: ids.count)])
            } else if node.alive, node.raft.role == .leader {
                // Membership churn: add a learner, promote one, or remove someone.
                let conf = node.raft.confState
                let outside = ids.filter { !conf.voters.contains($0) && !conf.learners.contains($0) }
                var change: ConfChange?
                if !conf.outgoingVoters.isEmpty {
                    // Joint with an explicit leave: leave it.
                    try? node.raft.proposeConfChange(ConfChangeSet.leaveJoint)
                    break
                }
                switch random.next(below: 4) {
                case 0: if let n = outside.randomElement(using: &random) { change = ConfChange(.addLearner, n) }
                case 1: if let n = conf.learners.sorted().randomElement(using: &random) { change = ConfChange(.addVoter, n) }
                case 2: if conf.voters.count > 1 { change = ConfChange(.remove, conf.voters.sorted().randomElement(using: &random)!) }
                default:
                    // Replace a voter through a joint configuration (left automatically or explicitly).
                    if let newcomer = (outside + conf.learners.sorted()).randomElement(using: &random),
                       let leaving = conf.voters.sorted().randomElement(using: &random) {
                        let set = ConfChangeSet([ConfChange(.addVoter, newcomer), ConfChange(.remove, leaving)],
                                                explicitLeave: random.next(below: 2) == 0)
                        try? node.raft.proposeConfChange(set)
                    }
                }
                if let change { try? node.raft.proposeConfChange(change) }
            }
        case 94:
            // Compaction: snapshot the applied state and drop the log before it.
            if node.alive, let last = node.applied.last, node.storage.firstIndex <= last.index {
                snapshotStates[last.index] = node.applied
                try? node.storage.createSnapshot(at: last.index, confState: node.storage.confState, data: [])
            }
        case 95..<97:
            // A partition: isolate one node (both ways, or only its outbound), or heal.
            blocked.removeAll()
            if random.next(below: 3) > 0 {
                let isolated = ids[random.next(below: ids.count)]
                let oneWay = random.next(below: 3) == 0
                for other in ids where other != isolated {
                    blocked.insert([isolated.value, other.value])
                    if !oneWay { blocked.insert([other.value, isolated.value]) }
                }
            }
        default:
            if node.alive { crash(node) }
        }
        checkInvariants()
    }

    /// Heals everything and runs until a leader commits a new proposal everywhere.
    func converge() {
        blocked.removeAll()
        dropRate = 0
        duplicateRate = 0
        // A client proposes a marker and, like any client, retries with a new one if it is lost
        // (an uncommitted entry of a deposed leader may be overwritten).
        var markers: [[UInt8]] = []
        for round in 0..<20_000 {
            steps += 1
            for id in ids { processReady(nodes[id]!) }
            while !inFlight.isEmpty { deliver(0) }
            for id in ids { processReady(nodes[id]!) }
            if let leader = nodes.values.first(where: { $0.raft.role == .leader }) {
                if round % 200 == 0 {
                    markers.append(Array("final-\(round)".utf8))
                    try? leader.raft.propose(markers.last!)
                    if !leader.raft.confState.outgoingVoters.isEmpty { try? leader.raft.proposeConfChange(ConfChangeSet.leaveJoint) }
                }
                let conf = leader.raft.confState
                let members = nodes.values.filter {
                    conf.voters.contains($0.id) || conf.learners.contains($0.id) || conf.outgoingVoters.contains($0.id)
                }
                if markers.contains(where: { marker in members.allSatisfy { $0.applied.contains { $0.data == marker } } }) {
                    // Everyone applied the marker; up to the shortest, the applied logs are one.
                    let shortest = members.map(\.applied.count).min() ?? 0
                    let prefixes = Set(members.map { Array($0.applied.prefix(shortest)) })
                    check(prefixes.count == 1, "applied logs differ after convergence")
                    for member in members {
                        var counts: [[UInt8]: Int] = [:]
                        for entry in member.applied where acknowledged.contains(entry.data) { counts[entry.data, default: 0] += 1 }
                        check(counts.count == acknowledged.count && counts.values.allSatisfy { $0 == 1 },
                              "member \(member.id) applied \(counts.count) of \(acknowledged.count) acknowledged proposals (each once?)")
                    }
                    checkInvariants()
                    return
                }
            }
            for id in ids { nodes[id]!.raft.tick() }
            checkInvariants()
        }
        let state = ids.map { id -> String in
            let r = nodes[id]!.raft
            let p = r.progress.sorted { $0.0 < $1.0 }.map { "\($0.0):\($0.1.state) m\($0.1.match) n\($0.1.next) ps\($0.1.probeSent) inf\($0.1.inflights.count)" }
            return "\(id): \(r.role) conf\(r.confState.voters.sorted())/\(r.confState.learners.sorted()) el\(r.electionElapsed)/\(r.randomizedElectionTimeout) t\(r.term) v\(r.vote) lead\(r.leader) c\(r.commitIndex) last\(r.lastIndex) persisted\(r.log.persistedIndex) applied\(nodes[id]!.applied.count) \(r.role == .leader ? p.joined(separator: ",") : "")"
        }
        check(false, "did not converge: \(state.joined(separator: " | "))")
    }
}

@Suite struct RaftSimulationTests {
    static func seeds() -> [UInt64] {
        let env = ProcessInfo.processInfo.environment
        if let one = env["RAFT_SIM_SEED"].flatMap(UInt64.init) { return [one] }
        let count = env["RAFT_SIM_SEEDS"].flatMap(Int.init) ?? 200
        let base = env["RAFT_SIM_SEED_BASE"].flatMap(UInt64.init) ?? 1
        return (0..<UInt64(count)).map { base + $0 }
    }

    @Test func seededSimulationsKeepRaftsSafetyProperties() {
        var failures: [String] = []
        var reads = 0
        var changes = 0
        var snapshots = 0
        var applied = 0
        var acknowledged = 0
        for seed in Self.seeds() {
            let sim = Simulation(seed: seed, size: 3 + Int(seed % 5))
            for _ in 0..<3_000 where sim.failure == nil { sim.randomStep() }
            if sim.failure == nil { sim.converge() }
            if let failure = sim.failure { failures.append(failure) }
            reads += sim.readsAnswered
            changes += sim.changesApplied
            snapshots += sim.snapshotsInstalled
            applied += sim.appliedAt.count
            acknowledged += sim.acknowledged.count
            if failures.count >= 5 { break }
        }
        #expect(failures.isEmpty, "\(failures.joined(separator: "\n"))")
        // The runs did something: entries were applied and reads answered (and checked).
        #expect(reads > 0 && changes > 0 && snapshots > 0 && applied > Self.seeds().count && acknowledged > 0)
    }

    @Test func aSingleNodeElectsItselfAndCommits() throws {
        let storage = MemoryStorage(members: [1])
        let node = RaftNode(config: RaftConfig(id: 1), storage: storage, random: SeededRandom(seed: 1))
        node.campaign()
        drain(node, storage)
        #expect(node.role == .leader && node.term == 1)
        try node.propose(Array("x".utf8))
        drain(node, storage)
        #expect(node.commitIndex == 2 && node.appliedIndex == 2)
    }
}
