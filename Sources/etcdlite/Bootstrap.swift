import ArgumentParser
import EtcdOperator
import Foundation

/// `etcdlite bootstrap render`: the manifests of a self-hosted etcdlite.
struct Bootstrap: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Manifests for running etcdlite self-hosted in the Kubernetes cluster it stores.",
        subcommands: [Render.self])

    struct Render: ParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Write the boot member's static pod manifest and the self-hosted objects (CRD, RBAC, operator, Services, PodDisruptionBudget, EtcdLiteCluster).")
        @Option(help: "Directory to write the manifests to.") var dir = "etcdlite-manifests"
        @Option(help: "Container image of etcdlite.") var image: String
        @Option(help: "Address of the node the boot member runs on (peer URLs use addresses, not names).") var bootNodeIp: String
        @Option(help: "Namespace of the self-hosted objects.") var namespace = "kube-system"
        @Option(help: "Self-hosted members wanted.") var size = 3
        @Option(help: "Host directory for members' data and recovery checkpoints.") var hostPath = "/var/lib/etcdlite"

        func run() throws {
            guard size >= 1 else { throw ValidationError("--size must be at least 1") }
            var options = BootstrapOptions(image: image, bootNodeIP: bootNodeIp)
            options.namespace = namespace
            options.size = size
            options.hostPath = hostPath
            for path in try Manifests.write(options, to: dir) { print(path) }
        }
    }
}
