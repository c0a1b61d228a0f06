import Foundation
import Testing

/// Certificates made for a test with openssl: a CA, and leaves it signs (ECDSA P-256, for
/// 127.0.0.1 and localhost, for server and client use, as etcd's own test certificates are).
final class TestPKI: @unchecked Sendable {
    let dir = TempDir()
    let name: String
    var caCert: String { path("\(name)-ca.crt") }

    init(name: String = "test") throws {
        self.name = name
        try Self.openssl(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                          "-keyout", path("\(name)-ca.key"), "-out", caCert, "-days", "2", "-subj", "/CN=\(name) CA"])
    }

    func path(_ file: String) -> String { dir.url.appendingPathComponent(file).path }

    /// A certificate signed by this CA: the paths of its certificate and key.
    func issue(_ leaf: String, commonName: String) throws -> (cert: String, key: String) {
        let key = path("\(leaf).key"), csr = path("\(leaf).csr"), cert = path("\(leaf).crt"), ext = path("\(leaf).ext")
        try "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n"
            .write(toFile: ext, atomically: true, encoding: .utf8)
        try Self.openssl(["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", csr,
                          "-subj", "/CN=\(commonName)"])
        try Self.openssl(["x509", "-req", "-in", csr, "-CA", caCert, "-CAkey", path("\(name)-ca.key"), "-CAcreateserial", "-out", cert,
                          "-days", "2", "-extfile", ext])
        return (cert, key)
    }

    @discardableResult
    static func openssl(_ arguments: [String], stdin: String? = nil) throws -> String {
        let result = try run(which("openssl") ?? "/usr/bin/openssl", arguments, stdin: stdin)
        guard result.status == 0 else { throw ProcessError(message: "openssl \(arguments.joined(separator: " ")): \(result.stderr)") }
        return result.stdout
    }

    /// The serial number of a certificate file.
    static func serial(_ cert: String) throws -> String {
        try openssl(["x509", "-noout", "-serial", "-in", cert]).trimmingCharacters(in: .whitespacesAndNewlines)
    }

    /// The serial number of the certificate a TLS server on 127.0.0.1:`port` presents.
    static func servedSerial(port: Int, cert: String, key: String, ca: String) throws -> String {
        let result = try run(which("openssl") ?? "/usr/bin/openssl", ["s_client", "-connect", "127.0.0.1:\(port)", "-CAfile", ca,
                                                                      "-cert", cert, "-key", key], stdin: "")
        return try openssl(["x509", "-noout", "-serial"], stdin: result.stdout).trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

/// TLS on the client port (gRPC and the JSON gateway on one port, client certificates) and
/// between members, with etcd's flags; etcd 3.4 answers the same commands side by side.
@Suite(.serialized) struct TLSTests {
    /// etcdctl through TLS with a client certificate; refused without one, with one from another
    /// CA, and without TLS; the gateway over TLS on the same port. The same session against etcd.
    @Test func clientCertificatesAreRequiredAsEtcdRequiresThem() throws {
        let pki = try TestPKI()
        let server = try pki.issue("server", commonName: "server")
        let client = try pki.issue("client", commonName: "root")
        let other = try TestPKI(name: "other")
        let stranger = try other.issue("stranger", commonName: "stranger")
        let flags = ["--cert-file", server.cert, "--key-file", server.key, "--client-cert-auth", "--trusted-ca-file", pki.caCert]
        let withCert = ["--cacert", pki.caCert, "--cert", client.cert, "--key", client.key]
        let quick = ["--dial-timeout=2s", "--command-timeout=3s"]

        func session(_ executable: String) throws -> [String] {
            let member = try ServerProcess(executable: executable, extra: flags, clientScheme: "https", etcdctlFlags: withCert)
            defer { member.stop() }
            var lines: [String] = []
            for arguments in [["put", "a", "1"], ["get", "a"], ["put", "b", "2", "--prev-kv"], ["get", "", "--prefix", "--keys-only"], ["del", "a"]] {
                let result = try member.etcdctl(arguments)
                lines.append("\(arguments.joined(separator: " ")): \(result.status) \(result.stdout)")
            }
            let https = "--endpoints=https://127.0.0.1:\(member.clientPort)"
            let noCert = try member.etcdctlRaw([https, "--cacert", pki.caCert] + quick + ["get", "b"])
            lines.append("without a client certificate: \(noCert.status == 0 ? "served" : "refused")")
            let untrusted = try member.etcdctlRaw([https, "--cacert", pki.caCert, "--cert", stranger.cert, "--key", stranger.key] + quick + ["get", "b"])
            lines.append("with a certificate of another CA: \(untrusted.status == 0 ? "served" : "refused")")
            let plain = try member.etcdctlRaw(["--endpoints=http://127.0.0.1:\(member.clientPort)"] + quick + ["get", "b"])
            lines.append("without TLS: \(plain.status == 0 ? "served" : "refused")")
            // The JSON gateway on the same port, HTTP/1.1 over TLS.
            let gateway = try run("/usr/bin/curl", ["-s", "--http1.1", "--cacert", pki.caCert, "--cert", client.cert, "--key", client.key,
                                                    "-X", "POST", "https://127.0.0.1:\(member.clientPort)/v3/kv/range", "-d", #"{"key":"Yg=="}"#])
            lines.append("gateway: \(gateway.stdout.contains(#""value":"Mg==""#) ? "b=2" : gateway.stdout)")
            // An HTTPS client that offers h2 and HTTP/1.1 (curl's default, as Go's net/http).
            let negotiated = try run("/usr/bin/curl", ["-s", "--cacert", pki.caCert, "--cert", client.cert, "--key", client.key,
                                                       "-X", "POST", "https://127.0.0.1:\(member.clientPort)/v3/kv/range", "-d", #"{"key":"Yg=="}"#])
            lines.append("gateway, protocol negotiated: \(negotiated.stdout.contains(#""value":"Mg==""#) ? "b=2" : negotiated.stdout)")
            let gatewayNoCert = try run("/usr/bin/curl", ["-s", "--http1.1", "--cacert", pki.caCert, "-X", "POST",
                                                          "https://127.0.0.1:\(member.clientPort)/v3/kv/range", "-d", #"{"key":"Yg=="}"#])
            lines.append("gateway without a client certificate: \(gatewayNoCert.status == 0 ? "served" : "refused")")
            return lines
        }
        let expected = try session(try #require(which("etcd"), "etcd installed (apt-get install etcd-server)"))
        let actual = try session(etcdliteBinary())
        #expect(actual == expected)
        #expect(expected.contains("without a client certificate: refused") && expected.contains("gateway: b=2"), "\(expected)")
    }

    /// --auto-tls: a generated certificate in <data-dir>/fixtures/client, as etcd makes it;
    /// etcdctl reaches both without checking it.
    @Test func autoTLSServesClientsWithAGeneratedCertificate() throws {
        func session(_ executable: String) throws -> [String] {
            let member = try ServerProcess(executable: executable, extra: ["--auto-tls"], clientScheme: "https",
                                           etcdctlFlags: ["--insecure-transport=false", "--insecure-skip-tls-verify"])
            defer { member.stop() }
            var lines: [String] = []
            for arguments in [["put", "a", "1"], ["get", "a"]] {
                let result = try member.etcdctl(arguments)
                lines.append("\(arguments.joined(separator: " ")): \(result.status) \(result.stdout)")
            }
            let fixtures = member.dataDir.url.appendingPathComponent("data/fixtures/client")
            for file in ["cert.pem", "key.pem"] {
                lines.append("\(file): \(FileManager.default.fileExists(atPath: fixtures.appendingPathComponent(file).path))")
            }
            let verified = try member.etcdctlRaw(["--endpoints=\(member.endpoint)", "--insecure-transport=false", "--dial-timeout=2s",
                                                  "--command-timeout=3s", "get", "a"])
            lines.append("checking the certificate: \(verified.status == 0 ? "served" : "refused")")
            return lines
        }
        let expected = try session(try #require(which("etcd"), "etcd installed (apt-get install etcd-server)"))
        let actual = try session(etcdliteBinary())
        #expect(actual == expected)
        #expect(expected.contains("cert.pem: true"), "\(expected)")
    }

    /// --peer-auto-tls: three members on https:// peer URLs with generated certificates.
    @Test func peerAutoTLSFormsACluster() throws {
        let members = try ClusterTests.startCluster(3, extra: ["--peer-auto-tls"], peerScheme: "https")
        defer { for m in members { m.stop() } }
        #expect(try members[0].etcdctl(["put", "auto", "tls"]).status == 0)
        #expect(try members[1].etcdctl(["get", "auto", "--print-value-only"]).stdout == "tls\n")
        #expect(FileManager.default.fileExists(atPath: members[2].dataDir.url.appendingPathComponent("data/fixtures/peer/cert.pem").path))
    }

    /// A certificate replaced on disk is what the next connection gets; a watch connected before
    /// keeps its stream.
    @Test func aRotatedCertificateIsServedWithoutARestart() throws {
        let pki = try TestPKI()
        let first = try pki.issue("server-1", commonName: "server")
        let client = try pki.issue("client", commonName: "root")
        let live = (cert: pki.path("live.crt"), key: pki.path("live.key"))
        try FileManager.default.copyItem(atPath: first.cert, toPath: live.cert)
        try FileManager.default.copyItem(atPath: first.key, toPath: live.key)
        let member = try ServerProcess(executable: etcdliteBinary(),
                                       extra: ["--cert-file", live.cert, "--key-file", live.key, "--client-cert-auth", "--trusted-ca-file", pki.caCert],
                                       clientScheme: "https", etcdctlFlags: ["--cacert", pki.caCert, "--cert", client.cert, "--key", client.key])
        defer { member.stop() }
        #expect(try TestPKI.servedSerial(port: member.clientPort, cert: client.cert, key: client.key, ca: pki.caCert) == TestPKI.serial(first.cert))

        let (watch, watchOutput) = try member.startWatch(["k"])
        defer { if watch.isRunning { watch.terminate() } }
        usleep(500_000)

        // Rotate: a new certificate and key written over the old files.
        let second = try pki.issue("server-2", commonName: "server")
        try FileManager.default.removeItem(atPath: live.key)
        try FileManager.default.copyItem(atPath: second.key, toPath: live.key)
        try FileManager.default.removeItem(atPath: live.cert)
        try FileManager.default.copyItem(atPath: second.cert, toPath: live.cert)
        #expect(try TestPKI.servedSerial(port: member.clientPort, cert: client.cert, key: client.key, ca: pki.caCert) == TestPKI.serial(second.cert))
        #expect(try member.etcdctl(["put", "k", "after-rotation"]).status == 0)
        #expect(MembershipTests.eventually(10) { (try String(contentsOf: watchOutput, encoding: .utf8)).contains("after-rotation") },
                "the watch connected before the rotation still streams")
        #expect(watch.isRunning)
    }

    /// Three members on https:// peer URLs with --peer-client-cert-auth replicate as usual; a
    /// member whose certificate another CA signed cannot join.
    @Test func membersTalkOverTLSAndAPeerWithoutATrustedCertificateCannotJoin() throws {
        let pki = try TestPKI()
        let peer = try pki.issue("peer", commonName: "peer")
        let flags = ["--peer-cert-file", peer.cert, "--peer-key-file", peer.key, "--peer-client-cert-auth", "--peer-trusted-ca-file", pki.caCert]
        let members = try ClusterTests.startCluster(3, extra: flags, peerScheme: "https")
        defer { for m in members { m.stop() } }
        #expect(try members[0].etcdctl(["put", "over", "tls"]).status == 0)
        #expect(try members[2].etcdctl(["get", "over", "--print-value-only"]).stdout == "tls\n")
        let list = try members[1].etcdctl(["member", "list"]).stdout
        #expect(list.components(separatedBy: "https://127.0.0.1:").count == 4, "\(list)")

        // A fourth member, added, with a certificate of another CA.
        let other = try TestPKI(name: "other")
        let stranger = try other.issue("stranger", commonName: "peer")
        let peerPort = freePort(), clientPort = freePort()
        let url = "https://127.0.0.1:\(peerPort)"
        #expect(try members[0].etcdctl(["member", "add", "m3", "--peer-urls=\(url)"]).status == 0)
        let initial = (try members[0].etcdctl(["member", "list"]).stdout).split(separator: "\n").compactMap { line -> String? in
            let fields = line.components(separatedBy: ", ")
            guard fields.count >= 4 else { return nil }
            return "\(fields[2].isEmpty ? "m3" : fields[2])=\(fields[3])"
        }.joined(separator: ",")
        let newcomer = try ServerProcess(executable: etcdliteBinary(), name: "m3", clientPort: clientPort, peerPort: peerPort, initialCluster: initial,
                                         extra: ["--initial-cluster-state", "existing", "--initial-cluster-token", "cluster-test",
                                                 "--peer-cert-file", stranger.cert, "--peer-key-file", stranger.key,
                                                 "--peer-client-cert-auth", "--peer-trusted-ca-file", other.caCert],
                                         peerScheme: "https")
        defer { newcomer.stop() }
        // It cannot even learn the cluster: both handshakes fail, it gives up.
        #expect(MembershipTests.eventually(30) { !newcomer.process.isRunning }, "the member without a trusted certificate stopped")
        let log = (try? String(contentsOfFile: newcomer.logPath, encoding: .utf8)) ?? ""
        #expect(log.contains("cannot fetch cluster info from peer urls"), "\(log.suffix(2000))")
        // The three go on, and the new member never started.
        #expect(try members[1].etcdctl(["put", "still", "serving"]).status == 0)
        #expect(try members[1].etcdctl(["member", "list"]).stdout.contains("unstarted"))
    }
}
