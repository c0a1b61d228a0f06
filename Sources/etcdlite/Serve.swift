import ArgumentParser
import EtcdLite
import Foundation
import Logging

/// `etcdlite` / `etcdlite serve`: one member, configured with etcd's flags or their `ETCD_*`
/// environment variables (a flag wins over its variable).
struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Run a member (the default).")

    @Option(help: "Human-readable name for this member.") var name: String?
    @Option(help: "Path to the data directory (default: ${name}.etcdlite).") var dataDir: String?
    @Option(help: "List of URLs to listen on for client traffic.") var listenClientUrls: String?
    @Option(help: "List of this member's client URLs to advertise to the public.") var advertiseClientUrls: String?
    @Option(help: "List of URLs to listen on for peer traffic.") var listenPeerUrls: String?
    @Option(help: "List of this member's peer URLs to advertise to the rest of the cluster.") var initialAdvertisePeerUrls: String?
    @Option(help: "Initial cluster configuration for bootstrapping.") var initialCluster: String?
    @Option(help: "Initial cluster state ('new' or 'existing').") var initialClusterState: String?
    @Option(help: "Initial cluster token for the etcd cluster during bootstrap.") var initialClusterToken: String?
    @Option(help: "Raise alarms when backend size exceeds the given quota (0 defaults to 2 GiB).") var quotaBackendBytes: String?
    @Option(help: "Maximum number of operations permitted in a transaction.") var maxTxnOps: String?
    @Option(help: "Maximum client request size in bytes the server will accept.") var maxRequestBytes: String?
    @Option(help: "Maximum concurrent streams that each client can open at a time (default math.MaxUint32).") var maxConcurrentStreams: String?
    @Option(help: "Watchers one Watch stream may have at once (default 100000; 0: no limit).") var maxWatchersPerStream: String?
    @Option(help: "Client connections one remote address may have open at once (default 4096; 0: no limit).") var maxConnectionsPerClient: String?
    @Option(help: "Minimum duration interval that a client should wait before pinging server.") var grpcKeepaliveMinTime: String?
    @Option(help: "Interpret 'auto-compaction-retention' as 'periodic' or 'revision'.") var autoCompactionMode: String?
    @Option(help: "Auto compaction retention (0 means off).") var autoCompactionRetention: String?
    @Option(help: "Number of committed transactions to trigger a snapshot to disk.") var snapshotCount: String?
    @Option(help: "Time (in milliseconds) of a heartbeat interval.") var heartbeatInterval: String?
    @Option(help: "Time (in milliseconds) for an election to timeout.") var electionTimeout: String?
    @Option(help: "Log level: debug, info, warn, error, panic or fatal.") var logLevel: String?
    @Option(help: "Logger (accepted for compatibility; logs are always JSON lines).") var logger: String?
    @Option(help: "Log outputs (accepted for compatibility; logs go to standard error).") var logOutputs: String?

    @Option(help: "Path to the client server TLS cert file.") var certFile: String?
    @Option(help: "Path to the client server TLS key file.") var keyFile: String?
    @Option(help: "Path to the client server TLS trusted CA cert file.") var trustedCaFile: String?
    @Option(help: "Path to the peer server TLS cert file.") var peerCertFile: String?
    @Option(help: "Path to the peer server TLS key file.") var peerKeyFile: String?
    @Option(help: "Path to the peer server TLS trusted CA file.") var peerTrustedCaFile: String?
    // Accepted and validated; the metrics issue gives it its effect.
    @Option var listenMetricsUrls: String?
    @Option var experimentalWatchProgressNotifyInterval: String?
    @Option(help: "Auth token type: simple, or jwt,pub-key=...,priv-key=...,sign-method=...[,ttl=...].") var authToken: String?
    @Option(help: "Seconds a simple token lives after its last use (default 300).") var authTokenTtl: String?
    @Option(help: "Accepted for compatibility: passwords are hashed with PBKDF2-HMAC-SHA256 at 210,000 rounds.") var bcryptCost: String?
    @Flag(help: "Enable client cert authentication.") var clientCertAuth = false
    @Flag(help: "Client TLS using generated certificates.") var autoTls = false
    @Flag(help: "Peer TLS using generated certificates.") var peerAutoTls = false
    @Flag(help: "Enable peer client cert authentication.") var peerClientCertAuth = false
    @Flag(help: "Compare the store's hash with the peers' before serving clients; refuse to start on a mismatch.")
    var experimentalInitialCorruptCheck = false
    @Flag var enableV2 = false
    @Flag(inversion: .prefixedNo, help: "Refuse membership changes that could cost quorum (etcd's default).") var strictReconfigCheck = true

    func run() async throws {
        let config = try makeConfig()
        let level = JSONLogHandler.level(config.logLevel) ?? .info
        LoggingSystem.bootstrap { JSONLogHandler(logLevel: level, label: $0) }
        let logger = Logger(label: "etcdlite")
        let server: EtcdLiteServer
        do {
            server = try EtcdLiteServer(config: config, logger: logger)
        } catch {
            logger.critical("failed to start", metadata: ["error": "\(error)"])
            throw ExitCode(1)
        }
        let signals = ShutdownSignals { signal in
            logger.info("received signal; shutting down", metadata: ["signal": "\(signal)"])
            server.shutdown()
        }
        defer { signals.cancel() }
        do {
            try await server.serve()
        } catch let error as MemberRemovedError {
            logger.warning("stopped serving", metadata: ["error": "\(error)"])
            throw ExitCode(1)
        } catch let error as DataInconsistencyError {
            logger.critical("failed to start", metadata: ["error": "\(error)"])
            throw ExitCode(1)
        }
        logger.info("stopped serving")
    }

    private func value(_ flag: String?, _ name: String) -> String? {
        if let flag { return flag }
        let variable = "ETCD_" + name.uppercased().replacingOccurrences(of: "-", with: "_")
        return ProcessInfo.processInfo.environment[variable]
    }

    private func list(_ text: String) -> [String] {
        text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty }
    }

    private func number<T: FixedWidthInteger>(_ flag: String?, _ name: String) throws -> T? {
        guard let text = value(flag, name) else { return nil }
        guard let number = T(text) else { throw ValidationError("invalid value \"\(text)\" for flag -\(name): parse error") }
        return number
    }

    func makeConfig() throws -> MemberConfig {
        var config = MemberConfig()
        if let v = value(name, "name") { config.name = v }
        if let v = value(dataDir, "data-dir") { config.dataDir = v }
        if let v = value(listenClientUrls, "listen-client-urls") { config.listenClientURLs = list(v) }
        if let v = value(advertiseClientUrls, "advertise-client-urls") { config.advertiseClientURLs = list(v) }
        if let v = value(listenPeerUrls, "listen-peer-urls") { config.listenPeerURLs = list(v) }
        if let v = value(initialAdvertisePeerUrls, "initial-advertise-peer-urls") { config.initialAdvertisePeerURLs = list(v) }
        if let v = value(initialCluster, "initial-cluster") { config.initialCluster = v }
        if let v = value(initialClusterState, "initial-cluster-state") { config.initialClusterState = v }
        if let v = value(initialClusterToken, "initial-cluster-token") { config.initialClusterToken = v }
        config.strictReconfigCheck = strictReconfigCheck
        config.initialCorruptCheck = experimentalInitialCorruptCheck
            || (ProcessInfo.processInfo.environment["ETCD_EXPERIMENTAL_INITIAL_CORRUPT_CHECK"]?.lowercased() == "true")
        if let v = ProcessInfo.processInfo.environment["ETCD_STRICT_RECONFIG_CHECK"] { config.strictReconfigCheck = v.lowercased() != "false" }
        if let v: Int64 = try number(quotaBackendBytes, "quota-backend-bytes") { config.quotaBackendBytes = v }
        if let v: Int = try number(maxTxnOps, "max-txn-ops") { config.maxTxnOps = v }
        if let v: Int = try number(maxRequestBytes, "max-request-bytes") { config.maxRequestBytes = v }
        if let v: UInt32 = try number(maxConcurrentStreams, "max-concurrent-streams") { config.maxConcurrentStreams = v }
        if let v: Int = try number(maxWatchersPerStream, "max-watchers-per-stream") { config.maxWatchersPerStream = v }
        if let v: Int = try number(maxConnectionsPerClient, "max-connections-per-client") { config.maxConnectionsPerClient = v }
        if let v = value(grpcKeepaliveMinTime, "grpc-keepalive-min-time") {
            guard let seconds = Duration.parseGo(v), seconds >= 0 else {
                throw ValidationError("invalid value \"\(v)\" for flag -grpc-keepalive-min-time: parse error")
            }
            config.grpcKeepaliveMinTime = .seconds(seconds)
        }
        if let v = value(autoCompactionMode, "auto-compaction-mode") { config.autoCompactionMode = v }
        if let v = value(autoCompactionRetention, "auto-compaction-retention") { config.autoCompactionRetention = v }
        if let v: UInt64 = try number(snapshotCount, "snapshot-count") { config.snapshotCount = v }
        if let v: Int = try number(heartbeatInterval, "heartbeat-interval") { config.heartbeatIntervalMilliseconds = v }
        if let v: Int = try number(electionTimeout, "election-timeout") { config.electionTimeoutMilliseconds = v }
        if let v = value(logLevel, "log-level") {
            guard JSONLogHandler.level(v) != nil else { throw ValidationError("invalid log level \"\(v)\"") }
            config.logLevel = v
        }
        if let v = value(experimentalWatchProgressNotifyInterval, "experimental-watch-progress-notify-interval") {
            guard let seconds = Duration.parseGo(v), seconds > 0 else {
                throw ValidationError("invalid value \"\(v)\" for flag -experimental-watch-progress-notify-interval: parse error")
            }
            config.watchProgressNotifyInterval = .seconds(seconds)
        }
        if let v = value(authToken, "auth-token") { config.authToken = v }
        if let v: Int = try number(authTokenTtl, "auth-token-ttl") { config.authTokenTTL = v }
        _ = value(bcryptCost, "bcrypt-cost")
        config.clientTLS.certFile = value(certFile, "cert-file") ?? ""
        config.clientTLS.keyFile = value(keyFile, "key-file") ?? ""
        config.clientTLS.trustedCAFile = value(trustedCaFile, "trusted-ca-file") ?? ""
        config.clientTLS.clientCertAuth = clientCertAuth || value(nil, "client-cert-auth")?.lowercased() == "true"
        config.clientTLS.autoTLS = autoTls || value(nil, "auto-tls")?.lowercased() == "true"
        config.peerTLS.autoTLS = peerAutoTls || value(nil, "peer-auto-tls")?.lowercased() == "true"
        config.peerTLS.certFile = value(peerCertFile, "peer-cert-file") ?? ""
        config.peerTLS.keyFile = value(peerKeyFile, "peer-key-file") ?? ""
        config.peerTLS.trustedCAFile = value(peerTrustedCaFile, "peer-trusted-ca-file") ?? ""
        config.peerTLS.clientCertAuth = peerClientCertAuth || value(nil, "peer-client-cert-auth")?.lowercased() == "true"
        for (file, flag) in [(certFile, "cert-file"), (keyFile, "key-file"), (trustedCaFile, "trusted-ca-file"),
                             (peerCertFile, "peer-cert-file"), (peerKeyFile, "peer-key-file"), (peerTrustedCaFile, "peer-trusted-ca-file")] {
            if let path = value(file, flag), !path.isEmpty, !FileManager.default.fileExists(atPath: path) {
                throw ValidationError("--\(flag): \(path): no such file or directory")
            }
        }
        do {
            try config.validate()
        } catch let error as ConfigError {
            throw ValidationError(error.description)
        }
        return config
    }
}

