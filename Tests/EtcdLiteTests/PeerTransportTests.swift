import Foundation
import NIOPosix
import Raft
import Synchronization
import Testing
@testable import EtcdLite

/// Raft messages between two members' transports over real TCP on 127.0.0.1, and the codec they
/// use on untrusted bytes.
@Suite struct PeerTransportTests {
    final class Inbox: Sendable {
        let messages = Mutex<[Message]>([])
        let unreachable = Mutex<[NodeID]>([])

        func wait(for count: Int, timeout: Duration = .seconds(10)) async -> [Message] {
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                let got = messages.withLock { $0 }
                if got.count >= count { return got }
                try? await Task.sleep(for: .milliseconds(5))
            }
            return messages.withLock { $0 }
        }

        func waitUnreachable(timeout: Duration = .seconds(10)) async -> Bool {
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline {
                if !unreachable.withLock({ $0.isEmpty }) { return true }
                try? await Task.sleep(for: .milliseconds(5))
            }
            // A busy machine may have kept this task from running until after the deadline.
            return !unreachable.withLock { $0.isEmpty }
        }
    }

    static func transport(_ id: UInt64, cluster: UInt64 = 7, _ inbox: Inbox) -> PeerTransport {
        PeerTransport(memberID: id, clusterID: cluster, group: MultiThreadedEventLoopGroup.singleton,
                      deliver: { m in inbox.messages.withLock { $0.append(m) } },
                      unreachable: { id in inbox.unreachable.withLock { $0.append(id) } })
    }

    static let sample = Message(
        kind: .append, from: 1, to: 2, term: 5, logTerm: 4, index: 10,
        entries: [Entry(term: 5, index: 11, data: [1, 2, 3]), Entry(term: 5, index: 12, kind: .configChange, data: ConfChange(.addLearner, 4).encoded)],
        commit: 9, context: Array("ctx".utf8),
        snapshot: Snapshot(index: 8, term: 3, confState: ConfState(voters: [1, 2, 3], learners: [4], outgoingVoters: [1, 2], autoLeave: true), data: [9, 9]))

    @Test func messagesRoundTripThroughTheCodec() throws {
        #expect(try RaftMessageCodec.decode(RaftMessageCodec.encode(Self.sample)) == Self.sample)
        let plain = Message(kind: .voteResponse, from: 3, to: 1, term: 2, reject: true)
        #expect(try RaftMessageCodec.decode(RaftMessageCodec.encode(plain)) == plain)
    }

    /// Every truncation and thousands of random corruptions of a valid message decode to an error
    /// or to some message — never a trap.
    @Test func garbageNeverTraps() {
        let bytes = RaftMessageCodec.encode(Self.sample)
        for length in 0..<bytes.count { #expect(throws: RaftMessageCodec.Malformed.self) { try RaftMessageCodec.decode(Array(bytes[..<length])) } }
        var random = SeededRandom(seed: 42)
        for _ in 0..<5_000 {
            var corrupt = bytes
            for _ in 0..<(1 + random.next(below: 4)) { corrupt[random.next(below: corrupt.count)] = UInt8(random.next(below: 256)) }
            _ = try? RaftMessageCodec.decode(corrupt)
        }
        for _ in 0..<2_000 {
            _ = try? RaftMessageCodec.decode((0..<random.next(below: 200)).map { _ in UInt8(random.next(below: 256)) })
        }
    }

    @Test func messagesArriveInOrder() async throws {
        let inboxA = Inbox(), inboxB = Inbox()
        let a = Self.transport(1, inboxA), b = Self.transport(2, inboxB)
        defer { a.close(); b.close() }
        let port = try await b.listen(host: "127.0.0.1", port: 0)
        a.setPeer(2, host: "127.0.0.1", port: port)
        a.send([Self.sample])
        let count = 5_000
        for n in 0..<count / 100 {
            a.send((0..<100).map { i in Message(kind: .heartbeat, from: 1, to: 2, term: 5, commit: LogIndex(UInt64(n * 100 + i))) })
        }
        let got = await inboxB.wait(for: count + 1)
        #expect(got.count == count + 1)
        #expect(got.first == Self.sample)
        #expect(got.dropFirst().map(\.commit.value) == (0..<UInt64(count)).map { $0 })
    }

    /// A member of another cluster is refused: nothing it sends is delivered, and it learns the
    /// peer is unreachable.
    @Test func aMemberOfAnotherClusterIsRefused() async throws {
        let inboxA = Inbox(), inboxB = Inbox()
        let a = Self.transport(1, cluster: 99, inboxA), b = Self.transport(2, cluster: 7, inboxB)
        defer { a.close(); b.close() }
        let port = try await b.listen(host: "127.0.0.1", port: 0)
        a.setPeer(2, host: "127.0.0.1", port: port)
        a.send([Self.sample])
        #expect(await inboxA.waitUnreachable())
        try await Task.sleep(for: .milliseconds(100))
        #expect(inboxB.messages.withLock { $0.isEmpty })
        #expect(b.refusals.withLockedValue { $0 } == ["cluster ID mismatch"])
    }

    /// A peer that is down is reported unreachable; once it is back, messages get through again.
    @Test func aPeerThatComesBackIsReachedAgain() async throws {
        let inboxA = Inbox(), inboxB = Inbox()
        let a = Self.transport(1, inboxA)
        defer { a.close() }
        // Find a free port, then leave it closed.
        let probe = Self.transport(2, inboxB)
        let port = try await probe.listen(host: "127.0.0.1", port: 0)
        probe.close()
        a.setPeer(2, host: "127.0.0.1", port: port)
        a.send([Self.sample])
        #expect(await inboxA.waitUnreachable())
        #expect(inboxB.messages.withLock { $0.isEmpty })
        let b = Self.transport(2, inboxB)
        defer { b.close() }
        _ = try await b.listen(host: "127.0.0.1", port: port)
        // After the backoff, a later send connects.
        let deadline = ContinuousClock.now + .seconds(10)
        while inboxB.messages.withLock({ $0.isEmpty }) && ContinuousClock.now < deadline {
            a.send([Self.sample])
            try await Task.sleep(for: .milliseconds(50))
        }
        #expect(inboxB.messages.withLock { $0.first } == Self.sample)
    }
}

