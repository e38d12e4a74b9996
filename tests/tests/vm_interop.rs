//! Interop with a real kernel's decapsulation (issue 13). This host's kernel has no ipip, fou or
//! ip6_tunnel, so the backend host is Debian's own kernel booted under qemu (`lb_tests::guest`,
//! DESIGN §9): its ipip, ip6tnl and fou devices, set up exactly as the README tells operators,
//! decapsulate hand-built packets, and its TCP stack answers the client directly.
//!
//! ```text
//!   test namespace ("lb side")                         guest (qemu, Debian 6.1 kernel)
//!   tap 10.77.0.1/24 fd00:77::1/64  ──── virtio ────  eth0 10.77.0.2/24 fd00:77::2/64
//!   AF_PACKET: sends encapsulated SYNs,                ipip0 (ipip external), ip6tnl1 (ip6tnl
//!   captures the answers                               mode any external), fou 6080 gue (v4+v6),
//!                                                      fou 5555 ipproto 4, fou 5556 ipproto 41 (v6)
//!                                                      lo: VIP 10.100.0.100, fd00:100::100
//! ```
//!
//! Every encapsulated SYN (client → VIP:80) must be answered by a SYN-ACK from the VIP to the
//! client's address and port, acknowledging the SYN's sequence number, as a plain (not
//! encapsulated) packet: direct server return. `lb_ipip_and_gue_to_a_kernel_backend` does the
//! same with the real `lb run` and real connections, once the balancer has `forward`.
//!
//! Run them alone with `cargo xtask test --vm`; they are also in the default `cargo xtask test`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_tests::daemon::{Launch, LbDaemon};
use lb_tests::guest::capture::{PacketSocket, TcpSegment};
use lb_tests::guest::frames::{Encapsulation, encapsulate, tcp_syn};
use lb_tests::guest::{Guest, GuestConfig, GuestNetwork, identity_server_command};
use lb_tests::links::{
    VethEnd, add_address, create_veth_pair, disable_tx_checksum_offload, interface_index, set_up,
};
use lb_tests::netns::{NetNs, list_namespaces, unique_name};
use lb_tests::servers::tcp_requests;

const VIP_V4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 100);
/// The second VIP of the `lb` test (GUE).
const VIP_V4_GUE: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 101);
const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x100);
const VIP_PORT: u16 = 80;
const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const GUE_PORT: u16 = 6080;
const FOU_IPIP_PORT: u16 = 5555;
const FOU_IP6_PORT: u16 = 5556;
const IDENTITY: &str = "kernel-backend";
/// How long one SYN waits for its answer before it is sent again (3 tries).
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The backend's decapsulation set-up: the README's "Backends on other networks" commands,
/// verbatim (keep the two in step), then the VIPs and a server.
fn backend_script() -> String {
    format!(
        "{DECAP_COMMANDS}\
         ip addr add {VIP_V4}/32 dev lo\n\
         ip addr add {VIP_V4_GUE}/32 dev lo\n\
         ip addr add {VIP_V6}/128 dev lo\n\
         {}\n",
        identity_server_command(VIP_PORT, IDENTITY)
    )
}

/// README, "Backends on other networks": what a backend runs to take lb's tunnels.
const DECAP_COMMANDS: &str = "\
modprobe -a ipip ip6_tunnel fou fou6
sysctl -qw net.ipv4.conf.all.rp_filter=0 net.ipv4.conf.default.rp_filter=0
ip link add name ipip0 type ipip external
ip link set ipip0 up
ip link add name ip6tnl1 type ip6tnl mode any external
ip link set ip6tnl1 up
ip fou add port 6080 gue
ip -6 fou add port 6080 gue
ip fou add port 5555 ipproto 4
ip -6 fou add port 5556 ipproto 41
";

/// The lb side's namespace and the guest on its tap, with a capture socket on the tap.
struct Lab {
    guest: Guest,
    socket: PacketSocket,
    namespace: NetNs,
}

