import EtcdLiteProto
import Foundation
import NIOHTTP1

/// A re-seed the coordinator decided: the one member of the new cluster (its record, with the
/// snapshot it is restored from). `previous` names the records it was decided on.
public struct ReseedOrder: Codable, Sendable, Equatable {
    public var previous: String
    public var record: MemberRecord
}

/// The records an agent last read, and the cluster's spec (for the re-seeded member's manifest).
struct RecordsCache: Codable {
    var records: [MemberRecord]
    var spec: String?
}

extension NodeAgent {
    var cachePath: String { hostPath + "/.etcdlite-records.json" }

    func saveCache(_ records: [MemberRecord], spec: String?) {
        var cache = RecordsCache(records: records, spec: spec)
        if spec == nil { cache.spec = loadCache().spec }
        let encoder = JSONEncoder()
        encoder.outputFormatting = .sortedKeys
        // Written only when it changed (a pass runs every few seconds).
        guard let data = try? encoder.encode(cache), FileManager.default.contents(atPath: cachePath) != data else { return }
        try? FileManager.default.createDirectory(atPath: hostPath, withIntermediateDirectories: true)
        try? data.write(to: URL(fileURLWithPath: cachePath), options: .atomic)
    }

    func loadCache() -> RecordsCache {
        FileManager.default.contents(atPath: cachePath).flatMap { try? JSONDecoder().decode(RecordsCache.self, from: $0) }
            ?? RecordsCache(records: [], spec: nil)
    }

    /// Seconds since the records were last read from the API server (since the start, if never).
    var apiSilence: Double { Date().timeIntervalSince(lastRead ?? startedAt) }

    // MARK: What this node has

    /// This node's part: its members' data and state, and their newest checkpoints.
    func report() async -> RecoveryReport {
        let records = loadCache().records
        let silence = apiSilence
        let state = loadState()
        var report = RecoveryReport(node: node, records: RecoveryReport.digest(records), reseeding: state.reseed?.record.clusterToken,
                                    apiSilentSeconds: silence)
        report.plan = lastPlanText.withLockedValue { $0 }
        report.presumedLost = state.presumedLost
        // While the API server answers, the operator decides: nothing to ask the members.
        guard silence >= min(recoveryGrace, 5) else { return report }
        let admin = EtcdAdmin(timeout: .seconds(2))
        for record in records where record.node == node && record.started {
            let present = record.dataName.map { FileManager.default.fileExists(atPath: "\(hostPath)/\($0)/member") } ?? false
            var live: RecoveryReport.LiveStatus?
            if let status = try? await admin.status(record.clientURL), let list = try? await admin.memberList(record.clientURL) {
                live = RecoveryReport.LiveStatus(revision: status.header.revision, leader: status.leader, isLearner: status.isLearner,
                                                 voters: list.members.filter { !$0.isLearner }.flatMap(\.peerUrls).sorted(),
                                                 learners: list.members.filter(\.isLearner).flatMap(\.peerUrls).sorted())
            }
            report.members.append(.init(name: record.name, dataPresent: present, status: live))
            if let newest = checkpoints(of: record.name).last, let revision = checkpointRevision(newest) {
                report.checkpoints.append(.init(member: record.name, path: newest, revision: revision))
            }
        }
        return report
    }

    /// A checkpoint's revision (`etcdlite snapshot status`), read once per file; nil when it does
    /// not check out.
    func checkpointRevision(_ path: String) -> Int64? {
        if let known = checkpointRevisions[path] { return known }
        guard let executable, let result = try? LocalPlatform.run(executable, ["snapshot", "status", path, "--write-out", "json"]), result.code == 0,
              let object = try? JSONSerialization.jsonObject(with: Data(result.output.utf8)) as? [String: Any],
              let revision = (object["revision"] as? NSNumber)?.int64Value else { return nil }
        checkpointRevisions[path] = revision
        return revision
    }

    /// Nil when the snapshot at `path` checks out (`etcdlite snapshot status`).
    func checkSnapshot(_ path: String) -> String? {
        guard let executable, let result = try? LocalPlatform.run(executable, ["snapshot", "status", path]) else { return "cannot run the snapshot check" }
        return result.code == 0 ? nil : result.output
    }

    func publishReport() async {
        let report = await report()
        served.withLockedValue { $0 = report }
    }

