//! Runs `lb_decap` on hand-built frames through `BPF_PROG_TEST_RUN`, with its real maps (not
//! pinned) written the way `lb decap` writes them.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{MacAddress, NetNs};
use aya::{
    Ebpf, TestRun as _, TestRunOptions,
    maps::{Array, HashMap, PerCpuArray},
    programs::Xdp,
};
use lb_common::{
    Counters,
    decap::{
        DecapConfig, DecapReason, DecapVip, MAP_DECAP_CONFIG, MAP_DECAP_STATS, MAP_DECAP_VIPS,
    },
};

pub struct DecapLab {
    ebpf: Ebpf,
}

impl DecapLab {
    /// Loads `lb_decap` for `vips` and GUE port `gue_port`.
    pub fn new(vips: &[IpAddr], gue_port: u16) -> Self {
        let mut ebpf = lb::decap::load(None)
            .unwrap_or_else(|e| panic!("loading lb_decap failed (run as root): {e}"));
        {
            let mut config: Array<_, DecapConfig> =
                Array::try_from(ebpf.map_mut(MAP_DECAP_CONFIG).expect("DECAP_CONFIG"))
                    .expect("an array");
            config
                .set(
                    0,
                    DecapConfig {
                        gue_port_be: gue_port.to_be(),
                        _pad: [0; 6],
                    },
                    0,
                )
                .expect("writing DECAP_CONFIG");
        }
        {
            let mut map: HashMap<_, DecapVip, u32> =
                HashMap::try_from(ebpf.map_mut(MAP_DECAP_VIPS).expect("DECAP_VIPS"))
                    .expect("a hash map");
            for &vip in vips {
                map.insert(lb::decap::vip_key(vip), 1, 0)
                    .expect("writing DECAP_VIPS");
            }
        }
        Self { ebpf }
    }

    /// Runs the program once on `frame`: the verdict and the frame as the program left it.
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &mut Xdp = self
            .ebpf
            .program_mut(lb::decap::PROGRAM_NAME)
            .expect("lb_decap")
            .try_into()
            .expect("an XDP program");
        let mut out = vec![0u8; frame.len() + 256];
        let result = program
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::new()
            })
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN on a {}-byte frame: {e}", frame.len()));
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// The packets counted for each reason, summed over the CPUs.
    pub fn counts(&self) -> Vec<(DecapReason, u64)> {
        let stats: PerCpuArray<_, Counters> =
            PerCpuArray::try_from(self.ebpf.map(MAP_DECAP_STATS).expect("DECAP_STATS"))
                .expect("a per-CPU array");
        DecapReason::ALL
            .iter()
            .map(|&reason| {
                let values = stats.get(&(reason as u32), 0).expect("reading DECAP_STATS");
                (reason, values.iter().map(|c| c.packets).sum())
            })
            .collect()
    }

    /// The packets counted for `reason`.
    pub fn count(&self, reason: DecapReason) -> u64 {
        self.counts()
            .into_iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| n)
    }
}

/// Two namespaces joined by a veth: a "sender" (the balancer's side, hand-building encapsulated
/// frames on an AF_PACKET socket, since this kernel cannot encapsulate) and a "backend" running
/// `lb decap` and a TCP server on the VIPs. Addresses: sender 192.0.2.1 / 2001:db8:1b::1, backend
/// 192.0.2.10 / 2001:db8:1b::10; clients (the inner sources) in 198.51.100.0/24 and
/// 2001:db8:c::/64 are routed back through the sender.
pub struct DecapHosts {
    pub sender: NetNs,
    pub backend: NetNs,
}

pub const SENDER_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x01];
pub const BACKEND_MAC: [u8; 6] = [0x02, 0xbe, 0, 0, 0, 0x10];
pub const SENDER_V4: &str = "192.0.2.1";
pub const BACKEND_V4: &str = "192.0.2.10";
pub const SENDER_V6: &str = "2001:db8:1b::1";
pub const BACKEND_V6: &str = "2001:db8:1b::10";
pub const CLIENTS_V4: &str = "198.51.100.0/24";
pub const CLIENTS_V6: &str = "2001:db8:c::/64";
/// The backend's interface.
pub const BACKEND_IF: &str = "eth0";

