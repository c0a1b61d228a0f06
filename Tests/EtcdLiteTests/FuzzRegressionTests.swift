import Foundation
import Testing
@_spi(Fuzzing) import EtcdLite

/// Every input in fuzz-regressions/<target> (crashers scripts/fuzz.sh found, and its seeds) goes
/// through its fuzz target again: each must return.
@Suite struct FuzzRegressionTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("fuzz-regressions")

    static func inputs(_ target: String) throws -> [[UInt8]] {
        let folder = directory.appendingPathComponent(target)
        return try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted().map {
            [UInt8](try Data(contentsOf: folder.appendingPathComponent($0)))
        }
    }

    @Test(arguments: ["request", "gateway", "peer", "log", "http2"])
    func everySavedInputRunsThrough(_ target: String) throws {
        let inputs = try Self.inputs(target)
        #expect(!inputs.isEmpty)
        for input in inputs {
            switch target {
            case "request": FuzzTargets.request(input)
            case "gateway": FuzzTargets.gatewayJSON(input)
            case "peer": FuzzTargets.peer(input)
            case "http2": FuzzTargets.http2(input)
            default: FuzzTargets.logSegment(input)
            }
        }
    }
}
