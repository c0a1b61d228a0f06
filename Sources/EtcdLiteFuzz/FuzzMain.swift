@_spi(Fuzzing) import EtcdLite
import Foundation

/// libFuzzer's entry point (built only with ETCDLITE_FUZZ=1, see scripts/fuzz.sh). The target is
/// chosen by ETCDLITE_FUZZ_TARGET: request, gateway, peer, log or http2.
private let target: @Sendable ([UInt8]) -> Void = {
    switch ProcessInfo.processInfo.environment["ETCDLITE_FUZZ_TARGET"] ?? "" {
    case "request": return FuzzTargets.request
    case "gateway": return FuzzTargets.gatewayJSON
    case "peer": return FuzzTargets.peer
    case "log": return FuzzTargets.logSegment
    case "http2": return FuzzTargets.http2
    default:
        FileHandle.standardError.write(Data("set ETCDLITE_FUZZ_TARGET to request, gateway, peer, log or http2\n".utf8))
        exit(2)
    }
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOneInput(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = size == 0 || data == nil ? [] : Array(UnsafeBufferPointer(start: data, count: size))
    target(bytes)
    return 0
}

@_silgen_name("LLVMFuzzerRunDriver")
private func runDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                       _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt) -> CInt

/// SwiftPM links an executable's `main` to `<module>_main`: hand over to libFuzzer's driver.
@_cdecl("EtcdLiteFuzz_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var count = argc
    var arguments = argv
    return runDriver(&count, &arguments) { fuzzOneInput($0, $1) }
}
