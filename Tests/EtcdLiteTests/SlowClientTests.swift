import Foundation
import Testing

/// Clients that send requests and never read the answers must not make a member's memory grow
/// without bound: past 64 MiB of answers waiting on one connection, its new calls are refused
/// (REFUSED_STREAM) until it reads. And etcd's --max-concurrent-streams reaches the client.
@Suite(.serialized) struct SlowClientTests {
    /// An HTTP/2 frame: length, type, flags, stream.
    static func frame(_ type: UInt8, flags: UInt8, stream: UInt32, _ payload: [UInt8]) -> [UInt8] {
        let length = UInt32(payload.count)
        return [UInt8(length >> 16 & 0xFF), UInt8(length >> 8 & 0xFF), UInt8(length & 0xFF), type, flags,
                UInt8(stream >> 24 & 0x7F), UInt8(stream >> 16 & 0xFF), UInt8(stream >> 8 & 0xFF), UInt8(stream & 0xFF)] + payload
    }

    /// HPACK "literal header field without indexing, new name", lengths under 127, no Huffman.
    static func literal(_ name: String, _ value: String) -> [UInt8] {
        [0x00, UInt8(name.utf8.count)] + Array(name.utf8) + [UInt8(value.utf8.count)] + Array(value.utf8)
    }

    /// A gRPC KV.Range call for [`key`, `end`) on `stream`: HEADERS, then DATA ending the stream.
    static func rangeCall(stream: UInt32, key: String, end: String) -> [UInt8] {
        let headers = literal(":method", "POST") + literal(":scheme", "http") + literal(":path", "/etcdserverpb.KV/Range")
            + literal(":authority", "127.0.0.1") + literal("content-type", "application/grpc") + literal("te", "trailers")
        // RangeRequest.key, RangeRequest.range_end
        let request: [UInt8] = [0x0A, UInt8(key.utf8.count)] + Array(key.utf8) + [0x12, UInt8(end.utf8.count)] + Array(end.utf8)
        let message: [UInt8] = [0, 0, 0, 0, UInt8(request.count)] + request
        return frame(0x1, flags: 0x4, stream: stream, headers) + frame(0x0, flags: 0x1, stream: stream, message)
    }

    /// The resident memory of a process, in KiB.
    static func residentKiB(_ pid: Int32) -> Int {
        let status = (try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8)) ?? ""
        guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmRSS:") }) else { return 0 }
        return Int(line.split(separator: " ").dropFirst().first ?? "") ?? 0
    }

    @Test func aClientThatNeverReadsDoesNotGrowTheMembersMemoryWithoutBound() throws {
        let member = try ServerProcess(executable: etcdliteBinary())
        defer { member.stop() }
        let value = String(repeating: "x", count: 1 << 20)
        for n in 0..<4 { #expect(try member.etcdctl(["put", "big\(n)"], stdin: value).status == 0) }
        // Warm up: one read of the values through a normal client.
        #expect(try member.etcdctl(["get", "big", "--prefix", "--print-value-only"]).stdout.count == 4 * ((1 << 20) + 1))
        let before = Self.residentKiB(member.process.processIdentifier)

        // A raw connection with a small receive buffer that acknowledges the member's settings
        // and then never reads: 100 reads of the four values (4 MiB each), 10 at a time — 400 MiB
        // of answers if they were all kept (the member before this limit grew by 459 MiB).
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        defer { close(fd) }
        var small: Int32 = 16 << 10
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, socklen_t(MemoryLayout<Int32>.size))
        let connected = withLoopback(port: member.clientPort) { connect(fd, $0, $1) }
        try #require(connected == 0)
        func send(_ bytes: [UInt8]) {
            _ = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        }
        send(Array("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".utf8) + Self.frame(0x4, flags: 0, stream: 0, []) + Self.frame(0x4, flags: 0x1, stream: 0, []))
        for batch in 0..<10 {
            var bytes: [UInt8] = []
            for n in 0..<10 { bytes += Self.rangeCall(stream: UInt32(2 * (batch * 10 + n) + 1), key: "big", end: "bih") }
            send(bytes)
            usleep(100_000)
        }
        sleep(2)
        let after = Self.residentKiB(member.process.processIdentifier)
        let grownMiB = (after - before) / 1024
        // 64 MiB of answers may wait, plus the calls of the batch that crossed the limit and the
        // copies made while answering (150 MiB measured).
        #expect(grownMiB < 250, "the member grew by \(grownMiB) MiB (\(before / 1024) → \(after / 1024) MiB)")
        // It still serves everyone else.
        #expect(try member.etcdctl(["put", "small", "1"]).status == 0)
        #expect(try member.etcdctl(["get", "small", "--print-value-only"]).stdout == "1\n")
    }

    /// etcd's --max-concurrent-streams is what the member announces in its HTTP/2 SETTINGS, as
    /// etcd announces it (nghttp shows the frame).
    @Test func maxConcurrentStreamsIsAnnouncedAsEtcdAnnouncesIt() throws {
        let nghttp = try #require(which("nghttp"), "nghttp installed (apt-get install nghttp2-client)")
        func announced(_ executable: String) throws -> String {
            let member = try ServerProcess(executable: executable, extra: ["--max-concurrent-streams", "100"])
            defer { member.stop() }
            let out = try run(nghttp, ["-nv", "http://127.0.0.1:\(member.clientPort)/health"], timeout: 10).stdout
            return out.split(separator: "\n").first { $0.contains("SETTINGS_MAX_CONCURRENT_STREAMS") }
                .map { String($0.drop { $0 != "[" }) } ?? "none"
        }
        let expected = try announced(try #require(which("etcd")))
        let actual = try announced(etcdliteBinary())
        #expect(expected.contains(":100]"), "\(expected)")
        #expect(actual == expected)
    }
}

