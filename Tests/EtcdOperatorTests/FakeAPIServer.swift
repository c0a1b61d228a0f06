@testable import EtcdOperator
import Foundation
import Testing
import NIOCore
import NIOHTTP1
import NIOPosix

/// An in-process stand-in for kube-apiserver, following the API conventions the operator
/// relies on: objects with resourceVersion and generation, optimistic concurrency (a PUT with a
/// stale resourceVersion gets 409 Conflict), the status subresource (status only; spec edits
/// bump generation), AlreadyExists and NotFound Status objects, label and field selectors,
/// strategic merge patches of pod containers by name, and watches that stream events after a
/// version or answer 410 Gone (an ERROR event) when it is too old. It records every request.
final class FakeAPIServer: @unchecked Sendable {
    struct Request {
        var method: String
        var path: String
        var query: [String: String]
        var contentType: String?
        var authorization: String?
        var body: [String: Any]?
    }

    static let collections: Set<String> = ["pods", "configmaps", "events", "etcdliteclusters", "nodes", "leases", "statefulsets",
                                           "persistentvolumeclaims", "poddisruptionbudgets"]
    let token = "test-token"
    private let lock = NSLock()
    private var objects: [String: [String: Any]] = [:]
    private var version = 100
    private var log: [(version: Int, type: String, collection: String, object: [String: Any])] = []
    /// Watches from a version below this get 410 Gone.
    private var oldestWatchable = 0
    private var watchers: [(collection: String, filter: ([String: Any]) -> Bool, channel: Channel)] = []
    private var injected: [(method: String, pathPrefix: String, code: Int, reason: String)] = []
    private var beforePut: [String: () -> Void] = [:]
    private(set) var requests: [Request] = []
    private var grants: [String: [[String: Any]]] = [:]
    private var forbidden: [String] = []
    private var channel: Channel?
    var port: Int { channel?.localAddress?.port ?? 0 }

    func start() throws {
        channel = try ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline().flatMap { channel.pipeline.addHandler(Handler(server: self)) }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
    }

    /// Stops serving; a request RBAC refused during the test is a failure of the test (the real
    /// API server would have refused it too).
    func stop() {
        try? channel?.close().wait()
        let refused = forbiddenRequests
        if !refused.isEmpty { Issue.record("requests the granted RBAC rules do not allow: \(refused)") }
    }

    /// The rules the rendered self-hosted manifests grant a service account (its Role and the
    /// ClusterRoles bound to it).
    static func renderedRules(_ account: String) -> [[String: Any]] {
        let objects = Manifests.rbac(BootstrapOptions(image: "etcdlite:1", bootNodeIP: "10.0.0.1"))
        return rules(account, in: objects)
    }

    /// The rules a list of RBAC objects grants `account` through its bindings.
    static func rules(_ account: String, in objects: [[String: Any]]) -> [[String: Any]] {
        var rules: [[String: Any]] = []
        for binding in objects where (binding["kind"] as? String)?.hasSuffix("Binding") == true {
            let subjects = binding["subjects"] as? [[String: Any]] ?? []
            guard subjects.contains(where: { $0["kind"] as? String == "ServiceAccount" && $0["name"] as? String == account }),
                  let roleRef = binding["roleRef"] as? [String: Any] else { continue }
            for role in objects where role["kind"] as? String == roleRef["kind"] as? String
                && (role["metadata"] as? [String: Any])?["name"] as? String == roleRef["name"] as? String {
                rules += role["rules"] as? [[String: Any]] ?? []
            }
        }
        return rules
    }

    /// RBAC as the API server applies it: requests with `token` are allowed only what `rules`
    /// (a Role's or ClusterRole's rules) grant; refusals answer 403 and are listed in `forbidden`.
    /// (`token` itself stays allowed everything, as the tests' own requests use it.)
    func grant(_ token: String, _ rules: [[String: Any]]) { locked { grants[token] = rules } }
    var forbiddenRequests: [String] { locked { forbidden } }

    /// A request's API group, resource (with subresource) and verb, as the authorizer sees them.
    static func authorizationAttributes(_ request: Request) -> (group: String, resource: String, verb: String) {
        var parts = request.path.split(separator: "/").map(String.init)
        var group = ""
        if parts.first == "apis", parts.count > 2 {
            group = parts[1]
            parts = Array(parts.dropFirst(3))
        } else {
            parts = Array(parts.dropFirst(2))
        }
        if parts.first == "namespaces", parts.count > 2 { parts = Array(parts.dropFirst(2)) }
        let resource = parts.count > 2 ? parts[0] + "/" + parts[2] : (parts.first ?? "")
        let named = parts.count > 1
        let verb: String
        switch request.method {
        case "GET": verb = named ? "get" : (request.query["watch"] == "1" ? "watch" : "list")
        case "POST": verb = "create"
        case "PUT": verb = "update"
        case "PATCH": verb = "patch"
        case "DELETE": verb = named ? "delete" : "deletecollection"
        default: verb = request.method.lowercased()
        }
        return (group, resource, verb)
    }