impl Lab {
    fn boot(name: &str) -> Self {
        let namespace = NetNs::new("lbvm").expect("test namespace");
        let started = Instant::now();
        let guest = Guest::boot(&namespace, &GuestConfig::new(name, backend_script()))
            .unwrap_or_else(|e| panic!("guest {name} did not boot: {e}"));
        eprintln!(
            "{} ({:.1} s with the tap)",
            guest.boot_report(),
            started.elapsed().as_secs_f64()
        );
        let ifindex = interface_index(&namespace, guest.tap()).expect("tap ifindex");
        let socket = namespace
            .run(|| PacketSocket::bind(ifindex))
            .expect("AF_PACKET socket on the tap");
        Self {
            guest,
            socket,
            namespace,
        }
    }

    fn network(&self) -> &GuestNetwork {
        self.guest.network()
    }

    /// Sends `syn` (client → `vip`:`port`, sequence `seq`) encapsulated from the lb side to the
    /// guest, up to three times, and returns the first TCP segment the guest sends to the
    /// client's port; an error when none comes.
    fn answer_to(
        &self,
        form: &Form,
        vip: IpAddr,
        port: u16,
        client_port: u16,
    ) -> Result<TcpSegment> {
        let client = if vip.is_ipv4() {
            IpAddr::V4(CLIENT_V4)
        } else {
            IpAddr::V6(CLIENT_V6)
        };
        let seq = 0x1000_0000 + u32::from(client_port);
        let (outer_source, outer_destination) = if form.outer_v6 {
            (
                IpAddr::V6(self.network().host_v6),
                IpAddr::V6(self.network().guest_v6),
            )
        } else {
            (
                IpAddr::V4(self.network().host_v4),
                IpAddr::V4(self.network().guest_v4),
            )
        };
        let frame = encapsulate(
            &tcp_syn(client, client_port, vip, port, seq),
            outer_source,
            outer_destination,
            form.encapsulation,
            self.network().host_mac,
            self.network().guest_mac,
        );
        for _ in 0..3 {
            self.socket.send(&frame)?;
            let answer = self.socket.wait_for(ANSWER_WAIT, |frame| {
                TcpSegment::parse(frame)
                    .filter(|s| s.destination_port == client_port && s.source_port == port)
            });
            if let Some(segment) = answer {
                return Ok(segment);
            }
        }
        bail!(
            "{}: no TCP answer to {client}:{client_port} within 3 x {ANSWER_WAIT:?}",
            form.name
        )
    }

    /// [`Lab::answer_to`], and the answer must be the SYN-ACK of direct server return.
    fn expect_syn_ack(&self, form: &Form, vip: IpAddr, port: u16, client_port: u16) -> Result<()> {
        let segment = self.answer_to(form, vip, port, client_port)?;
        let client = if vip.is_ipv4() {
            IpAddr::V4(CLIENT_V4)
        } else {
            IpAddr::V6(CLIENT_V6)
        };
        let seq = 0x1000_0000 + u32::from(client_port);
        let expected = TcpSegment {
            source: vip,
            source_port: port,
            destination: client,
            destination_port: client_port,
            seq: segment.seq,
            ack: seq.wrapping_add(1),
            syn: true,
            ack_flag: true,
            rst: false,
            outer_protocol: 6,
        };
        if segment != expected {
            bail!(
                "{}: the guest answered {segment:?}, expected a plain SYN-ACK {expected:?}",
                form.name
            );
        }
        Ok(())
    }
}

/// One way of carrying the client's packet to the backend.
struct Form {
    name: &'static str,
    outer_v6: bool,
    inner_v6: bool,
    encapsulation: Encapsulation,
}

const fn udp(port: u16) -> Encapsulation {
    Encapsulation::Udp {
        source_port: 40_123,
        port,
    }
}

