import Foundation
import Testing
@testable import EtcdLite

/// `--experimental-initial-corrupt-check`: a member compares its store's hash with its peers'
/// before it serves clients, and refuses to start when they differ at the same revision.
@Suite(.serialized) struct CorruptCheckTests {
    static func log(_ member: ServerProcess) -> String {
        (try? String(contentsOfFile: member.logPath, encoding: .utf8)) ?? ""
    }

    @Test func aMemberWhoseStoreDiffersFromItsPeersRefusesToStart() throws {
        let members = try ClusterTests.startCluster(3)
        defer { for m in members { m.stop() } }
        let leader = try ClusterTests.requireLeader(members)
        for n in 0..<20 { #expect(try leader.etcdctl(["put", "k\(n)", "v\(n)"]).status == 0) }
        let victim = members.first { $0 !== leader }!
        #expect(MembershipTests.eventually(10) { (try? victim.etcdctl(["get", "k19", "--consistency=s", "--print-value-only"]).stdout) == "v19\n" })

        // A healthy member restarted with the check passes it and serves.
        victim.stop()
        try victim.restart(addingArguments: ["--experimental-initial-corrupt-check"])
        try victim.waitUntilServing()
        #expect(Self.log(victim).contains("initial corruption checking passed; no corruption"))

        // One stored value changed behind the member's back (as a bad disk would).
        victim.stop()
        let store = victim.dataDir.url.appendingPathComponent("data/member/store.db").path
        do {
            let db = try SQLiteConnection(path: store)
            try db.execute("UPDATE revs SET value = X'626164' WHERE key = X'6B35'")
            let changed = try db.prepared("SELECT count(*) FROM revs WHERE key = X'6B35' AND value = X'626164'")
            #expect(try changed.step() && changed.int64(0) == 1, "the stored revision of k5 was changed")
            changed.reset()
        }
        try victim.restart()
        #expect(MembershipTests.eventually(20) { !victim.process.isRunning }, "the member refused to start")
        #expect(victim.process.terminationStatus == 1)
        let log = Self.log(victim)
        #expect(log.contains("found different hash values from remote peer"), "\(log.suffix(2000))")
        #expect(log.contains("found data inconsistency with peers"))
        // It never served clients from the corrupt store.
        let after = log.components(separatedBy: "starting initial corruption check").last ?? ""
        #expect(!after.contains("ready to serve client requests"))
        // The peers, untouched, still serve.
        #expect(try leader.etcdctl(["get", "k5", "--print-value-only"]).stdout == "v5\n")
    }
}