impl DecapHosts {
    pub fn new() -> Result<Self> {
        let sender = NetNs::new("decap-snd")?;
        let backend = NetNs::new("decap-be")?;
        crate::links::create_veth_pair(
            crate::links::VethEnd {
                namespace: &sender,
                name: "eth0",
                mac: Some(MacAddress(SENDER_MAC)),
            },
            crate::links::VethEnd {
                namespace: &backend,
                name: BACKEND_IF,
                mac: Some(MacAddress(BACKEND_MAC)),
            },
        )?;
        for (ns, v4, v6) in [
            (&sender, SENDER_V4, SENDER_V6),
            (&backend, BACKEND_V4, BACKEND_V6),
        ] {
            crate::links::add_address(ns, "eth0", v4.parse()?, 24)?;
            crate::links::add_address(ns, "eth0", v6.parse()?, 64)?;
            crate::links::set_up(ns, "eth0")?;
        }
        backend.ip(["-4", "route", "add", CLIENTS_V4, "via", SENDER_V4])?;
        backend.ip(["-6", "route", "add", CLIENTS_V6, "via", SENDER_V6])?;
        crate::links::wait_for_carrier(&backend, BACKEND_IF, Duration::from_secs(5))?;
        Ok(Self { sender, backend })
    }

    /// `lb decap ARGS...` in the backend's network namespace (host mount namespace, so its pins
    /// are in the host's bpffs); its stdout, or an error with its stderr.
    pub fn lb_decap(&self, args: &[&str]) -> Result<String> {
        let mut command = self.backend.nsenter_command(crate::daemon::lb_binary());
        command
            .args(["decap", "--interface", BACKEND_IF])
            .args(args);
        let output = crate::netns::run_checked(&mut command)?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// `lb decap --status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(
            &self.lb_decap(&["--status", "--json"])?,
        )?)
    }

    /// The addresses on the backend's `lo`.
    pub fn backend_lo_addresses(&self) -> Result<BTreeSet<IpAddr>> {
        let output = self.backend.ip(["-o", "addr", "show", "dev", "lo"])?;
        Ok(String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| {
                let mut words = line.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect())
    }

    /// An AF_PACKET socket on the sender's eth0 that sees every frame.
    pub fn sender_socket(&self) -> Result<PacketSocket> {
        self.sender.run(|| PacketSocket::open("eth0"))
    }
}

/// A raw AF_PACKET socket bound to one interface.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

impl PacketSocket {
    /// Opens it in the calling thread's network namespace.
    pub fn open(interface: &str) -> Result<Self> {
        let ifindex = nix::net::if_::if_nametoindex(interface)
            .with_context(|| format!("no interface {interface}"))? as i32;
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        if fd < 0 {
            bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroes are a valid start.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_protocol = protocol;
        address.sll_ifindex = ifindex;
        // SAFETY: `address` is a valid sockaddr_ll of the size passed.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::from_ref(&address).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound != 0 {
            bail!(
                "binding to {interface}: {}",
                std::io::Error::last_os_error()
            );
        }
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size passed.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::from_ref(&timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Ok(Self { fd, ifindex })
    }

    /// Sends one whole Ethernet frame.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: sockaddr_ll is plain data.
        let mut address: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        address.sll_family = libc::AF_PACKET as u16;
        address.sll_ifindex = self.ifindex;
        address.sll_halen = 6;
        address.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: `frame` and `address` are valid for the lengths passed.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&address).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent != frame.len() as isize {
            bail!("sending a frame: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Frames received until `deadline` or until `stop` says so for one (that one returned).
    pub fn wait_for(
        &self,
        deadline: Duration,
        mut stop: impl FnMut(&[u8]) -> bool,
    ) -> Option<Vec<u8>> {
        let end = Instant::now() + deadline;
        let mut buffer = vec![0u8; 65536];
        while Instant::now() < end {
            // SAFETY: `buffer` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buffer.as_mut_ptr().cast(),
                    buffer.len(),
                    0,
                )
            };
            if n > 0 && stop(&buffer[..n as usize]) {
                return Some(buffer[..n as usize].to_vec());
            }
        }
        None
    }
}

/// A TCP segment's addresses, ports and flags, if `frame` is an untagged IPv4/IPv6 TCP frame.
pub fn tcp_of(frame: &[u8]) -> Option<(SocketAddr, SocketAddr, u8)> {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst) = match sliced.net? {
        etherparse::NetSlice::Ipv4(ip) => (
            IpAddr::from(ip.header().source()),
            IpAddr::from(ip.header().destination()),
        ),
        etherparse::NetSlice::Ipv6(ip) => (
            IpAddr::from(ip.header().source()),
            IpAddr::from(ip.header().destination()),
        ),
        _ => return None,
    };
    let etherparse::TransportSlice::Tcp(tcp) = sliced.transport? else {
        return None;
    };
    let flags = tcp.slice().get(13).copied()?;
    Some((
        SocketAddr::new(src, tcp.source_port()),
        SocketAddr::new(dst, tcp.destination_port()),
        flags,
    ))
}
