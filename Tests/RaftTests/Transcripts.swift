import Foundation
import Testing
@testable import Raft

/// Scenario transcripts (Tests/RaftTests/testdata/*.txt): each block is one command, a `----` line
/// and the output it must print, ended by a blank line. A run replays the commands against real
/// `RaftNode`s with in-memory storage and compares what they print. Regenerate the expected output
/// with `RAFT_TRANSCRIPTS_REWRITE=1 swift test --filter Transcript` and review it as a diff.
///
/// Commands:
///   add-nodes N [voters=1,2,3] [learners=4] [prevote=false] [checkquorum=false] [inflight=N]
///   campaign ID | propose ID DATA | propose-conf-change ID [explicit] v4 l5 r2 (empty: leave joint)
///   process-ready ID... | deliver-msgs [drop] ID... | stabilize [ID...]
///   tick ID [N] | tick-heartbeat ID | tick-election ID
///   partition 1 2 / 3 | heal | transfer-leadership FROM TO | read-index ID CONTEXT
///   compact ID INDEX | send-snapshot FROM TO | report-snapshot FROM TO ok|fail
///   report-unreachable FROM TO | restart ID | raft-state | raft-log ID | status ID
final class TranscriptRunner {
    final class Node {
        let id: NodeID
        var storage: MemoryStorage
        var raft: RaftNode<SeededRandom>
        var config: RaftConfig
        var applied: LogIndex = .zero
        var restarts: UInt64 = 0

        init(id: NodeID, storage: MemoryStorage, config: RaftConfig) {
            self.id = id
            self.storage = storage
            self.config = config
            raft = RaftNode(config: config, storage: storage, random: SeededRandom(seed: id.value))
        }
    }

    var nodes: [NodeID: Node] = [:]
    var order: [NodeID] = []
    /// Messages waiting for each recipient, in send order.
    var mailbox: [NodeID: [Message]] = [:]
    /// Partition groups: messages between different groups are dropped on delivery.
    var groups: [NodeID: Int] = [:]
    var out: [String] = []

    func print(_ line: String) { out.append(line) }

