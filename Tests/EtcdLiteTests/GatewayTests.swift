import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Testing

/// curl, a real HTTP client, against a member's client port.
func curl(_ port: Int, _ path: String, body: String? = nil, method: String? = nil, maxTime: Double? = nil) throws -> String {
    var arguments = ["-sN", "-w", "\n%{http_code}", "http://127.0.0.1:\(port)\(path)"]
    if let body { arguments += ["-X", "POST", "--data-binary", body] }
    if let method { arguments += ["-X", method] }
    if let maxTime { arguments += ["--max-time", String(maxTime)] }
    let result = try run("/usr/bin/curl", arguments, timeout: (maxTime ?? 10) + 5)
    return result.stdout
}

/// The JSON gateway against etcd 3.4's: the same HTTP requests to both, answers compared once
/// ids, versions and sizes are normalised.
@Suite(.serialized, .timeLimit(.minutes(3)), .enabled(if: etcdInstalled && FileManager.default.fileExists(atPath: "/usr/bin/curl"),
                                                       "needs etcd (apt-get install etcd-server) and curl"))
struct GatewayTests {
    static func normalize(_ text: String) -> String {
        var out = text
        let rules: [(String, String)] = [
            (#"\"(cluster_id|member_id|leader|ID|memberID)\":\"\d+\""#, "\"$1\":\"ID\""),
            (#"\"(dbSize|dbSizeInUse|raftIndex|raftAppliedIndex|hash|remaining_bytes)\":\"\d+\""#, "\"$1\":\"N\""),
            (#"\"version\":\"3\.[0-9.]+\""#, "\"version\":\"V\""),
            (#"\"blob\":\"[^\"]*\""#, "\"blob\":\"B\""),
            (#"\"TTL\":\"(59|60)\""#, "\"TTL\":\"60\""),
            (#"127\.0\.0\.1:\d+"#, "127.0.0.1:PORT"),
        ]
        for (pattern, template) in rules {
            let regex = try! NSRegularExpression(pattern: pattern)
            out = regex.stringByReplacingMatches(in: out, range: NSRange(out.startIndex..., in: out), withTemplate: template)
        }
        return out
    }

    static func b64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }

    /// (path, body): unary calls in order; streams and errors included.
    static let steps: [(String, String?)] = [
        ("/v3/kv/put", #"{"key":"\#(b64("foo"))","value":"\#(b64("bar"))"}"#),
        ("/v3/kv/put", #"{"key":"\#(b64("foo"))","value":"\#(b64("baz"))","prev_kv":true}"#),
        ("/v3beta/kv/put", #"{"key":"\#(b64("fop"))","value":"\#(b64("1"))","prevKv":true}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("foo"))"}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("fo"))","range_end":"\#(b64("fp"))","sort_order":"DESCEND","sort_target":"KEY"}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("fo"))","rangeEnd":"\#(b64("fp"))","limit":"1","sortOrder":2}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("fo"))","range_end":"\#(b64("fp"))","count_only":true}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("nothing"))"}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("foo"))","revision":2,"unknown_field":[1,2]}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("foo"))","revision":"99"}"#),
        ("/v3/kv/range", #"{"key":""}"#),
        ("/v3/kv/range", ""),
        ("/v3/kv/txn", #"{"compare":[{"key":"\#(b64("foo"))","target":"VALUE","result":"EQUAL","value":"\#(b64("baz"))"}],"success":[{"request_put":{"key":"\#(b64("t"))","value":"\#(b64("1"))"}},{"requestRange":{"key":"\#(b64("t"))"}}],"failure":[]}"#),
        ("/v3/kv/txn", #"{"compare":[{"key":"\#(b64("foo"))","target":"MOD","result":"GREATER","mod_revision":"100"}],"failure":[{"request_delete_range":{"key":"\#(b64("t"))","prev_kv":true}}]}"#),
        ("/v3/kv/deleterange", #"{"key":"\#(b64("fop"))","prev_kv":true}"#),
        ("/v3/kv/deleterange", #"{"key":"\#(b64("zzz"))"}"#),
        ("/v3/kv/compaction", #"{"revision":"3"}"#),
        ("/v3/kv/compaction", #"{"revision":"2"}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("foo"))","revision":"2"}"#),
        ("/v3/lease/grant", #"{"TTL":"60","ID":"1000"}"#),
        ("/v3/lease/grant", #"{"TTL":60,"ID":1000}"#),
        ("/v3/kv/put", #"{"key":"\#(b64("leased"))","value":"\#(b64("x"))","lease":"1000"}"#),
        ("/v3/lease/timetolive", #"{"ID":"1000","keys":true}"#),
        ("/v3/kv/lease/timetolive", #"{"ID":"5"}"#),
        ("/v3/lease/leases", "{}"),
        ("/v3/kv/lease/leases", "{}"),
        ("/v3/lease/keepalive", #"{"ID":"1000"}{"ID":"5"}"#),
        ("/v3/lease/revoke", #"{"ID":"1000"}"#),
        ("/v3/kv/lease/revoke", #"{"ID":"1000"}"#),
        ("/v3/maintenance/alarm", #"{"action":"GET"}"#),
        ("/v3/maintenance/status", "{}"),
        ("/v3/maintenance/defragment", "{}"),
        ("/v3/cluster/member/list", "{}"),
        ("/v3/cluster/member/list", #"{"linearizable":true}"#),
        // Membership changes etcd refuses, and a learner added (its answer: see `comparable`).
        ("/v3/cluster/member/add", #"{"peerURLs":["http://127.0.0.1"]}"#),
        ("/v3/cluster/member/add", #"{"peerURLs":["ftp://127.0.0.1:1"]}"#),
        ("/v3/cluster/member/remove", #"{"ID":"1234"}"#),
        ("/v3/cluster/member/promote", #"{"ID":"1234"}"#),
        ("/v3/cluster/member/update", #"{"ID":"1234","peerURLs":["http://127.0.0.1:1"]}"#),
        ("/v3/cluster/member/add", #"{"peerURLs":["http://127.0.0.1:1"],"isLearner":true}"#),
        ("/v3/cluster/member/add", #"{"peerURLs":["http://127.0.0.1:2"],"isLearner":true}"#),
        // Bad input: etcd's codes and statuses (messages of JSON errors are Go's own).
        ("/v3/kv/put", #"{"key":"\#(b64("k"))","value":"\#(b64("v"))","lease":"12345"}"#),
        ("/v3/kv/put", #"{"value":"\#(b64("v"))"}"#),
        ("/v3/kv/range", #"{"key":"#),
        ("/v3/kv/range", #"{"key":"!!"}"#),
        ("/v3/kv/range", #"{"key":"\#(b64("foo"))","limit":"ten"}"#),
        ("/v3/kv/range", #"{"key":["x"]}"#),
        ("/v3/nope", "{}"),
        ("/nope", nil),
        ("/v3/kv/range", nil),
        ("/version", nil),
        ("/health", nil),
        ("/health?serializable=true", nil),
    ]

    /// Where Go's JSON decoder words an error its own way, compare the status and code only.
    static func comparable(_ answer: String, path: String, body: String?) -> String {
        if body == #"{"key":"# || body == #"{"key":"!!"}"# || body?.contains("ten") == true || body == #"{"key":["x"]}"# {
            // Go's JSON decoder words these its own way: the status and the code must match.
            let lines = answer.split(separator: "\n")
            let code = answer.range(of: #""code":\d+"#, options: .regularExpression).map { String(answer[$0]) } ?? "no code"
            return "\(code) \(lines.last ?? "")"
        }
        if path == "/version" { return answer.contains("etcdserver") && answer.contains("etcdcluster") ? "version" : answer }
        if path == "/v3/cluster/member/add", answer.hasSuffix("\n200") {
            // Members come in ID order, and IDs differ between the two: the new member and the count.
            let member = answer.range(of: #""member":\{[^}]*\}"#, options: .regularExpression).map { normalize(String(answer[$0])) } ?? "none"
            return "200 \(member) members=\(answer.components(separatedBy: "\"peerURLs\"").count - 2)"
        }
        return normalize(answer)
    }

    func session(_ port: Int) throws -> [String] {
        var out: [String] = []
        for (path, body) in Self.steps {
            let answer = try curl(port, path, body: body)
            out.append("\(path) \(body ?? "GET"): \(Self.comparable(answer, path: path, body: body))")
        }
        // A watch from the start of history, streamed until the client hangs up; and a second
        // request object on the same stream.
        let watch = try curl(port, "/v3/watch", body: #"{"create_request":{"key":"\#(Self.b64("f"))","range_end":"\#(Self.b64("g"))","start_revision":"1","prev_kv":true}}"#, maxTime: 1.5)
        out.append("watch: \(Self.normalize(watch.components(separatedBy: "\n").dropLast().joined(separator: "\n")))")
        let snapshot = try curl(port, "/v3/maintenance/snapshot", body: "{}")
        out.append("snapshot: lines=\(snapshot.split(separator: "\n").count > 2) \(snapshot.hasPrefix("{\"result\":{")) \(snapshot.hasSuffix("200"))")
        return out
    }

    @Test func gatewayAnswersAsEtcds() throws {
        try expectSameAsEtcd { server in try session(server.clientPort) }
    }
}

/// /health follows the alarms; `?exclude=NOSPACE` looks past that one (etcd 3.5's option).
@Suite(.timeLimit(.minutes(2))) struct HealthTests {
    @Test func healthFollowsAlarmsAndExclusions() throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        #expect(try curl(lite.clientPort, "/health") == "{\"health\":\"true\"}\n200")
        _ = try curl(lite.clientPort, "/v3/maintenance/alarm", body: #"{"action":"ACTIVATE","memberID":"1","alarm":"NOSPACE"}"#)
        #expect(try curl(lite.clientPort, "/health") == "{\"health\":\"false\"}\n503")
        #expect(try curl(lite.clientPort, "/readyz") == "{\"health\":\"false\"}\n503")
        #expect(try curl(lite.clientPort, "/health?exclude=NOSPACE") == "{\"health\":\"true\"}\n200")
        #expect(try curl(lite.clientPort, "/health?serializable=true&exclude=CORRUPT") == "{\"health\":\"false\"}\n503")
        _ = try curl(lite.clientPort, "/v3/maintenance/alarm", body: #"{"action":"DEACTIVATE","memberID":"1","alarm":"NOSPACE"}"#)
        #expect(try curl(lite.clientPort, "/livez") == "{\"health\":\"true\"}\n200")
    }
}

/// The gateway through Foundation's URLSession (a real HTTP client library, keep-alive).
@Suite(.timeLimit(.minutes(2))) struct GatewayClientTests {
    @Test func urlSessionPutsAndReads() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let session = URLSession(configuration: .ephemeral)
        func post(_ path: String, _ json: [String: Any]) async throws -> (Int, [String: Any]) {
            var request = URLRequest(url: URL(string: "http://127.0.0.1:\(lite.clientPort)\(path)")!)
            request.httpMethod = "POST"
            request.httpBody = try JSONSerialization.data(withJSONObject: json)
            let (data, response) = try await session.data(for: request)
            let object = try JSONSerialization.jsonObject(with: data) as? [String: Any] ?? [:]
            return ((response as! HTTPURLResponse).statusCode, object)
        }
        for n in 0..<20 {
            let (status, _) = try await post("/v3/kv/put", ["key": GatewayTests.b64("k\(n)"), "value": GatewayTests.b64("v\(n)")])
            #expect(status == 200)
        }
        let (status, range) = try await post("/v3/kv/range", ["key": GatewayTests.b64("k"), "range_end": GatewayTests.b64("l"), "limit": 5])
        #expect(status == 200)
        #expect(range["count"] as? String == "20" && range["more"] as? Bool == true)
        #expect((range["kvs"] as? [[String: Any]])?.count == 5)
        let (errorStatus, error) = try await post("/v3/kv/range", ["key": ""])
        #expect(errorStatus == 400 && error["code"] as? Int == 3 && error["message"] as? String == "etcdserver: key is not provided")
    }
}

/// /metrics in Prometheus text with etcd's names: every name etcd dashboards rely on that we
/// list is served by etcd 3.4 and by etcdlite, and the counts follow the requests.
@Suite(.timeLimit(.minutes(2)), .enabled(if: etcdInstalled && FileManager.default.fileExists(atPath: "/usr/bin/curl"),
                                          "needs etcd and curl"))
struct MetricsTests {
    static let names = [
        "etcd_server_has_leader", "etcd_server_is_leader", "etcd_server_leader_changes_seen_total",
        "etcd_server_proposals_committed_total", "etcd_server_proposals_applied_total", "etcd_server_proposals_pending",
        "etcd_server_proposals_failed_total", "etcd_disk_wal_fsync_duration_seconds_bucket",
        "etcd_disk_backend_commit_duration_seconds_bucket", "etcd_mvcc_db_total_size_in_bytes",
        "etcd_mvcc_db_total_size_in_use_in_bytes", "etcd_debugging_mvcc_keys_total", "grpc_server_started_total",
        "grpc_server_handled_total", "process_cpu_seconds_total", "process_resident_memory_bytes", "process_open_fds",
    ]

    func scrape(_ server: ServerProcess) throws -> [String: Double] {
        for n in 0..<5 { _ = try server.etcdctl(["put", "m\(n)", "v"]) }
        _ = try server.etcdctl(["get", "m", "--prefix"])
        let text = try curl(server.clientPort, "/metrics")
        var values: [String: Double] = [:]
        for line in text.split(separator: "\n") where !line.hasPrefix("#") {
            guard let space = line.lastIndex(of: " "), let value = Double(line[line.index(after: space)...]) else { continue }
            values[String(line[..<space])] = value
        }
        return values
    }

    @Test func etcdsNamesAndCounts() throws {
        let etcd = try ServerProcess(executable: which("etcd")!)
        defer { etcd.stop(); etcd.dataDir.cleanup() }
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let expected = try scrape(etcd)
        let actual = try scrape(lite)
        for name in Self.names {
            #expect(expected.keys.contains { $0 == name || $0.hasPrefix(name + "{") }, "etcd serves \(name)")
            #expect(actual.keys.contains { $0 == name || $0.hasPrefix(name + "{") }, "etcdlite serves \(name)")
        }
        let puts = #"grpc_server_handled_total{grpc_code="OK",grpc_method="Put",grpc_service="etcdserverpb.KV",grpc_type="unary"}"#
        #expect(actual[puts] == 5 && expected[puts] == 5)
        #expect(actual["etcd_debugging_mvcc_keys_total"] == 5 && expected["etcd_debugging_mvcc_keys_total"] == 5)
        #expect(actual["etcd_server_has_leader"] == 1 && actual["etcd_server_is_leader"] == 1)
        #expect((actual["etcd_server_proposals_applied_total"] ?? 0) >= 5)
    }
}
