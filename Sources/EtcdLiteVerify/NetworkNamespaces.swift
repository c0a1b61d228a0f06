import Foundation

/// Members in network namespaces of their own (root with iproute2 only): each member's namespace
/// has one veth (`eth0`, 10.213.K.(slot+1)/24) into a bridge in a hub namespace, and the verifier
/// reaches the members through one more veth from its own namespace (10.213.K.254). Every
/// namespace and link is made here and deleted at the end; traffic goes nowhere else.
///
/// Network faults happen in the kernel, not in a proxy: a blocked link a→b is a blackhole route to
/// b's address in a's namespace (its packets to b are dropped, whatever the connection); with
/// `tc netem` (when the kernel has it) a member's link gets delay, loss or reordering, and with
/// `tc tbf` a narrow, queueing link.
final class NetworkNamespaces: @unchecked Sendable {
    let prefix: String
    let subnet: String
    let members: Int
    private let ip: String
    private let tc: String
    private var blackholes: Set<LinkTable.Link> = []
    private let lock = NSLock()
    /// Whether this kernel has the netem queueing discipline (delay, loss, reordering).
    private(set) var hasNetem = false

    static func tool(_ name: String) -> String? {
        ["/usr/sbin/\(name)", "/sbin/\(name)", "/usr/bin/\(name)", "/bin/\(name)"].first { FileManager.default.isExecutableFile(atPath: $0) }
    }

    /// Whether namespaces can be made here: root, iproute2, and a kernel that lets us.
    static func available() -> Bool {
        guard geteuid() == 0, let ip = tool("ip"), tool("tc") != nil else { return false }
        let probe = "elv\(getpid())probe"
        guard (try? ChildProcess.run(ip, ["netns", "add", probe]))?.code == 0 else { return false }
        _ = try? ChildProcess.run(ip, ["netns", "del", probe])
        return true
    }

    init(members: Int) throws {
        guard let ip = Self.tool("ip"), let tc = Self.tool("tc") else { throw VerifyError("iproute2 (ip, tc) not found") }
        self.ip = ip
        self.tc = tc
        self.members = members
        prefix = "elv\(getpid())"
        Self.removeStale(ip: ip)
        // A /24 nobody on this machine uses yet.
        let routes = (try? ChildProcess.run(ip, ["-4", "route", "show", "table", "all"]).output) ?? ""
        let start = Int(getpid() % 200)
        guard let k = (0..<200).map({ 20 + ($0 + start) % 200 }).first(where: { !routes.contains("10.213.\($0).") }) else {
            throw VerifyError("no free 10.213.x.0/24 subnet")
        }
        subnet = "10.213.\(k)"
        do {
            try setUp()
        } catch {
            tearDown()
            throw error
        }
    }

    func namespace(_ slot: Int) -> String { "\(prefix)m\(slot)" }
    private var hub: String { "\(prefix)h" }
    func address(_ slot: Int) -> String { "\(subnet).\(slot + 1)" }

    private func run(_ arguments: [String]) throws {
        let result = try ChildProcess.run(ip, arguments)
        guard result.code == 0 else { throw VerifyError("ip \(arguments.joined(separator: " ")): \(result.output.trimmingCharacters(in: .whitespacesAndNewlines))") }
    }

    private func setUp() throws {
        try run(["netns", "add", hub])
        try run(["-n", hub, "link", "add", "br0", "type", "bridge"])
        try run(["-n", hub, "link", "set", "br0", "up"])
        for i in 0..<members {
            let ns = namespace(i), inner = "\(prefix)m\(i)", outer = "\(prefix)b\(i)"
            try run(["netns", "add", ns])
            try run(["link", "add", inner, "type", "veth", "peer", "name", outer])
            try run(["link", "set", inner, "netns", ns])
            try run(["link", "set", outer, "netns", hub])
            try run(["-n", ns, "link", "set", inner, "name", "eth0"])
            try run(["-n", ns, "addr", "add", "\(address(i))/24", "dev", "eth0"])
            try run(["-n", ns, "link", "set", "eth0", "up"])
            try run(["-n", ns, "link", "set", "lo", "up"])
            try run(["-n", hub, "link", "set", outer, "master", "br0"])
            try run(["-n", hub, "link", "set", outer, "up"])
        }
        // The verifier's way in.
        let root = "\(prefix)r", rootPeer = "\(prefix)rh"
        try run(["link", "add", root, "type", "veth", "peer", "name", rootPeer])
        try run(["link", "set", rootPeer, "netns", hub])
        try run(["-n", hub, "link", "set", rootPeer, "master", "br0"])
        try run(["-n", hub, "link", "set", rootPeer, "up"])
        try run(["addr", "add", "\(subnet).254/24", "dev", root])
        try run(["link", "set", root, "up"])
        // netem is a kernel module some kernels do not have.
        let probe = try ChildProcess.run(ip, ["netns", "exec", namespace(0), tc, "qdisc", "add", "dev", "eth0", "root", "netem", "delay", "1ms"])
        hasNetem = probe.code == 0
        if hasNetem { _ = try? ChildProcess.run(ip, ["netns", "exec", namespace(0), tc, "qdisc", "del", "dev", "eth0", "root"]) }
    }

