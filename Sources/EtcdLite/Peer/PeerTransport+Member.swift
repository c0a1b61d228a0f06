import EtcdLiteProto

extension PeerTransport {
    /// Points the link to `member` at its first peer URL.
    func setPeer(_ member: Etcdserverpb_Member) {
        guard let url = member.peerUrls.first, let address = MemberConfig.address(url, defaultPort: 2380) else { return }
        setPeer(member.id, host: address.host, port: address.port, secure: url.hasPrefix("https://"))
    }
}
