import ArgumentParser
import EtcdLite
import EtcdOperator
import Foundation

/// `etcdlite snapshot`: etcdutl's offline snapshot commands for etcdlite's snapshot files (a
/// SQLite image and its SHA-256, as Maintenance.Snapshot streams it; `etcdctl snapshot save`
/// writes one).
struct Snapshot: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check a snapshot file or seed a new member's data directory from one.",
        subcommands: [Restore.self, Status.self])

    struct Restore: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Seed a data directory from a snapshot; start the member with --initial-cluster-state new and the new cluster's flags.")
        @Argument(help: "The snapshot file, or an http:// URL to download it from (the operator serves its backups at /snapshots/<name>).")
        var file: String
        @Option(help: "Data directory to create (it must not hold a member).") var dataDir = "default.etcdlite"
        @Flag(help: "Accept a file without a matching SHA-256 trailer (a store.db copied from a data directory).") var skipHashCheck = false

        func run() async throws {
            var path = file
            var downloaded: String?
            if file.hasPrefix("http://") {
                guard let url = URL(string: file), let host = url.host else { throw ValidationError("not a URL: \(file)") }
                // Beside the data directory (the same volume); its SHA-256 trailer is checked below.
                let parent = (URL(fileURLWithPath: dataDir).standardizedFileURL.deletingLastPathComponent()).path
                try FileManager.default.createDirectory(atPath: parent, withIntermediateDirectories: true)
                let target = parent + "/.snapshot-download-\(UUID().uuidString).db"
                downloaded = target
                do {
                    let query = url.query.map { "?" + $0 } ?? ""
                    try await KubeClient(host: host, port: url.port ?? 80, timeout: .seconds(10)).download(url.path + query, to: target)
                } catch {
                    try? FileManager.default.removeItem(atPath: target)
                    throw ValidationError("could not download \(file): \(error)")
                }
                path = target
            }
            defer { if let downloaded { try? FileManager.default.removeItem(atPath: downloaded) } }
            do {
                try SnapshotRestore.restore(snapshot: path, dataDir: dataDir, skipHashCheck: skipHashCheck)
            } catch let failure as SnapshotRestore.Failure {
                throw ValidationError(failure.description)
            }
            print("restored snapshot \(file) into \(dataDir)")
        }
    }

    struct Status: ParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Verify a snapshot file and print its revision, keys and size.")
        @Argument(help: "The snapshot file.") var file: String
        @Option(name: .customLong("write-out"), help: "simple or json.") var writeOut = "simple"

        func run() throws {
            let summary: SnapshotRestore.Summary
            do {
                summary = try SnapshotRestore.verify(snapshot: file)
            } catch let failure as SnapshotRestore.Failure {
                throw ValidationError(failure.description)
            }
            if writeOut == "json" {
                print("{\"revision\":\(summary.revision),\"totalKey\":\(summary.totalKeys),\"totalSize\":\(summary.totalSize)}")
            } else {
                print("revision \(summary.revision), \(summary.totalKeys) keys, \(summary.totalSize) bytes")
            }
        }
    }
}