const FORMS: &[Form] = &[
    Form {
        name: "IPv4-in-IPv4 (ipip)",
        outer_v6: false,
        inner_v6: false,
        encapsulation: Encapsulation::Ip,
    },
    Form {
        name: "IPv6-in-IPv6 (ip6tnl)",
        outer_v6: true,
        inner_v6: true,
        encapsulation: Encapsulation::Ip,
    },
    Form {
        name: "IPv4-in-IPv6 (ip6tnl mode any)",
        outer_v6: true,
        inner_v6: false,
        encapsulation: Encapsulation::Ip,
    },
    Form {
        name: "GUE direct IPv4 over IPv4 (fou gue)",
        outer_v6: false,
        inner_v6: false,
        encapsulation: udp(GUE_PORT),
    },
    Form {
        name: "GUE direct IPv6 over IPv6 (fou -6 gue)",
        outer_v6: true,
        inner_v6: true,
        encapsulation: udp(GUE_PORT),
    },
    Form {
        name: "GUE direct IPv4 over IPv6 (fou -6 gue)",
        outer_v6: true,
        inner_v6: false,
        encapsulation: udp(GUE_PORT),
    },
    Form {
        name: "fou ipproto 4 over IPv4",
        outer_v6: false,
        inner_v6: false,
        encapsulation: udp(FOU_IPIP_PORT),
    },
    Form {
        name: "fou ipproto 41 over IPv6",
        outer_v6: true,
        inner_v6: true,
        encapsulation: udp(FOU_IP6_PORT),
    },
];

fn vip(form: &Form) -> IpAddr {
    if form.inner_v6 {
        IpAddr::V6(VIP_V6)
    } else {
        IpAddr::V4(VIP_V4)
    }
}

#[test]
#[ignore = "needs root and the guest kernel: run with cargo xtask test (or --vm)"]
fn kernel_decapsulates_every_form_and_answers_directly() {
    let started = Instant::now();
    let lab = Lab::boot("decap");
    let boot = started.elapsed();
    let mut failures = Vec::new();
    for (index, form) in FORMS.iter().enumerate() {
        let client_port = 41_000 + u16::try_from(index).expect("few forms");
        let result = lab.expect_syn_ack(form, vip(form), VIP_PORT, client_port);
        match result {
            Ok(()) => eprintln!(
                "ok: {}: SYN-ACK from the VIP straight to the client",
                form.name
            ),
            Err(error) => failures.push(format!("{error:#}")),
        }
    }
    let mut lab = lab;
    if failures.is_empty() {
        // The console command channel, and the guest's own view of its fou listeners.
        let listeners = lab
            .guest
            .exec("ip fou show; ip -6 fou show", Duration::from_secs(20))
            .expect("ip fou show in the guest");
        for port in [GUE_PORT, FOU_IPIP_PORT, FOU_IP6_PORT] {
            assert!(
                listeners.contains(&format!("port {port}")),
                "the guest lists no fou port {port}:\n{listeners}"
            );
        }
    } else {
        let guest = &mut lab.guest;
        let state = guest
            .exec(
                "ip -d link show; ip fou show; ip -6 fou show; nstat -az | grep -iE 'tunnel|ipip|udp|InNoRoutes|Discard' ",
                Duration::from_secs(20),
            )
            .unwrap_or_else(|e| format!("(guest state unavailable: {e})"));
        panic!(
            "{} of {} forms failed:\n{}\nguest state:\n{state}",
            failures.len(),
            FORMS.len(),
            failures.join("\n")
        );
    }
    eprintln!(
        "boot {:.1} s, all {} forms {:.1} s",
        boot.as_secs_f64(),
        FORMS.len(),
        (started.elapsed() - boot).as_secs_f64()
    );
}

