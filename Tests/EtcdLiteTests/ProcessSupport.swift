import Foundation
import Testing

/// Where `swift build` put the etcdlite binary: beside the test bundle, or $ETCDLITE_BINARY.
func etcdliteBinary() -> String {
    if let path = ProcessInfo.processInfo.environment["ETCDLITE_BINARY"] { return path }
    var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    for _ in 0..<4 {
        url.deleteLastPathComponent()
        let candidate = url.appendingPathComponent("etcdlite").path
        if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
    }
    let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    return root.appendingPathComponent(".build/debug/etcdlite").path
}

func which(_ name: String) -> String? {
    for dir in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
        let path = "\(dir)/\(name)"
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return nil
}

/// A TCP port that was free a moment ago on 127.0.0.1.
func freePort() -> Int {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
    defer { close(fd) }
    _ = withLoopback(port: 0) { bind(fd, $0, $1) }
    var address = sockaddr_in()
    var length = socklen_t(MemoryLayout<sockaddr_in>.size)
    _ = withUnsafeMutablePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) } }
    return Int(UInt16(bigEndian: address.sin_port))
}

/// 127.0.0.1:`port` as a socket address, for bind and connect.
func withLoopback<T>(port: Int, _ body: (UnsafePointer<sockaddr>, socklen_t) -> T) -> T {
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_addr.s_addr = inet_addr("127.0.0.1")
    address.sin_port = UInt16(port).bigEndian
    return withUnsafePointer(to: &address) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
}

struct CommandResult {
    var status: Int32
    var stdout: String
    var stderr: String
}

/// Runs a command to completion (bounded by `timeout` seconds).
@discardableResult
func run(_ executable: String, _ arguments: [String], stdin: String? = nil, environment: [String: String] = [:], timeout: Double = 30) throws -> CommandResult {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    var env = ProcessInfo.processInfo.environment
    for (k, v) in environment { env[k] = v }
    process.environment = env
    let out = Pipe(), err = Pipe(), input = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = input
    try process.run()
    if let stdin { input.fileHandleForWriting.write(Data(stdin.utf8)) }
    try input.fileHandleForWriting.close()
    let deadline = Date().addingTimeInterval(timeout)
    let outData = ReadAll(out.fileHandleForReading), errData = ReadAll(err.fileHandleForReading)
    while process.isRunning && Date() < deadline { usleep(2000) }
    if process.isRunning { process.terminate() }
    process.waitUntilExit()
    return CommandResult(status: process.terminationStatus, stdout: outData.wait(), stderr: errData.wait())
}

/// Drains a pipe on a thread so a chatty child never blocks on a full pipe.
final class ReadAll: @unchecked Sendable {
    private var data = Data()
    private let done = DispatchSemaphore(value: 0)
    init(_ handle: FileHandle) {
        Thread.detachNewThread { [self] in
            data = handle.readDataToEndOfFile()
            done.signal()
        }
    }
    func wait() -> String {
        done.wait()
        return String(decoding: data, as: UTF8.self)
    }
}

/// A server process (etcdlite or etcd) on loopback, stopped by `stop()` or `kill()`.
final class ServerProcess: @unchecked Sendable {
    private(set) var process = Process()
    private(set) var clientPort: Int
    let dataDir: TempDir
    /// A data directory this object made is removed with it (one passed in belongs to the caller).
    private let ownsDataDir: Bool
    let logPath: String
    /// `https` serves clients with TLS (the caller passes the certificate flags in `extra`).
    let clientScheme: String
    /// What etcdctl needs to reach it (--cacert, --cert, --key).
    let etcdctlFlags: [String]
    var endpoint: String { clientScheme == "http" ? "127.0.0.1:\(clientPort)" : "\(clientScheme)://127.0.0.1:\(clientPort)" }

    /// Starts `executable` with etcd's flags for one member on free loopback ports (picking new
    /// ports if another process took them in the meantime).
    init(executable: String, name: String = "default", dataDir: TempDir? = nil, clientPort: Int? = nil, extra: [String] = [],
         clientScheme: String = "http", etcdctlFlags: [String] = []) throws {
        self.clientScheme = clientScheme
        self.etcdctlFlags = etcdctlFlags
        self.dataDir = dataDir ?? TempDir()
        ownsDataDir = dataDir == nil
        logPath = self.dataDir.url.appendingPathComponent("server.log").path
        self.clientPort = clientPort ?? freePort()
        for attempt in 1...3 {
            try launch(executable: executable, name: name, extra: extra)
            do {
                try waitUntilServing()
                return
            } catch {
                kill()
                let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
                guard attempt < 3, clientPort == nil, log.contains("in use") else { throw error }
                self.clientPort = freePort()
            }
        }
    }

    /// A member of a cluster: its ports and `--initial-cluster` are chosen by the caller, and it is
    /// not waited for (a member serves once a quorum is up).
    init(executable: String, name: String, clientPort: Int, peerPort: Int, initialCluster: String, extra: [String] = [],
         environment: [String: String] = [:], peerScheme: String = "http") throws {
        clientScheme = "http"
        etcdctlFlags = []
        dataDir = TempDir()
        ownsDataDir = true
        logPath = dataDir.url.appendingPathComponent("server.log").path
        self.clientPort = clientPort
        try launch(executable: executable, name: name, extra: ["--initial-cluster", initialCluster] + extra, peerPort: peerPort, environment: environment,
                   peerScheme: peerScheme)
    }

