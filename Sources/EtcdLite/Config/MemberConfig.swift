import Foundation

/// A member's configuration, with etcd's flag names and defaults.
public struct MemberConfig: Sendable {
    public var name = "default"
    /// Empty means "\(name).etcdlite" in the working directory.
    public var dataDir = ""
    public var listenClientURLs = ["http://127.0.0.1:2379"]
    public var advertiseClientURLs = ["http://127.0.0.1:2379"]
    public var listenPeerURLs = ["http://localhost:2380"]
    public var initialAdvertisePeerURLs = ["http://localhost:2380"]
    /// Empty means "\(name)=\(initialAdvertisePeerURLs)".
    public var initialCluster = ""
    public var initialClusterState = "new"
    public var initialClusterToken = "etcd-cluster"
    /// Refuse membership changes that could cost quorum (etcd's --strict-reconfig-check, on by
    /// default).
    public var strictReconfigCheck = true
    /// Compare the store's hash with the peers' before serving clients (etcd's
    /// --experimental-initial-corrupt-check).
    public var initialCorruptCheck = false
    /// TLS for clients (--cert-file, --key-file, --trusted-ca-file, --client-cert-auth): used on
    /// https:// client URLs.
    public var clientTLS = TLSFiles()
    /// TLS between members (--peer-*): used on https:// peer URLs and for connections to peers.
    public var peerTLS = TLSFiles()
    /// etcd's --auth-token: `simple`, or `jwt,pub-key=...,priv-key=...,sign-method=...[,ttl=...]`.
    public var authToken = "simple"
    /// etcd's --auth-token-ttl: how long a simple token lives after its last use, in seconds.
    public var authTokenTTL = 300
    /// 0 means etcd's default of 2 GiB; negative disables the quota.
    public var quotaBackendBytes: Int64 = 0
    public var maxTxnOps = 128
    public var maxRequestBytes = 1_572_864
    /// HTTP/2 streams a client connection may have open at once (etcd's --max-concurrent-streams).
    public var maxConcurrentStreams = UInt32.max
    /// Watchers one Watch stream may have at once; a create beyond it is answered canceled
    /// (etcdlite's own limit: etcd has none). 0: no limit.
    public var maxWatchersPerStream = 100_000
    /// Client connections one remote address may have open at once; more are closed as they are
    /// accepted (etcdlite's own limit). 0: no limit.
    public var maxConnectionsPerClient = 4_096
    /// Client pings closer together than this are strikes; past two, GOAWAY too_many_pings
    /// (etcd's --grpc-keepalive-min-time).
    public var grpcKeepaliveMinTime = Duration.seconds(5)
    public var autoCompactionMode = "periodic"
    public var autoCompactionRetention = "0"
    public var snapshotCount: UInt64 = 100_000
    public var heartbeatIntervalMilliseconds = 100
    public var electionTimeoutMilliseconds = 1000
    public var logLevel = "info"
    /// How often a synced watcher that asked for progress notifications and got no events hears
    /// the current revision (etcd's --experimental-watch-progress-notify-interval).
    public var watchProgressNotifyInterval = Duration.seconds(600)
    /// Event bytes a Watch stream may have queued before its watchers read from history instead.
    public var watchStreamQueueBytes = 4 << 20

    public init() {}

    public static let defaultQuotaBytes: Int64 = 2 << 30

    public var effectiveDataDir: String { dataDir.isEmpty ? "\(name).etcdlite" : dataDir }

    public var effectiveQuotaBytes: Int64? {
        if quotaBackendBytes < 0 { return nil }
        return quotaBackendBytes == 0 ? Self.defaultQuotaBytes : quotaBackendBytes
    }