/// The assertions above can fail: a SYN for an address the guest does not own, one for a port
/// nothing listens on, and one to a UDP port without a fou listener are not answered with the
/// SYN-ACK `expect_syn_ack` wants. Also checks that the guest's drop guard leaves nothing.
#[test]
#[ignore = "needs root and the guest kernel: run with cargo xtask test (or --vm)"]
fn kernel_backend_does_not_answer_what_it_should_not() {
    let lab = Lab::boot("refuse");
    let ipip = &FORMS[0];
    let gue = &FORMS[3];

    let not_vip = IpAddr::V4(Ipv4Addr::new(10, 100, 0, 200));
    let error = lab
        .expect_syn_ack(ipip, not_vip, VIP_PORT, 42_000)
        .expect_err("a SYN to an address the backend does not own must not be answered");
    assert!(
        format!("{error:#}").contains("no TCP answer"),
        "unexpected failure: {error:#}"
    );

    let error = lab
        .expect_syn_ack(gue, IpAddr::V4(VIP_V4), VIP_PORT + 1, 42_001)
        .expect_err("a SYN to a closed port must not get a SYN-ACK");
    let answer = lab
        .answer_to(gue, IpAddr::V4(VIP_V4), VIP_PORT + 1, 42_002)
        .expect("a closed port answers with a reset");
    assert!(
        answer.rst && !answer.syn && answer.source == IpAddr::V4(VIP_V4),
        "closed port: expected a RST from the VIP, got {answer:?} ({error:#})"
    );

    let no_listener = Form {
        name: "GUE to a port without fou",
        outer_v6: false,
        inner_v6: false,
        encapsulation: udp(GUE_PORT + 1),
    };
    let error = lab
        .expect_syn_ack(&no_listener, IpAddr::V4(VIP_V4), VIP_PORT, 42_003)
        .expect_err("a UDP port without a fou listener decapsulates nothing");
    assert!(
        format!("{error:#}").contains("no TCP answer"),
        "unexpected failure: {error:#}"
    );

    let namespace_name = lab.namespace.name().to_owned();
    let tap = lab.guest.tap().to_owned();
    let qemu = lab.guest.pid().expect("qemu runs");
    drop(lab);
    assert!(
        !std::path::Path::new(&format!("/proc/{qemu}")).exists(),
        "qemu (pid {qemu}) survived its guard"
    );
    assert!(
        !list_namespaces()
            .expect("ip netns list")
            .contains(&namespace_name),
        "namespace {namespace_name} (tap {tap}) survived its guard"
    );
}

// ---- the real balancer in front of the kernel backend -------------------------------------

const LB_CLIENT_SIDE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);
const ROUTER_LB_SIDE: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 1);
const LB: Ipv4Addr = Ipv4Addr::new(10, 202, 0, 2);

