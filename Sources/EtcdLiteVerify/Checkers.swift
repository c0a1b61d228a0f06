import Foundation

/// One watch event as recorded (from a watcher or the reference stream).
public struct WatchedEvent: Codable, Hashable, Sendable {
    public var key: String
    public var isPut: Bool
    public var value: String
    public var modRevision: Int64
    public var createRevision: Int64
    public var version: Int64
    /// The previous value the member attached (prev_kv), if any.
    public var prevValue: String?
    public var prevModRevision: Int64

    public init(key: String, isPut: Bool, value: String, modRevision: Int64, createRevision: Int64, version: Int64,
                prevValue: String?, prevModRevision: Int64) {
        self.key = key
        self.isPut = isPut
        self.value = value
        self.modRevision = modRevision
        self.createRevision = createRevision
        self.version = version
        self.prevValue = prevValue
        self.prevModRevision = prevModRevision
    }
}

/// One stream of a watcher: the revision it asked to start from and what it received.
public struct WatchStreamRecord: Codable, Sendable {
    public var member: Int
    public var start: Int64
    public var events: [WatchedEvent]

    public init(member: Int, start: Int64, events: [WatchedEvent]) {
        self.member = member
        self.start = start
        self.events = events
    }
}

/// An acknowledged write and the revision its answer carried.
public struct AcknowledgedWrite: Codable, Hashable, Sendable {
    public enum Kind: String, Codable, Sendable { case put, delete }
    public var key: String
    public var kind: Kind
    public var value: String
    public var revision: Int64

    public init(key: String, kind: Kind, value: String, revision: Int64) {
        self.key = key
        self.kind = kind
        self.value = value
        self.revision = revision
    }
}

/// The checks that need no member: pure functions of what was recorded, so that each can be shown
/// to fail on a history that is wrong.
public enum VerifyCheckers {
    /// The reference stream (every event on the prefix from the start revision, read once after
    /// the final heal) is internally consistent: revisions never go back, each key's version and
    /// create revision follow its previous event, and prev_kv is that previous event.
    public static func checkReference(_ reference: [WatchedEvent]) -> [String] {
        var problems: [String] = []
        var last: [String: WatchedEvent] = [:]
        var revision: Int64 = 0
        for event in reference {
            if event.modRevision < revision {
                problems.append("reference: revision \(event.modRevision) after \(revision)")
            }
            revision = event.modRevision
            let previous = last[event.key]
            let previousPut = previous.flatMap { $0.isPut ? $0 : nil }
            if event.isPut {
                let version = (previousPut?.version ?? 0) + 1
                let created = previousPut?.createRevision ?? event.modRevision
                if event.version != version || event.createRevision != created {
                    problems.append("reference: \(event.key)@\(event.modRevision) has version \(event.version) create \(event.createRevision), expected \(version) and \(created)")
                }
            }
            if previous != nil || event.prevValue != nil {
                if event.prevValue != previousPut?.value || (previousPut != nil && event.prevModRevision != previousPut!.modRevision) {
                    problems.append("reference: \(event.key)@\(event.modRevision) prev_kv \(event.prevValue ?? "none")@\(event.prevModRevision), the previous event was \(previousPut.map { "\($0.value)@\($0.modRevision)" } ?? "none")")
                }
            }
            last[event.key] = event
        }
        return problems
    }

    /// Every acknowledged write is in the reference at the revision its answer named.
    public static func checkDurability(_ writes: [AcknowledgedWrite], reference: [WatchedEvent]) -> [String] {
        var byRevision: [Int64: [WatchedEvent]] = [:]
        for event in reference { byRevision[event.modRevision, default: []].append(event) }
        var problems: [String] = []
        for write in writes {
            let found = byRevision[write.revision]?.contains { event in
                event.key == write.key && event.isPut == (write.kind == .put) && (!event.isPut || event.value == write.value)
            } ?? false
            if !found {
                problems.append("acknowledged \(write.kind.rawValue) of \(write.key)\(write.kind == .put ? "=\(write.value)" : "") at revision \(write.revision) is not in the history")
            }
        }
        return problems
    }

    /// A watcher's streams, in order: each received exactly the reference's events from its start
    /// revision on (ordered, gap-free, no duplicates, equal to the history, prev_kv included), and
    /// each new stream started right after the last event the previous one delivered.
    /// `through`: the revision every watcher must have reached by the end (0: no such demand).
    public static func checkWatcher(_ sessions: [WatchStreamRecord], reference: [WatchedEvent], through: Int64, name: String) -> [String] {
        var problems: [String] = []
        var expectedStart: Int64?
        var reached: Int64 = 0
        for (n, session) in sessions.enumerated() {
            if let expectedStart, session.start != expectedStart {
                problems.append("\(name) stream \(n) resumed at \(session.start), expected \(expectedStart)")
            }
            let first = reference.firstIndex { $0.modRevision >= session.start } ?? reference.count
            for (i, event) in session.events.enumerated() {
                guard first + i < reference.count else {
                    problems.append("\(name) stream \(n) event \(i) \(event.key)@\(event.modRevision) is past the end of the history")
                    break
                }
                let wanted = reference[first + i]
                if event != wanted {
                    problems.append("\(name) stream \(n) (member \(session.member), from \(session.start)) event \(i): got \(event.key)@\(event.modRevision) \(event.isPut ? "put \(event.value)" : "delete") prev \(event.prevValue ?? "none"), expected \(wanted.key)@\(wanted.modRevision) \(wanted.isPut ? "put \(wanted.value)" : "delete") prev \(wanted.prevValue ?? "none")")
                    break
                }
            }
            if let last = session.events.last {
                // A revision's events arrive together: the next stream starts after it.
                expectedStart = last.modRevision + 1
                reached = last.modRevision
            } else {
                expectedStart = session.start
                reached = max(reached, session.start - 1)
            }
        }
        let lastWanted = reference.last { $0.modRevision <= through }?.modRevision ?? 0
        if through > 0 && reached < lastWanted {
            problems.append("\(name) stopped at revision \(reached); the history goes on to \(lastWanted)")
        }
        return problems
    }

    /// A kept-alive lease must not expire before the time its last renewal promised: a renewal
    /// invoked at `t` keeps it until at least `t + ttl`.
    public struct KeepAlive: Codable, Sendable {
        public var invoked: Double
        public var returned: Double
        public var ttl: Int64
        public init(invoked: Double, returned: Double, ttl: Int64) {
            self.invoked = invoked
            self.returned = returned
            self.ttl = ttl
        }
    }

    public static func checkKeepAlives(_ answers: [KeepAlive], granted: Double, ttl: Int64) -> [String] {
        var renewedAt = granted
        for answer in answers {
            if answer.ttl > 0 {
                renewedAt = max(renewedAt, answer.invoked)
            } else if answer.returned < renewedAt + Double(ttl) {
                return ["a kept-alive lease expired \(String(format: "%.1f", answer.returned - renewedAt)) s after a renewal of \(ttl) s"]
            } else {
                return []  // expired legitimately (no renewal got through for a whole TTL)
            }
        }
        return []
    }
}
