import EtcdOperator
import Foundation
import Synchronization

/// A member's process, started with posix_spawn and reaped with waitpid here: Foundation's
/// Process sometimes never noticed a member that crashed (it stayed a zombie and
/// `waitUntilExit` never returned).
final class ChildProcess: Sendable {
    let pid: pid_t
    private let exited = Mutex<Int32?>(nil)

    /// Starts `executable` with `arguments`, stdout and stderr appended to `log`.
    init(executable: String, arguments: [String], environment: [String: String], log: String) throws {
        do {
            pid = try Spawn.process(executable, arguments, environment: environment, log: log, newSession: false)
        } catch let error as OperatorError {
            throw VerifyError(error.description)
        }
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
