//! Test harness for end-to-end tests and the demo: network namespaces, veths and bridges, the
//! L2 DSR topology, real servers and clients, and bpffs checks. Needs root.

pub mod bird;
pub mod bpffs;
pub mod daemon;
pub mod decap_lab;
pub mod dns_lab;
pub mod ecmp;
pub mod frames;
pub mod guest;
pub mod keepalived;
pub mod links;
pub mod load;
pub mod netns;
pub mod orphan_lab;
pub mod packet_lab;
pub mod prometheus;
pub mod routed;
pub mod servers;
pub mod topology;
pub mod tunnel;
pub mod vrrp;
pub mod web_lab;
pub mod xdp;

pub use bpffs::bpffs_entries_under;
pub use links::MacAddress;
pub use netns::NetNs;
pub use servers::{
    BatchOutcome, TcpIdentityServer, TcpLineClient, UdpIdentityServer, tcp_request, tcp_requests,
    udp_request, udp_requests,
};
pub use topology::{DsrTopology, DsrTopologyOptions, Host, leftovers};
pub mod bench;
pub mod fuzz;
pub mod model;