    /// The outage as this agent's last report shows it: the API server silent for the grace
    /// period (and, for an order, no member of its node answering with a leader).
    func seesOutage(leaderless: Bool = false) -> Bool {
        guard let report = served.withLockedValue({ $0 }), (report.apiSilentSeconds ?? 0) >= recoveryGrace else { return false }
        return !leaderless || !report.members.contains { ($0.status?.leader ?? 0) != 0 }
    }

    /// `GET /recovery` (this node's report), `POST /recovery/reseed` (an order, checked on the
    /// next pass), `GET /healthz`.
    public func route(_ method: HTTPMethod, _ path: String, _ body: [UInt8]) -> RouteServer.Answer {
        switch (method, path) {
        case (.GET, "/recovery"):
            guard let report = served.withLockedValue({ $0 }), let json = try? JSONEncoder().encode(report) else {
                return .init(.serviceUnavailable, "text/plain; charset=utf-8", "no report yet\n")
            }
            return .init(.ok, "application/json", String(decoding: json, as: UTF8.self))
        case (.POST, "/recovery/reseed"):
            guard let order = try? JSONDecoder().decode(ReseedOrder.self, from: Data(body)) else {
                return .init(.badRequest, "text/plain; charset=utf-8", "not a re-seed order\n")
            }
            orders.withLockedValue { $0.append(order) }
            return .init(.accepted, "application/json", "{}")
        case (.POST, "/recovery/presume-lost"):
            // Only during an outage this agent sees itself; considered on the next pass.
            guard let object = try? JSONSerialization.jsonObject(with: Data(body)) as? [String: Any], let nodes = object["nodes"] as? [String],
                  !nodes.isEmpty, !nodes.contains(node) else {
                return .init(.badRequest, "text/plain; charset=utf-8", "expected {\"nodes\": [other nodes' names]}\n")
            }
            guard seesOutage() else {
                return .init(.conflict, "text/plain; charset=utf-8", "the API server answered within \(Int(recoveryGrace)) s: the operator decides\n")
            }
            presumptions.withLockedValue { $0.formUnion(nodes) }
            return .init(.accepted, "application/json", "{}")
        case (.GET, "/healthz"):
            return .init(.ok, "text/plain; charset=utf-8", "ok\n")
        case (_, "/recovery"), (_, "/recovery/reseed"), (_, "/recovery/presume-lost"), (_, "/healthz"):
            return .methodNotAllowed
        default:
            return .notFound
        }
    }

    // MARK: Deciding and acting

    /// Every agent's report (this one's fresh), keyed by node; agents that do not answer are left out.
    func gatherReports(_ records: [MemberRecord]) async -> [String: RecoveryReport] {
        var reports: [String: RecoveryReport] = [node: await report()]
        for other in otherNodes(records) {
            guard let url = agentURL(of: other, records),
                  let data = try? await Self.http(.GET, url + "/recovery"),
                  let report = try? JSONDecoder().decode(RecoveryReport.self, from: data), report.node == other else { continue }
            reports[other] = report
        }
        return reports
    }

    /// One step of recovery without the API server: follows a checked order, re-sends an order
    /// this agent coordinates to agents that have not taken it, or decides (and, as the
    /// coordinator, starts) a re-seed. Returns what it did and the plan it reached.
    func recoveryPass() async -> ([String], RecoveryPlan?) {
        let received = orders.withLockedValue { queue in defer { queue = [] }; return queue }
        let declared = presumptions.withLockedValue { nodes in defer { nodes = [] }; return nodes }
        guard apiSilence >= recoveryGrace else { return ([], nil) }
        var done: [String] = []
        let cache = loadCache()
        var state = loadState()
        if !declared.isSubset(of: Set(state.presumedLost ?? [])) {
            state.presumedLost = Array(declared.union(state.presumedLost ?? [])).sorted()
            try? saveState(state)
            done.append("declared lost by a person: \(state.presumedLost!.joined(separator: ", "))")
        }
        if state.reseed == nil, let order = received.first(where: { accepts($0, cache.records) }) {
            state.reseed = order
            do {
                try saveState(state)
                done.append("following the re-seed \(order.record.clusterToken) coordinated by \(order.record.node ?? "?")")
            } catch {
                return (["re-seed order not recorded: \(error)"], nil)
            }
        }
        if let order = state.reseed {
            // Its members stop (their manifests go) and their data moves aside once unlocked.
            done += (try? apply([order.record], bootRemoved: false)) ?? []
            if order.record.node == node {
                for (other, report) in await gatherReports(cache.records) where other != node && report.reseeding != order.record.clusterToken {
                    _ = await send(order, to: other, cache.records)
                }
            }
            return (done, nil)
        }
        let plan = RecoveryPlan.decide(records: cache.records, reports: await gatherReports(cache.records), grace: recoveryGrace,
                                       presumedLost: Set(state.presumedLost ?? []))
        lastPlanText.withLockedValue { $0 = "\(plan)" }
        guard case .reseed(let coordinator, let member, let source, _) = plan, coordinator == node else { return (done, plan) }
        do {
            done += try await reseed(member: member, source: source, cache: cache)
        } catch {
            done.append("re-seed not started: \(error)")
        }
        return (done, plan)
    }

