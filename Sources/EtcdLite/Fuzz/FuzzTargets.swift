import NIOCore
import Foundation
import Raft
import SwiftProtobuf
import EtcdLiteProto

/// Entry points for the libFuzzer targets (Sources/EtcdLiteFuzz): everything a member decodes
/// from bytes that others control. Each must return for any input; a crash, a trap, or a decoded
/// value that does not survive its own encoding is a finding.
@_spi(Fuzzing) public enum FuzzTargets {
    /// A client request: the first byte picks the RPC, the rest is its protobuf message, which is
    /// decoded, validated as the member validates it, and (for what goes into the log) encoded
    /// as a log entry and decoded back.
    public static func request(_ input: [UInt8]) {
        guard let selector = input.first else { return }
        let body = Array(input.dropFirst())
        let decoders = requestDecoders
        do {
            try decoders[Int(selector) % decoders.count](body)
        } catch {}
    }

    private static let requestDecoders: [@Sendable ([UInt8]) throws -> Void] = [
        { let r = try Etcdserverpb_RangeRequest(serializedBytes: $0); try RequestValidation.check(r) },
        { let r = try Etcdserverpb_PutRequest(serializedBytes: $0); try RequestValidation.check(r); try roundTrip(.put(r)) },
        { let r = try Etcdserverpb_DeleteRangeRequest(serializedBytes: $0); try RequestValidation.check(r); try roundTrip(.deleteRange(r)) },
        { let r = try Etcdserverpb_TxnRequest(serializedBytes: $0); try RequestValidation.check(r, maxTxnOps: 128); try roundTrip(.txn(r)) },
        { try roundTrip(.compaction(try Etcdserverpb_CompactionRequest(serializedBytes: $0))) },
        { try roundTrip(.alarm(try Etcdserverpb_AlarmRequest(serializedBytes: $0))) },
        { try roundTrip(.leaseGrant(try Etcdserverpb_LeaseGrantRequest(serializedBytes: $0))) },
        { try roundTrip(.leaseRevoke(try Etcdserverpb_LeaseRevokeRequest(serializedBytes: $0))) },
        { try roundTrip(.leaseRenew(try Etcdserverpb_LeaseKeepAliveRequest(serializedBytes: $0))) },
        { let r = try Etcdserverpb_WatchRequest(serializedBytes: $0)
          if case .createRequest(let c) = r.requestUnion { _ = KeyRange(key: c.key.isEmpty ? Data([0]) : c.key, rangeEnd: c.rangeEnd) } },
        { _ = try Etcdserverpb_LeaseTimeToLiveRequest(serializedBytes: $0) },
        { let r = try Etcdserverpb_MemberAddRequest(serializedBytes: $0)
          for url in r.peerUrls { _ = try? MemberConfig.validateURL(url, flag: "peerURLs") } },
        { _ = try Etcdserverpb_MemberRemoveRequest(serializedBytes: $0) },
        { _ = try Etcdserverpb_MemberUpdateRequest(serializedBytes: $0) },
        { _ = try Etcdserverpb_MemberPromoteRequest(serializedBytes: $0) },
        { _ = try Etcdserverpb_MemberListRequest(serializedBytes: $0) },
        { _ = try Etcdserverpb_HashKVRequest(serializedBytes: $0) },
        { _ = try Etcdserverpb_MoveLeaderRequest(serializedBytes: $0) },
        { _ = try Etcdserverpb_StatusRequest(serializedBytes: $0) },
        { _ = try Etcdserverpb_AuthenticateRequest(serializedBytes: $0) },
        { _ = try Etcdserverpb_AuthRoleGrantPermissionRequest(serializedBytes: $0) },
    ]

    /// A request as the log carries it must decode to what encodes to the same bytes.
    private static func roundTrip(_ request: InternalRequest) throws {
        let once = try request.encoded()
        let twice = try InternalRequest(encoded: once).encoded()
        precondition(once == twice, "a log entry does not survive decoding")
    }