/// The write end of the pipe that signal handlers report to (set once, before handlers exist).
nonisolated(unsafe) private var signalPipe: Int32 = -1

/// SIGTERM and SIGINT start a graceful shutdown. The handler only writes the signal number to a
/// pipe (async-signal-safe, whichever thread the kernel picks); a thread of ours reads it.
final class ShutdownSignals: @unchecked Sendable {
    private var fds: [Int32] = [-1, -1]

    init(_ handler: @escaping @Sendable (Int32) -> Void) {
        guard pipe(&fds) == 0 else { return }
        signalPipe = fds[1]
        for number in [SIGTERM, SIGINT] {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { signal in
                var byte = UInt8(truncatingIfNeeded: signal)
                _ = write(signalPipe, &byte, 1)
            }
            sigemptyset(&action.sa_mask)
            action.sa_flags = SA_RESTART
            sigaction(number, &action, nil)
        }
        let readEnd = fds[0]
        let thread = Thread {
            var byte: UInt8 = 0
            while read(readEnd, &byte, 1) == 1 {
                handler(Int32(byte))
            }
        }
        thread.name = "etcdlite-signals"
        thread.start()
    }

    func cancel() {
        for number in [SIGTERM, SIGINT] { signal(number, SIG_DFL) }
    }
}
