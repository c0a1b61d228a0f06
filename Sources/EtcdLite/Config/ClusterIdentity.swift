import Crypto
import Foundation

/// Member and cluster IDs derived as etcd derives them, so the same flags give the same IDs:
/// a member's ID is the first 8 bytes (big-endian) of SHA-1 over its sorted peer URLs and the
/// cluster token; the cluster ID is the same over the members' sorted IDs.
enum ClusterIdentity {
    static func memberID(peerURLs: [String], token: String) -> UInt64 {
        var bytes = Array(peerURLs.sorted().joined().utf8)
        bytes += Array(token.utf8)
        return firstWord(Insecure.SHA1.hash(data: bytes))
    }

    static func clusterID(memberIDs: [UInt64]) -> UInt64 {
        var bytes: [UInt8] = []
        for id in memberIDs.sorted() {
            for shift in stride(from: 56, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: id >> UInt64(shift))) }
        }
        return firstWord(Insecure.SHA1.hash(data: bytes))
    }

    private static func firstWord(_ digest: Insecure.SHA1Digest) -> UInt64 {
        digest.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }
}