    func run(_ command: String) throws -> String {
        out = []
        var words = command.split(separator: " ").map(String.init)
        let name = words.removeFirst()
        var options: [String: String] = [:]
        let positional = words.filter { word in
            guard let eq = word.firstIndex(of: "=") else { return true }
            options[String(word[..<eq])] = String(word[word.index(after: eq)...])
            return false
        }
        func id(_ i: Int) throws -> NodeID {
            guard i < positional.count, let v = UInt64(positional[i]), nodes[NodeID(v)] != nil else {
                throw TranscriptError("\(name): no node \(i < positional.count ? positional[i] : "given")")
            }
            return NodeID(v)
        }
        func ids(from start: Int = 0) throws -> [NodeID] {
            positional.count > start ? try (start..<positional.count).map(id) : order
        }
        switch name {
        case "add-nodes":
            guard let count = positional.first.flatMap(Int.init) else { throw TranscriptError("add-nodes N") }
            let voters = Set(options["voters"].map(Self.idList) ?? [])
            let learners = Set(options["learners"].map(Self.idList) ?? [])
            for _ in 0..<count {
                let id = NodeID(UInt64(order.count + 1))
                var config = RaftConfig(id: id)
                config.preVote = options["prevote"] != "false"
                config.checkQuorum = options["checkquorum"] != "false"
                if let inflight = options["inflight"].flatMap(Int.init) { config.maxInflightMessages = inflight }
                let storage = MemoryStorage(confState: ConfState(voters: voters, learners: learners))
                nodes[id] = Node(id: id, storage: storage, config: config)
                order.append(id)
            }
            print("ok")
        case "campaign":
            nodes[try id(0)]!.raft.campaign()
            print("ok")
        case "propose":
            guard positional.count == 2 else { throw TranscriptError("propose ID DATA") }
            do {
                try nodes[try id(0)]!.raft.propose(Array(positional[1].utf8))
                print("ok")
            } catch { print("\(error)") }
        case "propose-conf-change":
            let changes = try positional.dropFirst().map { word -> ConfChange in
                guard let v = UInt64(word.dropFirst()) else { throw TranscriptError("bad change \(word)") }
                switch word.first {
                case "v": return ConfChange(.addVoter, NodeID(v))
                case "l": return ConfChange(.addLearner, NodeID(v))
                case "r": return ConfChange(.remove, NodeID(v))
                default: throw TranscriptError("bad change \(word)")
                }
            }
            do {
                try nodes[try id(0)]!.raft.proposeConfChange(ConfChangeSet(changes, explicitLeave: options["explicit"] == "true"))
                print("ok")
            } catch { print("\(error)") }
        case "process-ready":
            for id in try ids() { processReady(nodes[id]!) }
        case "deliver-msgs":
            let drop = positional.first == "drop"
            for id in try ids(from: drop ? 1 : 0) { deliver(to: id, drop: drop) }
        case "stabilize":
            let chosen = try ids()
            var moved = true
            while moved {
                moved = false
                for id in chosen where nodes[id]!.raft.hasReady {
                    processReady(nodes[id]!)
                    moved = true
                }
                for id in chosen where !(mailbox[id] ?? []).isEmpty {
                    deliver(to: id, drop: false)
                    moved = true
                }
            }
        case "tick", "tick-heartbeat", "tick-election":
            let node = nodes[try id(0)]!
            let times = switch name {
            case "tick-heartbeat": node.config.heartbeatTicks
            // A leader's election timeout is its check-quorum round.
            case "tick-election": node.raft.role == .leader ? node.config.electionTicks : node.raft.randomizedElectionTimeout
            default: positional.count > 1 ? Int(positional[1]) ?? 1 : 1
            }
            for _ in 0..<times { node.raft.tick() }
            print("ok")
        case "partition":
            groups = [:]
            var group = 0
            for word in positional {
                if word == "/" { group += 1 } else if let v = UInt64(word) { groups[NodeID(v)] = group }
            }
            print("ok")
        case "heal":
            groups = [:]
            print("ok")
        case "transfer-leadership":
            nodes[try id(0)]!.raft.transferLeadership(to: try id(1))
            print("ok")
        case "read-index":
            guard positional.count == 2 else { throw TranscriptError("read-index ID CONTEXT") }
            nodes[try id(0)]!.raft.readIndex(context: Array(positional[1].utf8))
            print("ok")
        case "compact":
            let node = nodes[try id(0)]!
            guard positional.count == 2, let index = UInt64(positional[1]) else { throw TranscriptError("compact ID INDEX") }
            try node.storage.createSnapshot(at: LogIndex(index), confState: node.storage.confState, data: Array("snap@\(index)".utf8))
            print("snapshot \(index)@\(try node.storage.term(at: LogIndex(index))); log now \(node.storage.firstIndex)...\(node.storage.lastIndex)")
        case "send-snapshot":
            let from = nodes[try id(0)]!
            guard let snapshot = from.storage.snapshot() else { throw TranscriptError("send-snapshot: \(from.id) has none") }
            let m = Message(kind: .snapshot, from: from.id, to: try id(1), term: from.raft.term, snapshot: snapshot)
            mailbox[m.to, default: []].append(m)
            print(describe(m))
        case "report-snapshot":
            nodes[try id(0)]!.raft.reportSnapshot(try id(1), success: positional.count > 2 && positional[2] == "ok")
            print("ok")
        case "report-unreachable":
            nodes[try id(0)]!.raft.reportUnreachable(try id(1))
            print("ok")
        case "restart":
            let node = nodes[try id(0)]!
            // Whatever was not persisted is gone, and so are the messages on their way to it.
            node.storage = node.storage.copy()
            node.config.applied = node.applied
            node.restarts += 1
            node.raft = RaftNode(config: node.config, storage: node.storage,
                                 random: SeededRandom(seed: node.id.value &+ 1_000 &* node.restarts))
            mailbox[node.id] = []
            print("\(node.id) restarted: \(state(node))")
        case "raft-state":
            for id in order { print("\(id): \(state(nodes[id]!))") }
        case "raft-log":
            let node = nodes[try id(0)]!
            let storage = node.storage
            if let snapshot = storage.snapshot() { print("snapshot \(snapshot.index)@\(snapshot.term)") }
            let entries = storage.lastIndex < storage.firstIndex ? []
                : try storage.entries(from: storage.firstIndex, to: storage.lastIndex.next, maxBytes: .max)
            if entries.isEmpty { print("log is empty") }
            for entry in entries { print(Self.describe(entry)) }
        case "status":
            let node = nodes[try id(0)]!
            print("\(node.id): \(state(node))")
            for (peer, p) in node.raft.progress.sorted(by: { $0.0 < $1.0 }) {
                var line = "  \(peer): \(p.state) match=\(p.match) next=\(p.next)"
                if p.state == .replicate { line += " inflight=\(p.inflights.count)" }
                if p.state == .probe && p.probeSent { line += " paused" }
                if p.state == .snapshot { line += " pending=\(p.pendingSnapshot)" }
                print(line)
            }
        default:
            throw TranscriptError("unknown command \(name)")
        }
        return out.joined(separator: "\n")
    }

