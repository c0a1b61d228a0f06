import Foundation
import Synchronization
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import Testing
import EtcdLiteProto

struct RawBytes: MessageSerializer, MessageDeserializer {
    func serialize<Bytes: GRPCContiguousBytes>(_ message: [UInt8]) throws -> Bytes { Bytes(message) }
    func deserialize<Bytes: GRPCContiguousBytes>(_ bytes: Bytes) throws -> [UInt8] { bytes.withUnsafeBytes { [UInt8]($0) } }
}

func withClient<T: Sendable>(port: Int, _ body: (GRPCClient<HTTP2ClientTransport.Posix>) async throws -> T) async throws -> T {
    let transport = try HTTP2ClientTransport.Posix(target: .ipv4(address: "127.0.0.1", port: port), transportSecurity: .plaintext)
    return try await withGRPCClient(transport: transport) { client in try await body(client) }
}

/// Sends raw bytes to a method and returns the gRPC status code (nil on success).
func rawCall(_ client: GRPCClient<HTTP2ClientTransport.Posix>, _ service: String, _ method: String, _ bytes: [UInt8]) async -> RPCError.Code? {
    do {
        _ = try await client.unary(
            request: ClientRequest(message: bytes), descriptor: MethodDescriptor(fullyQualifiedService: service, method: method),
            serializer: RawBytes(), deserializer: RawBytes(), options: .defaults) { try $0.message }
        return nil
    } catch let error as RPCError {
        return error.code
    } catch {
        return .unknown
    }
}

/// An HTTP/1.1 GET over a plain socket.
func httpGet(port: Int, path: String) throws -> String {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    let connected = withLoopback(port: port) { connect(fd, $0, $1) }
    guard connected == 0 else { throw ProcessError(message: "connect failed") }
    var timeout = timeval(tv_sec: 5, tv_usec: 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    let request = "GET \(path) HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    _ = request.withCString { send(fd, $0, strlen($0), 0) }
    var response = [UInt8]()
    var buffer = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = recv(fd, &buffer, buffer.count, 0)
        if n <= 0 { break }
        response += buffer[0..<n]
    }
    return String(decoding: response, as: UTF8.self)
}

