import Foundation
import Synchronization

/// glibc ≥ 2.34 (not in Swift's Glibc module): close every descriptor from `from` in the child.
@_silgen_name("posix_spawn_file_actions_addclosefrom_np")
private func spawnCloseFrom(_ actions: UnsafeMutablePointer<posix_spawn_file_actions_t>, _ from: Int32) -> Int32

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
        guard spawnCloseFrom(&actions, 3) == 0 else { throw VerifyError("posix_spawn_file_actions_addclosefrom_np failed") }
        let argv = ([executable] + arguments).map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in argv { free(p) }
            for p in envp { free(p) }
        }
        var pid: pid_t = 0
        let status = posix_spawn(&pid, executable, &actions, nil, argv, envp)
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
