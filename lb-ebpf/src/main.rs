//! The XDP data plane of the load balancer.
//!
//! parse (headers → 5-tuple) → VIP lookup (a direct-mapped index, the hash map on a collision)
//! → ring slot (owner, prior) → flow table only where needed (changed TCP slots, UDP) → L2 DSR
//! rewrite, or IPIP/GUE encapsulation to a routed backend → `XDP_TX` / redirect.
//! Anything that is not a VIP or cannot be parsed is `XDP_PASS`ed untouched: the program must
//! never break the host's own traffic.
#![no_std]
#![no_main]

mod balance;
mod counters;
mod decap;
mod encap;
mod events;
mod maps;
mod parse;
mod rewrite;
mod vips;
mod wire;

use crate::parse::Parsed;
use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};

/// Ring size M. Read-only global, set by the daemon at load time (`EbpfLoader::set_global`); the
/// non-zero default keeps it in `.rodata`, where the verifier treats it as a known constant.
#[unsafe(no_mangle)]
static RING_SIZE: u32 = lb_common::DEFAULT_RING_SIZE;

/// `ring_size_inverse(RING_SIZE)`, set with it (see `lb_common::ring_index`).
#[unsafe(no_mangle)]
static RING_SIZE_INVERSE: u64 = lb_common::ring_size_inverse(lb_common::DEFAULT_RING_SIZE);

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    let (verdict, reason) = match parse::parse(&ctx) {
        Parsed::Flow(packet) => balance::forward(&ctx, &packet),
        Parsed::Pass(reason) => (xdp_action::XDP_PASS, reason),
    };
    // A forward was counted on its backend (see `counters`).
    if !reason.is_forwarded() {
        counters::count_reason(reason, parse::frame_len(&ctx));
    }
    verdict
}

/// A program that passes everything. A frame sent with native `XDP_TX` or redirect into a veth is
/// only delivered when the veth's peer runs an XDP program; tests and container set-ups attach
/// this one there.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable by construction (no unwrap, no indexing, no division by an unproven value); the
    // verifier would reject the program if any path led here.
    loop {}
}
