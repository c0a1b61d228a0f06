import EtcdLiteClient
import EtcdLiteProto
import Foundation
import NIOCore
import NIOPosix
import SwiftProtobuf
import Synchronization

/// N etcdlite members as processes: on 127.0.0.1, each behind a fault proxy on its peer URL, or
/// each in a network namespace of its own (`NetworkNamespaces`).
final class VerifyCluster: @unchecked Sendable {
    struct Slot {
        let index: Int
        /// Where the member listens for clients and peers.
        let host: String
        let clientPort: Int
        let peerPort: Int
        /// The peer URL it advertises (a proxy's, or its own in a namespace).
        let advertisedPeerURL: String
        var generation = 0
        var process: ChildProcess?
        var paused = false
        var name: String { "m\(index)" }
        var clientURL: String { "http://\(host):\(clientPort)" }
    }

    let binary: String
    let directory: URL
    let token: String
    let links: LinkTable
    /// The members' namespaces (nil: proxies on 127.0.0.1).
    let namespaces: NetworkNamespaces?
    private(set) var slots: [Slot] = []
    private var proxies: [FaultProxy] = []
    private var proxyPorts: [Int] = []
    private let log: @Sendable (String) -> Void

    init(binary: String, directory: URL, members: Int, token: String, namespaces: NetworkNamespaces?,
         log: @escaping @Sendable (String) -> Void) throws {
        self.binary = binary
        self.directory = directory
        self.token = token
        self.log = log
        self.namespaces = namespaces
        links = LinkTable(namespaces: namespaces)
        if let namespaces {
            for i in 0..<members {
                let host = namespaces.address(i)
                slots.append(Slot(index: i, host: host, clientPort: 2379, peerPort: 2380, advertisedPeerURL: "http://\(host):2380"))
            }
        } else {
            var ports = try freePorts(3 * members)
            for i in 0..<members {
                let client = ports.removeFirst(), peer = ports.removeFirst(), proxy = ports.removeFirst()
                proxyPorts.append(proxy)
                slots.append(Slot(index: i, host: "127.0.0.1", clientPort: client, peerPort: peer, advertisedPeerURL: "http://127.0.0.1:\(proxy)"))
            }
        }
    }

    var count: Int { slots.count }

    func dataDir(_ slot: Int) -> URL {
        directory.appendingPathComponent("\(slots[slot].name)-gen\(slots[slot].generation)")
    }

    /// Starts the proxies and every member (`--initial-cluster-state new`).
    func start() async throws {
        for (slot, port) in zip(slots, proxyPorts) {
            proxies.append(try await FaultProxy.start(slot: slot.index, listenPort: port, targetPort: slot.peerPort,
                                                     members: count, links: links))
        }
        let initial = slots.map { "\($0.name)=\($0.advertisedPeerURL)" }.joined(separator: ",")
        for i in 0..<count { try launch(i, initialCluster: initial, state: "new") }
        try await waitForMemberIDs()
    }

    private func launch(_ i: Int, initialCluster: String, state: String, environment: [String: String] = [:]) throws {
        let slot = slots[i]
        let dir = dataDir(i)
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        let arguments = [
            "--name", slot.name, "--data-dir", dir.appendingPathComponent("data").path,
            "--listen-client-urls", slot.clientURL, "--advertise-client-urls", slot.clientURL,
            "--listen-peer-urls", "http://\(slot.host):\(slot.peerPort)",
            "--initial-advertise-peer-urls", slot.advertisedPeerURL,
            "--initial-cluster", initialCluster, "--initial-cluster-state", state,
            "--initial-cluster-token", token,
            // Every (re)start compares the member's store with its peers' before it serves.
            "--experimental-initial-corrupt-check",
        ]
        let command = namespaces?.command(i, binary, arguments) ?? (executable: binary, arguments: arguments)
        let process = try ChildProcess(executable: command.executable, arguments: command.arguments,
                                       environment: ProcessInfo.processInfo.environment.merging(environment) { $1 },
                                       log: dir.appendingPathComponent("member.log").path)
        slots[i].process = process
        slots[i].paused = false
    }