@Suite(.serialized, .timeLimit(.minutes(3))) struct GRPCProcessTests {
    @Test func unknownMethodsAndBadInputKeepTheMemberServing() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let etcd = etcdInstalled ? try ServerProcess(executable: which("etcd")!) : nil
        defer { etcd?.stop(); etcd?.dataDir.cleanup() }

        try await withClient(port: lite.clientPort) { client in
            #expect(await rawCall(client, "etcdserverpb.KV", "RangeStream", []) == .unimplemented)
            #expect(await rawCall(client, "etcdserverpb.Maintenance", "Downgrade", []) == .unimplemented)
            #expect(await rawCall(client, "no.Such", "Method", []) == .unimplemented)
            let kv = Etcdserverpb_KV.Client(wrapping: client)
            var request = Etcdserverpb_PutRequest()
            request.key = Data("after".utf8)
            request.value = Data("bad input".utf8)
            _ = try await kv.put(request)
        }
        // Undecodable and oversized requests get the same gRPC codes as from etcd.
        let garbage: [UInt8] = [0x0A, 0xFF, 0xFF, 0xFF, 0x0F]
        let oversized = [UInt8](repeating: 0x41, count: 2_200_000)
        let liteCodes = try await withClient(port: lite.clientPort) { client in
            [await rawCall(client, "etcdserverpb.KV", "Range", garbage), await rawCall(client, "etcdserverpb.KV", "Put", oversized)]
        }
        #expect(liteCodes[0] != nil && liteCodes[1] != nil)
        if let etcd {
            let etcdCodes = try await withClient(port: etcd.clientPort) { client in
                [await rawCall(client, "etcdserverpb.KV", "Range", garbage), await rawCall(client, "etcdserverpb.KV", "Put", oversized)]
            }
            #expect(liteCodes == etcdCodes)
        }
        // Still serving, and the failed requests changed nothing.
        let get = try lite.etcdctl(["get", "", "--prefix", "--keys-only"])
        #expect(get.status == 0 && get.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "after")
    }

    @Test func httpOnTheClientPort() throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let version = try httpGet(port: lite.clientPort, path: "/version")
        #expect(version.hasPrefix("HTTP/1.1 200") && version.contains("\"etcdserver\":\"3.5.") && version.contains("\"etcdcluster\":\"3.5.0\""))
        let health = try httpGet(port: lite.clientPort, path: "/health")
        #expect(health.hasPrefix("HTTP/1.1 200") && health.contains("{\"health\":\"true\"}"))
        // gRPC keeps working on the same port.
        #expect(try lite.etcdctl(["put", "k", "v"]).status == 0)
    }

    @Test func sigtermFinishesAndClosesCleanly() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let lite = try ServerProcess(executable: etcdliteBinary(), dataDir: dir)
        #expect(try lite.etcdctl(["put", "k", "v"]).status == 0)
        lite.process.terminate()
        let deadline = Date().addingTimeInterval(10)
        while lite.process.isRunning && Date() < deadline { usleep(20_000) }
        #expect(!lite.process.isRunning)
        #expect(lite.process.terminationStatus == 0)
        let log = try String(contentsOfFile: lite.logPath, encoding: .utf8)
        #expect(log.contains("ready to serve client requests") && log.contains("shutting down"))
        let again = try ServerProcess(executable: etcdliteBinary(), dataDir: dir, clientPort: lite.clientPort)
        defer { again.stop() }
        #expect(try again.etcdctl(["get", "k", "--print-value-only"]).stdout == "v\n")
    }

    /// kill -9 while clients write; every write that was acknowledged is there after restart.
    @Test func acknowledgedWritesSurviveKillNine() async throws {
        let dir = TempDir(); defer { dir.cleanup() }
        let lite = try ServerProcess(executable: etcdliteBinary(), dataDir: dir)
        let port = lite.clientPort
        let count = Counter()
        let acknowledged = try await withClient(port: port) { client in
            let kv = Etcdserverpb_KV.Client(wrapping: client)
            return await withTaskGroup(of: [String: Int64].self) { group in
                for writer in 0..<8 {
                    group.addTask {
                        var acked: [String: Int64] = [:]
                        for n in 0..<5_000 {
                            var request = Etcdserverpb_PutRequest()
                            request.key = Data("w\(writer)/\(n)".utf8)
                            request.value = Data("value-\(writer)-\(n)".utf8)
                            do {
                                let response = try await kv.put(request)
                                acked["w\(writer)/\(n)"] = response.header.revision
                                count.value.add(1, ordering: .relaxed)
                            } catch {
                                break
                            }
                        }
                        return acked
                    }
                }
                group.addTask {
                    // Kill mid-stream: once writes flow (a loaded machine may take a while).
                    let deadline = ContinuousClock.now + .seconds(20)
                    while count.value.load(ordering: .relaxed) < 500 && ContinuousClock.now < deadline {
                        try? await Task.sleep(for: .milliseconds(10))
                    }
                    lite.kill()
                    return [:]
                }
                var all: [String: Int64] = [:]
                for await acked in group { all.merge(acked) { a, _ in a } }
                return all
            }
        }
        #expect(acknowledged.count > 100, "the writers got going before the kill")
        let again = try ServerProcess(executable: etcdliteBinary(), dataDir: dir, clientPort: port)
        defer { again.stop() }
        let stored = try await withClient(port: port) { client in
            var request = Etcdserverpb_RangeRequest()
            request.key = Data("w".utf8)
            request.rangeEnd = Data("x".utf8)
            return try await Etcdserverpb_KV.Client(wrapping: client).range(request).kvs
        }
        let byKey = Dictionary(stored.map { (String(decoding: $0.key, as: UTF8.self), $0) }, uniquingKeysWith: { a, _ in a })
        var missing = 0
        for (key, revision) in acknowledged {
            guard let kv = byKey[key] else { missing += 1; continue }
            let parts = key.dropFirst().split(separator: "/")
            #expect(kv.modRevision == revision && kv.value == Data("value-\(parts[0])-\(parts[1])".utf8))
        }
        #expect(missing == 0, "acknowledged writes lost: \(missing) of \(acknowledged.count)")
    }
}

