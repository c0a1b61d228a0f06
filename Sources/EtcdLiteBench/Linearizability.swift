/// A linearizability checker for histories of single-key operations on etcd's KV store, after
/// Wing & Gong's search with Lowe's memoization (the algorithm porcupine uses): find an order of
/// the operations that respects real time (an operation that returned before another was invoked
/// comes first) and in which every operation's answer is what a sequential store would give.
/// Linearizability is local, so each key's history is checked on its own.
public enum KVLinearizability {
    /// What a client asked of one key.
    public enum Input: Hashable, Sendable, Codable {
        case put(String)
        case get
        case delete
        /// Txn: if the value equals `expected` (nil: the key is absent), put `new`.
        case compareAndSwap(expected: String?, new: String)
    }

    /// What it was told; `unknown` when the answer never came (a timeout, a broken connection):
    /// the operation may have taken effect at any time after it was invoked, or never.
    public enum Output: Hashable, Sendable, Codable {
        case ok
        case value(String?)
        case deleted(Int)
        case swapped(Bool)
        case unknown
    }

    public struct Operation: Hashable, Sendable, Codable {
        public var client: Int
        public var key: String
        public var input: Input
        public var output: Output
        /// Monotonic nanoseconds: when it was sent and when its answer came (ignored if unknown).
        public var invoked: UInt64
        public var returned: UInt64

        public init(client: Int, key: String, input: Input, output: Output, invoked: UInt64, returned: UInt64) {
            self.client = client
            self.key = key
            self.input = input
            self.output = output
            self.invoked = invoked
            self.returned = returned
        }
    }

    public struct Verdict: Sendable {
        public var linearizable: Bool
        /// Keys whose search was given up (too many orders to try): neither passed nor failed.
        public var undecidedKeys: [String] = []
        /// For a violation: the key, and a smallest failing sub-history found by removing
        /// operations one at a time while the rest still fails.
        public var key: String?
        public var counterexample: [Operation]
    }

    /// The sequential store for one key: its value, or nil when absent.
    static func step(_ state: String?, _ input: Input, _ output: Output) -> (Bool, String?) {
        switch (input, output) {
        case (.put(let v), .ok): return (true, v)
        case (.put(let v), .unknown): return (true, v)
        case (.get, .value(let seen)): return (seen == state, state)
        case (.get, .unknown): return (true, state)
        case (.delete, .deleted(let n)): return (n == (state == nil ? 0 : 1), nil)
        case (.delete, .unknown): return (true, nil)
        case (.compareAndSwap(let expected, let new), .swapped(let swapped)):
            let matches = expected == state
            return (swapped == matches, matches ? new : state)
        case (.compareAndSwap(let expected, let new), .unknown):
            return (true, expected == state ? new : state)
        default:
            return (false, state)
        }
    }

    public static func check(_ history: [Operation], shrink: Bool = true) -> Verdict {
        let byKey = Dictionary(grouping: history, by: \.key)
        var undecided: [String] = []
        for key in byKey.keys.sorted() {
            let operations = byKey[key]!
            switch search(operations) {
            case true?: continue
            case nil: undecided.append(key)
            case false?:
                return Verdict(linearizable: false, undecidedKeys: undecided, key: key,
                               counterexample: shrink ? minimize(operations) : operations)
            }
        }
        return Verdict(linearizable: undecided.isEmpty, undecidedKeys: undecided, key: nil, counterexample: [])
    }

    /// Greedy shrinking: drop each operation in turn if the history without it still fails.
    static func minimize(_ operations: [Operation]) -> [Operation] {
        var current = operations.sorted { $0.invoked < $1.invoked }
        var index = 0
        var checks = 0
        while index < current.count && checks < 2_000 {
            var candidate = current
            candidate.remove(at: index)
            checks += 1
            if search(candidate) == false { current = candidate } else { index += 1 }
        }
        return current
    }

    /// One key's history (an initially absent key).
    public static func isLinearizable(_ operations: [Operation]) -> Bool { search(operations) == true }

