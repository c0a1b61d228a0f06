import EtcdLiteBench
import Testing

/// The checker on histories written by hand: it passes what a store could have answered and
/// flags what none could.
@Suite struct LinearizabilityCheckerTests {
    typealias Op = KVLinearizability.Operation

    static func op(_ client: Int, _ input: KVLinearizability.Input, _ output: KVLinearizability.Output,
                   _ invoked: UInt64, _ returned: UInt64, key: String = "k") -> Op {
        Op(client: client, key: key, input: input, output: output, invoked: invoked, returned: returned)
    }

    @Test func sequentialHistories() {
        let good = [Self.op(0, .put("a"), .ok, 0, 1), Self.op(0, .get, .value("a"), 2, 3), Self.op(0, .delete, .deleted(1), 4, 5),
                    Self.op(0, .get, .value(nil), 6, 7), Self.op(0, .compareAndSwap(expected: nil, new: "b"), .swapped(true), 8, 9),
                    Self.op(0, .compareAndSwap(expected: "a", new: "c"), .swapped(false), 10, 11), Self.op(0, .get, .value("b"), 12, 13)]
        #expect(KVLinearizability.check(good).linearizable)
        // A read that returns a value overwritten before it began: stale.
        let stale = [Self.op(0, .put("a"), .ok, 0, 1), Self.op(0, .put("b"), .ok, 2, 3), Self.op(1, .get, .value("a"), 4, 5)]
        let verdict = KVLinearizability.check(stale)
        #expect(!verdict.linearizable && verdict.key == "k")
        // Smallest: the read alone (the key starts absent, so nothing explains "a" without the puts,
        // and with only the second put "a" is impossible too).
        #expect(verdict.counterexample == [stale[2]], "\(verdict.counterexample)")
    }

    @Test func concurrentOperationsMayTakeEitherOrder() {
        // The get overlaps both puts: "a" and "b" are both fine answers.
        for seen in ["a", "b"] {
            let h = [Self.op(0, .put("a"), .ok, 0, 10), Self.op(1, .put("b"), .ok, 1, 9), Self.op(2, .get, .value(seen), 2, 11)]
            #expect(KVLinearizability.check(h).linearizable, "\(seen)")
        }
        // Two reads that see the writes in opposite orders while both writes were done: not linearizable.
        let split = [Self.op(0, .put("a"), .ok, 0, 10), Self.op(1, .put("b"), .ok, 0, 10),
                     Self.op(2, .get, .value("a"), 11, 12), Self.op(3, .get, .value("b"), 13, 14), Self.op(2, .get, .value("a"), 15, 16)]
        #expect(!KVLinearizability.check(split).linearizable)
        // Two compare-and-swaps from the same value cannot both succeed.
        let doubleSwap = [Self.op(0, .put("a"), .ok, 0, 1), Self.op(1, .compareAndSwap(expected: "a", new: "b"), .swapped(true), 2, 5),
                          Self.op(2, .compareAndSwap(expected: "a", new: "c"), .swapped(true), 3, 6)]
        #expect(!KVLinearizability.check(doubleSwap).linearizable)
    }

    @Test func unknownOutcomesMayOrMayNotHaveHappened() {
        // A put that timed out may take effect later (after a read saw nothing)...
        let late = [Self.op(0, .put("a"), .unknown, 0, 0), Self.op(1, .get, .value(nil), 5, 6), Self.op(1, .get, .value("a"), 7, 8)]
        #expect(KVLinearizability.check(late).linearizable)
        // ...or never.
        let never = [Self.op(0, .put("a"), .unknown, 0, 0), Self.op(1, .get, .value(nil), 5, 6)]
        #expect(KVLinearizability.check(never).linearizable)
        // But not before it was invoked.
        let early = [Self.op(1, .get, .value("a"), 0, 1), Self.op(0, .put("a"), .unknown, 5, 0)]
        #expect(!KVLinearizability.check(early).linearizable)
        // Keys are checked apart; a violation names its key.
        let twoKeys = [Self.op(0, .put("a"), .ok, 0, 1, key: "x"), Self.op(0, .get, .value("a"), 2, 3, key: "x"),
                       Self.op(0, .get, .value("a"), 4, 5, key: "y")]
        #expect(KVLinearizability.check(twoKeys).key == "y")
    }
}
