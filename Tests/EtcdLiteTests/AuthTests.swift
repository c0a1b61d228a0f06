import Foundation
import Testing

/// etcd's auth (users, roles, permissions, tokens) against etcd 3.4 side by side: etcdctl's
/// commands and the JSON gateway give the same answers from both.
///
/// Debian's etcd is 3.4.23. Later 3.4 releases (3.4.25–3.4.44) closed holes that 3.4.23 still has
/// (Compact, Status, MemberList, lease calls and nested txns without a permission check, invalid
/// permission ranges accepted, tokens checked while auth is off); etcdlite answers as 3.4.44, so
/// those cases are tested against etcdlite alone, in `AuthPermissionTests`.
@Suite(.serialized, .timeLimit(.minutes(5)), .enabled(if: etcdInstalled && FileManager.default.fileExists(atPath: "/usr/bin/curl"),
                                                       "needs etcd, etcdctl and curl"))
struct AuthTests {
    /// Exit status, standard output, and etcdctl's `Error:` lines (its JSON warnings carry times).
    static func outcome(_ result: CommandResult) -> String {
        let errors = result.stderr.split(separator: "\n").filter { $0.hasPrefix("Error:") || $0.hasPrefix("Failed") }
        return "\(result.status) \(result.stdout)\(errors.joined(separator: "\n"))"
    }

    /// Users and roles made and changed, auth turned on, and what each user may then do.
    static func etcdctlSession(_ member: ServerProcess) throws -> [String] {
        var lines: [String] = []
        func ctl(_ arguments: [String], user: String? = nil, stdin: String? = nil) throws {
            let result = try member.etcdctl((user.map { ["--user", $0] } ?? []) + arguments, stdin: stdin)
            lines.append("\(user ?? "-") \(arguments.joined(separator: " ")): \(outcome(result))")
        }
        try ctl(["user", "add", "root:rootpw"])
        try ctl(["user", "add", "alice:apw"])
        try ctl(["user", "add", "bob", "--new-user-password=bpw"])
        try ctl(["user", "add", "alice:again"])
        try ctl(["role", "add", "r1"])
        try ctl(["role", "add", "r2"])
        try ctl(["role", "add", "r1"])
        try ctl(["role", "grant-permission", "r1", "readwrite", "foo"])
        try ctl(["role", "grant-permission", "r1", "read", "/pre/", "--prefix"])
        try ctl(["role", "grant-permission", "r1", "write", "a", "c"])
        try ctl(["role", "grant-permission", "r1", "read", "z", "--from-key"])
        try ctl(["role", "grant-permission", "r1", "write", "foo"])  // replaces READWRITE on foo
        try ctl(["role", "grant-permission", "r1", "readwrite", "foo"])
        try ctl(["role", "grant-permission", "nope", "read", "x"])
        try ctl(["role", "grant-permission", "r1", "rw", "x"])
        try ctl(["role", "grant-permission", "r2", "read", "b", "d"])
        try ctl(["role", "get", "r1"])
        try ctl(["role", "get", "r2"])
        try ctl(["role", "get", "nope"])
        try ctl(["user", "grant-role", "alice", "r1"])
        try ctl(["user", "grant-role", "alice", "r1"])
        try ctl(["user", "grant-role", "alice", "nope"])
        try ctl(["user", "grant-role", "nobody", "r1"])
        try ctl(["user", "grant-role", "bob", "r2"])
        try ctl(["user", "get", "alice"])
        try ctl(["user", "get", "alice", "--detail"])
        try ctl(["user", "get", "nobody"])
        try ctl(["user", "list"])
        try ctl(["role", "list"])
        try ctl(["role", "revoke-permission", "r2", "x"])
        try ctl(["role", "revoke-permission", "r2", "b", "d"])
        try ctl(["role", "grant-permission", "r2", "read", "b", "d"])
        try ctl(["user", "revoke-role", "bob", "r1"])
        try ctl(["put", "foo", "0"])
        try ctl(["put", "b1", "0"])
        // root without role root: etcdctl adds the role and grants it, then enables.
        try ctl(["auth", "enable"])
        try ctl(["auth", "enable"], user: "root:rootpw")
        try ctl(["put", "foo", "1"])
        try ctl(["get", "foo"])
        try ctl(["put", "foo", "2"], user: "alice:apw")
        try ctl(["get", "foo"], user: "alice:apw")
        try ctl(["get", "foo"], user: "alice:wrong")
        try ctl(["get", "foo"], user: "nobody:pw")
        try ctl(["put", "foo", "3", "--prev-kv"], user: "alice:apw")
        try ctl(["put", "b", "3"], user: "alice:apw")
        try ctl(["put", "b", "4", "--prev-kv"], user: "alice:apw")
        try ctl(["get", "b"], user: "alice:apw")
        try ctl(["put", "zzz", "1"], user: "alice:apw")
        try ctl(["get", "zzz"], user: "alice:apw")
        try ctl(["get", "z", "--from-key"], user: "alice:apw")
        try ctl(["get", "y", "--from-key"], user: "alice:apw")
        try ctl(["get", "/pre/", "--prefix"], user: "alice:apw")
        try ctl(["get", "/p", "--prefix"], user: "alice:apw")
        try ctl(["get", "a", "c"], user: "alice:apw")
        try ctl(["del", "a", "c"], user: "alice:apw")
        try ctl(["del", "a", "d"], user: "alice:apw")
        try ctl(["del", "b", "--prev-kv"], user: "alice:apw")
        try ctl(["get", "b", "d"], user: "bob:bpw")
        try ctl(["get", "b1"], user: "bob:bpw")
        try ctl(["put", "b1", "x"], user: "bob:bpw")
        // Txn: compares and both branches are checked, whichever runs.
        try ctl(["txn"], user: "alice:apw", stdin: "value(\"foo\") = \"2\"\n\nput foo 5\n\nput foo 6\n\n")
        try ctl(["txn"], user: "alice:apw", stdin: "value(\"foo\") = \"2\"\n\nput foo 5\n\nput zzz 6\n\n")
        try ctl(["txn"], user: "alice:apw", stdin: "value(\"zzz\") = \"2\"\n\nput foo 5\n\nput foo 6\n\n")
        try ctl(["txn"], user: "alice:apw", stdin: "value(\"foo\") = \"5\"\n\nget foo\n\nget zzz\n\n")
        // Admin calls: root only; users read themselves and the roles they hold.
        try ctl(["user", "list"], user: "alice:apw")
        try ctl(["user", "list"], user: "root:rootpw")
        try ctl(["user", "get", "alice"], user: "alice:apw")
        try ctl(["user", "get", "bob"], user: "alice:apw")
        try ctl(["role", "get", "r1"], user: "alice:apw")
        try ctl(["role", "get", "r2"], user: "alice:apw")
        try ctl(["role", "list"], user: "alice:apw")
        try ctl(["role", "list"], user: "root:rootpw")
        try ctl(["user", "add", "carol:cpw"], user: "alice:apw")
        try ctl(["user", "passwd", "alice", "--interactive=false"], user: "alice:apw", stdin: "newpw\n")
        try ctl(["user", "passwd", "alice", "--interactive=false"], user: "root:rootpw", stdin: "newpw\n")
        try ctl(["get", "foo"], user: "alice:apw")
        try ctl(["get", "foo"], user: "alice:newpw")
        try ctl(["user", "delete", "root"], user: "root:rootpw")
        try ctl(["user", "revoke-role", "root", "root"], user: "root:rootpw")
        try ctl(["role", "delete", "root"], user: "root:rootpw")
        try ctl(["role", "delete", "r2"], user: "root:rootpw")
        try ctl(["user", "get", "bob"], user: "root:rootpw")
        try ctl(["user", "delete", "bob"], user: "root:rootpw")
        try ctl(["get", "b1"], user: "bob:bpw")
        try ctl(["auth", "disable"], user: "alice:newpw")
        try ctl(["auth", "disable"], user: "root:rootpw")
        try ctl(["put", "zzz", "9"])
        try ctl(["get", "", "--prefix"])
        try ctl(["auth", "disable"])
        return lines
    }

