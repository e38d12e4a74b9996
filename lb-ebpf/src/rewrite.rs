//! L2 direct server return: only the Ethernet addresses change. The IP packet is untouched, so
//! there is no checksum to fix; the backend owns the VIP on a loopback and replies directly.

use aya_ebpf::programs::XdpContext;
use network_types::eth::EthHdr;

/// Sets destination and source MAC; false if the frame has no Ethernet header.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, dst: &[u8; 6], src: &[u8; 6]) -> bool {
    let start = ctx.data();
    if start + EthHdr::LEN > ctx.data_end() {
        return false;
    }
    let eth = start as *mut EthHdr;
    // SAFETY: bounds-checked just above; XDP frames are writable.
    unsafe {
        (*eth).dst_addr = *dst;
        (*eth).src_addr = *src;
    }
    true
}