final class Counter: Sendable {
    let value = Atomic<Int>(0)
}

@Suite(.timeLimit(.minutes(2))) struct AutoCompactionTests {
    @Test func periodicRetentionCompactsOldRevisions() throws {
        let lite = try ServerProcess(executable: etcdliteBinary(), extra: ["--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1s"])
        defer { lite.stop(); lite.dataDir.cleanup() }
        #expect(try lite.etcdctl(["put", "k", "1"]).status == 0)  // revision 2
        #expect(try lite.etcdctl(["put", "k", "2"]).status == 0)  // revision 3
        // Within a few retention periods revision 2 is compacted away.
        let deadline = Date().addingTimeInterval(8)
        var compacted = false
        while !compacted && Date() < deadline {
            _ = try lite.etcdctl(["put", "tick", "x"])
            compacted = try lite.etcdctl(["get", "k", "--rev=2"]).stderr.contains("required revision has been compacted")
            usleep(200_000)
        }
        #expect(compacted)
        let log = try String(contentsOfFile: lite.logPath, encoding: .utf8)
        #expect(log.contains("auto compaction finished"))
    }
}

@Suite(.timeLimit(.minutes(2))) struct SnapshotProcessTests {
    @Test func etcdctlSnapshotSaveWritesTheStore() throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        for i in 0..<50 { #expect(try lite.etcdctl(["put", "snap/\(i)", "value-\(i)"]).status == 0) }
        let file = lite.dataDir.url.appendingPathComponent("backup.db").path
        let saved = try lite.etcdctl(["snapshot", "save", file])
        #expect(saved.status == 0 && saved.stdout.contains("Snapshot saved at \(file)"))
        // etcdctl strips nothing: the file is the database followed by its SHA-256.
        let bytes = try Data(contentsOf: URL(fileURLWithPath: file))
        let database = lite.dataDir.url.appendingPathComponent("restored.db")
        try bytes.dropLast(32).write(to: database)
        let sqlite = try run("/usr/bin/env", ["python3", "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from latest').fetchone()[0])", database.path])
        #expect(sqlite.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "50")
    }
}

@Suite(.timeLimit(.minutes(2))) struct LargeRequestTests {
    /// Messages that span many HTTP/2 DATA frames, up to etcd's limits.
    @Test func largeValuesAndTheRequestLimit() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        try await withClient(port: lite.clientPort) { client in
            let kv = Etcdserverpb_KV.Client(wrapping: client)
            var request = Etcdserverpb_PutRequest()
            request.key = Data("big".utf8)
            request.value = Data((0..<1_000_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })
            _ = try await kv.put(request)
            var get = Etcdserverpb_RangeRequest()
            get.key = Data("big".utf8)
            #expect(try await kv.range(get).kvs.first?.value == request.value)
            // Over --max-request-bytes (1.5 MiB) but under the gRPC limit: etcd's own error.
            request.value = Data(repeating: 7, count: 1_600_000)
            do {
                _ = try await kv.put(request)
                Issue.record("a 1.6 MB put was accepted")
            } catch let error as RPCError {
                #expect(error.code == .invalidArgument && error.message == "etcdserver: request is too large")
            }
            #expect(try await kv.range(get).kvs.first?.value.count == 1_000_000)
        }
    }
}
