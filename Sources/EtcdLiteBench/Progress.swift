import Foundation
import Synchronization

/// A run's progress as the user watches it: a bar redrawn in place on a terminal, a plain line
/// a second otherwise (a log file or a pipe gets no carriage returns). Runs that count requests
/// show how many of the total are answered; runs bound by time show the time gone.
public final class ProgressDisplay: Sendable {
    private struct State {
        var done: Int?
        var task: Task<Void, Never>?
        var lastLength = 0
    }

    private let total: Int?
    private let duration: Double?
    private let terminal: Bool
    private let write: @Sendable (String) -> Void
    private let start = monotonicNanos()
    private let state: Mutex<State>

    /// `total`: the requests the run stops at; `duration`: the seconds it stops at (either, both
    /// — whichever comes first — or neither: then only the time gone is shown).
    public init(total: Int?, duration: Double?, terminal: Bool, write: @escaping @Sendable (String) -> Void) {
        self.total = total
        self.duration = duration
        self.terminal = terminal
        self.write = write
        state = Mutex(State(done: total == nil ? nil : 0))
    }

    /// Standard error: a bar when it is a terminal, plain lines otherwise.
    public static func standardError(total: Int?, duration: Double?) -> ProgressDisplay {
        ProgressDisplay(total: total, duration: duration, terminal: isatty(STDERR_FILENO) != 0) { text in
            FileHandle.standardError.write(Data(text.utf8))
        }
    }

    /// Answered requests so far.
    public func update(done: Int) { state.withLock { $0.done = done } }

    /// Redraws every half second (terminal) or writes a line every second until `finish`.
    public func begin() {
        let interval: Duration = terminal ? .milliseconds(500) : .seconds(1)
        let task = Task { [self] in
            while !Task.isCancelled {
                try? await Task.sleep(for: interval)
                if Task.isCancelled { break }
                show()
            }
        }
        state.withLock { $0.task = task }
    }

    /// The last state, and the end of the bar's line.
    public func finish() {
        state.withLock { $0.task?.cancel() }
        show()
        if terminal { write("\n") }
    }

    private func show() {
        let elapsed = Double(monotonicNanos() - start) / 1e9
        let (done, previous) = state.withLock { ($0.done, $0.lastLength) }
        let line = Self.render(done: done, total: total, elapsed: elapsed, duration: duration, bar: terminal)
        if terminal {
            // Blank out what a longer earlier line left behind.
            write("\r" + line + String(repeating: " ", count: max(0, previous - line.count)))
            state.withLock { $0.lastLength = line.count }
        } else {
            write(line + "\n")
        }
    }

    /// One progress line: `[#####.....]  50%  10000/20000  4.0 s  2500/s` on a terminal,
    /// `progress: 50% 10000/20000 4.0 s 2500/s` otherwise. The fraction is that of the count or of
    /// the time, whichever is further along (the run stops at the first of them).
    public static func render(done: Int?, total: Int?, elapsed: Double, duration: Double?, bar: Bool, width: Int = 30) -> String {
        var fraction: Double?
        if let done, let total, total > 0 { fraction = Double(done) / Double(total) }
        if let duration, duration > 0 { fraction = max(fraction ?? 0, elapsed / duration) }
        var parts: [String] = []
        if let fraction {
            let clamped = min(1, max(0, fraction))
            if bar {
                let filled = Int((clamped * Double(width)).rounded(.down))
                parts.append("[" + String(repeating: "#", count: filled) + String(repeating: ".", count: width - filled) + "]")
            }
            parts.append(String(format: bar ? "%3d%%" : "%d%%", Int((clamped * 100).rounded(.down))))
        }
        if let done { parts.append(total.map { "\(done)/\($0)" } ?? "\(done)") }
        parts.append(String(format: "%.1f s", elapsed))
        if let done, elapsed > 0 { parts.append(String(format: "%.0f/s", Double(done) / elapsed)) }
        return (bar ? "" : "progress: ") + parts.joined(separator: bar ? "  " : " ")
    }
}
