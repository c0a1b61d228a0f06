import Foundation
import Logging
import EtcdLiteProto

/// A member whose store differs from its peers' at the same revision.
public struct DataInconsistencyError: Error, CustomStringConvertible {
    public let description: String
}

extension EtcdLiteServer {
    /// The answer to a peer's start-up hash question: HashKV at `revision` of this store.
    func hashAnswer(revision: Int64) -> HashAnswer {
        var request = Etcdserverpb_HashKVRequest()
        request.revision = revision
        do {
            let response = try hashKV(request)
            return HashAnswer(status: .ok, memberID: memberID, hash: response.hash, compactRevision: response.compactRevision,
                              hashRevision: response.hashRevision, revision: response.header.revision)
        } catch let error as EtcdError where error == .futureRevision {
            return HashAnswer(status: .futureRevision, memberID: memberID)
        } catch let error as EtcdError where error == .compacted {
            return HashAnswer(status: .compacted, memberID: memberID)
        } catch {
            return HashAnswer(status: .unavailable, memberID: memberID)
        }
    }

    /// etcd's --experimental-initial-corrupt-check: before serving clients, the hash of this
    /// store's history up to its revision is compared with each peer's at the same revision. A
    /// peer with the same compact revision and another hash means one of the stores is corrupt:
    /// the member refuses to start. Peers that cannot answer (down, behind, compacted past the
    /// revision) are logged and skipped, as etcd does.
    func initialCorruptionCheck() throws {
        let local = hashAnswer(revision: 0)
        let id = String(memberID, radix: 16)
        logger.info("starting initial corruption check", metadata: ["local-member-id": "\(id)", "timeout": "5s"])
        guard local.status == .ok else { throw DataInconsistencyError(description: "\(id) cannot hash its own store") }
        let peers = loop.members.withLock { $0.sorted }.filter { $0.id != memberID }
        var mismatches = 0
        for peer in peers {
            var fields: Logger.Metadata = [
                "local-member-id": "\(id)", "local-member-revision": "\(local.hashRevision)",
                "local-member-compact-revision": "\(local.compactRevision)", "local-member-hash": "\(local.hash)",
                "remote-peer-id": "\(String(peer.id, radix: 16))", "remote-peer-endpoints": "\(peer.peerUrls)",
            ]
            guard let url = peer.peerUrls.first, let address = MemberConfig.address(url, defaultPort: 2380) else { continue }
            let answer: HashAnswer
            do {
                answer = try loop.transport.fetchHash(host: address.host, port: address.port, secure: url.hasPrefix("https://"), revision: local.hashRevision)
            } catch {
                fields["error"] = "\(error)"
                logger.warning("failed hash kv request", metadata: fields)
                continue
            }
            fields["remote-peer-revision"] = "\(answer.revision)"
            fields["remote-peer-compact-revision"] = "\(answer.compactRevision)"
            fields["remote-peer-hash"] = "\(answer.hash)"
            switch answer.status {
            case .ok where answer.hash == local.hash:
                continue
            case .ok where answer.compactRevision == local.compactRevision:
                logger.warning("found different hash values from remote peer", metadata: fields)
                mismatches += 1
            case .ok:
                logger.warning("found different compact revision values from remote peer", metadata: fields)
            case .futureRevision:
                logger.warning("cannot fetch hash from slow remote peer", metadata: fields)
            case .compacted:
                logger.warning("cannot fetch hash from remote peer; local member is behind", metadata: fields)
            case .unavailable:
                logger.warning("failed hash kv request", metadata: fields)
            }
        }
        if mismatches > 0 { throw DataInconsistencyError(description: "\(id) found data inconsistency with peers") }
        logger.info("initial corruption checking passed; no corruption", metadata: ["local-member-id": "\(id)"])
    }
}
