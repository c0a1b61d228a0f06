import Foundation
import Raft

/// Committed proposals per second in a 3-node in-memory cluster driven through Ready: no I/O,
/// messages handed over directly, storage in memory. Usage: raft-bench [proposals] [batch]
struct Cluster {
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
    }

    mutating func drive() {
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
                for m in ready.messages + ready.messagesAfterPersist { nodes[Int(m.to.value) - 1].raft.step(m) }
                if index == 0 { applied += ready.committedEntries.count }
                raft.advance(ready)
            }
        }
    }
}

let arguments = CommandLine.arguments
let total = arguments.count > 1 ? Int(arguments[1])! : 200_000
let batch = arguments.count > 2 ? Int(arguments[2])! : 1
var cluster = Cluster()
cluster.nodes[0].raft.campaign()
cluster.drive()
let payload = [UInt8](repeating: 7, count: 64)
let start = ContinuousClock.now
var proposed = 0
while proposed < total {
    for _ in 0..<min(batch, total - proposed) {
        try cluster.nodes[0].raft.propose(payload)
        proposed += 1
    }
    cluster.drive()
}
let elapsed = ContinuousClock.now - start
let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
print(String(format: "raft-bench: %d proposals of 64 B, batch %d: committed and applied on the leader %d in %.3f s = %.0f/s",
             total, batch, cluster.applied - 1, seconds, Double(cluster.applied - 1) / seconds))
