//! Reference XDP programs for benchmarks, built as their own object (`lb-bench-progs`) so the
//! production object carries nothing but the load balancer.
//!
//! - `bench_pass`: returns XDP_PASS; the "trivial program" subtracted from per-packet costs.
//! - `bench_reflect`: swaps the Ethernet addresses and returns XDP_TX: the floor for any L2
//!   forwarder, and the "reflector" throughput baseline.
//! - `bench_drop`: counts and drops: the sink of throughput runs.
//! - `bench_gen`: traffic generator for live-frames test runs: gives each frame a new UDP/TCP
//!   source port (so every packet is a new flow) and sends it with XDP_TX.
//! - `bench_fib`: the next hop by `bpf_fib_lookup` per packet (the way issue 13 did not take):
//!   looks the IPv4 destination up, writes the MACs it returns and sends the frame with XDP_TX;
//!   the helper's return code goes to `BENCH_COUNTERS[2]`, so the bench knows which path it timed.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{bpf_fib_lookup, xdp_action},
    helpers::bpf_fib_lookup,
    macros::{map, xdp},
    maps::PerCpuArray,
    programs::XdpContext,
};

/// Slot 0: packets seen by `bench_drop`. Slot 1: frames sent by `bench_gen`. Slot 2: the last
/// return code of `bench_fib`'s lookup.
#[map]
static BENCH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(3, 0);

const ETH_LEN: usize = 14;

#[inline(always)]
fn bump(slot: u32) -> u64 {
    match BENCH_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it.
        Some(counter) => unsafe {
            *counter += 1;
            *counter
        },
        None => 0,
    }
}

#[xdp]
pub fn bench_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[xdp]
pub fn bench_reflect(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + ETH_LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    let eth = start as *mut [u8; 12];
    // SAFETY: the 14-byte Ethernet header is inside the frame (checked above).
    let addresses = unsafe { *eth };
    let [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5] = addresses;
    // SAFETY: as above; XDP frames are writable.
    unsafe { *eth = [s0, s1, s2, s3, s4, s5, d0, d1, d2, d3, d4, d5] };
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    bump(0);
    xdp_action::XDP_DROP
}

/// Offset of the L4 source port in an untagged IPv4 frame without options.
const SPORT_OFFSET: usize = ETH_LEN + 20;

#[xdp]
pub fn bench_gen(ctx: XdpContext) -> u32 {
    let sent = bump(1);
    let start = ctx.data();
    if start + SPORT_OFFSET + 2 > ctx.data_end() {
        return xdp_action::XDP_TX;
    }
    // Live frames keep what the program wrote, so each run sees the previous port: rewriting it
    // from the counter gives every frame a new flow. The UDP checksum is left zero (allowed for
    // IPv4), so no checksum work is needed.
    let port = (sent as u16) | 0x400;
    let sport = (start + SPORT_OFFSET) as *mut [u8; 2];
    // SAFETY: bounds-checked above.
    unsafe { *sport = port.to_be_bytes() };
    xdp_action::XDP_TX
}

const AF_INET: u8 = 2;

#[xdp]
pub fn bench_fib(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + ETH_LEN + 20 > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: all-zero is a valid `bpf_fib_lookup` (integers and integer unions).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    // SAFETY: the IPv4 header's first 20 bytes are inside the frame (checked above); the
    // addresses are read as they are on the wire; `ctx.ctx` is the program's `xdp_md`.
    unsafe {
        let ip = start + ETH_LEN;
        params.l4_protocol = *((ip + 9) as *const u8);
        params.__bindgen_anon_1.tot_len = u16::from_be(*((ip + 2) as *const u16));
        params.__bindgen_anon_3.ipv4_src = core::ptr::read_unaligned((ip + 12) as *const u32);
        params.__bindgen_anon_4.ipv4_dst = core::ptr::read_unaligned((ip + 16) as *const u32);
        params.ifindex = (*ctx.ctx).ingress_ifindex;
    }
    // SAFETY: `params` is a live, correctly sized struct; `ctx.ctx` is the program's context.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut params,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            0,
        )
    };
    if let Some(slot) = BENCH_COUNTERS.get_ptr_mut(2) {
        // SAFETY: per-CPU slot from a successful lookup; only this CPU writes it.
        unsafe { *slot = rc as u64 };
    }
    let eth = start as *mut [u8; 12];
    let [d0, d1, d2, d3, d4, d5] = params.dmac;
    let [s0, s1, s2, s3, s4, s5] = params.smac;
    // SAFETY: the Ethernet header is inside the frame (checked above); XDP frames are writable.
    unsafe { *eth = [d0, d1, d2, d3, d4, d5, s0, s1, s2, s3, s4, s5] };
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
