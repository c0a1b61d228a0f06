import Foundation
import EtcdLiteProto

/// The store's hot paths without Raft or the network, for Benchmarks/StoreCore: applying a batch
/// of requests in one transaction (as the apply loop does) and reading a range (as Range does).
@_spi(Benchmarks) public final class StoreHarness {
    private let backend: Backend
    private let machine: StateMachine
    private var index: UInt64

    /// A new store in `directory`.
    public init(directory: String) throws {
        backend = try Backend(path: (directory as NSString).appendingPathComponent("db"))
        machine = try StateMachine(backend: backend, lessor: Lessor())
        index = machine.state.appliedIndex
    }

    /// Applies `requests` as one batch: one SQLite transaction, committed (not synced: the Raft
    /// log is what is synced per batch). Returns the events the batch produced.
    @discardableResult
    public func apply(puts requests: [Etcdserverpb_PutRequest]) throws -> Int {
        try machine.begin()
        for request in requests {
            index += 1
            _ = try machine.apply(.put(request), index: index)
        }
        try machine.commit()
        return machine.takeEvents().count
    }

    /// A Range as the member answers it (without its header).
    public func range(_ request: Etcdserverpb_RangeRequest) throws -> Etcdserverpb_RangeResponse {
        try backend.read { try Applier.range(request, $0) }
    }

    public var revision: Int64 { machine.state.currentRevision }
}