/// `lb run` with a VIP per tunnel kind and the guest as the only backend, one routed hop away:
///
/// ```text
///   client ns           router ns                         lb ns
///   eth0 10.201.0.2 ── r-c 10.201.0.1                     
///   default via .0.1    r-l 10.202.0.1 ────────────────── eth0 10.202.0.2 (lb, XDP)
///                       tap 10.77.0.1 ── guest 10.77.0.2   routes: 10.77.0.0/24, default via .0.1
///                       VIPs via 10.202.0.2
/// ```
///
/// Client → router → lb (XDP: encapsulate, outer source 10.202.0.2, next hop the router) →
/// router → guest (decapsulate) → answer from the VIP → router → client.
#[test]
#[ignore = "needs root and the guest kernel: run with cargo xtask test (or --vm)"]
fn lb_ipip_and_gue_to_a_kernel_backend() {
    let base = unique_name("lbvmlb");
    let namespace = |role: &str| {
        NetNs::with_name(&format!("{base}-{role}"))
            .unwrap_or_else(|e| panic!("namespace {role}: {e:#}"))
    };
    let (client, router, lb) = (namespace("c"), namespace("r"), namespace("lb"));
    wire(&client, &router, &lb).expect("topology");
    let guest = Guest::boot(&router, &GuestConfig::new("lb-backend", backend_script()))
        .unwrap_or_else(|e| panic!("guest did not boot: {e}"));
    let backend = guest.network().guest_v4;
    // The routed path without the balancer: client → router → guest and back.
    let direct = SocketAddr::new(IpAddr::V4(backend), VIP_PORT);
    let answer = tcp_requests(&client, direct, 1, Duration::from_secs(5)).expect("client");
    assert_eq!(
        answer.per_identity.get(IDENTITY),
        Some(&1),
        "the client cannot reach the guest's server directly: {answer:?}"
    );
    lb.ip([
        "route",
        "add",
        "10.77.0.0/24",
        "via",
        &ROUTER_LB_SIDE.to_string(),
    ])
    .expect("lb route to the backend");
    let config = format!(
        r#"interface = "eth0"
flow_table_size = 4096
max_vips = 4

[[vip]]
name = "ipip"
address = "{VIP_V4}"
port = {VIP_PORT}
protocol = "tcp"
forward = "ipip"
health = {{ check = "tcp", interval = "200ms", timeout = "150ms", rise = 1 }}
[[vip.backend]]
address = "{backend}"

[[vip]]
name = "gue"
address = "{VIP_V4_GUE}"
port = {VIP_PORT}
protocol = "tcp"
forward = "gue"
gue_port = {GUE_PORT}
health = {{ check = "tcp", interval = "200ms", timeout = "150ms", rise = 1 }}
[[vip.backend]]
address = "{backend}"
"#
    );
    let daemon = LbDaemon::start(&lb, &config, Launch::Nsenter).expect("lb run");
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.transitions().iter().filter(|t| t.to == "up").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the kernel backend never came up in both VIPs\nlb log:\n{}",
            daemon.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for vip in [VIP_V4, VIP_V4_GUE] {
        let target = SocketAddr::new(IpAddr::V4(vip), VIP_PORT);
        let outcome = tcp_requests(&client, target, 5, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("client to {target}: {e:#}"));
        assert_eq!(
            outcome.answered(),
            5,
            "{target}: {outcome:?}\nlb log:\n{}\nguest console:\n{}",
            daemon.log(),
            guest.console()
        );
        for answer in outcome.per_identity.keys() {
            assert_eq!(answer, IDENTITY, "{target} answered by {answer}");
        }
    }
    // Every answer went through the balancer: it counted the connections' packets per VIP.
    let counters = daemon.stop().expect("lb run stops with its counters");
    for vip in ["ipip", "gue"] {
        let packets = counters
            .backends
            .get(&(vip.to_owned(), backend.to_string()))
            .map_or(0, |c| c.0);
        assert!(
            packets >= 5,
            "lb forwarded {packets} packets of vip {vip} to {backend}, expected at least the 5 SYNs: {counters:?}"
        );
    }
    drop(guest);
}

fn wire(client: &NetNs, router: &NetNs, lb: &NetNs) -> Result<()> {
    let end = |namespace, name| VethEnd {
        namespace,
        name,
        mac: None,
    };
    create_veth_pair(end(client, "eth0"), end(router, "r-c"))?;
    create_veth_pair(end(lb, "eth0"), end(router, "r-l"))?;
    for (namespace, interface, address) in [
        (client, "eth0", CLIENT),
        (router, "r-c", LB_CLIENT_SIDE),
        (router, "r-l", ROUTER_LB_SIDE),
        (lb, "eth0", LB),
    ] {
        add_address(namespace, interface, IpAddr::V4(address), 24)?;
        set_up(namespace, interface)?;
    }
    disable_tx_checksum_offload(client, "eth0")?;
    client.ip([
        "route",
        "add",
        "default",
        "via",
        &LB_CLIENT_SIDE.to_string(),
    ])?;
    lb.ip([
        "route",
        "add",
        "default",
        "via",
        &ROUTER_LB_SIDE.to_string(),
    ])?;
    router.set_sysctl("net.ipv4.ip_forward", "1")?;
    for scope in ["all", "default", "r-c", "r-l"] {
        router
            .set_sysctl(&format!("net.ipv4.conf.{scope}.rp_filter"), "0")
            .with_context(|| format!("rp_filter on {scope}"))?;
    }
    for vip in [VIP_V4, VIP_V4_GUE] {
        router.ip(["route", "add", &format!("{vip}/32"), "via", &LB.to_string()])?;
    }
    Ok(())
}
