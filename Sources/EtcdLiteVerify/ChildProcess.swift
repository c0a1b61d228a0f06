import Foundation
import Synchronization

/// glibc ≥ 2.34's `posix_spawn_file_actions_addclosefrom_np` (not in Swift's Glibc module),
/// looked up at run time so that an older glibc still loads the binary.
private typealias CloseFrom = @convention(c) (UnsafeMutablePointer<posix_spawn_file_actions_t>, Int32) -> Int32
private let closeFrom: CloseFrom? = dlsym(nil, "posix_spawn_file_actions_addclosefrom_np").map { unsafeBitCast($0, to: CloseFrom.self) }

/// A member's process, started with posix_spawn and reaped with waitpid here: Foundation's
/// Process sometimes never noticed a member that crashed (it stayed a zombie and
/// `waitUntilExit` never returned).
final class ChildProcess: Sendable {
    let pid: pid_t
    private let exited = Mutex<Int32?>(nil)

    /// Starts `executable` with `arguments`, stdout and stderr appended to `log`.
    init(executable: String, arguments: [String], environment: [String: String], log: String) throws {
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        // Nothing else of ours: an inherited proxy socket would keep a cut link open in the child.
        if let closeFrom {
            guard closeFrom(&actions, 3) == 0 else { throw VerifyError("posix_spawn_file_actions_addclosefrom_np failed") }
        } else {
            let open = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
            for fd in open.compactMap(Int32.init) where fd > 2 { posix_spawn_file_actions_addclose(&actions, fd) }
        }
        // The spawning thread (a dispatch worker) blocks most signals; the member must not inherit
        // that mask (SIGTERM would never reach it) nor our dispositions.
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        var none = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in argv { free(p) }
            for p in envp { free(p) }
        }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, executable, &actions, &attributes, argv, envp)
        guard status == 0 else { throw VerifyError("posix_spawn \(executable): \(String(cString: strerror(status)))") }
        self.pid = pid
    }

    /// Whether it has not exited (reaping it if it has).
    var isRunning: Bool {
        exited.withLock { exited in
            guard exited == nil else { return false }
            var status: Int32 = 0
            let result = waitpid(pid, &status, WNOHANG)
            if result == pid || (result < 0 && errno == ECHILD) {
                exited = status
                return false
            }
            return true
        }
    }

    func signal(_ signal: Int32) {
        if isRunning { kill(pid, signal) }
    }

    /// The exit code once it has exited normally (nil while it runs or after a signal).
    var exitCode: Int32? {
        guard !isRunning, let status = exited.withLock({ $0 }) else { return nil }
        return status & 0x7f == 0 ? (status >> 8) & 0xff : nil
    }

    /// Runs a short command to its end (at most `timeout` seconds): its exit code (nil: killed
    /// or a signal) and what it printed.
    static func run(_ executable: String, _ arguments: [String], timeout: Double = 10) throws -> (code: Int32?, output: String) {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("etcdlite-verify-cmd-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        defer { try? FileManager.default.removeItem(atPath: output) }
        let child = try ChildProcess(executable: executable, arguments: arguments, environment: ProcessInfo.processInfo.environment, log: output)
        if !child.waitForExit(timeout: timeout) {
            child.signal(SIGKILL)
            _ = child.waitForExit(timeout: 5)
        }
        return (child.exitCode, (try? String(contentsOfFile: output, encoding: .utf8)) ?? "")
    }

    /// Waits up to `timeout` seconds for it to exit; true when it has.
    func waitForExit(timeout: Double) -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while isRunning {
            if Date() > deadline { return false }
            usleep(10_000)
        }
        return true
    }
}
