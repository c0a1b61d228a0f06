import Foundation
/// The interval a request names: one key, [key, end), or every key ≥ key.
public enum KeyRange: Sendable, Equatable {
    case single(Data)
    case interval(Data, Data)
    case from(Data)

    /// etcd's reading of (key, range_end): empty end = one key; "\0" = every key ≥ key.
    public init(key: Data, rangeEnd: Data) {
        if rangeEnd.isEmpty {
            self = .single(key)
        } else if rangeEnd == Data([0]) {
            self = .from(key)
        } else {
            self = .interval(key, rangeEnd)
        }
    }

    public func contains(_ candidate: Data) -> Bool {
        switch self {
        case .single(let key): return candidate == key
        case .interval(let start, let end): return !candidate.lexicographicallyPrecedes(start) && candidate.lexicographicallyPrecedes(end)
        case .from(let start): return !candidate.lexicographicallyPrecedes(start)
        }
    }
}