    private func launch(executable: String, name: String, extra: [String], peerPort: Int? = nil, environment: [String: String] = [:],
                        peerScheme: String = "http") throws {
        let peerPort = peerPort ?? freePort()
        let client = "\(clientScheme)://127.0.0.1:\(clientPort)"
        let peer = "\(peerScheme)://127.0.0.1:\(peerPort)"
        process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = [
            "--name", name, "--data-dir", dataDir.url.appendingPathComponent("data").path,
            "--listen-client-urls", client, "--advertise-client-urls", client,
            "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
        ] + (extra.contains("--initial-cluster") ? [] : ["--initial-cluster", "\(name)=\(peer)"]) + extra
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = FileHandle(forWritingAtPath: logPath)!
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    /// Starts the same command again (same flags, same data directory), appending to its log;
    /// `environment` is added to the test's own, `addingArguments` to the flags (from then on).
    func restart(environment: [String: String] = [:], addingArguments: [String] = []) throws {
        guard !process.isRunning, let executable = process.executableURL else { return }
        let arguments = (process.arguments ?? []) + addingArguments
        process = Process()
        process.executableURL = executable
        process.arguments = arguments
        if !environment.isEmpty { process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 } }
        let log = FileHandle(forWritingAtPath: logPath)!
        log.seekToEndOfFile()
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    /// Waits (at most 20 s) until etcdctl reaches the member.
    func waitUntilServing() throws {
        let deadline = Date().addingTimeInterval(20)
        while Date() < deadline {
            guard process.isRunning else { break }
            if let result = try? etcdctl(["endpoint", "health", "--dial-timeout=500ms", "--command-timeout=1s"]), result.status == 0 { return }
            usleep(50_000)
        }
        let log = (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? ""
        throw ProcessError(message: "server on \(endpoint) did not come up; log:\n\(log.suffix(2000))")
    }

    func etcdctl(_ arguments: [String], stdin: String? = nil) throws -> CommandResult {
        try etcdctlRaw(["--endpoints=\(endpoint)"] + etcdctlFlags + arguments, stdin: stdin)
    }

    /// `etcdctl watch <arguments>` against this member in the background, its output going to
    /// `watch.out` in the data directory (returned); the caller terminates the process.
    func startWatch(_ arguments: [String]) throws -> (process: Process, output: URL) {
        let output = dataDir.url.appendingPathComponent("watch.out")
        guard FileManager.default.createFile(atPath: output.path, contents: nil) else { throw ProcessError(message: "cannot create \(output.path)") }
        let watch = Process()
        watch.executableURL = URL(fileURLWithPath: try etcdctlPath())
        watch.arguments = ["--endpoints=\(endpoint)"] + etcdctlFlags + ["watch"] + arguments
        watch.environment = ["ETCDCTL_API": "3"]
        watch.standardOutput = FileHandle(forWritingAtPath: output.path)
        watch.standardError = FileHandle.nullDevice
        try watch.run()
        return (watch, output)
    }

    /// etcdctl with exactly these arguments (the caller names the endpoints).
    func etcdctlRaw(_ arguments: [String], stdin: String? = nil) throws -> CommandResult {
        try run(etcdctlPath(), arguments, stdin: stdin, environment: ["ETCDCTL_API": "3"])
    }

    /// SIGTERM, and SIGKILL if the process is still there after 10 s (a test must not hang).
    func stop() {
        guard process.isRunning else { return }
        process.terminate()
        let deadline = Date().addingTimeInterval(10)
        while process.isRunning && Date() < deadline { usleep(10_000) }
        kill()
    }

    func kill() {
        if process.isRunning {
            Foundation.kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
    }

    deinit {
        kill()
        if ownsDataDir { dataDir.cleanup() }
    }
}

func etcdctlPath() throws -> String {
    guard let path = which("etcdctl") else { throw ProcessError(message: "etcdctl not installed (apt-get install etcd-client)") }
    return path
}

struct ProcessError: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}

/// Tests that need Debian's etcd-server and etcd-client.
let etcdInstalled = which("etcd") != nil && which("etcdctl") != nil

/// Runs `session` against etcd and then etcdlite, each on a fresh member started with `extra`,
/// and expects the same lines from both. Returns etcd's lines for further checks.
@discardableResult
func expectSameAsEtcd(extra: [String] = [], _ session: (ServerProcess) throws -> [String]) throws -> [String] {
    let etcd = try ServerProcess(executable: which("etcd")!, extra: extra)
    defer { etcd.stop(); etcd.dataDir.cleanup() }
    let lite = try ServerProcess(executable: etcdliteBinary(), extra: extra)
    defer { lite.stop(); lite.dataDir.cleanup() }
    let expected = try session(etcd)
    let actual = try session(lite)
    #expect(actual.count == expected.count)
    for (e, a) in zip(expected, actual) { #expect(a == e) }
    return expected
}