/// Limits a client cannot push past: watchers on one stream, connections from one address.
@Suite(.serialized, .timeLimit(.minutes(2))) struct ClientLimitTests {
    @Test func watchersBeyondTheStreamsLimitAreCanceledAndTheStreamGoesOn() async throws {
        let lite = try ServerProcess(executable: etcdliteBinary(), extra: ["--max-watchers-per-stream", "3"])
        defer { lite.stop(); lite.dataDir.cleanup() }
        try await withClient(port: lite.clientPort) { client in
            try await withWatchSession(client) { w in
                for key in ["a", "b", "c", "d"] { w.create(key) }
                let created = await w.wait { $0.filter(\.created).count == 4 }.filter(\.created)
                #expect(created.prefix(3).allSatisfy { !$0.canceled && $0.watchID >= 0 })
                try #require(created.count == 4, "four creates answered: \(created)")
                #expect(created.last?.canceled == true && created.last?.watchID == -1
                        && created.last?.cancelReason == "etcdlite: too many watchers on this stream", "\(created)")
                // After a cancel there is room again.
                w.cancel(created[0].watchID)
                w.create("e")
                let again = await w.wait { $0.filter(\.created).count == 5 }.filter(\.created)
                #expect(again.last?.canceled == false)
            }
        }
    }

    @Test func connectionsBeyondTheAddresssLimitAreClosed() throws {
        let lite = try ServerProcess(executable: etcdliteBinary(), extra: ["--max-connections-per-client", "4"])
        defer { lite.stop(); lite.dataDir.cleanup() }
        func connect() -> Int32 {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            _ = withLoopback(port: lite.clientPort) { Foundation.connect(fd, $0, $1) }
            var timeout = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
            return fd
        }
        /// Whether the member closed the connection (EOF) rather than waiting for a request.
        func closedByMember(_ fd: Int32) -> Bool {
            var byte: UInt8 = 0
            return recv(fd, &byte, 1, 0) == 0
        }
        var held = (0..<4).map { _ in connect() }
        defer { for fd in held { close(fd) } }
        // Connections are set up on several event loops: let the four be counted first.
        usleep(500_000)
        let fifth = connect()
        #expect(closedByMember(fifth))
        close(fifth)
        #expect(!closedByMember(held[0]))  // the first four stay open (the read times out)
        close(held.removeLast())
        usleep(200_000)
        // One left: the next is admitted and served.
        #expect(try httpGet(port: lite.clientPort, path: "/health").contains("200 OK"))
    }
}
