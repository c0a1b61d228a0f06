// swift-tools-version:6.1
import PackageDescription

/// ETCDLITE_FUZZ=1 (scripts/fuzz.sh): our modules get libFuzzer's coverage instrumentation and
/// the EtcdLiteFuzz executable exists; never set for the normal build.
let fuzzing = Context.environment["ETCDLITE_FUZZ"] == "1"
let fuzzFlags: [SwiftSetting] = fuzzing ? [.unsafeFlags(["-sanitize=fuzzer"])] : []

let package = Package(
    name: "etcdlite",
    platforms: [.macOS(.v15)],
    products: [
        .executable(name: "etcdlite", targets: ["EtcdLiteMain"]),
        .library(name: "EtcdLite", targets: ["EtcdLite"]),
        .library(name: "Raft", targets: ["Raft"]),
    ],
    dependencies: [
        .package(url: "https://github.com/grpc/grpc-swift-2.git", exact: "2.4.3"),
        .package(url: "https://github.com/grpc/grpc-swift-nio-transport.git", exact: "2.9.2"),
        .package(url: "https://github.com/grpc/grpc-swift-protobuf.git", exact: "2.4.1"),
        .package(url: "https://github.com/apple/swift-protobuf.git", exact: "1.39.0"),
        .package(url: "https://github.com/apple/swift-nio.git", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-nio-http2.git", from: "1.46.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl.git", from: "2.37.6"),
        .package(url: "https://github.com/apple/swift-certificates.git", from: "1.21.1"),
        .package(url: "https://github.com/apple/swift-asn1.git", from: "1.7.4"),
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-crypto.git", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift.git", from: "0.2.0"),
        // Benchmarks/RaftCore (the runtime interposer trait needs a package this mirror lacks).
        .package(url: "https://github.com/ordo-one/benchmark.git", from: "1.38.1", traits: ["MallocInterposer"]),
    ],
    targets: [
        .systemLibrary(name: "CSQLite", path: "Sources/CSQLite", pkgConfig: "sqlite3",
                       providers: [.apt(["libsqlite3-dev"])]),
        // Generated from Protos/ by Scripts/generate-protos.sh; committed, never generated at build time.
        .target(
            name: "EtcdLiteProto",
            dependencies: [
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
            ]
        ),
        .target(
            name: "EtcdLite",
            dependencies: [
                "CSQLite",
                "Raft",
                "EtcdLiteProto",
                "EtcdLiteHTTP2",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "X509", package: "swift-certificates"),
                .product(name: "SwiftASN1", package: "swift-asn1"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "CryptoExtras", package: "swift-crypto"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ],
            // Storage failpoints (Log/Failpoints.swift) exist in debug builds, which the tests run.
            // Release builds skip dynamic exclusivity checks (the tests' debug builds keep them):
            // they cost the request path a few percent (perf: swift_beginAccess, AccessSet::insert).
            swiftSettings: [
                .define("ETCDLITE_FAILPOINTS", .when(configuration: .debug)),
                .unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release)),
            ]
        ),
        // The consensus core: pure and deterministic (no I/O, clocks or system randomness).
        .target(
            name: "Raft",
            // The core is single-threaded by contract; dynamic exclusivity checks on its class
            // properties cost ~12 % of its time (perf) in release builds.
            swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
        ),
        // A lean gRPC client speaking HTTP/2 on bytes, for load generation (no task per call).
        .target(
            name: "EtcdLiteHTTP2",
            dependencies: [.product(name: "NIOCore", package: "swift-nio")],
            swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
        ),
        .target(
            name: "EtcdLiteClient",
            dependencies: [
                "EtcdLiteHTTP2",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ],
            // Single-threaded per connection (its event loop); dynamic exclusivity checks cost
            // the load generator a few percent (perf).
            swiftSettings: [.unsafeFlags(["-enforce-exclusivity=unchecked"], .when(configuration: .release))]
        ),
        // `etcdlite bench`: workloads against any etcd-compatible endpoint.
        .target(
            name: "EtcdLiteBench",
            dependencies: [
                "EtcdLiteClient",
                "EtcdLiteProto",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        // `etcdlite verify`: members as processes under faults, and the checks of what clients saw.
        .target(
            name: "EtcdLiteVerify",
            dependencies: [
                "Raft",
                "EtcdOperator",
                "EtcdLiteBench",
                "EtcdLiteClient",
                "EtcdLiteProto",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "EtcdLiteMain",
            dependencies: [
                "EtcdLite",
                "EtcdLiteBench",
                "EtcdLiteVerify",
                "EtcdOperator",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ],
            path: "Sources/etcdlite"
        ),
        // testdata/: scenario transcripts read (and rewritten) by the tests from the source tree.
        .testTarget(name: "RaftTests", dependencies: ["Raft"], exclude: ["testdata"]),
        // The operator (issue 9): a pure planner first; platforms talk to members only through
        // the etcd API.
        .target(
            name: "EtcdOperator",
            dependencies: [
                "EtcdLiteClient",
                "EtcdLiteProto",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The planner and the Kubernetes platform against an in-process API server of the tests'.
        .testTarget(name: "EtcdOperatorTests", dependencies: [
            "EtcdOperator",
            .product(name: "NIOCore", package: "swift-nio"),
            .product(name: "NIOPosix", package: "swift-nio"),
            .product(name: "NIOHTTP1", package: "swift-nio"),
        ]),
        // Throughput and allocations of the Raft core alone: swift package benchmark --target RaftCore
        .executableTarget(
            name: "RaftCore",
            dependencies: ["Raft", .product(name: "Benchmark", package: "benchmark")],
            path: "Benchmarks/RaftCore",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        // The store's hot paths (MVCC apply, Range, protobuf): swift package benchmark --target StoreCore
        .executableTarget(
            name: "StoreCore",
            dependencies: [
                "EtcdLite", "EtcdLiteProto",
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "Benchmark", package: "benchmark"),
            ],
            path: "Benchmarks/StoreCore",
            plugins: [.plugin(name: "BenchmarkPlugin", package: "benchmark")]
        ),
        .testTarget(
            name: "EtcdLiteTests",
            dependencies: [
                "EtcdLite",
                "EtcdOperator",
                "Raft",
                "EtcdLiteBench",
                "EtcdLiteClient",
                "EtcdLiteVerify",
                "EtcdLiteProto",
                .product(name: "GRPCCore", package: "grpc-swift-2"),
                .product(name: "GRPCNIOTransportHTTP2Posix", package: "grpc-swift-nio-transport"),
                .product(name: "GRPCProtobuf", package: "grpc-swift-protobuf"),
                .product(name: "SwiftProtobuf", package: "swift-protobuf"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP2", package: "swift-nio-http2"),
                .product(name: "NIOHPACK", package: "swift-nio-http2"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ],
            // Inputs for FuzzRegressionTests and the seeds of scripts/fuzz.sh.
            exclude: ["fuzz-regressions"]
        ),
    ]
)

for target in package.targets where ["EtcdLite", "EtcdLiteProto"].contains(target.name) {
    target.swiftSettings = (target.swiftSettings ?? []) + fuzzFlags
}
if fuzzing {
    // libFuzzer's targets: request decoding and validation, gateway JSON, peer messages, log records.
    package.targets.append(.executableTarget(
        name: "EtcdLiteFuzz",
        dependencies: ["EtcdLite"],
        swiftSettings: [.unsafeFlags(["-sanitize=fuzzer", "-parse-as-library"])],
        linkerSettings: [.unsafeFlags(["-sanitize=fuzzer"])]
    ))
}