    @Test func etcdctlUsersRolesAndPermissionsAnswerAsEtcd() throws {
        let lines = try expectSameAsEtcd { member in try Self.etcdctlSession(member) }
        // The session did what it means to (both answered alike, and not alike by accident).
        #expect(lines.contains("root:rootpw auth enable: 0 Authentication Enabled\n"))
        #expect(lines.contains("alice:apw put zzz 1: 1 Error: etcdserver: permission denied"))
        #expect(lines.contains("alice:apw put foo 2: 0 OK\n"))
        #expect(lines.contains("- put foo 1: 1 Error: etcdserver: user name is empty"))
        #expect(lines.contains { $0.hasPrefix("alice:wrong get foo: 2 ") && $0.contains("authentication failed, invalid user ID or password") })
    }

    static func b64(_ text: String) -> String { Data(text.utf8).base64EncodedString() }

    /// A POST through curl: the answer's body, a newline, the HTTP status.
    static func curlPost(_ port: Int, _ path: String, _ body: String, headers: [String] = [], maxTime: Double = 10) throws -> String {
        var arguments = ["-s", "-w", "\n%{http_code}", "http://127.0.0.1:\(port)\(path)", "-X", "POST", "--data-binary", body,
                         "--max-time", String(maxTime)]
        for header in headers { arguments += ["-H", header] }
        return try run("/usr/bin/curl", arguments, timeout: maxTime + 5).stdout
    }

    /// An answer or header with ids and simple tokens masked (they differ between servers).
    static func masked(_ text: String) -> String {
        GatewayTests.normalize(text).replacingOccurrences(of: #"[A-Za-z]{16}\.\d+"#, with: "TOKEN", options: .regularExpression)
    }

    static func post(_ port: Int, _ path: String, _ body: String, headers: [String] = []) throws -> String {
        masked(try curlPost(port, path, body, headers: headers))
    }

    static func token(_ answer: String) -> String {
        guard let json = answer.split(separator: "\n").first, let data = json.data(using: .utf8),
              let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return "" }
        return object["token"] as? String ?? ""
    }

