//! Why the XDP program returned what it returned; one per-CPU counter per reason.

/// The verdict reason counted in the `REASONS` map (index = discriminant).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Forwarded to a backend on the same interface (`XDP_TX`).
    Tx = 0,
    /// Forwarded to a backend behind another interface (`XDP_REDIRECT` through `TX_PORTS`).
    Redirect = 1,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed to the host.
    PassNotIp = 2,
    /// IP, but not addressed to a configured VIP (address, port, protocol): passed to the host.
    PassNotVip = 3,
    /// Truncated or malformed header: passed to the host untouched.
    PassMalformed = 4,
    /// IPv4 fragment or IPv6 extension header: passed to the host.
    PassFragment = 5,
    /// Neither TCP nor UDP: passed to the host.
    PassNotTcpUdp = 6,
    /// A VIP whose ring holds no backend: dropped.
    DropNoBackend = 7,
    /// A ring or flow entry named a backend slot that does not exist: dropped (daemon bug guard).
    DropBadBackend = 8,
    /// The redirect helper refused the frame.
    DropRedirectFailed = 9,
    /// A VIP with no usable backend whose policy is `on_all_down = "pass"`: passed to the host.
    PassAllDown = 10,
    /// An encapsulating VIP's packet would exceed the egress MTU once encapsulated: answered with
    /// ICMP "fragmentation needed" / ICMPv6 "packet too big" (`XDP_TX` back to the client).
    IcmpTooBig = 11,
    /// Too big once encapsulated, and no ICMP answer allowed: an IPv4 packet without DF (which a
    /// router would fragment), or over the per-CPU answer rate: dropped.
    DropTooBig = 12,
    /// Room for the outer headers could not be made (`bpf_xdp_adjust_head` refused): dropped.
    DropEncapFailed = 13,
}

impl Reason {
    /// Number of reasons; the size of the `REASONS` map.
    pub const COUNT: u32 = 14;

    /// Every reason in discriminant order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::Tx,
        Reason::Redirect,
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassMalformed,
        Reason::PassFragment,
        Reason::PassNotTcpUdp,
        Reason::DropNoBackend,
        Reason::DropBadBackend,
        Reason::DropRedirectFailed,
        Reason::PassAllDown,
        Reason::IcmpTooBig,
        Reason::DropTooBig,
        Reason::DropEncapFailed,
    ];

    /// A packet forwarded to a backend: counted on the backend (`BACKEND_STATS`), not in
    /// `REASONS`, except a redirect's outcome, which the backend's counter cannot tell. The
    /// daemon derives `tx` as the backends' sum less the redirects.
    pub const fn is_forwarded(self) -> bool {
        matches!(
            self,
            Reason::Tx | Reason::Redirect | Reason::DropRedirectFailed
        )
    }

    /// Stable snake_case name, used in logs, `lb status` and metric labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::Tx => "tx",
            Reason::Redirect => "redirect",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassFragment => "pass_fragment",
            Reason::PassNotTcpUdp => "pass_not_tcp_udp",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropBadBackend => "drop_bad_backend",
            Reason::DropRedirectFailed => "drop_redirect_failed",
            Reason::PassAllDown => "pass_all_down",
            Reason::IcmpTooBig => "icmp_too_big",
            Reason::DropTooBig => "drop_too_big",
            Reason::DropEncapFailed => "drop_encap_failed",
        }
    }
}

// `ALL[r as usize] == r` for every reason: readers index by discriminant.
const _: () = {
    let mut i = 0;
    while i < Reason::ALL.len() {
        assert!(Reason::ALL[i] as usize == i, "Reason::ALL is out of order");
        i += 1;
    }
};