    static func allows(_ rules: [[String: Any]], group: String, resource: String, verb: String) -> Bool {
        rules.contains { rule in
            let groups = rule["apiGroups"] as? [String] ?? []
            let resources = rule["resources"] as? [String] ?? []
            let verbs = rule["verbs"] as? [String] ?? []
            return (groups.contains(group) || groups.contains("*")) && (resources.contains(resource) || resources.contains("*"))
                && (verbs.contains(verb) || verbs.contains("*"))
        }
    }

    // MARK: Test controls

    func locked<T>(_ body: () -> T) -> T {
        lock.lock()
        defer { lock.unlock() }
        return body()
    }

    /// Stores an object as if created through the API (returns it with its metadata filled).
    @discardableResult
    func seed(_ collectionPath: String, _ object: [String: Any]) -> [String: Any] {
        locked { create(collectionPath, object) }
    }

    func object(_ path: String) -> [String: Any]? { locked { objects[path] } }

    func objects(in collectionPath: String) -> [[String: Any]] {
        locked { objects.filter { Self.parent($0.key) == collectionPath }.sorted { $0.key < $1.key }.map(\.value) }
    }

    /// Changes an object as another client would (a new resourceVersion; a spec change bumps
    /// the generation).
    func modify(_ path: String, _ change: (inout [String: Any]) -> Void) {
        locked {
            guard var object = objects[path] else { return }
            let spec = object["spec"].map { "\($0)" }
            change(&object)
            var metadata = object["metadata"] as? [String: Any] ?? [:]
            if spec != object["spec"].map({ "\($0)" }) { metadata["generation"] = (metadata["generation"] as? Int ?? 1) + 1 }
            object["metadata"] = metadata
            _ = replace(path, object)
        }
    }

    func remove(_ path: String) {
        locked {
            if let object = objects.removeValue(forKey: path) { record("DELETED", path, object) }
        }
    }

    /// A strategic merge patch as the API server applies it to the objects these tests use: maps
    /// merge key by key, `containers` lists merge by name, other values are replaced.
    static func strategicMerge(_ stored: [String: Any], _ patch: [String: Any]) -> [String: Any] {
        var result = stored
        for (key, value) in patch {
            if key == "containers", let patches = value as? [[String: Any]], var containers = stored[key] as? [[String: Any]] {
                for item in patches {
                    if let i = containers.firstIndex(where: { $0["name"] as? String == item["name"] as? String }) {
                        containers[i] = strategicMerge(containers[i], item)
                    } else {
                        containers.append(item)
                    }
                }
                result[key] = containers
            } else if let map = value as? [String: Any], let old = stored[key] as? [String: Any] {
                result[key] = strategicMerge(old, map)
            } else {
                result[key] = value
            }
        }
        return result
    }

    /// The next request of `method` on a path starting with `pathPrefix` fails with this Status.
    func inject(_ method: String, _ pathPrefix: String, code: Int, reason: String) {
        locked { injected.append((method, pathPrefix, code, reason)) }
    }

    /// Runs `body` just before the next PUT on `path` is handled (to make a conflict).
    func beforeNextPut(_ path: String, _ body: @escaping () -> Void) { locked { beforePut[path] = body } }

    /// Forgets the event log: watches from older versions get 410 Gone.
    func compact() { locked { oldestWatchable = version + 1 } }

    var currentVersion: Int { locked { version } }

    // MARK: Handling

    static func parent(_ path: String) -> String { (path as NSString).deletingLastPathComponent }

    private func create(_ collectionPath: String, _ input: [String: Any]) -> [String: Any] {
        var object = input
        var metadata = object["metadata"] as? [String: Any] ?? [:]
        version += 1
        metadata["resourceVersion"] = String(version)
        metadata["uid"] = UUID().uuidString.lowercased()
        metadata["creationTimestamp"] = ISO8601DateFormatter().string(from: Date())
        metadata["generation"] = 1
        object["metadata"] = metadata
        let path = collectionPath + "/" + (metadata["name"] as? String ?? "")
        objects[path] = object
        record("ADDED", path, object)
        return object
    }

