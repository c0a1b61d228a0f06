import EtcdLiteProto

/// etcd's auto compaction. Periodic: every min(retention, 1h) compact to the revision seen one
/// retention ago, sampling the revision ten times per interval. Revision: every `revisionCheck`,
/// compact to current − retention.
struct AutoCompactor {
    let server: EtcdLiteServer
    let retention: MemberConfig.Retention
    var revisionCheck: Duration = .seconds(300)

    func run() async {
        switch retention {
        case .periodic(let seconds):
            await runPeriodic(period: .milliseconds(Int64(seconds * 1000)))
        case .revisions(let count):
            await runRevisions(keep: count)
        }
    }

    private func runPeriodic(period: Duration) async {
        let clock = ContinuousClock()
        let interval = min(period, .seconds(3600))
        let sampleEvery = interval / 10
        var samples: [(at: ContinuousClock.Instant, revision: Int64)] = []
        var lastCompaction = clock.now
        while !Task.isCancelled {
            samples.append((clock.now, server.status.state.currentRevision))
            do { try await Task.sleep(for: sampleEvery) } catch { return }
            let now = clock.now
            guard now - lastCompaction >= interval else { continue }
            // The newest revision that is at least one retention old.
            guard let old = samples.last(where: { now - $0.at >= period }) else { continue }
            samples.removeAll { $0.at < old.at }
            lastCompaction = now
            await compact(to: old.revision)
        }
    }

    private func runRevisions(keep: Int64) async {
        var last: Int64 = 0
        while !Task.isCancelled {
            do { try await Task.sleep(for: revisionCheck) } catch { return }
            let target = server.status.state.currentRevision - keep
            guard target > 0, target != last else { continue }
            last = target
            await compact(to: target)
        }
    }

    private func compact(to revision: Int64) async {
        guard revision > server.status.state.compactRevision else { return }
        var request = Etcdserverpb_CompactionRequest()
        request.revision = revision
        do {
            _ = try await server.compact(request)
            server.logger.info("auto compaction finished", metadata: ["compact-revision": "\(revision)"])
        } catch {
            server.logger.warning("auto compaction failed", metadata: ["revision": "\(revision)", "error": "\(error)"])
        }
    }
}
