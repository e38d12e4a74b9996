//! L2 direct server return: only the Ethernet addresses change. The IP packet is untouched, so
//! there is no checksum to fix; the backend owns the VIP on a loopback and replies directly.

use aya_ebpf::programs::XdpContext;
use lb_common::Backend;
use network_types::eth::EthHdr;

/// Sets destination and source MAC to the backend's; false if the frame has no Ethernet
/// header.
///
/// Copied as six 16-bit words: a `[u8; 6]` assignment becomes a call to a byte-by-byte
/// `memcpy` in BPF (two calls and twelve loop turns per packet). Both MACs of the record sit at
/// even offsets (16 and 22), and the frame's are at 0 and 6, so every access is 2-byte aligned.
#[inline(always)]
pub fn set_macs(ctx: &XdpContext, backend: &Backend) -> bool {
    let start = ctx.data();
    if start + EthHdr::LEN > ctx.data_end() {
        return false;
    }
    let from = backend.dst_mac.as_ptr() as *const u16;
    let to = start as *mut u16;
    // SAFETY: the frame holds the 14-byte Ethernet header (checked above) and XDP frames are
    // writable; `dst_mac` and `src_mac` are adjacent in the `repr(C)` record (offsets 16..28,
    // asserted in lb-common), so words 0..6 from `dst_mac` are the two MACs.
    // Volatile, so LLVM does not fold the six copies back into a `memcpy` call.
    unsafe {
        core::ptr::write_volatile(to, core::ptr::read_volatile(from));
        core::ptr::write_volatile(to.add(1), core::ptr::read_volatile(from.add(1)));
        core::ptr::write_volatile(to.add(2), core::ptr::read_volatile(from.add(2)));
        core::ptr::write_volatile(to.add(3), core::ptr::read_volatile(from.add(3)));
        core::ptr::write_volatile(to.add(4), core::ptr::read_volatile(from.add(4)));
        core::ptr::write_volatile(to.add(5), core::ptr::read_volatile(from.add(5)));
    }
    true
}