    /// true, false, or nil when the search gave up after `budget` steps.
    static func search(_ operations: [Operation], budget: Int = 20_000_000) -> Bool? {
        let n = operations.count
        guard n > 0 else { return true }
        // Events: a call and a return per operation; unknown answers return "at infinity".
        struct Event { var time: UInt64; var isCall: Bool; var op: Int }
        var events: [Event] = []
        events.reserveCapacity(2 * n)
        for (i, op) in operations.enumerated() {
            events.append(Event(time: op.invoked, isCall: true, op: i))
            events.append(Event(time: op.output == .unknown ? UInt64.max : max(op.returned, op.invoked), isCall: false, op: i))
        }
        // Calls before returns at the same instant: such operations count as concurrent.
        events.sort { ($0.time, $0.isCall ? 0 : 1, $0.op) < ($1.time, $1.isCall ? 0 : 1, $1.op) }
        // A doubly linked list over the events (index events.count is the head sentinel).
        let head = events.count
        var next = [Int](repeating: -1, count: events.count + 1)
        var prev = [Int](repeating: -1, count: events.count + 1)
        var returnOf = [Int](repeating: -1, count: n)
        for i in 0..<events.count {
            next[i] = i + 1 < events.count ? i + 1 : -1
            prev[i] = i == 0 ? head : i - 1
            if !events[i].isCall { returnOf[events[i].op] = i }
        }
        next[head] = events.isEmpty ? -1 : 0
        func unlink(_ i: Int) {
            next[prev[i]] = next[i]
            if next[i] >= 0 { prev[next[i]] = prev[i] }
        }
        func relink(_ i: Int) {
            next[prev[i]] = i
            if next[i] >= 0 { prev[next[i]] = i }
        }
        struct Memo: Hashable { var done: [UInt64]; var state: String? }
        var seen = Set<Memo>()
        var done = [UInt64](repeating: 0, count: (n + 63) / 64)
        var state: String? = nil
        var stack: [(call: Int, state: String?)] = []
        var entry = next[head]
        var steps = 0
        while next[head] >= 0 {
            steps += 1
            if steps > budget { return nil }
            guard entry >= 0 else { return false }
            let event = events[entry]
            if event.isCall {
                let op = operations[event.op]
                let (ok, newState) = step(state, op.input, op.output)
                if ok {
                    var newDone = done
                    newDone[event.op / 64] |= 1 << UInt64(event.op % 64)
                    if seen.insert(Memo(done: newDone, state: newState)).inserted {
                        stack.append((entry, state))
                        state = newState
                        done = newDone
                        unlink(entry)
                        unlink(returnOf[event.op])
                        entry = next[head]
                        continue
                    }
                }
                entry = next[entry]
            } else {
                // An operation returned before everything before it could be ordered: back up.
                guard let (call, previous) = stack.popLast() else { return false }
                let op = events[call].op
                relink(returnOf[op])
                relink(call)
                state = previous
                done[op / 64] &= ~(1 << UInt64(op % 64))
                entry = next[call]
            }
        }
        return true
    }
}

extension KVLinearizability.Operation {
    /// One line for a report: client, times (ms from `origin`), call and answer.
    public func line(origin: UInt64) -> String {
        func ms(_ t: UInt64) -> String { t == .max ? "∞" : String(format: "%.3f", Double(t &- origin) / 1e6) }
        let answer: String
        switch output {
        case .ok: answer = "ok"
        case .value(let v): answer = v.map { "\"\($0)\"" } ?? "absent"
        case .deleted(let n): answer = "deleted \(n)"
        case .swapped(let s): answer = s ? "swapped" : "not swapped"
        case .unknown: answer = "unknown"
        }
        let call: String
        switch input {
        case .put(let v): call = "put \(key) \"\(v)\""
        case .get: call = "get \(key)"
        case .delete: call = "delete \(key)"
        case .compareAndSwap(let e, let n): call = "cas \(key) \(e.map { "\"\($0)\"" } ?? "absent") -> \"\(n)\""
        }
        return "client \(client) [\(ms(invoked)) .. \(output == .unknown ? "∞" : ms(returned)) ms] \(call) => \(answer)"
    }
}