    /// The peers named by --initial-cluster: name → peer URLs.
    public func initialClusterMembers() throws -> [(name: String, peerURLs: [String])] {
        let text = initialCluster.isEmpty
            ? initialAdvertisePeerURLs.map { "\(name)=\($0)" }.joined(separator: ",") : initialCluster
        var members: [(String, [String])] = []
        for item in text.split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1).map(String.init)
            guard parts.count == 2, !parts[0].isEmpty else {
                throw ConfigError("--initial-cluster: invalid value \"\(item)\"")
            }
            try Self.validateURL(parts[1], flag: "--initial-cluster")
            if let existing = members.firstIndex(where: { $0.0 == parts[0] }) {
                members[existing].1.append(parts[1])
            } else {
                members.append((parts[0], [parts[1]]))
            }
        }
        return members
    }

    /// Checks what etcd checks at startup.
    public func validate() throws {
        for url in listenClientURLs { try Self.validateURL(url, flag: "--listen-client-urls") }
        for url in advertiseClientURLs { try Self.validateURL(url, flag: "--advertise-client-urls") }
        for url in listenPeerURLs { try Self.validateURL(url, flag: "--listen-peer-urls") }
        for url in initialAdvertisePeerURLs { try Self.validateURL(url, flag: "--initial-advertise-peer-urls") }
        guard ["new", "existing"].contains(initialClusterState) else {
            throw ConfigError("--initial-cluster-state: invalid value \"\(initialClusterState)\" (new or existing)")
        }
        guard ["periodic", "revision"].contains(autoCompactionMode) else {
            throw ConfigError("--auto-compaction-mode: invalid value \"\(autoCompactionMode)\" (periodic or revision)")
        }
        _ = try autoCompactionRetentionValue()
        guard maxTxnOps > 0 else { throw ConfigError("--max-txn-ops must be positive") }
        guard maxRequestBytes > 0 else { throw ConfigError("--max-request-bytes must be positive") }
        guard heartbeatIntervalMilliseconds > 0, electionTimeoutMilliseconds >= 5 * heartbeatIntervalMilliseconds else {
            throw ConfigError("--election-timeout[\(electionTimeoutMilliseconds)ms] should be at least as 5 times as --heartbeat-interval[\(heartbeatIntervalMilliseconds)ms]")
        }
        guard electionTimeoutMilliseconds <= 50_000 else {
            throw ConfigError("--election-timeout[\(electionTimeoutMilliseconds)ms] is too long, and should be set less than 50000ms")
        }
        for url in listenClientURLs where url.hasPrefix("https://") && clientTLS.isEmpty && !clientTLS.autoTLS {
            throw ConfigError("TLS key/cert (--cert-file, --key-file) must be provided for client url \(url) with HTTPS scheme")
        }
        for url in listenPeerURLs where url.hasPrefix("https://") && peerTLS.isEmpty && !peerTLS.autoTLS {
            throw ConfigError("TLS key/cert (--peer-cert-file, --peer-key-file) must be provided for peer url \(url) with HTTPS scheme")
        }
        let members = try initialClusterMembers()
        guard members.contains(where: { $0.name == name }) else {
            throw ConfigError("couldn't find local name \"\(name)\" in the initial cluster configuration")
        }
    }

    /// The retention as etcd reads it: periodic takes a duration ("5m", "1h") or hours as a
    /// number; revision takes a count. Nil means auto compaction is off.
    public enum Retention: Equatable, Sendable {
        case periodic(seconds: Double)
        case revisions(Int64)
    }

    public func autoCompactionRetentionValue() throws -> Retention? {
        let text = autoCompactionRetention
        if autoCompactionMode == "revision" {
            guard let count = Int64(text), count >= 0 else {
                throw ConfigError("--auto-compaction-retention: invalid revision count \"\(text)\"")
            }
            return count == 0 ? nil : .revisions(count)
        }
        if let hours = Double(text) {
            return hours <= 0 ? nil : .periodic(seconds: hours * 3600)
        }
        guard let seconds = Duration.parseGo(text) else {
            throw ConfigError("--auto-compaction-retention: invalid duration \"\(text)\"")
        }
        return seconds <= 0 ? nil : .periodic(seconds: seconds)
    }

    /// Where a URL of etcd's flags points: its host (`localhost` as 127.0.0.1) and port.
    static func address(_ text: String, defaultPort: Int) -> (host: String, port: Int)? {
        guard let url = URLComponents(string: text), let host = url.host else { return nil }
        return (host == "localhost" ? "127.0.0.1" : host, url.port ?? defaultPort)
    }

    static func validateURL(_ text: String, flag: String) throws {
        guard let url = URLComponents(string: text), let scheme = url.scheme, ["http", "https", "unix", "unixs"].contains(scheme),
              url.host != nil || scheme.hasPrefix("unix")
        else { throw ConfigError("\(flag): invalid URL \"\(text)\"") }
        if url.path != "" && url.path != "/" && !scheme.hasPrefix("unix") {
            throw ConfigError("\(flag): URL must not contain a path: \"\(text)\"")
        }
    }
}

public struct ConfigError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

extension Duration {
    /// Seconds in a Go duration string such as "1h30m", "5m", "250ms".
    public static func parseGo(_ text: String) -> Double? {
        let units: [(String, Double)] = [("ns", 1e-9), ("us", 1e-6), ("µs", 1e-6), ("ms", 1e-3), ("s", 1), ("m", 60), ("h", 3600)]
        var rest = Substring(text)
        var total = 0.0
        guard !rest.isEmpty else { return nil }
        while !rest.isEmpty {
            let number = rest.prefix { $0.isNumber || $0 == "." }
            guard let value = Double(number) else { return nil }
            rest = rest.dropFirst(number.count)
            guard let unit = units.first(where: { rest.hasPrefix($0.0) && !(($0.0 == "m") && rest.hasPrefix("ms")) }) else { return nil }
            rest = rest.dropFirst(unit.0.count)
            total += value * unit.1
        }
        return total
    }
}
