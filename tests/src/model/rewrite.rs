//! L2 DSR: only the Ethernet addresses change; the verdict depends on the backend's path.

use lb_common::{BACKEND_F_REDIRECT, Backend, Reason};

use super::{MapsView, XDP_DROP, XDP_REDIRECT, XDP_TX};

/// Writes the backend's MAC as destination and the egress interface's as source.
pub fn set_macs(frame: &mut [u8], dst: &[u8; 6], src: &[u8; 6]) {
    // The parser proved 14 bytes of Ethernet header before anything is forwarded.
    let Some(eth) = frame.get_mut(..12) else {
        panic!("model bug: rewriting a {}-byte frame", frame.len());
    };
    eth[..6].copy_from_slice(dst);
    eth[6..].copy_from_slice(src);
}

/// Same interface: `XDP_TX`. Another one: redirect through `TX_PORTS[id]`, which fails (drop,
/// after the rewrite) when that slot holds no interface.
pub fn verdict(backend_id: u32, backend: &Backend, maps: &impl MapsView) -> (u32, Reason) {
    if backend.flags & BACKEND_F_REDIRECT == 0 {
        (XDP_TX, Reason::Tx)
    } else if maps.tx_port(backend_id) {
        (XDP_REDIRECT, Reason::Redirect)
    } else {
        (XDP_DROP, Reason::DropRedirectFailed)
    }
}
