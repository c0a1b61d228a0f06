import EtcdLite
import Foundation
import Logging

/// Writes one JSON object per line to standard error, in the shape of etcd's zap logs
/// (`level`, `ts`, `msg`, then the metadata).
struct JSONLogHandler: LogHandler {
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level
    let label: String

    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    func log(event: LogEvent) {
        var object: [String: String] = [:]
        for (key, value) in metadata.merging(event.metadata ?? [:], uniquingKeysWith: { $1 }) {
            object[key] = "\(value)"
        }
        var line = "{\"level\":\"\(Self.name(event.level))\",\"ts\":\"\(Self.timestamp())\",\"logger\":\"\(label)\",\"msg\":\(Self.quote("\(event.message)"))"
        for key in object.keys.sorted() {
            line += ",\(Self.quote(key)):\(Self.quote(object[key]!))"
        }
        line += "}\n"
        FileHandle.standardError.write(Data(line.utf8))
    }

    private static func name(_ level: Logger.Level) -> String {
        switch level {
        case .trace, .debug: "debug"
        case .info, .notice: "info"
        case .warning: "warn"
        case .error: "error"
        case .critical: "fatal"
        }
    }

    private static func timestamp() -> String {
        Date().formatted(.iso8601.year().month().day().time(includingFractionalSeconds: true).timeZone(separator: .omitted))
    }

    static func quote(_ text: String) -> String { JSONText.quote(text) }

    static func level(_ text: String) -> Logger.Level? {
        switch text {
        case "debug": .debug
        case "info": .info
        case "warn": .warning
        case "error": .error
        case "panic", "fatal": .critical
        default: nil
        }
    }
}
