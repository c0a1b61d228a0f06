import EtcdLiteClient
import EtcdLiteProto
import Foundation
import Histogram
import NIOSSL
import SwiftProtobuf
import Synchronization

/// Monotonic nanoseconds (CLOCK_MONOTONIC), comparable across this process's threads.
@inline(__always)
public func monotonicNanos() -> UInt64 {
    var spec = timespec()
    clock_gettime(CLOCK_MONOTONIC, &spec)
    return UInt64(spec.tv_sec) * 1_000_000_000 + UInt64(spec.tv_nsec)
}

/// Latency samples in nanoseconds, kept for the summary's HDR histogram.
final class LatencyRecorder: Sendable {
    private let samples = Mutex<[UInt64]>([])

    func record(_ nanoseconds: UInt64) { samples.withLock { $0.append(nanoseconds) } }
    func record(contentsOf values: [UInt64]) { samples.withLock { $0 += values } }

    var count: Int { samples.withLock { $0.count } }

    func summary() -> LatencySummary { LatencySummary(samples.withLock { $0 }) }
}

/// Milliseconds at the usual percentiles, from an HDR histogram (three significant digits), as
/// the KV workloads report them.
public struct LatencySummary: Sendable, Codable {
    public var count: Int
    public var p50: Double
    public var p90: Double
    public var p99: Double
    public var p999: Double
    public var p9999: Double
    public var max: Double
    public var mean: Double
    public var stddev: Double

    init(_ values: [UInt64]) {
        var histogram = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
        for value in values { _ = histogram.record(Swift.min(Swift.max(1, value), 600_000_000_000)) }
        count = values.count
        func at(_ percentile: Double) -> Double {
            values.isEmpty ? 0 : Double(histogram.valueAtPercentile(percentile)) / 1e6
        }
        p50 = at(50)
        p90 = at(90)
        p99 = at(99)
        p999 = at(99.9)
        p9999 = at(99.99)
        max = Double(values.max() ?? 0) / 1e6
        mean = values.isEmpty ? 0 : histogram.mean / 1e6
        stddev = values.isEmpty ? 0 : histogram.stdDeviation / 1e6
    }

    public var text: String {
        String(format: "n=%d p50=%.3fms p90=%.3fms p99=%.3fms p99.9=%.3fms p99.99=%.3fms max=%.3fms mean=%.3fms stddev=%.3fms",
               count, p50, p90, p99, p999, p9999, max, mean, stddev)
    }
}

/// How a workload reaches a secured member: TLS (with a client certificate) and a user whose
/// token every call carries.
public final class ClientSecurity: Sendable {
    let tls: NIOSSLContext?
    let user: (name: String, password: String)?
    private let token = Mutex<String?>(nil)

    /// `caFile`, `certFile`, `keyFile`: PEM files as etcdctl's --cacert, --cert, --key; `user`:
    /// "name:password".
    public init(caFile: String? = nil, certFile: String? = nil, keyFile: String? = nil, user: String? = nil) throws {
        if caFile != nil || certFile != nil {
            var configuration = TLSConfiguration.makeClientConfiguration()
            configuration.applicationProtocols = ["h2"]
            configuration.certificateVerification = .noHostnameVerification
            if let caFile { configuration.trustRoots = .certificates(try NIOSSLCertificate.fromPEMFile(caFile)) }
            if let certFile, let keyFile {
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certFile).map { .certificate($0) }
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: keyFile, format: .pem))
            }
            tls = try NIOSSLContext(configuration: configuration)
        } else {
            tls = nil
        }
        if let user {
            guard let colon = user.firstIndex(of: ":") else { throw BenchError("--user takes name:password") }
            self.user = (String(user[..<colon]), String(user[user.index(after: colon)...]))
        } else {
            self.user = nil
        }
    }

    /// Authenticates once (on the first connection) and gives the token to every connection.
    func prepare(_ connection: GRPCClientConnection) async throws {
        guard let user else { return }
        var current = token.withLock { $0 }
        if current == nil {
            var request = Etcdserverpb_AuthenticateRequest()
            request.name = user.name
            request.password = user.password
            do {
                let answer = try Etcdserverpb_AuthenticateResponse(
                    serializedBytes: try await connection.unary("/etcdserverpb.Auth/Authenticate", try request.serializedBytes()))
                current = answer.token
            } catch let status as ClientStatus where status.message == "etcdserver: authentication is not enabled" {
                current = ""  // as clientv3: no token needed
            }
            token.withLock { $0 = current }
        }
        if let current, !current.isEmpty { try await connection.setDefaultMetadata([("token", current)]) }
    }
}

/// Where a workload connects: "host:port", "http://host:port" or "https://host:port" (https
/// needs a `ClientSecurity` with TLS).
public struct Endpoint: Sendable {
    public let host: String
    public let port: Int
    public let security: ClientSecurity?

    public init(_ text: String, security: ClientSecurity? = nil) throws {
        var rest = Substring(text)
        if let scheme = rest.range(of: "://") { rest = rest[scheme.upperBound...] }
        let parts = rest.split(separator: ":")
        guard parts.count == 2, let port = Int(parts[1]) else { throw BenchError("invalid endpoint \(text)") }
        host = parts[0] == "localhost" ? "127.0.0.1" : String(parts[0])
        self.port = port
        self.security = security
    }

    func connect() async throws -> GRPCClientConnection {
        let connection = try await GRPCClientConnection.connect(host: host, port: port, tls: security?.tls)
        try await security?.prepare(connection)
        return connection
    }
}

public struct BenchError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// Counts answers of fire-and-forget calls and reports their latency from an intended start.
final class TimedCall: ClientCallObserver, @unchecked Sendable {
    let intended: UInt64
    let errors: ErrorCounter
    /// Receives (intended start, latency) in nanoseconds for each successful call.
    let record: @Sendable (UInt64, UInt64) -> Void

    init(intended: UInt64, errors: ErrorCounter, record: @escaping @Sendable (UInt64, UInt64) -> Void) {
        self.intended = intended
        self.errors = errors
        self.record = record
    }

    func received(_ message: [UInt8]) {}

    func closed(_ status: ClientStatus) {
        if status.code == 0 {
            record(intended, monotonicNanos() &- intended)
        } else {
            errors.add(status.message)
        }
    }
}

/// Errors by message.
final class ErrorCounter: Sendable {
    private let counts = Mutex<[String: Int]>([:])
    func add(_ message: String) { counts.withLock { $0[message, default: 0] += 1 } }
    var all: [String: Int] { counts.withLock { $0 } }
    var total: Int { all.values.reduce(0, +) }
}

/// Sleeps until a monotonic instant.
func sleep(until nanos: UInt64) async {
    let now = monotonicNanos()
    if nanos > now { try? await Task.sleep(nanoseconds: nanos - now) }
}

/// Polls `condition` every 10 ms until it holds or `timeout` seconds pass; true if it held.
func waitUntil(timeout: Double, _ condition: () -> Bool) async -> Bool {
    let deadline = monotonicNanos() + UInt64(timeout * 1e9)
    while monotonicNanos() < deadline {
        if condition() { return true }
        try? await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}
