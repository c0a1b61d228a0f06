import Crypto
import Foundation

/// `etcdlite snapshot restore`: a new member's data directory seeded from a snapshot that
/// Maintenance.Snapshot streamed (`etcdctl snapshot save` against etcdlite, or the operator's
/// backups): the store's keys, revisions, leases and auth state are kept; the old cluster's
/// identity, members, alarms and log position are dropped, so the member starts a new cluster
/// (`--initial-cluster-state new`) whose bootstrap entries are applied on top of the image.
public enum SnapshotRestore {
    public struct Failure: Error, CustomStringConvertible {
        public let description: String
        init(_ description: String) { self.description = description }
    }

    /// What a snapshot file holds, as `etcdutl snapshot status` shows it.
    public struct Summary: Sendable, Equatable {
        public var revision: Int64
        public var totalKeys: Int64
        public var totalSize: Int64
        /// Whether the file ended in the SHA-256 of the image (a stream's copy; a file copied from
        /// a data directory has none).
        public var hasHash: Bool
    }

    /// Checks a snapshot file: the SHA-256 trailer against the image (unless `skipHashCheck`),
    /// then SQLite's own check of the image. Returns what it holds.
    public static func verify(snapshot path: String, skipHashCheck: Bool = false) throws -> Summary {
        let image = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-verify-\(UUID().uuidString).db").path
        defer { try? FileManager.default.removeItem(atPath: image) }
        let hasHash = try extractImage(path, to: image, skipHashCheck: skipHashCheck)
        let connection = try SQLiteConnection(path: image, readOnly: true)
        try quickCheck(connection, path)
        let state = try connection.prepared("SELECT current_rev FROM store_state WHERE id = 1")
        guard try state.step() else { throw Failure("snapshot \(path) has no store state") }
        let revision = state.int64(0)
        state.reset()
        let keys = try connection.prepared("SELECT count(*) FROM latest")
        let total = try keys.step() ? keys.int64(0) : 0
        keys.reset()
        let size = (try? FileManager.default.attributesOfItem(atPath: image)[.size] as? Int64) ?? 0
        return Summary(revision: revision, totalKeys: total, totalSize: size, hasHash: hasHash)
    }

    /// Writes `<dataDir>/member/store.db` from the snapshot at `path`. The data directory must not
    /// hold a member already (etcdutl's rule: "data-dir ... exists").
    public static func restore(snapshot path: String, dataDir: String, skipHashCheck: Bool = false) throws {
        let memberDir = URL(fileURLWithPath: dataDir).appendingPathComponent("member")
        if FileManager.default.fileExists(atPath: memberDir.path) {
            throw Failure("data-dir \"\(dataDir)\" exists")
        }
        let staging = URL(fileURLWithPath: dataDir).appendingPathComponent("restore-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: staging, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: staging) }
        let image = staging.appendingPathComponent("store.db").path
        _ = try extractImage(path, to: image, skipHashCheck: skipHashCheck)
        do {
            let connection = try SQLiteConnection(path: image)
            try quickCheck(connection, path)
            try connection.execute("BEGIN IMMEDIATE")
            // The new cluster's log starts at index 1: nothing of it is applied yet.
            try connection.execute("UPDATE store_state SET applied_index = 0")
            for table in ["member_meta", "members", "members_removed", "alarms"] {
                try connection.execute("DELETE FROM \(table)")
            }
            try connection.execute("COMMIT")
        }
        // Complete before it appears where a member looks for it.
        let done = staging.appendingPathComponent("member")
        try FileManager.default.createDirectory(at: done, withIntermediateDirectories: true)
        try FileManager.default.moveItem(atPath: image, toPath: done.appendingPathComponent("store.db").path)
        try FileManager.default.moveItem(at: done, to: memberDir)
    }

    /// Copies the image out of a snapshot file; true when it carried a SHA-256 trailer that matched.
    private static func extractImage(_ path: String, to image: String, skipHashCheck: Bool) throws -> Bool {
        guard let data = FileManager.default.contents(atPath: path) else { throw Failure("open \(path): no such file or directory") }
        let header = Array("SQLite format 3\0".utf8)
        guard data.count >= 512, Array(data.prefix(header.count)) == header else {
            throw Failure("snapshot \(path) is not an etcdlite snapshot (no SQLite header)")
        }
        // A streamed snapshot is the image and then its SHA-256; SQLite images are a whole number
        // of pages (512 bytes at least), so the 32 extra bytes tell one from the other.
        let hasHash = data.count % 512 == 32
        if hasHash {
            let body = data.prefix(data.count - 32)
            if !skipHashCheck && Data(SHA256.hash(data: body)) != data.suffix(32) {
                throw Failure("expected sha256 \(data.suffix(32).map { String(format: "%02x", $0) }.joined()), got \(Data(SHA256.hash(data: body)).map { String(format: "%02x", $0) }.joined())")
            }
            try body.write(to: URL(fileURLWithPath: image))
        } else {
            if !skipHashCheck { throw Failure("snapshot missing hash but --skip-hash-check=false") }
            try data.write(to: URL(fileURLWithPath: image))
        }
        return hasHash
    }

    private static func quickCheck(_ connection: SQLiteConnection, _ path: String) throws {
        let check = try connection.prepared("PRAGMA quick_check(1)")
        let verdict = try check.step() ? check.text(0) : "no answer"
        check.reset()
        guard verdict == "ok" else { throw Failure("snapshot \(path) is damaged: SQLite quick_check: \(verdict)") }
    }
}