    func state(_ node: Node) -> String {
        let r = node.raft
        let conf = r.confState
        var s = "\(r.role) term=\(r.term) vote=\(r.vote) leader=\(r.leader) commit=\(r.commitIndex) applied=\(node.applied) last=\(r.lastIndex)"
        s += " voters=\(Self.list(conf.voters))"
        if !conf.outgoingVoters.isEmpty { s += "&&\(Self.list(conf.outgoingVoters))" }
        if !conf.learners.isEmpty { s += " learners=\(Self.list(conf.learners))" }
        if !conf.learnersNext.isEmpty { s += " learners-next=\(Self.list(conf.learnersNext))" }
        return s
    }

    /// Persists, applies and sends one node's Ready, printing it.
    func processReady(_ node: Node) {
        guard node.raft.hasReady else { return }
        let ready = node.raft.ready()
        print("> \(node.id) handling Ready")
        if let soft = ready.softState { print("  soft: \(soft.role) leader=\(soft.leader)") }
        if let hard = ready.hardState { print("  hard: term=\(hard.term) vote=\(hard.vote) commit=\(hard.commit)") }
        if let snapshot = ready.snapshot {
            print("  snapshot: \(snapshot.index)@\(snapshot.term) voters=\(Self.list(snapshot.confState.voters))")
            node.storage.applySnapshot(snapshot)
            node.applied = snapshot.index
        }
        if !ready.entries.isEmpty { print("  entries: \(ready.entries.map(Self.describe).joined(separator: ", "))") }
        node.storage.append(ready.entries)
        if let hard = ready.hardState { node.storage.setHardState(hard) }
        for m in ready.messages { send(m, "  send") }
        for m in ready.messagesAfterPersist { send(m, "  send after persist") }
        if !ready.committedEntries.isEmpty {
            print("  apply: \(ready.committedEntries.map(Self.describe).joined(separator: ", "))")
        }
        for entry in ready.committedEntries {
            if entry.kind == .configChange, let set = ConfChangeSet(encoded: entry.data) {
                node.storage.confState = node.raft.applyConfChange(set)
                let conf = node.storage.confState
                print("  conf now: voters=\(Self.list(conf.voters))\(conf.outgoingVoters.isEmpty ? "" : "&&\(Self.list(conf.outgoingVoters))") learners=\(Self.list(conf.learners))")
            }
            node.applied = entry.index
        }
        for read in ready.readStates { print("  read ready: index=\(read.index) ctx=\(String(decoding: read.context, as: UTF8.self))") }
        node.raft.advance(ready)
    }

    func send(_ m: Message, _ label: String) {
        print("\(label): \(describe(m))")
        mailbox[m.to, default: []].append(m)
    }

    /// Delivers (or drops) every message waiting for `id`, printing each.
    func deliver(to id: NodeID, drop: Bool) {
        let waiting = mailbox[id] ?? []
        mailbox[id] = []
        for m in waiting {
            let cut = groups[m.from, default: 0] != groups[m.to, default: 0]
            if drop {
                print("dropped: \(describe(m))")
            } else if cut {
                // Peers talk over streams: across a partition the stream breaks and the transport
                // tells the sender (an explicit `drop` is a silent loss instead).
                print("dropped: \(describe(m)) (partition)")
                nodes[m.from]?.raft.reportUnreachable(m.to)
                if m.kind == .snapshot { nodes[m.from]?.raft.reportSnapshot(m.to, success: false) }
            } else {
                print("deliver: \(describe(m))")
                nodes[id]!.raft.step(m)
            }
        }
    }

    func describe(_ m: Message) -> String {
        var s = "\(m.from)->\(m.to) \(Self.name(m.kind)) term=\(m.term)"
        switch m.kind {
        case .append:
            s += " prev=\(m.index)@\(m.logTerm) commit=\(m.commit)"
            if !m.entries.isEmpty { s += " entries=[\(m.entries.map(Self.describe).joined(separator: ", "))]" }
        case .appendResponse:
            s += m.reject ? " rejected index=\(m.index) hint=\(m.rejectHint)" : " index=\(m.index)"
        case .vote, .preVote:
            s += " last=\(m.index)@\(m.logTerm)"
            if !m.context.isEmpty { s += " transfer" }
        case .voteResponse, .preVoteResponse:
            s += m.reject ? " rejected" : " granted"
        case .heartbeat:
            s += " commit=\(m.commit)"
            if !m.context.isEmpty { s += " ctx=\(String(decoding: m.context, as: UTF8.self))" }
        case .heartbeatResponse:
            if !m.context.isEmpty { s += " ctx=\(String(decoding: m.context, as: UTF8.self))" }
        case .snapshot:
            if let snapshot = m.snapshot { s += " snapshot=\(snapshot.index)@\(snapshot.term) voters=\(Self.list(snapshot.confState.voters))" }
        case .readIndex, .readIndexResponse:
            if m.kind == .readIndexResponse { s += " index=\(m.index)" }
            s += " ctx=\(String(decoding: m.context, as: UTF8.self))"
        case .propose:
            s += " entries=[\(m.entries.map { Self.data($0.data) }.joined(separator: ", "))]"
        case .transferLeader:
            s += " to=\(m.index)"
        default:
            break
        }
        return s
    }