    /// An order is followed only by an agent that itself sees the outage: the API server silent
    /// for the grace period, the order about the records it read, and no member of its own node
    /// answering with a leader.
    func accepts(_ order: ReseedOrder, _ records: [MemberRecord]) -> Bool {
        guard order.previous == RecoveryReport.digest(records), let coordinator = order.record.node,
              records.contains(where: { $0.node == coordinator && $0.name == order.record.name }) else { return false }
        return seesOutage(leaderless: true)
    }

    /// The coordinator's part: a snapshot of the survivor (or the checkpoint chosen), the new
    /// one-member cluster's record and manifest, adopted here first (it survives a restart of
    /// this agent), then sent to the other agents.
    func reseed(member: String, source: String?, cache: RecordsCache) async throws -> [String] {
        guard let old = cache.records.first(where: { $0.name == member && $0.node == node }) else { throw OperatorError("no record of \(member) here") }
        var done: [String] = []
        var snapshot = source
        if snapshot == nil {
            let taken = await checkpoint([old]) { [self] in checkSnapshot($0) }
            guard taken.first?.hasPrefix("checkpoint of") == true, let newest = checkpoints(of: member).last else {
                throw OperatorError("no snapshot of the survivor \(member): \(taken)")
            }
            snapshot = newest
            done += taken
        }
        var record = MemberRecord(name: member, id: nil, clientURL: old.clientURL, peerURL: old.peerURL, binary: old.binary,
                                  initialCluster: "\(member)=\(old.peerURL)", initialClusterState: "new",
                                  clusterToken: "\(clusterName)-\(Int(Date().timeIntervalSince1970))", started: true, node: node,
                                  dataName: KubernetesPlatform.dataName(member), restoreFrom: snapshot)
        record.manifest = try KubernetesPlatform.staticPodManifest(record, spec: cache.spec, hostPath: hostPath, namespace: namespace, clusterName: clusterName)
        let order = ReseedOrder(previous: RecoveryReport.digest(cache.records), record: record)
        var state = loadState()
        state.reseed = order
        try saveState(state)
        done.append("re-seeding as \(member) from \(snapshot!) (token \(record.clusterToken))")
        done += try apply([record], bootRemoved: false)
        for other in otherNodes(cache.records) {
            let answered = await send(order, to: other, cache.records)
            done.append("told \(other)'s agent\(answered ? "" : ": no answer (sent again on the next passes)")")
        }
        return done
    }

    /// The other nodes that host a started member, by name.
    func otherNodes(_ records: [MemberRecord]) -> [String] {
        Set(records.filter(\.started).compactMap(\.node)).subtracting([node]).sorted()
    }

    /// Where `other`'s agent serves (its node's address is its members' peer URL host).
    func agentURL(of other: String, _ records: [MemberRecord]) -> String? {
        records.first { $0.node == other }.flatMap { URL(string: $0.peerURL)?.host }.map { agentURL(other, $0) }
    }

    /// POST /recovery/reseed to `other`'s agent; whether it took it in.
    func send(_ order: ReseedOrder, to other: String, _ records: [MemberRecord]) async -> Bool {
        guard let url = agentURL(of: other, records), let body = try? JSONEncoder().encode(order) else { return false }
        return (try? await Self.http(.POST, url + "/recovery/reseed", body: body)) != nil
    }

    /// A request to another agent (JSON both ways): the answer's body when it is a 2xx.
    static func http(_ method: HTTPMethod, _ url: String, body: Data? = nil) async throws -> Data {
        guard let parsed = URL(string: url), let host = parsed.host, let port = parsed.port else { throw OperatorError("not an agent URL: \(url)") }
        let object = try body.map { try JSONSerialization.jsonObject(with: $0) as? [String: Any] ?? [:] }
        let answer = try await KubeClient(host: host, port: port, timeout: .seconds(3)).send(method, parsed.path, body: object)
        return try JSONSerialization.data(withJSONObject: answer)
    }
}