    /// A JSON gateway body: the first byte picks the path, the rest is the body (one or more JSON
    /// objects, as a keep-alive stream sends), decoded as the gateway decodes it.
    public static func gatewayJSON(_ input: [UInt8]) {
        guard let selector = input.first else { return }
        let paths = gatewayPaths
        guard let route = GatewayRoute.table[paths[Int(selector) % paths.count]] else { return }
        guard let values = try? JSONValues.split(Array(input.dropFirst())) else { return }
        for value in values { _ = try? route.decode(value) }
    }

    private static let gatewayPaths = GatewayRoute.table.keys.sorted()

    /// What a peer sends: the first byte picks a Raft message frame, an application request (log
    /// entry payload), a configuration change, or a whole connection's bytes (hello, frames,
    /// snapshot stream) cut into pieces as TCP might; each decoded value must survive re-encoding.
    public static func peer(_ input: [UInt8]) {
        guard let selector = input.first else { return }
        let body = Array(input.dropFirst())
        switch selector % 4 {
        case 3:
            peerStream(body, piece: Int(selector / 4) + 1)
        case 0:
            guard let message = try? RaftMessageCodec.decode(body) else { return }
            let once = RaftMessageCodec.encode(message)
            guard let again = try? RaftMessageCodec.decode(once) else { preconditionFailure("an encoded message does not decode") }
            precondition(RaftMessageCodec.encode(again) == once, "a message does not survive decoding")
        case 1:
            guard let request = try? InternalRequest(encoded: body) else { return }
            _ = try? roundTrip(request)
        default:
            guard let set = ConfChangeSet(encoded: body) else { return }
            precondition(ConfChangeSet(encoded: set.encoded)?.encoded == set.encoded, "a configuration change does not survive decoding")
        }
    }

    /// A peer connection's bytes through the transport's frame decoder, `piece` bytes at a time:
    /// it yields frames or refuses (throws), and a snapshot's chunks add up to its size.
    private static func peerStream(_ bytes: [UInt8], piece: Int) {
        var processor = NIOSingleStepByteToMessageProcessor(FrameDecoder(expectHello: true), maximumBufferSize: 1 << 20)
        var expected: UInt64?
        var received: UInt64 = 0
        var start = 0
        do {
            while start < bytes.count {
                let end = min(bytes.count, start + piece)
                try processor.process(buffer: ByteBuffer(bytes: bytes[start..<end])) { frame in
                    switch frame {
                    case .snapshotStart(_, let size): expected = size
                    case .snapshotChunk(let chunk): received += UInt64(chunk.readableBytes)
                    case .snapshotEnd:
                        precondition(received == expected, "a snapshot's chunks do not add up to its size")
                    case .message(let bytes):
                        precondition(bytes.count <= PeerTransport.maxFrameBytes)
                    default: break
                    }
                }
                start = end
            }
        } catch {
            return
        }
        if let expected { precondition(received <= expected, "more snapshot bytes than its size") }
    }

    /// A log segment's bytes (bit 0 of the first byte: whether it is the last segment, where a
    /// torn tail is allowed; bit 1: give every record a correct checksum first, so that the
    /// records' contents are decoded rather than stopped at the checksum): every record read is
    /// decoded, or named as corrupt with its offset.
    public static func logSegment(_ input: [UInt8]) {
        guard let selector = input.first else { return }
        var segment = Array(input.dropFirst())
        if selector & 2 != 0 {
            var offset = 0
            while segment.count - offset >= RecordSegments.headerSize {
                let declared = Int(segment[offset]) | Int(segment[offset + 1]) << 8 | Int(segment[offset + 2]) << 16 | Int(segment[offset + 3]) << 24
                let length = min(declared, segment.count - offset - RecordSegments.headerSize)
                let crc = segment.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[(offset + RecordSegments.headerSize)..<(offset + RecordSegments.headerSize + length)])) }
                for i in 0..<4 { segment[offset + 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
                offset += RecordSegments.headerSize + length
            }
        }
        guard let (records, end) = try? RecordSegments.read(Data(segment), path: "fuzz", isLast: selector & 1 == 1) else { return }
        precondition(end <= segment.count, "the valid data ends past the segment")
        for record in records { _ = try? RaftLogStore.decode(record, path: "fuzz") }
    }
}