    /// The gateway's Auth paths, and tokens in `Authorization` (raw, not "Bearer") and
    /// `Grpc-Metadata-Token`; HTTP statuses for each refusal.
    static func gatewaySession(_ member: ServerProcess) throws -> [String] {
        let port = member.clientPort
        var lines: [String] = []
        func call(_ path: String, _ body: String, headers: [String] = []) throws -> String {
            let raw = try curlPost(port, path, body, headers: headers)
            lines.append("\(path) \(body) \(headers.map(masked)): \(masked(raw))")
            return raw
        }
        _ = try call("/v3/auth/user/add", #"{"name":"root","password":"rootpw"}"#)
        _ = try call("/v3/auth/user/add", #"{"name":"alice","password":"apw"}"#)
        _ = try call("/v3/auth/user/add", #"{"name":"","password":"x"}"#)
        _ = try call("/v3/auth/user/add", #"{"name":"cn2","options":{"no_password":true}}"#)
        _ = try call("/v3/auth/role/add", #"{"name":"root"}"#)
        _ = try call("/v3/auth/role/add", #"{"name":""}"#)
        _ = try call("/v3/auth/role/add", #"{"name":"r1"}"#)
        _ = try call("/v3/auth/user/grant", #"{"user":"root","role":"root"}"#)
        _ = try call("/v3/auth/user/grant", #"{"user":"alice","role":"r1"}"#)
        _ = try call("/v3/auth/role/grant", #"{"name":"r1","perm":{"permType":"READWRITE","key":"\#(b64("foo"))","range_end":"\#(b64("fop"))"}}"#)
        _ = try call("/v3/auth/role/grant", #"{"name":"r1","perm":{"permType":"WRITE","key":"\#(b64("a"))","range_end":"\#(b64("c"))"}}"#)
        _ = try call("/v3/auth/role/get", #"{"role":"r1"}"#)
        _ = try call("/v3/auth/user/get", #"{"name":"alice"}"#)
        _ = try call("/v3/auth/user/list", "{}")
        _ = try call("/v3/auth/role/list", "{}")
        _ = try call("/v3/auth/authenticate", #"{"name":"alice","password":"apw"}"#)
        _ = try call("/v3/auth/enable", "{}")
        _ = try call("/v3/auth/authenticate", #"{"name":"alice","password":"bad"}"#)
        _ = try call("/v3/auth/authenticate", #"{"name":"nobody","password":"bad"}"#)
        _ = try call("/v3/auth/authenticate", #"{"name":"cn2","password":""}"#)
        let alice = token(try call("/v3/auth/authenticate", #"{"name":"alice","password":"apw"}"#))
        let root = token(try call("/v3/auth/authenticate", #"{"name":"root","password":"rootpw"}"#))
        _ = try call("/v3/kv/put", #"{"key":"\#(b64("foo"))","value":"\#(b64("v"))"}"#)
        _ = try call("/v3/kv/put", #"{"key":"\#(b64("foo"))","value":"\#(b64("v"))"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/kv/put", #"{"key":"\#(b64("foo"))","value":"\#(b64("w"))"}"#, headers: ["Authorization: Bearer \(alice)"])
        _ = try call("/v3/kv/put", #"{"key":"\#(b64("foo"))","value":"\#(b64("w"))"}"#, headers: ["Authorization: abcdefghijklmnop.1"])
        _ = try call("/v3/kv/put", #"{"key":"\#(b64("foo"))","value":"\#(b64("x"))"}"#, headers: ["Grpc-Metadata-Token: \(alice)"])
        _ = try call("/v3/kv/range", #"{"key":"\#(b64("foo"))"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/kv/range", #"{"key":"\#(b64("a"))","range_end":"\#(b64("c"))"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/kv/put", #"{"key":"\#(b64("b"))","value":"\#(b64("1"))"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/kv/put", #"{"key":"\#(b64("q"))","value":"\#(b64("1"))"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/kv/deleterange", #"{"key":"\#(b64("a"))","range_end":"\#(b64("z"))"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/kv/txn", #"{"compare":[{"key":"\#(b64("q"))","target":"VERSION","version":"0"}],"success":[{"request_put":{"key":"\#(b64("foo"))","value":"\#(b64("t"))"}}]}"#,
                     headers: ["Authorization: \(alice)"])
        _ = try call("/v3/auth/user/list", "{}", headers: ["Authorization: \(alice)"])
        _ = try call("/v3/auth/user/list", "{}", headers: ["Authorization: \(root)"])
        _ = try call("/v3/auth/role/get", #"{"role":"r1"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/auth/role/revoke", #"{"role":"r1","key":"\#(b64("a"))","range_end":"\#(b64("c"))"}"#, headers: ["Authorization: \(root)"])
        _ = try call("/v3/auth/role/revoke", #"{"role":"r1","key":"\#(b64("a"))","range_end":"\#(b64("c"))"}"#, headers: ["Authorization: \(root)"])
        _ = try call("/v3/kv/put", #"{"key":"\#(b64("b"))","value":"\#(b64("2"))"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/auth/user/delete", #"{"name":"alice"}"#, headers: ["Authorization: \(root)"])
        _ = try call("/v3/kv/range", #"{"key":"\#(b64("foo"))"}"#, headers: ["Authorization: \(alice)"])
        _ = try call("/v3/auth/disable", "{}", headers: ["Authorization: \(root)"])
        _ = try call("/v3/kv/range", #"{"key":"\#(b64("foo"))"}"#)
        return lines
    }

    @Test func gatewayAuthAnswersAsEtcd() throws {
        let lines = try expectSameAsEtcd { member in try Self.gatewaySession(member) }
        #expect(lines.filter { $0.hasSuffix("\n401") }.count == 3)  // Bearer, unknown token, deleted user
        #expect(lines.filter { $0.hasSuffix("\n403") }.count >= 4)
        #expect(lines.contains { $0.contains("Grpc-Metadata-Token") && $0.hasSuffix("\n200") })
    }

    /// A simple token lives `--auth-token-ttl` seconds after its last use.
    static func expirySession(_ member: ServerProcess) throws -> [String] {
        let port = member.clientPort
        _ = try post(port, "/v3/auth/user/add", #"{"name":"root","password":"rootpw"}"#)
        _ = try post(port, "/v3/auth/user/grant", #"{"user":"root","role":"root"}"#)
        _ = try post(port, "/v3/auth/enable", "{}")
        var lines: [String] = []
        let used = try AuthPermissionTests.login(port, "root", "rootpw")
        let idle = try AuthPermissionTests.login(port, "root", "rootpw")
        let put = #"{"key":"\#(b64("k"))","value":"\#(b64("v"))"}"#
        lines.append("fresh: " + (try post(port, "/v3/kv/put", put, headers: ["Authorization: \(used)"])))
        for _ in 0..<3 {
            Thread.sleep(forTimeInterval: 1.5)
            lines.append("used every 1.5 s: " + (try post(port, "/v3/kv/put", put, headers: ["Authorization: \(used)"])))
        }
        lines.append("idle for 4.5 s: " + (try post(port, "/v3/kv/put", put, headers: ["Authorization: \(idle)"])))
        return lines
    }

    @Test func simpleTokensExpireAfterTheirTTLUnlessUsed() throws {
        let lines = try expectSameAsEtcd(extra: ["--auth-token-ttl", "3"]) { member in try Self.expirySession(member) }
        #expect(lines.last?.hasSuffix("401") == true)
    }
}

/// What etcd 3.4.44 refuses (some of which Debian's 3.4.23 still allows), tested against
/// etcdlite alone: a user tries every kind of request outside their permission and learns and
/// changes nothing.
@Suite(.serialized, .timeLimit(.minutes(5)), .enabled(if: FileManager.default.fileExists(atPath: "/usr/bin/curl"), "needs curl"))
struct AuthPermissionTests {
    static func b64(_ text: String) -> String { AuthTests.b64(text) }
    func b64(_ text: String) -> String { AuthTests.b64(text) }

    /// One gateway call: HTTP status and the answer's JSON.
    static func call(_ port: Int, _ path: String, _ body: String, token: String? = nil, maxTime: Double = 10) throws -> (Int, String) {
        let output = try AuthTests.curlPost(port, path, body, headers: token.map { ["Authorization: \($0)"] } ?? [], maxTime: maxTime)
        let lines = output.split(separator: "\n", omittingEmptySubsequences: false)
        return (Int(lines.last ?? "") ?? 0, lines.dropLast().joined(separator: "\n"))
    }

    static func login(_ port: Int, _ name: String, _ password: String) throws -> String {
        let (_, body) = try call(port, "/v3/auth/authenticate", #"{"name":"\#(name)","password":"\#(password)"}"#)
        return AuthTests.token(body)
    }

    @Test func nothingLeaksOutsideAUsersPermission() throws {
        let lite = try ServerProcess(executable: etcdliteBinary())
        defer { lite.stop(); lite.dataDir.cleanup() }
        let port = lite.clientPort
        for (path, body) in [
            ("/v3/auth/user/add", #"{"name":"root","password":"rootpw"}"#),
            ("/v3/auth/user/grant", #"{"user":"root","role":"root"}"#),
            ("/v3/auth/user/add", #"{"name":"eve","password":"evepw"}"#),
            ("/v3/auth/role/add", #"{"name":"limited"}"#),
            ("/v3/auth/role/grant", #"{"name":"limited","perm":{"permType":"READWRITE","key":"\#(b64("a"))","range_end":"\#(b64("c"))"}}"#),
            ("/v3/auth/role/grant", #"{"name":"limited","perm":{"permType":"READ","key":"\#(b64("r"))"}}"#),
            ("/v3/auth/user/grant", #"{"user":"eve","role":"limited"}"#),
            ("/v3/kv/put", #"{"key":"\#(b64("d"))","value":"\#(b64("secret"))"}"#),
            ("/v3/kv/put", #"{"key":"\#(b64("r"))","value":"\#(b64("public"))"}"#),
            ("/v3/lease/grant", #"{"ID":"7","TTL":"600"}"#),
            ("/v3/kv/put", #"{"key":"\#(b64("s1"))","value":"\#(b64("secret"))","lease":"7"}"#),
            ("/v3/auth/enable", "{}"),
        ] {
            let (status, answer) = try Self.call(port, path, body)
            #expect(status == 200, "\(path) \(body): \(status) \(answer)")
        }
        let root = try Self.login(port, "root", "rootpw")
        let eve = try Self.login(port, "eve", "evepw")
        #expect(!root.isEmpty && !eve.isEmpty)
        func everything() throws -> String {
            let (_, answer) = try Self.call(port, "/v3/kv/range", #"{"key":"AA==","range_end":"AA=="}"#, token: root)
            let (_, lease) = try Self.call(port, "/v3/lease/timetolive", #"{"ID":"7","keys":true}"#, token: root)
            return answer.replacingOccurrences(of: #""header":\{[^}]*\},?"#, with: "", options: .regularExpression)
                + (lease.contains(#""keys":["czE="]"#) ? " lease 7 holds s1" : " lease 7 changed: \(lease)")
        }
        let before = try everything()
        #expect(before.contains(b64("secret")) && before.hasSuffix("lease 7 holds s1"))

        let denied = #"{"error":"etcdserver: permission denied","message":"etcdserver: permission denied","code":7}"#
        let put = { (key: String) in #"{"key":"\#(b64(key))","value":"\#(b64("x"))"}"# }
        let attempts: [(String, String, String)] = [
            ("read an outside key", "/v3/kv/range", #"{"key":"\#(b64("d"))"}"#),
            ("read a range reaching outside", "/v3/kv/range", #"{"key":"\#(b64("a"))","range_end":"\#(b64("e"))"}"#),
            ("read from a key on", "/v3/kv/range", #"{"key":"\#(b64("a"))","range_end":"AA=="}"#),
            ("count an outside range", "/v3/kv/range", #"{"key":"\#(b64("d"))","range_end":"\#(b64("z"))","count_only":true}"#),
            ("write an outside key", "/v3/kv/put", put("d")),
            ("write a read-only key", "/v3/kv/put", put("r")),
            ("write with an outside previous value", "/v3/kv/put", #"{"key":"\#(b64("r"))","value":"\#(b64("x"))","prev_kv":true}"#),
            ("attach to a lease holding outside keys", "/v3/kv/put", #"{"key":"\#(b64("b"))","value":"\#(b64("x"))","lease":"7"}"#),
            ("delete an outside key", "/v3/kv/deleterange", #"{"key":"\#(b64("d"))"}"#),
            ("delete a range reaching outside", "/v3/kv/deleterange", #"{"key":"\#(b64("a"))","range_end":"\#(b64("z"))"}"#),
            ("compare an outside key", "/v3/kv/txn",
             #"{"compare":[{"key":"\#(b64("d"))","target":"VALUE","value":"\#(b64("secret"))"}],"success":[{"request_put":\#(put("b"))}]}"#),
            ("read outside in a txn", "/v3/kv/txn", #"{"success":[{"request_range":{"key":"\#(b64("d"))"}}]}"#),
            ("write outside in a txn", "/v3/kv/txn", #"{"success":[{"request_put":\#(put("d"))}]}"#),
            ("write outside in the branch that does not run", "/v3/kv/txn",
             #"{"compare":[{"key":"\#(b64("b"))","target":"VERSION","version":"0"}],"success":[{"request_put":\#(put("b"))}],"failure":[{"request_delete_range":{"key":"\#(b64("d"))"}}]}"#),
            ("write outside in a nested txn", "/v3/kv/txn", #"{"success":[{"request_txn":{"success":[{"request_put":\#(put("d"))}]}}]}"#),
            ("read outside in a nested txn", "/v3/kv/txn", #"{"success":[{"request_txn":{"success":[{"request_range":{"key":"\#(b64("s1"))"}}]}}]}"#),
            ("revoke a lease holding outside keys", "/v3/lease/revoke", #"{"ID":"7"}"#),
            ("list a lease's outside keys", "/v3/lease/timetolive", #"{"ID":"7","keys":true}"#),
            ("list leases holding outside keys", "/v3/lease/leases", "{}"),
            ("compact", "/v3/kv/compaction", #"{"revision":"2"}"#),
            ("member status", "/v3/maintenance/status", "{}"),
            ("raise an alarm", "/v3/maintenance/alarm", #"{"action":"ACTIVATE","memberID":"1","alarm":"NOSPACE"}"#),
            ("add a member", "/v3/cluster/member/add", #"{"peerURLs":["http://127.0.0.1:1"]}"#),
            ("list users", "/v3/auth/user/list", "{}"),
            ("read root", "/v3/auth/user/get", #"{"name":"root"}"#),
            ("read a role not held", "/v3/auth/role/get", #"{"role":"root"}"#),
            ("add a user", "/v3/auth/user/add", #"{"name":"mallory","password":"x"}"#),
            ("grant itself root", "/v3/auth/user/grant", #"{"user":"eve","role":"root"}"#),
            ("widen its role", "/v3/auth/role/grant", #"{"name":"limited","perm":{"permType":"READWRITE","key":"AA==","range_end":"AA=="}}"#),
            ("change root's password", "/v3/auth/user/changepw", #"{"name":"root","password":"x"}"#),
            ("turn auth off", "/v3/auth/disable", "{}"),
        ]
        for (what, path, body) in attempts {
            let (status, answer) = try Self.call(port, path, body, token: eve)
            #expect(status == 403 && answer == denied, "\(what): \(status) \(answer)")
        }
        // Maintenance calls that etcd answers with the auth error unmapped (code Unknown).
        for path in ["/v3/maintenance/defragment", "/v3/maintenance/hash", "/v3/maintenance/hashkv"] {
            let (status, answer) = try Self.call(port, path, "{}", token: eve)
            #expect(status == 500 && answer.contains(#""message":"auth: permission denied","code":2"#), "\(path): \(status) \(answer)")
        }
        let (_, snapshot) = try Self.call(port, "/v3/maintenance/snapshot", "{}", token: eve)
        #expect(snapshot.contains("auth: permission denied") && !snapshot.contains("blob"), "snapshot: \(snapshot)")
        // A watch outside: created and canceled at once, the reason etcd gives; no event.
        for body in [#"{"create_request":{"key":"\#(b64("d"))"}}"#, #"{"create_request":{"key":"\#(b64("a"))","range_end":"\#(b64("z"))","start_revision":"1"}}"#] {
            let (_, answer) = try Self.call(port, "/v3/watch", body, token: eve, maxTime: 1.5)
            #expect(answer.contains(#""canceled":true"#) && answer.contains("rpc error: code = PermissionDenied desc = etcdserver: permission denied")
                    && !answer.contains("events"), "watch \(body): \(answer)")
        }
        // Without a token, or with a bad one.
        let (anonymous, anonymousAnswer) = try Self.call(port, "/v3/kv/range", #"{"key":"\#(b64("a"))"}"#)
        #expect(anonymous == 400 && anonymousAnswer.contains("etcdserver: user name is empty"))
        let (forged, forgedAnswer) = try Self.call(port, "/v3/kv/range", #"{"key":"\#(b64("a"))"}"#, token: "abcdefghijklmnop.1")
        #expect(forged == 401 && forgedAnswer.contains("etcdserver: invalid auth token"))
        // A token naming a log index far ahead is refused at once (etcd 3.4.23 waits for ever).
        let (ahead, _) = try Self.call(port, "/v3/kv/range", #"{"key":"\#(b64("a"))"}"#, token: "abcdefghijklmnop.999999", maxTime: 5)
        #expect(ahead == 401)
        for path in ["/v3/lease/grant", "/v3/cluster/member/list"] {
            let (status, answer) = try Self.call(port, path, #"{"TTL":"60"}"#)
            #expect(status == 400 && answer.contains("user name is empty"), "\(path) without a user: \(status) \(answer)")
        }

        // What eve may do still works.
        #expect(try Self.call(port, "/v3/kv/put", put("b"), token: eve).0 == 200)
        #expect(try Self.call(port, "/v3/kv/range", #"{"key":"\#(b64("r"))"}"#, token: eve).1.contains(b64("public")))
        #expect(try Self.call(port, "/v3/kv/deleterange", #"{"key":"\#(b64("b"))"}"#, token: eve).0 == 200)
        #expect(try Self.call(port, "/v3/cluster/member/list", "{}", token: eve).0 == 200)
        #expect(try Self.call(port, "/v3/maintenance/alarm", #"{"action":"GET"}"#, token: eve).0 == 200)
        #expect(try Self.call(port, "/v3/auth/user/get", #"{"name":"eve"}"#, token: eve).1.contains("limited"))
        #expect(try Self.call(port, "/v3/lease/grant", #"{"TTL":"60"}"#, token: eve).0 == 200)
        // Nothing outside changed.
        #expect(try everything() == before)
    }

    /// With --client-cert-auth, the CN of the client's certificate is the user when the call
    /// carries no token (gRPC only: the gateway ignores it); a token goes first.
    @Test func theCertificatesCommonNameIsTheUser() throws {
        let pki = try TestPKI()
        let server = try pki.issue("server", commonName: "server")
        let alice = try pki.issue("alice", commonName: "alice")
        let rootCert = try pki.issue("root", commonName: "root")
        let member = try ServerProcess(executable: etcdliteBinary(),
                                       extra: ["--cert-file", server.cert, "--key-file", server.key, "--client-cert-auth", "--trusted-ca-file", pki.caCert],
                                       clientScheme: "https", etcdctlFlags: ["--cacert", pki.caCert, "--cert", rootCert.cert, "--key", rootCert.key])
        defer { member.stop(); member.dataDir.cleanup() }
        for arguments in [["user", "add", "root", "--no-password"], ["user", "grant-role", "root", "root"], ["user", "add", "alice", "--no-password"],
                          ["role", "add", "r"], ["role", "grant-permission", "r", "readwrite", "a/", "--prefix"], ["user", "grant-role", "alice", "r"],
                          ["put", "secret", "s"], ["auth", "enable"], ["put", "root-wrote", "1"]] {
            let result = try member.etcdctl(arguments)
            #expect(result.status == 0, "\(arguments): \(result.stderr)")
        }
        let asAlice = ["--endpoints=https://127.0.0.1:\(member.clientPort)", "--cacert", pki.caCert, "--cert", alice.cert, "--key", alice.key]
        let allowed = try member.etcdctlRaw(asAlice + ["put", "a/1", "v"])
        #expect(allowed.status == 0 && allowed.stdout == "OK\n", "\(allowed.stderr)")
        let refused = try member.etcdctlRaw(asAlice + ["get", "secret"])
        #expect(refused.status != 0 && refused.stderr.contains("Error: etcdserver: permission denied"))
        let admin = try member.etcdctlRaw(asAlice + ["user", "list"])
        #expect(admin.status != 0 && admin.stderr.contains("permission denied"))
        #expect(try member.etcdctl(["get", "secret", "--print-value-only"]).stdout == "s\n")
        // No password to give for a user made for certificates.
        let login = try member.etcdctlRaw(asAlice + ["--user", "alice:x", "get", "a/1"])
        #expect(login.stderr.contains("password was given for no password user"))
        // The gateway does not take the certificate as the user.
        let gateway = try run("/usr/bin/curl", ["-s", "--cacert", pki.caCert, "--cert", rootCert.cert, "--key", rootCert.key,
                                                "https://127.0.0.1:\(member.clientPort)/v3/kv/range", "-X", "POST", "--data-binary",
                                                #"{"key":"\#(Self.b64("secret"))"}"#]).stdout
        #expect(gateway.contains("etcdserver: user name is empty"), "\(gateway)")
    }

    /// JWT tokens (RS256 and ES256): signed with the configured key, carry the auth revision, so
    /// any change of users or roles makes them old; a verify-only member cannot sign.
    @Test func jwtTokensAsEtcdMakesThem() throws {
        let dir = TempDir()
        defer { dir.cleanup() }
        let rsaKey = dir.url.appendingPathComponent("rsa.key").path, rsaPub = dir.url.appendingPathComponent("rsa.pub").path
        try TestPKI.openssl(["genrsa", "-out", rsaKey, "2048"])
        try TestPKI.openssl(["rsa", "-in", rsaKey, "-pubout", "-out", rsaPub])
        let member = try ServerProcess(executable: etcdliteBinary(),
                                       extra: ["--auth-token", "jwt,pub-key=\(rsaPub),priv-key=\(rsaKey),sign-method=RS256,ttl=1h"])
        defer { member.stop(); member.dataDir.cleanup() }
        let port = member.clientPort
        for (path, body) in [("/v3/auth/user/add", #"{"name":"root","password":"rootpw"}"#), ("/v3/auth/user/grant", #"{"user":"root","role":"root"}"#),
                             ("/v3/auth/enable", "{}")] {
            #expect(try Self.call(port, path, body).0 == 200)
        }
        let token = try Self.login(port, "root", "rootpw")
        let parts = token.split(separator: ".")
        #expect(parts.count == 3)
        let claims = JWTTokensTestSupport.decode(parts.count == 3 ? parts[1] : "")
        #expect(claims["username"] as? String == "root" && claims["revision"] as? Int == 3 && claims["exp"] != nil, "\(claims)")
        #expect(try Self.call(port, "/v3/kv/put", #"{"key":"\#(Self.b64("k"))","value":"\#(Self.b64("v"))"}"#, token: token).0 == 200)
        // A forged signature, and the same claims signed with another key, are refused.
        let forged = parts.count == 3 ? "\(parts[0]).\(parts[1]).\(String(parts[2].reversed()))" : "x"
        #expect(try Self.call(port, "/v3/kv/range", #"{"key":"\#(Self.b64("k"))"}"#, token: forged).0 == 401)
        // Any auth change makes existing tokens old for keys; admin calls still take them.
        #expect(try Self.call(port, "/v3/auth/role/add", #"{"name":"r"}"#, token: token).0 == 200)
        let (status, answer) = try Self.call(port, "/v3/kv/range", #"{"key":"\#(Self.b64("k"))"}"#, token: token)
        #expect(status == 400 && answer.contains("etcdserver: revision of auth store is old"), "\(answer)")
        #expect(try Self.call(port, "/v3/auth/role/list", "{}", token: token).0 == 200)
        let fresh = try Self.login(port, "root", "rootpw")
        #expect(try Self.call(port, "/v3/kv/range", #"{"key":"\#(Self.b64("k"))"}"#, token: fresh).0 == 200)
        // The token is valid after a restart (stateless): the same key verifies it.
        member.stop()
        try member.restart(addingArguments: [])
        var afterRestart = 0
        for _ in 0..<100 where afterRestart != 200 {
            afterRestart = (try? Self.call(port, "/v3/kv/range", #"{"key":"\#(Self.b64("k"))"}"#, token: fresh, maxTime: 1).0) ?? 0
            if afterRestart != 200 { usleep(200_000) }
        }
        #expect(afterRestart == 200)
    }
}

enum JWTTokensTestSupport {
    static func decode(_ part: Substring) -> [String: Any] {
        var text = part.replacingOccurrences(of: "-", with: "+").replacingOccurrences(of: "_", with: "/")
        while text.count % 4 != 0 { text += "=" }
        guard let data = Data(base64Encoded: text), let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any] else { return [:] }
        return object
    }
}

/// The auth state goes through the log: every member knows the users, roles and tokens, a
/// restarted member keeps them, and one that catches up from a snapshot gets them with it.
@Suite(.serialized, .timeLimit(.minutes(4)), .enabled(if: FileManager.default.fileExists(atPath: "/usr/bin/curl"), "needs curl"))
struct AuthClusterTests {
    @Test func usersRolesAndTokensReachEveryMember() throws {
        let members = try ClusterTests.startCluster(3, extra: ["--snapshot-count", "100"])
        defer { for m in members { m.stop() } }
        let b64 = AuthTests.b64
        // Member 2 is away while auth is set up and the log moves on far enough to be compacted.
        members[2].stop()
        for arguments in [["user", "add", "root:rootpw"], ["user", "add", "alice:apw"], ["role", "add", "r"],
                          ["role", "grant-permission", "r", "readwrite", "a/", "--prefix"], ["user", "grant-role", "alice", "r"], ["auth", "enable"]] {
            let result = try members[0].etcdctl(arguments)
            #expect(result.status == 0, "\(arguments): \(result.stderr)")
        }
        let token = try AuthPermissionTests.login(members[0].clientPort, "alice", "apw")
        for n in 0..<250 {
            let (status, _) = try AuthPermissionTests.call(members[n % 2].clientPort, "/v3/kv/put", #"{"key":"\#(b64("a/\(n)"))","value":"\#(b64("v"))"}"#,
                                                           token: token)
            #expect(status == 200)
            if status != 200 { break }
        }
        // A token made through member 0 is known to member 1.
        let (status, answer) = try AuthPermissionTests.call(members[1].clientPort, "/v3/kv/range",
                                                             #"{"key":"\#(b64("a/"))","range_end":"\#(b64("a0"))","count_only":true}"#, token: token)
        #expect(status == 200 && answer.contains(#""count":"250""#), "\(answer)")
        // Member 2 comes back (a snapshot from the leader, the log having moved past it) and
        // knows the users and permissions.
        try members[2].restart()
        var caughtUp = ""
        for _ in 0..<100 {
            let result = try? members[2].etcdctlRaw(["--endpoints=127.0.0.1:\(members[2].clientPort)", "--user", "alice:apw",
                                                      "--command-timeout=2s", "get", "a/", "--prefix", "--keys-only", "--write-out=json"])
            caughtUp = result?.stdout ?? ""
            if caughtUp.contains("\"count\":250") { break }
            usleep(200_000)
        }
        #expect(caughtUp.contains("\"count\":250"), "\(caughtUp.prefix(300))")
        let log = (try? String(contentsOfFile: members[2].logPath, encoding: .utf8)) ?? ""
        #expect(log.contains("installed a snapshot from the leader"))
        let refused = try members[2].etcdctlRaw(["--endpoints=127.0.0.1:\(members[2].clientPort)", "--user", "alice:apw", "put", "b", "1"])
        #expect(refused.stderr.contains("Error: etcdserver: permission denied"))
        let users = try members[2].etcdctlRaw(["--endpoints=127.0.0.1:\(members[2].clientPort)", "--user", "root:rootpw", "user", "list"])
        #expect(users.stdout == "alice\nroot\n")
        // A restarted member keeps the auth state (from its store).
        members[1].stop()
        try members[1].restart()
        var roles = ""
        for _ in 0..<100 {
            roles = (try? members[1].etcdctlRaw(["--endpoints=127.0.0.1:\(members[1].clientPort)", "--user", "root:rootpw",
                                                  "--command-timeout=2s", "role", "get", "r"]))?.stdout ?? ""
            if !roles.isEmpty { break }
            usleep(200_000)
        }
        #expect(roles == "Role r\nKV Read:\n\t[a/, a0) (prefix a/)\nKV Write:\n\t[a/, a0) (prefix a/)\n")
    }
}