    /// Stores a changed object under a new resourceVersion and tells the watchers.
    private func replace(_ path: String, _ input: [String: Any]) -> [String: Any] {
        var object = input
        var metadata = object["metadata"] as? [String: Any] ?? [:]
        version += 1
        metadata["resourceVersion"] = String(version)
        object["metadata"] = metadata
        objects[path] = object
        record("MODIFIED", path, object)
        return object
    }

    private func record(_ type: String, _ path: String, _ object: [String: Any]) {
        let collection = Self.parent(path)
        log.append((version, type, collection, object))
        for watcher in watchers where watcher.collection == collection && watcher.filter(object) {
            Self.send(event: type, object, on: watcher.channel)
        }
    }

    static func send(event type: String, _ object: [String: Any], on channel: Channel) {
        let data = (try? JSONSerialization.data(withJSONObject: ["type": type, "object": object])) ?? Data()
        var buffer = channel.allocator.buffer(capacity: data.count + 1)
        buffer.writeBytes(data)
        buffer.writeString("\n")
        channel.writeAndFlush(HTTPServerResponsePart.body(.byteBuffer(buffer)), promise: nil)
    }

    static func status(_ code: Int, _ reason: String, _ message: String) -> [String: Any] {
        ["kind": "Status", "apiVersion": "v1", "metadata": [String: Any](), "status": "Failure", "message": message, "reason": reason, "code": code]
    }

    static func matches(_ object: [String: Any], query: [String: String]) -> Bool {
        let metadata = object["metadata"] as? [String: Any] ?? [:]
        let labels = metadata["labels"] as? [String: String] ?? [:]
        for term in (query["labelSelector"] ?? "").split(separator: ",") {
            let parts = term.split(separator: "=", maxSplits: 1).map(String.init)
            if parts.count == 2 && labels[parts[0]] != parts[1] { return false }
        }
        if let field = query["fieldSelector"], field.hasPrefix("metadata.name=") {
            if metadata["name"] as? String != String(field.dropFirst("metadata.name=".count)) { return false }
        }
        return true
    }

