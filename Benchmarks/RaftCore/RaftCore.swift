import Benchmark
import Raft

// Committed proposals per second of the Raft core alone: a 3-node cluster in memory driven
// through Ready (no I/O, messages handed over directly), 64-byte entries. Each benchmark iteration
// is 1,000 proposals (scaling factor kilo): per-iteration figures are per 1,000 proposals, the
// scaled ones per proposal. Run: swift package benchmark --target RaftCore

/// Three nodes whose Readies are persisted to memory and whose messages are delivered at once.
final class Cluster: @unchecked Sendable {
    var nodes: [(raft: RaftNode<SeededRandom>, storage: MemoryStorage)] = []
    var applied = 0

    init() {
        let ids: [NodeID] = [1, 2, 3]
        for id in ids {
            let storage = MemoryStorage(members: ids)
            var config = RaftConfig(id: id)
            config.maxInflightMessages = 1024
            nodes.append((RaftNode(config: config, storage: storage, random: SeededRandom(seed: id.value)), storage))
        }
        nodes[0].raft.campaign()
        drive()
    }

    func drive() {
        var moved = true
        while moved {
            moved = false
            for index in nodes.indices {
                let (raft, storage) = nodes[index]
                guard raft.hasReady else { continue }
                moved = true
                let ready = raft.ready()
                storage.append(ready.entries)
                if let hard = ready.hardState { storage.setHardState(hard) }
                for m in ready.messages { nodes[Int(m.to.value) - 1].raft.step(m) }
                for m in ready.messagesAfterPersist { nodes[Int(m.to.value) - 1].raft.step(m) }
                if index == 0 { applied += ready.committedEntries.count }
                raft.advance(ready)
            }
        }
    }

    /// Drops applied entries from every log (outside the measurement) so memory stays flat.
    func compact() {
        for (raft, storage) in nodes where raft.appliedIndex >= storage.firstIndex {
            try? storage.compact(through: raft.appliedIndex)
        }
    }
}

let payload = [UInt8](repeating: 7, count: 64)

func proposals(batch: Int) -> (Benchmark) -> Void {
    let cluster = Cluster()
    return { benchmark in
        let before = cluster.applied
        let total = benchmark.scaledIterations.count
        benchmark.startMeasurement()
        var proposed = 0
        while proposed < total {
            for _ in 0..<min(batch, total - proposed) {
                try! cluster.nodes[0].raft.propose(payload)
                proposed += 1
            }
            cluster.drive()
        }
        benchmark.stopMeasurement()
        precondition(cluster.applied - before == total, "every proposal commits and applies on the leader")
        cluster.compact()
    }
}

let benchmarks: @Sendable () -> Void = {
    let configuration = Benchmark.Configuration(
        metrics: [.throughput, .wallClock, .mallocCountTotal, .cpuTotal],
        scalingFactor: .kilo,
        maxDuration: .seconds(5),
        maxIterations: 5_000,
        // Allocation counts may not grow by more than 5 % over Benchmarks/Thresholds/ (times vary
        // with the machine and are not checked).
        thresholds: [.mallocCountTotal: .init(relative: [.p90: 5])])
    Benchmark("CommittedProposalsBatchesOf64", configuration: configuration, closure: proposals(batch: 64))
    Benchmark("CommittedProposalsOneAtATime", configuration: configuration, closure: proposals(batch: 1))
}