/// The block checksums of snapshot images: the same however the bytes are cut, and a damaged
/// byte named by its block's offset.
@Suite struct SnapshotImageTests {
    @Test func blockChecksumsDoNotDependOnHowTheBytesArrive() {
        var random = SystemRandomNumberGenerator()
        let image = (0..<(SnapshotImage.blockSize * 2 + 12_345)).map { _ in UInt8.random(in: 0...255, using: &random) }
        var whole = SnapshotImage.BlockChecksums()
        image.withUnsafeBytes { whole.add($0) }
        let expected = whole.finish()
        #expect(expected.count == 3)
        #expect(expected[0] == CRC32C.checksum(Array(image[0..<SnapshotImage.blockSize])))
        #expect(expected[2] == CRC32C.checksum(Array(image[(2 * SnapshotImage.blockSize)...])))
        for _ in 0..<5 {
            var pieces = SnapshotImage.BlockChecksums()
            var start = 0
            while start < image.count {
                let end = min(image.count, start + Int.random(in: 1...300_000))
                image[start..<end].withUnsafeBytes { pieces.add($0) }
                start = end
            }
            #expect(pieces.finish() == expected)
        }
        var damaged = image
        damaged[SnapshotImage.blockSize + 7] ^= 1
        var sums = SnapshotImage.BlockChecksums()
        damaged.withUnsafeBytes { sums.add($0) }
        #expect(SnapshotImage.firstMismatch(sums.finish(), expected) == SnapshotImage.blockSize)
        #expect(SnapshotImage.firstMismatch(Array(expected.prefix(2)), expected) == 2 * SnapshotImage.blockSize)
        #expect(SnapshotImage.decode(SnapshotImage.encode(expected)) == expected)
    }

    @Test func anImageChangedOnDiskFailsItsCheckWithTheOffset() throws {
        let dir = TempDir()
        let path = dir.url.appendingPathComponent("incoming-1.db").path
        let image = [UInt8](repeating: 7, count: SnapshotImage.blockSize + 100)
        var sums = SnapshotImage.BlockChecksums()
        image.withUnsafeBytes { sums.add($0) }
        #expect(FileManager.default.createFile(atPath: path, contents: Data(image)))
        #expect(FileManager.default.createFile(atPath: SnapshotImage.sidecarPath(path), contents: Data(SnapshotImage.encode(sums.finish()))))
        try SnapshotImage.verify(path)
        var damaged = image
        damaged[SnapshotImage.blockSize + 50] = 8
        #expect(FileManager.default.createFile(atPath: path, contents: Data(damaged)))
        let error = #expect(throws: SnapshotCorruptionError.self) { try SnapshotImage.verify(path) }
        #expect(error?.description == "snapshot image \(path) corrupted at offset \(SnapshotImage.blockSize): block checksum mismatch")
        SnapshotImage.remove(path)
        #expect(!FileManager.default.fileExists(atPath: SnapshotImage.sidecarPath(path)))
    }
}
