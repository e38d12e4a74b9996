//! Reading and pruning the `FLOWS` table in bulk, for the daemon's flow sweep: one
//! `BPF_MAP_LOOKUP_BATCH` per few thousand entries instead of two syscalls per entry (a
//! 100,000-entry table is read in milliseconds, not in a second of the daemon's loop).

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::{HashMap, IterableMap, MapData};
use lb_common::{FlowKey, FlowState};

use super::error::DataPlaneError;

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// Entries per batch call. Larger than any hash bucket can get, so the kernel never answers
/// ENOSPC (a bucket that does not fit the buffer).
const BATCH: usize = 4096;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The kernel clock the data plane stamps flows with (`bpf_ktime_get_coarse_ns`, i.e.
/// `CLOCK_MONOTONIC_COARSE`), in nanoseconds.
pub fn kernel_now_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; the clock id is a constant the kernel knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now) };
    debug_assert_eq!(rc, 0, "CLOCK_MONOTONIC_COARSE is always available on Linux");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The `BPF_MAP_*_ELEM` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<A>(command: libc::c_long, attr: &mut A) -> std::io::Result<()> {
    // SAFETY: `attr` is a live `bpf_attr` member of the size passed; the caller made its
    // pointers describe buffers of `count` keys (and values) of the map's sizes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            command,
            attr as *mut A,
            size_of::<A>() as u32,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn batch_error(source: std::io::Error) -> DataPlaneError {
    DataPlaneError::FlowBatch(source)
}

/// Every entry of the flow table, read in batches. Entries the data plane adds or removes
/// meanwhile may or may not be seen (as with any walk of a live hash map).
pub fn read_flows(
    flows: &HashMap<MapData, FlowKey, FlowState>,
) -> Result<Vec<(FlowKey, FlowState)>, DataPlaneError> {
    let fd = IterableMap::map(flows).fd().as_fd().as_raw_fd() as u32;
    let zero_key: FlowKey = bytemuck::Zeroable::zeroed();
    let zero_state: FlowState = bytemuck::Zeroable::zeroed();
    let mut keys = vec![zero_key; BATCH];
    let mut values = vec![zero_state; BATCH];
    let mut entries = Vec::new();
    let mut token: u32 = 0;
    let mut first = true;
    loop {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &token as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd,
            ..Default::default()
        };
        let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let got = (attr.count as usize).min(BATCH);
        entries.extend(
            keys[..got]
                .iter()
                .copied()
                .zip(values[..got].iter().copied()),
        );
        match result {
            Ok(()) => {}
            // The walk is over (the last batch may still have carried entries).
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(entries),
            Err(e) => return Err(batch_error(e)),
        }
        token = next;
        first = false;
    }
}

/// Writes `keys` with `values` into the flow table behind `fd` (a raw descriptor, so threads
/// pinned to each CPU can fill their CPU's LRU list): `BPF_MAP_UPDATE_BATCH`, one entry at a time
/// where the kernel has no batch support for the map.
pub fn write_flows(
    fd: std::os::fd::RawFd,
    keys: &[FlowKey],
    values: &[FlowState],
) -> Result<(), DataPlaneError> {
    assert_eq!(keys.len(), values.len(), "a value per key");
    for (keys, values) in keys.chunks(65_536).zip(values.chunks(65_536)) {
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: keys.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let error = match bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
            Ok(()) => continue,
            Err(e) => e,
        };
        // 524: ENOTSUPP, the kernel's own "not supported" (no batch ops for this map).
        if !matches!(
            error.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP | 524)
        ) {
            return Err(batch_error(error));
        }
        let done = (attr.count as usize).min(keys.len());
        for (key, value) in keys.iter().zip(values).skip(done) {
            let mut attr = ElemAttr {
                map_fd: fd as u32,
                key: key as *const FlowKey as u64,
                value: value as *const FlowState as u64,
                ..Default::default()
            };
            bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map_err(batch_error)?;
        }
    }
    Ok(())
}

/// Deletes `keys` from the flow table; keys already gone are skipped. Returns how many were
/// deleted.
pub fn delete_flows(
    flows: &mut HashMap<MapData, FlowKey, FlowState>,
    keys: &[FlowKey],
) -> Result<usize, DataPlaneError> {
    let fd = IterableMap::map(flows).fd().as_fd().as_raw_fd() as u32;
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(BATCH)];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd,
            ..Default::default()
        };
        match bpf(BPF_MAP_DELETE_BATCH, &mut attr) {
            Ok(()) => {
                deleted += chunk.len();
                rest = &rest[chunk.len()..];
            }
            // The kernel stops at the first key that is gone (the data plane's LRU evicted
            // it): `count` says how many went before it; skip that key and go on.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let done = (attr.count as usize).min(chunk.len());
                deleted += done;
                rest = &rest[(done + 1).min(rest.len())..];
            }
            Err(e) => return Err(batch_error(e)),
        }
    }
    Ok(deleted)
}