    /// The answer to one request: status and body, or a watch (the channel stays open).
    fileprivate func handle(_ request: Request, channel: Channel) -> (Int, [String: Any])? {
        lock.lock()
        defer { lock.unlock() }
        requests.append(request)
        let bearer = request.authorization.map { String($0.dropFirst("Bearer ".count)) }
        guard let bearer, bearer == token || grants[bearer] != nil else { return (401, Self.status(401, "Unauthorized", "Unauthorized")) }
        if let rules = grants[bearer] {
            let (group, resource, verb) = Self.authorizationAttributes(request)
            guard Self.allows(rules, group: group, resource: resource, verb: verb) else {
                forbidden.append("\(verb) \(group.isEmpty ? "" : group + "/")\(resource)")
                return (403, Self.status(403, "Forbidden", "\(resource) is forbidden: cannot \(verb) resource \"\(resource)\" in API group \"\(group)\""))
            }
        }
        if let i = injected.firstIndex(where: { $0.method == request.method && request.path.hasPrefix($0.pathPrefix) }) {
            let failure = injected.remove(at: i)
            return (failure.code, Self.status(failure.code, failure.reason, "injected \(failure.reason)"))
        }
        var path = request.path
        var subresource: String?
        let segments = path.split(separator: "/")
        if segments.last == "status" {
            subresource = "status"
            path = Self.parent(path)
        }
        let isCollection = Self.collections.contains(String(path.split(separator: "/").last ?? ""))
        let kind = String((isCollection ? path : Self.parent(path)).split(separator: "/").last ?? "")
        let notFound = (404, Self.status(404, "NotFound", "\(kind) \"\((path as NSString).lastPathComponent)\" not found"))
        switch (request.method, isCollection) {
        case ("GET", true) where request.query["watch"] == "1":
            let from = Int(request.query["resourceVersion"] ?? "") ?? version
            var head = HTTPResponseHead(version: .http1_1, status: .ok)
            head.headers.add(name: "Content-Type", value: "application/json")
            channel.write(HTTPServerResponsePart.head(head), promise: nil)
            if from < oldestWatchable {
                Self.send(event: "ERROR", Self.status(410, "Gone", "too old resource version: \(from) (\(oldestWatchable))"), on: channel)
                channel.writeAndFlush(HTTPServerResponsePart.end(nil), promise: nil)
                return nil
            }
            for entry in log where entry.version > from && entry.collection == path && Self.matches(entry.object, query: request.query) {
                Self.send(event: entry.type, entry.object, on: channel)
            }
            let query = request.query
            watchers.append((path, { Self.matches($0, query: query) }, channel))
            channel.flush()
            let seconds = Int64(request.query["timeoutSeconds"] ?? "") ?? 30
            channel.eventLoop.scheduleTask(in: .seconds(min(seconds, 5))) {
                channel.writeAndFlush(HTTPServerResponsePart.end(nil), promise: nil)
            }
            return nil
        case ("GET", true):
            let items = objects.filter { Self.parent($0.key) == path && Self.matches($0.value, query: request.query) }.sorted { $0.key < $1.key }.map(\.value)
            return (200, ["kind": "List", "apiVersion": "v1", "metadata": ["resourceVersion": String(version)], "items": items])
        case ("POST", true):
            guard let body = request.body else { return (400, Self.status(400, "BadRequest", "no body")) }
            let name = (body["metadata"] as? [String: Any])?["name"] as? String ?? ""
            guard !name.isEmpty else { return (422, Self.status(422, "Invalid", "metadata.name: Required value")) }
            if objects[path + "/" + name] != nil {
                return (409, Self.status(409, "AlreadyExists", "\(kind) \"\(name)\" already exists"))
            }
            return (201, create(path, body))
        case ("GET", false):
            return objects[path].map { (200, $0) } ?? notFound
        case ("PUT", false):
            beforePut.removeValue(forKey: request.path).map { hook in
                lock.unlock()
                hook()
                lock.lock()
            }
            guard var stored = objects[path] else { return notFound }
            guard let body = request.body else { return (400, Self.status(400, "BadRequest", "no body")) }
            var metadata = stored["metadata"] as? [String: Any] ?? [:]
            let sent = (body["metadata"] as? [String: Any])?["resourceVersion"] as? String
            if let sent, sent != metadata["resourceVersion"] as? String {
                return (409, Self.status(409, "Conflict", "Operation cannot be fulfilled on \(kind) \"\((path as NSString).lastPathComponent)\": the object has been modified; please apply your changes to the latest version and try again"))
            }
            if subresource == "status" {
                stored["status"] = body["status"]
            } else {
                let specChanged = "\(stored["spec"] ?? "")" != "\(body["spec"] ?? "")"
                let keep = metadata
                stored = body
                metadata = keep.merging(body["metadata"] as? [String: Any] ?? [:]) { old, _ in old }
                if let labels = (body["metadata"] as? [String: Any])?["labels"] { metadata["labels"] = labels }
                if specChanged { metadata["generation"] = (metadata["generation"] as? Int ?? 1) + 1 }
            }
            stored["metadata"] = metadata
            return (200, replace(path, stored))
        case ("PATCH", false):
            guard var stored = objects[path], let body = request.body else { return notFound }
            guard request.contentType == "application/strategic-merge-patch+json" else {
                return (415, Self.status(415, "UnsupportedMediaType", "the body of the request was in an unknown format"))
            }
            stored = Self.strategicMerge(stored, body)
            return (200, replace(path, stored))
        case ("DELETE", false):
            guard let object = objects.removeValue(forKey: path) else { return notFound }
            version += 1
            record("DELETED", path, object)
            return (200, object)
        default:
            return (405, Self.status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource"))
        }
    }

    private final class Handler: ChannelInboundHandler {
        typealias InboundIn = HTTPServerRequestPart
        typealias OutboundOut = HTTPServerResponsePart
        let server: FakeAPIServer
        var head: HTTPRequestHead?
        var body = Data()

        init(server: FakeAPIServer) { self.server = server }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            switch unwrapInboundIn(data) {
            case .head(let head):
                self.head = head
                body = Data()
            case .body(let bytes):
                body.append(contentsOf: bytes.readableBytesView)
            case .end:
                guard let head else { return }
                let components = URLComponents(string: head.uri)
                var query: [String: String] = [:]
                for item in components?.queryItems ?? [] { query[item.name] = item.value ?? "" }
                let request = Request(method: head.method.rawValue, path: components?.path ?? head.uri, query: query,
                                      contentType: head.headers.first(name: "Content-Type"), authorization: head.headers.first(name: "Authorization"),
                                      body: body.isEmpty ? nil : (try? JSONSerialization.jsonObject(with: body)) as? [String: Any])
                guard let (code, object) = server.handle(request, channel: context.channel) else { return }
                let data = (try? JSONSerialization.data(withJSONObject: object)) ?? Data()
                var response = HTTPResponseHead(version: .http1_1, status: HTTPResponseStatus(statusCode: code))
                response.headers.add(name: "Content-Type", value: "application/json")
                response.headers.add(name: "Content-Length", value: String(data.count))
                context.write(wrapOutboundOut(.head(response)), promise: nil)
                context.write(wrapOutboundOut(.body(.byteBuffer(ByteBuffer(bytes: data)))), promise: nil)
                context.writeAndFlush(wrapOutboundOut(.end(nil)), promise: nil)
            }
        }
    }
}
