@testable import EtcdLiteBench
import Foundation
import Synchronization
import Testing

/// The progress line of `etcdlite bench`: a bar on a terminal, plain lines otherwise.
@Suite struct ProgressDisplayTests {
    @Test func aCountedRunShowsItsShareOfTheTotal() {
        #expect(ProgressDisplay.render(done: 5_000, total: 10_000, elapsed: 2, duration: nil, bar: true, width: 10)
                == "[#####.....]   50%  5000/10000  2.0 s  2500/s")
        #expect(ProgressDisplay.render(done: 5_000, total: 10_000, elapsed: 2, duration: nil, bar: false)
                == "progress: 50% 5000/10000 2.0 s 2500/s")
    }

    @Test func aTimedRunShowsItsShareOfTheTimeAndTheFirstLimitWins() {
        #expect(ProgressDisplay.render(done: nil, total: nil, elapsed: 2.5, duration: 10, bar: true, width: 4)
                == "[#...]   25%  2.5 s")
        // --duration with a --total cap: whichever is further along.
        #expect(ProgressDisplay.render(done: 100, total: 10_000, elapsed: 5, duration: 10, bar: false)
                == "progress: 50% 100/10000 5.0 s 20/s")
        #expect(ProgressDisplay.render(done: 9_000, total: 10_000, elapsed: 5, duration: 10, bar: false)
                == "progress: 90% 9000/10000 5.0 s 1800/s")
        // Past its end (the last answers arrive after the deadline) the bar stays full.
        #expect(ProgressDisplay.render(done: nil, total: nil, elapsed: 12, duration: 10, bar: true, width: 2) == "[##]  100%  12.0 s")
    }

    @Test func aRunWithoutAnEndShowsTheTimeGone() {
        #expect(ProgressDisplay.render(done: nil, total: nil, elapsed: 1.5, duration: nil, bar: false) == "progress: 1.5 s")
    }

    @Test func theDisplayRedrawsInPlaceOnATerminalAndWritesLinesElsewhere() async throws {
        for terminal in [true, false] {
            let sink = Mutex("")
            let display = ProgressDisplay(total: 10, duration: nil, terminal: terminal) { text in sink.withLock { $0 += text } }
            display.begin()
            display.update(done: 4)
            try await Task.sleep(for: .milliseconds(1_200))
            display.update(done: 10)
            display.finish()
            let written = sink.withLock { $0 }
            let lines = written.split(separator: "\n")
            if terminal {
                #expect(written.hasPrefix("\r[") && written.hasSuffix("\n") && lines.count == 1, "one line, redrawn: \(written.debugDescription)")
                #expect(written.contains("  40%  4/10") && written.contains("100%  10/10"), "\(written.debugDescription)")
            } else {
                #expect(!written.contains("\r") && lines.count >= 2, "\(written.debugDescription)")
                #expect(lines.first?.hasPrefix("progress: 40% 4/10 ") == true && lines.last?.hasPrefix("progress: 100% 10/10 ") == true,
                        "\(written.debugDescription)")
            }
        }
    }
}

/// The latency summary of the watch and lease workloads: HDR percentiles to p99.99, as the KV report.
@Suite struct LatencySummaryTests {
    @Test func percentilesComeFromTheHistogramToThreeDigits() throws {
        func recorder(_ values: [UInt64]) -> LatencySummary {
            let recorder = LatencyRecorder()
            recorder.record(contentsOf: values)
            return recorder.summary()
        }
        // 1 ms … 10,000 ms, one sample each.
        let summary = recorder((1...10_000).map { UInt64($0) * 1_000_000 })
        #expect(summary.count == 10_000)
        for (value, expected) in [(summary.p50, 5_000.0), (summary.p90, 9_000.0), (summary.p99, 9_900.0),
                                  (summary.p999, 9_990.0), (summary.p9999, 9_999.0)] {
            #expect(abs(value - expected) / expected < 0.001, "\(value) vs \(expected)")
        }
        #expect(summary.max == 10_000)
        #expect(abs(summary.mean - 5_000.5) / 5_000.5 < 0.001)
        #expect(abs(summary.stddev - 2_886.9) / 2_886.9 < 0.01)
        #expect(summary.text.contains("p99.99="))
        let empty = recorder([])
        #expect(empty.count == 0 && empty.p50 == 0 && empty.max == 0 && empty.mean == 0)
    }
}
