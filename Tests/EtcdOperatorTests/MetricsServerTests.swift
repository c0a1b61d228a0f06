@testable import EtcdOperator
import Foundation
import Testing

/// The operator's metrics endpoint, scraped with curl as Prometheus would.
@Suite struct MetricsServerTests {
    static func curl(_ arguments: [String]) throws -> (status: Int32, out: String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/usr/bin/curl")
        process.arguments = ["-s", "--max-time", "5"] + arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        try process.run()
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: data, as: UTF8.self))
    }

    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/curl"), "needs curl"))
    func metricsFollowThePublishedStatus() async throws {
        let server = try await MetricsServer.start(host: "127.0.0.1", port: 0)
        defer { Task { await server.close() } }
        let base = "http://127.0.0.1:\(server.port)"
        // Before any pass: zeros, in Prometheus' text format.
        var scrape = try Self.curl(["-D", "-", "\(base)/metrics"])
        #expect(scrape.status == 0 && scrape.out.hasPrefix("HTTP/1.1 200"), "\(scrape.out)")
        #expect(scrape.out.lowercased().contains("content-type: text/plain; version=0.0.4"))
        #expect(scrape.out.contains("etcdlite_operator_reconciles_total 0"))

        var status = ClusterStatus()
        status.reconciles = 7
        status.actions = ["addLearner": 2, "promote": 1]
        status.members = [ClusterStatus.Member(id: "1", name: "m1", clientURL: nil, leader: true, learner: false, healthy: true, appliedIndex: 5, version: nil),
                          ClusterStatus.Member(id: "2", name: "m2", clientURL: nil, leader: false, learner: true, healthy: true, appliedIndex: 3, version: nil)]
        server.update(status)
        scrape = try Self.curl(["\(base)/metrics"])
        for line in ["etcdlite_operator_reconciles_total 7", "etcdlite_operator_actions_total{kind=\"addLearner\"} 2",
                     "etcdlite_operator_actions_total{kind=\"promote\"} 1", "etcdlite_operator_members{state=\"healthy\"} 1",
                     "etcdlite_operator_members{state=\"learner\"} 1", "etcdlite_operator_members{state=\"unhealthy\"} 0"] {
            #expect(scrape.out.split(separator: "\n").contains { $0 == line }, "\(line) in \(scrape.out)")
        }
        #expect(try Self.curl(["\(base)/healthz"]).out == "ok\n")
        #expect(try Self.curl(["-o", "/dev/null", "-w", "%{http_code}", "\(base)/nothing"]).out == "404")
        #expect(try Self.curl(["-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "\(base)/metrics"]).out == "405")
    }

    /// A snapshot offered to a re-seeding member: that file alone, byte for byte.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/curl"), "needs curl"))
    func anOfferedSnapshotIsServedAndNothingElse() async throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-offer-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: dir) }
        let file = dir.appendingPathComponent("chosen.db")
        let bytes = Data((0..<300_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
        try bytes.write(to: file)
        let server = try await MetricsServer.start(host: "127.0.0.1", port: 0, snapshot: { $0 == "set-1.db" ? file.path : nil })
        defer { Task { await server.close() } }
        let base = "http://127.0.0.1:\(server.port)"
        let copy = dir.appendingPathComponent("copy.db")
        #expect(try Self.curl(["-o", copy.path, "-w", "%{http_code}", "\(base)/snapshots/set-1.db"]).out == "200")
        #expect(try Data(contentsOf: copy) == bytes)
        #expect(try Self.curl(["-o", "/dev/null", "-w", "%{http_code}", "\(base)/snapshots/chosen.db"]).out == "404")
        #expect(try Self.curl(["-o", "/dev/null", "-w", "%{http_code}", "--path-as-is", "\(base)/snapshots/../chosen.db"]).out == "404")
        #expect(try Self.curl(["-o", "/dev/null", "-w", "%{http_code}", "-X", "DELETE", "\(base)/snapshots/set-1.db"]).out == "405")
        // The metrics still answer beside it.
        #expect(try Self.curl(["\(base)/healthz"]).out == "ok\n")
    }
}