    /// Learns which member ID sits in which slot (from the member list's peer URLs).
    func waitForMemberIDs(timeout: Double = 30) async throws {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            for i in 0..<count where isRunning(i) {
                guard let members = try? await memberList(via: i) else { continue }
                var found = 0
                for member in members {
                    if let slot = slots.firstIndex(where: { member.peerUrls.contains($0.advertisedPeerURL) }) {
                        links.setSlot(member.id, slot)
                        found += 1
                    }
                }
                if found == count { return }
            }
            try await Task.sleep(for: .milliseconds(200))
        }
        throw VerifyError("the members did not list each other within \(Int(timeout)) s")
    }

    func isRunning(_ i: Int) -> Bool { slots[i].process?.isRunning ?? false }

    // MARK: - Faults

    func kill(_ i: Int) {
        guard let process = slots[i].process, process.isRunning else { return }
        if slots[i].paused { process.signal(SIGCONT) }
        process.signal(SIGKILL)
        _ = process.waitForExit(timeout: 10)
        slots[i].paused = false
    }

    /// Starts a stopped member again on its data (with failpoints armed by `environment`).
    func restart(_ i: Int, environment: [String: String] = [:]) throws {
        guard !isRunning(i) else { return }
        let initial = slots.map { "\($0.name)=\($0.advertisedPeerURL)" }.joined(separator: ",")
        try launch(i, initialCluster: initial, state: "new", environment: environment)
    }

    /// What the members' start-up corruption checks said, in every member log of the run: how
    /// many passed, and each refusal to start on a hash that differed from a peer's.
    func startupHashChecks() -> (passed: Int, refused: [String]) {
        var passed = 0
        var refused: [String] = []
        let generations = (try? FileManager.default.contentsOfDirectory(atPath: directory.path)) ?? []
        for name in generations.sorted() {
            let path = directory.appendingPathComponent(name).appendingPathComponent("member.log").path
            guard let log = try? String(contentsOfFile: path, encoding: .utf8) else { continue }
            for line in log.split(separator: "\n") {
                if line.contains("initial corruption checking passed") { passed += 1 }
                if line.contains("found different hash values from remote peer") { refused.append("\(name): \(line)") }
            }
        }
        return (passed, refused)
    }

    /// The size of the member's log (to read what a restart writes after it).
    func logSize(_ i: Int) -> Int {
        (try? FileManager.default.attributesOfItem(atPath: dataDir(i).appendingPathComponent("member.log").path)[.size] as? Int) ?? 0
    }

    /// Whether the member's log after `offset` says a failpoint is armed, once it serves (debug
    /// builds only have them); waits up to 60 s for it to serve.
    func failpointArmed(_ i: Int, after offset: Int) async -> Bool {
        // A start takes a while late in a long run: the start-up check hashes the whole history.
        for _ in 0..<600 {
            let log = (try? Data(contentsOf: dataDir(i).appendingPathComponent("member.log"))) ?? Data()
            let since = String(decoding: log.dropFirst(offset), as: UTF8.self)
            if since.contains("ready to serve client requests") { return since.contains("failpoint armed") }
            // A sync failing early stops the member before it serves (its start syncs too): the
            // failpoint took effect all the same.
            if !isRunning(i) { return since.contains("failed to start") || since.contains("write path failed") }
            try? await Task.sleep(for: .milliseconds(100))
        }
        return false
    }

    func pause(_ i: Int) {
        guard let process = slots[i].process, process.isRunning, !slots[i].paused else { return }
        process.signal(SIGSTOP)
        slots[i].paused = true
    }

    func resume(_ i: Int) {
        guard let process = slots[i].process, slots[i].paused else { return }
        process.signal(SIGCONT)
        slots[i].paused = false
    }

    /// Replaces a member by a new one with an empty data directory, as an operator does: stop it,
    /// MemberRemove through another member, MemberAdd its peer URL again (a new ID), start it with
    /// `--initial-cluster-state existing`.
    func replace(_ i: Int) async throws {
        kill(i)
        let helper = (0..<count).first { $0 != i && isRunning($0) && !slots[$0].paused }
        guard let helper else { throw VerifyError("no member to replace m\(i) through") }
        do {
            var members: [Etcdserverpb_Member] = []
            // The member stopped may have led: the list waits for a new leader.
            try await retry("MemberList", via: helper, seconds: 20) { members = try await self.memberList(via: helper) }
            guard let old = members.first(where: { $0.peerUrls.contains(slots[i].advertisedPeerURL) }) else {
                throw VerifyError("m\(i) is not in the member list")
            }
            var remove = Etcdserverpb_MemberRemoveRequest()
            remove.id = old.id
            try await retry("MemberRemove", via: helper, seconds: 20) {
                _ = try await self.call(helper, "/etcdserverpb.Cluster/MemberRemove", remove, as: Etcdserverpb_MemberRemoveResponse.self)
            }
        } catch {
            // Not removed: the member comes back on its data, and the cluster is whole again.
            try restart(i)
            throw ReplaceFailed(description: "replacing m\(i): \(error)")
        }
        // Its data goes; its log stays (the report counts every start's hash check, and a failed
        // run keeps the logs of every generation).
        try? FileManager.default.removeItem(at: dataDir(i).appendingPathComponent("data"))
        slots[i].generation += 1
        var add = Etcdserverpb_MemberAddRequest()
        add.peerUrls = [slots[i].advertisedPeerURL]
        var added = Etcdserverpb_MemberAddResponse()
        try await retry("MemberAdd", via: helper, seconds: 20) {
            added = try await self.call(helper, "/etcdserverpb.Cluster/MemberAdd", add, as: Etcdserverpb_MemberAddResponse.self)
        }
        links.setSlot(added.member.id, i)
        let initial = added.members.map { member -> String in
            let name = member.id == added.member.id ? slots[i].name : member.name
            return member.peerUrls.map { "\(name)=\($0)" }.joined(separator: ",")
        }.joined(separator: ",")
        try launch(i, initialCluster: initial, state: "existing")
    }

    /// A member replacement that failed before the member was removed (it was restarted).
    struct ReplaceFailed: Error, CustomStringConvertible {
        let description: String
    }

    private func retry(_ step: String, via helper: Int, seconds: Double, _ body: () async throws -> Void) async throws {
        let deadline = Date().addingTimeInterval(seconds)
        while true {
            do {
                try await body()
                return
            } catch {
                if Date() > deadline { throw VerifyError("\(step) through m\(helper) failed for \(Int(seconds)) s: \(error)") }
                try await Task.sleep(for: .milliseconds(300))
            }
        }
    }

    func stopAll() async {
        for i in 0..<count {
            resume(i)
            if let process = slots[i].process, process.isRunning {
                process.signal(SIGTERM)
            }
        }
        for i in 0..<count {
            let deadline = Date().addingTimeInterval(5)
            while isRunning(i) && Date() < deadline { try? await Task.sleep(for: .milliseconds(50)) }
            kill(i)
        }
        for proxy in proxies { await proxy.close() }
    }

    // MARK: - Calls to members

    func connect(_ i: Int) async throws -> GRPCClientConnection {
        try await GRPCClientConnection.connect(host: slots[i].host, port: slots[i].clientPort, connectTimeout: .seconds(1))
    }

    func call<Request: SwiftProtobuf.Message, Response: SwiftProtobuf.Message>(
        _ i: Int, _ path: String, _ request: Request, as: Response.Type, timeout: TimeAmount = .seconds(3)
    ) async throws -> Response {
        let connection = try await connect(i)
        defer { Task { await connection.close() } }
        let bytes = try await connection.unary(path, try request.serializedBytes(), timeout: timeout)
        return try Response(serializedBytes: bytes)
    }

    func memberList(via i: Int) async throws -> [Etcdserverpb_Member] {
        var request = Etcdserverpb_MemberListRequest()
        request.linearizable = true
        return try await call(i, "/etcdserverpb.Cluster/MemberList", request, as: Etcdserverpb_MemberListResponse.self).members
    }

    func status(_ i: Int) async throws -> Etcdserverpb_StatusResponse {
        try await call(i, "/etcdserverpb.Maintenance/Status", Etcdserverpb_StatusRequest(), as: Etcdserverpb_StatusResponse.self,
                       timeout: .seconds(1))
    }

    /// The slot of the member the running members agree leads, if any.
    func leader() async -> Int? {
        for i in 0..<count where isRunning(i) && !slots[i].paused {
            guard let status = try? await status(i), status.leader != 0 else { continue }
            if let slot = links.slot(of: status.leader) { return slot }
        }
        return nil
    }

    /// Writes a key outside the workload's prefix, one put at a time through any other running
    /// member, until member `i` has stopped (each put is an entry `i` must sync) or `seconds` passed.
    func driveSyncs(until i: Int, seconds: Double) async {
        let deadline = Date().addingTimeInterval(seconds)
        var put = Etcdserverpb_PutRequest()
        put.key = Data("verify-sync-probe".utf8)
        var written = 0
        while isRunning(i) && Date() < deadline {
            put.value = Data("\(written)".utf8)
            for j in 0..<count where j != i && isRunning(j) && !slots[j].paused {
                if (try? await call(j, "/etcdserverpb.KV/Put", put, as: Etcdserverpb_PutResponse.self, timeout: .seconds(2))) != nil {
                    written += 1
                    break
                }
            }
            try? await Task.sleep(for: .milliseconds(50))
        }
    }

    /// Waits until every member is up, agrees on one leader, and answers a linearizable read.
    func waitHealthy(timeout: Double) async -> Bool {
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if await isHealthy() { return true }
            try? await Task.sleep(for: .milliseconds(250))
        }
        return false
    }

    private func isHealthy() async -> Bool {
        var leaders = Set<UInt64>()
        for i in 0..<count {
            guard isRunning(i), !slots[i].paused, let status = try? await status(i), status.leader != 0 else { return false }
            leaders.insert(status.leader)
            var range = Etcdserverpb_RangeRequest()
            range.key = Data("health".utf8)
            guard (try? await call(i, "/etcdserverpb.KV/Range", range, as: Etcdserverpb_RangeResponse.self, timeout: .seconds(2))) != nil else {
                return false
            }
        }
        return leaders.count == 1
    }
}

struct VerifyError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// Ports the kernel hands out now (bound to port 0, then released).
func freePorts(_ n: Int) throws -> [Int] {
    var sockets: [Int32] = []
    defer { for s in sockets { close(s) } }
    var ports: [Int] = []
    for _ in 0..<n {
        let s = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard s >= 0 else { throw VerifyError("socket failed") }
        sockets.append(s)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = 0
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(s, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard bound == 0 else { throw VerifyError("bind failed") }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(s, $0, &length) }
        }
        ports.append(Int(UInt16(bigEndian: address.sin_port)))
    }
    return ports
}