    /// The command that runs `executable` in the member's namespace (`ip netns exec` execs it: the
    /// process's pid is the member's).
    func command(_ slot: Int, _ executable: String, _ arguments: [String]) -> (executable: String, arguments: [String]) {
        (ip, ["netns", "exec", namespace(slot), executable] + arguments)
    }

    /// Makes exactly `links` blocked (a→b: a's packets to b dropped).
    func block(_ links: Set<LinkTable.Link>) {
        lock.lock()
        defer { lock.unlock() }
        for link in blackholes.subtracting(links) {
            _ = try? ChildProcess.run(ip, ["-n", namespace(link.from), "route", "del", "blackhole", "\(address(link.to))/32"])
        }
        for link in links.subtracting(blackholes) {
            _ = try? ChildProcess.run(ip, ["-n", namespace(link.from), "route", "add", "blackhole", "\(address(link.to))/32"])
        }
        blackholes = links
    }

    /// Shapes the member's outgoing traffic with a queueing discipline (`netem ...`, `tbf ...`).
    func shape(_ slot: Int, _ discipline: [String]) throws {
        let result = try ChildProcess.run(ip, ["netns", "exec", namespace(slot), tc, "qdisc", "replace", "dev", "eth0", "root"] + discipline)
        guard result.code == 0 else { throw VerifyError("tc qdisc \(discipline.joined(separator: " ")): \(result.output)") }
    }

    func unshape(_ slot: Int) {
        _ = try? ChildProcess.run(ip, ["netns", "exec", namespace(slot), tc, "qdisc", "del", "dev", "eth0", "root"])
    }

    /// Deletes every namespace and link made here (deleting a namespace deletes its veths, and
    /// with them their other ends).
    func tearDown() {
        for i in 0..<members { _ = try? ChildProcess.run(ip, ["netns", "del", namespace(i)]) }
        _ = try? ChildProcess.run(ip, ["netns", "del", hub])
        _ = try? ChildProcess.run(ip, ["link", "del", "\(prefix)r"])
    }

    /// Namespaces and links left by a verifier that was killed (its pid is gone).
    private static func removeStale(ip: String) {
        func stalePrefix(_ name: Substring) -> Bool {
            guard name.hasPrefix("elv") else { return false }
            let digits = name.dropFirst(3).prefix { $0.isNumber }
            guard let pid = Int32(digits) else { return false }
            return kill(pid, 0) != 0 && errno == ESRCH
        }
        let namespaces = (try? ChildProcess.run(ip, ["netns", "list"]).output) ?? ""
        for line in namespaces.split(separator: "\n") {
            guard let name = line.split(separator: " ").first, stalePrefix(name) else { continue }
            _ = try? ChildProcess.run(ip, ["netns", "del", String(name)])
        }
        let links = (try? ChildProcess.run(ip, ["-o", "link", "show"]).output) ?? ""
        for line in links.split(separator: "\n") {
            let fields = line.split(separator: " ")
            guard fields.count > 1 else { continue }
            let name = fields[1].split(separator: "@").first.map { $0.trimmingCharacters(in: CharacterSet(charactersIn: ":")) } ?? ""
            if stalePrefix(Substring(name)) { _ = try? ChildProcess.run(ip, ["link", "del", name]) }
        }
    }
}
