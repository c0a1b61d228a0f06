import Foundation
import Testing

/// The same etcdctl commands against etcd 3.4 and etcdlite, started with the same flags; the
/// outputs must match once ids, ports, sizes and versions are normalised.
@Suite(.serialized, .timeLimit(.minutes(3)), .enabled(if: etcdInstalled, "needs etcd and etcdctl (apt-get install etcd-server etcd-client)"))
struct DifferentialTests {
    static func normalize(_ text: String) -> String {
        var out = text
        let rules: [(String, String)] = [
            (#"\"(cluster_id|member_id|ID|leader|memberID)\":\d+"#, "\"$1\":ID"),
            (#"\b[0-9a-f]{14,16}\b"#, "HEXID"),
            (#"127\.0\.0\.1:\d+"#, "127.0.0.1:PORT"),
            (#"\"(dbSize|dbSizeInUse|raftIndex|raftAppliedIndex|hash)\":\d+"#, "\"$1\":N"),
            (#"\"version\":\"[0-9.]+\""#, "\"version\":\"V\""),
            (#"took = [0-9.]+[µm]?s"#, "took = T"),
            (#"\| +[0-9.]+ +(kB|MB|B) +\|"#, "| SIZE |"),
            (#"\| +3\.[0-9]+\.[0-9]+ +\|"#, "| VERSION |"),
            // etcd's Raft log holds a few entries of its own (membership, leader no-op, attributes).
            (#"3\.\d+\.\d+, [0-9.]+ [kM]?B, (true|false), (true|false), (\d+), \d+, \d+,"#, "V, SIZE, $1, $2, $3, I, I,"),
        ]
        for (pattern, template) in rules {
            let regex = try! NSRegularExpression(pattern: pattern)
            out = regex.stringByReplacingMatches(in: out, range: NSRange(out.startIndex..., in: out), withTemplate: template)
        }
        return out
    }

    static func clean(_ stderr: String) -> String {
        stderr.split(separator: "\n").filter { !$0.hasPrefix("{\"level\"") }.joined(separator: "\n")
    }

    /// Each step: etcdctl arguments and optional stdin.
    static let steps: [([String], String?)] = [
        (["put", "foo", "bar"], nil),
        (["put", "foo", "bar2", "--prev-kv"], nil),
        (["put", "foo", "--ignore-value", "--prev-kv"], nil),
        (["put", "foo", "x", "--ignore-value"], nil),
        (["put", "missing", "--ignore-value"], nil),
        (["put", "k", "v", "--lease=1234"], nil),
        (["put", "foo", "--ignore-lease"], nil),
        (["put", "fob", "1"], nil), (["put", "fop", "2"], nil), (["put", "zeta", "3"], nil), (["put", "alpha", "4"], nil),
        (["get", "foo"], nil),
        (["get", "foo", "-w", "json"], nil),
        (["get", "fo", "--prefix", "-w", "json"], nil),
        (["get", "fo", "--prefix", "--keys-only"], nil),
        (["get", "fo", "--prefix", "--print-value-only"], nil),
        (["get", "a", "z"], nil),
        (["get", "f", "--from-key", "-w", "json"], nil),
        (["get", "", "--prefix", "--limit=2", "-w", "json"], nil),
        (["get", "", "--prefix", "--sort-by=MODIFY", "--order=DESCEND"], nil),
        (["get", "", "--prefix", "--sort-by=VALUE", "--order=ASCEND", "-w", "json"], nil),
        (["get", "", "--prefix", "--sort-by=CREATE"], nil),
        (["get", "", "--prefix", "--order=DESCEND", "--limit=3"], nil),
        (["get", "foo", "--rev=2", "-w", "json"], nil),
        (["get", "foo", "--rev=100"], nil),
        (["get", "foo", "--consistency=s", "-w", "json"], nil),
        (["get", "", "--prefix", "--count-only", "-w", "json"], nil),
        (["txn", "-w", "json"], "value(\"foo\") = \"bar2\"\n\nget foo\nput t1 a\ndel nothing\nget t1\nput t2 b\n\nput never x\n\n"),
        (["txn"], "mod(\"foo\") > \"0\"\nversion(\"foo\") = \"2\"\n\nput t3 c\n\nget foo\n\n"),
        (["txn", "-w", "json"], "create(\"nokey\") = \"0\"\n\n\n\n"),
        (["txn", "-w", "json"], "\nput d1 1\nput d1 2\n\n\n"),
        (["txn", "-w", "json"], "\nput 1 1\nput 2 2\nput 3 3\nput 4 4\n\n\n"),
        (["del", "nothing", "-w", "json"], nil),
        (["del", "fo", "--prefix", "--prev-kv", "-w", "json"], nil),
        (["del", "t", "--from-key"], nil),
        (["get", "", "--prefix", "-w", "json"], nil),
        (["compaction", "3"], nil),
        (["compaction", "2"], nil),
        (["compaction", "1000"], nil),
        (["get", "foo", "--rev=2"], nil),
        (["compaction", "--physical", "5"], nil),
        (["get", "foo", "--rev=5", "-w", "json"], nil),
        (["endpoint", "status", "-w", "json"], nil),
        (["endpoint", "status"], nil),
        (["endpoint", "health"], nil),
        (["endpoint", "hashkv", "-w", "json"], nil),
        (["member", "list", "-w", "json"], nil),
        (["member", "list"], nil),
        (["alarm", "list"], nil),
        (["defrag"], nil),
        (["put", "big", String(repeating: "v", count: 5000)], nil),
        (["put", "last", "x", "-w", "json"], nil),
    ]

    @Test func etcdctlAgainstBoth() throws {
        let flags = ["--max-txn-ops", "3", "--max-request-bytes", "4096"]
        let etcd = try ServerProcess(executable: which("etcd")!, name: "diff", extra: flags)
        defer { etcd.stop(); etcd.dataDir.cleanup() }
        let lite = try ServerProcess(executable: etcdliteBinary(), name: "diff", extra: flags)
        defer { lite.stop(); lite.dataDir.cleanup() }
        for (arguments, stdin) in Self.steps {
            let expected = try etcd.etcdctl(arguments, stdin: stdin)
            let actual = try lite.etcdctl(arguments, stdin: stdin)
            let command = "etcdctl " + arguments.joined(separator: " ")
            #expect(actual.status == expected.status, "\(command): exit status")
            #expect(Self.normalize(actual.stdout) == Self.normalize(expected.stdout), "\(command): stdout")
            #expect(Self.normalize(Self.clean(actual.stderr)) == Self.normalize(Self.clean(expected.stderr)), "\(command): stderr")
        }
    }
}