    static func name(_ kind: Message.Kind) -> String {
        switch kind {
        case .append: "app"
        case .appendResponse: "app-resp"
        case .vote: "vote"
        case .voteResponse: "vote-resp"
        case .preVote: "prevote"
        case .preVoteResponse: "prevote-resp"
        case .heartbeat: "heartbeat"
        case .heartbeatResponse: "heartbeat-resp"
        case .propose: "propose"
        case .snapshot: "snapshot"
        case .readIndex: "read-index"
        case .readIndexResponse: "read-index-resp"
        case .timeoutNow: "timeout-now"
        case .transferLeader: "transfer-leader"
        case .hup, .beat, .checkQuorum: "\(kind)"
        }
    }

    static func describe(_ entry: Entry) -> String {
        var s = "\(entry.index)@\(entry.term)"
        if entry.kind == .configChange, let set = ConfChangeSet(encoded: entry.data) {
            let changes = set.changes.map { change -> String in
                switch change.kind {
                case .addVoter: "v\(change.node)"
                case .addLearner: "l\(change.node)"
                case .remove: "r\(change.node)"
                }
            }
            s += set.isLeave ? " conf(leave-joint)" : " conf(\(changes.joined(separator: " "))\(set.explicitLeave ? " explicit" : ""))"
        } else if !entry.data.isEmpty {
            s += " \(data(entry.data))"
        }
        return s
    }

    static func data(_ bytes: [UInt8]) -> String {
        bytes.allSatisfy { $0 > 32 && $0 < 127 } ? String(decoding: bytes, as: UTF8.self) : bytes.map { String($0, radix: 16) }.joined()
    }

    static func list(_ ids: Set<NodeID>) -> String { "(\(ids.sorted().map(\.description).joined(separator: " ")))" }

    static func idList(_ text: String) -> [NodeID] { text.split(separator: ",").compactMap { UInt64($0).map { NodeID($0) } } }
}

struct TranscriptError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

@Suite struct TranscriptTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("testdata")

    static func files() -> [String] {
        ((try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []).filter { $0.hasSuffix(".txt") }.sorted()
    }

    @Test func thereAreTranscripts() {
        #expect(Self.files().count >= 8, "\(Self.directory.path)")
    }

    /// Replays a transcript and compares every command's output with the recorded one.
    @Test(arguments: files()) func transcript(_ file: String) throws {
        let url = Self.directory.appendingPathComponent(file)
        let text = try String(contentsOf: url, encoding: .utf8)
        let runner = TranscriptRunner()
        var rewritten: [String] = []
        var mismatches: [String] = []
        var lines = text.components(separatedBy: "\n")[...]
        while let line = lines.first {
            lines = lines.dropFirst()
            // Comments and blank lines between blocks are kept as they are.
            if line.isEmpty || line.hasPrefix("#") {
                rewritten.append(line)
                continue
            }
            let command = line
            guard lines.first == "----" else { throw TranscriptError("\(file): '\(command)' is not followed by ----") }
            lines = lines.dropFirst()
            var expected: [String] = []
            while let next = lines.first, !next.isEmpty {
                expected.append(next)
                lines = lines.dropFirst()
            }
            let actual = try runner.run(command)
            if actual != expected.joined(separator: "\n") {
                let got = actual.components(separatedBy: "\n")
                let first = (0..<min(got.count, expected.count)).first { got[$0] != expected[$0] } ?? min(got.count, expected.count)
                mismatches.append("""
                    \(file): '\(command)' differs at output line \(first + 1):
                      expected: \(first < expected.count ? expected[first] : "<end>")
                      actual:   \(first < got.count ? got[first] : "<end>")
                    """)
            }
            rewritten += [command, "----", actual]
        }
        if ProcessInfo.processInfo.environment["RAFT_TRANSCRIPTS_REWRITE"] == "1" {
            var output = rewritten.joined(separator: "\n")
            if !output.hasSuffix("\n") { output += "\n" }
            try output.write(to: url, atomically: true, encoding: .utf8)
            return
        }
        #expect(mismatches.isEmpty, "\(mismatches.joined(separator: "\n"))\n(RAFT_TRANSCRIPTS_REWRITE=1 records the new output)")
    }
}
