//! The `RINGS` map, memory-mapped: writing a 65537-slot Maglev table is one pass over shared
//! memory instead of one `bpf()` syscall per slot. Consistency comes from double-buffering: the
//! daemon only writes a VIP's inactive table and then flips `VipInfo::active_ring` with a map
//! update (a syscall, hence a full barrier), so the XDP program never reads a table being written.

use std::{num::NonZeroUsize, os::fd::AsFd, ptr::NonNull};

use lb_common::RingSlot;
use nix::sys::mman::{MapFlags, ProtFlags, mmap, munmap};

use super::error::DataPlaneError;

pub struct RingMemory {
    base: NonNull<RingSlot>,
    len_bytes: NonZeroUsize,
    ring_size: u32,
    tables: u32,
}

// SAFETY: the mapping is owned by this struct and only accessed through `&mut self` for writes;
// the kernel side synchronises through the double-buffer protocol described above.
unsafe impl Send for RingMemory {}
// SAFETY: shared access only reads.
unsafe impl Sync for RingMemory {}

impl RingMemory {
    /// Maps the `RINGS` array (`tables * ring_size` slots) of the map behind `fd`.
    pub fn map(fd: impl AsFd, ring_size: u32, tables: u32) -> Result<Self, DataPlaneError> {
        let slots = ring_size as usize * tables as usize;
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (slots * size_of::<RingSlot>()).div_ceil(page) * page;
        let len_bytes = NonZeroUsize::new(bytes).ok_or_else(|| {
            DataPlaneError::RingMmap(std::io::Error::other("ring map has no slots"))
        })?;
        // SAFETY: mapping a BPF array created with BPF_F_MMAPABLE: the kernel backs it with
        // `bytes` (page-rounded) of memory that lives as long as the map, which outlives this
        // mapping because the mapping itself holds a reference to the map.
        let base = unsafe {
            mmap(
                None,
                len_bytes,
                ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
                MapFlags::MAP_SHARED,
                fd,
                0,
            )
        }
        .map_err(|errno| DataPlaneError::RingMmap(errno.into()))?;
        Ok(Self {
            base: base.cast(),
            len_bytes,
            ring_size,
            tables,
        })
    }

    pub fn ring_size(&self) -> u32 {
        self.ring_size
    }

    fn table_ptr(&self, table: u32) -> Result<*mut RingSlot, DataPlaneError> {
        if table >= self.tables {
            return Err(DataPlaneError::OutOfRange {
                what: "ring table",
                index: table,
                capacity: self.tables,
            });
        }
        // SAFETY: `table < tables`, so the offset stays inside the mapping.
        Ok(unsafe {
            self.base
                .as_ptr()
                .add(table as usize * self.ring_size as usize)
        })
    }

    /// Writes a whole table. `slots` must hold exactly `ring_size` slots.
    pub fn write_table(&mut self, table: u32, slots: &[RingSlot]) -> Result<(), DataPlaneError> {
        assert_eq!(
            slots.len(),
            self.ring_size as usize,
            "Maglev table of the wrong size"
        );
        let ptr = self.table_ptr(table)?;
        // SAFETY: `ptr` starts a run of `ring_size` slots inside the mapping (checked in
        // `table_ptr`); we hold `&mut self`, so no other userspace writer exists. The XDP program
        // does not read this table until the VIP record flips to it.
        let table = unsafe { std::slice::from_raw_parts_mut(ptr, slots.len()) };
        table.copy_from_slice(slots);
        Ok(())
    }

    /// A whole table, to write in place. Only for a table the XDP program does not read (a VIP's
    /// inactive table), as with [`RingMemory::write_table`].
    pub fn table_mut(&mut self, table: u32) -> Result<&mut [RingSlot], DataPlaneError> {
        let ptr = self.table_ptr(table)?;
        // SAFETY: as in `write_table`: `ring_size` slots inside the mapping, and `&mut self`
        // for as long as the slice lives, so no other userspace writer exists.
        Ok(unsafe { std::slice::from_raw_parts_mut(ptr, self.ring_size as usize) })
    }

    /// Changes one slot of a table the XDP program may be reading: one aligned 8-byte store, so
    /// a reader sees the old slot or the new one, never half of each.
    pub fn write_slot(
        &mut self,
        table: u32,
        index: u32,
        slot: RingSlot,
    ) -> Result<(), DataPlaneError> {
        if index >= self.ring_size {
            return Err(DataPlaneError::OutOfRange {
                what: "ring slot",
                index,
                capacity: self.ring_size,
            });
        }
        let ptr = self.table_ptr(table)?;
        let word = u64::from(slot.owner) | (u64::from(slot.prior) << 32);
        // SAFETY: `index < ring_size`, so the slot is inside the table (and the mapping); the
        // mapping is page-aligned and slots are 8 bytes, so the slot is 8-byte aligned and the
        // atomic store is a single instruction. `RingSlot` is `repr(C)` with `owner` first, on
        // a little-endian layout (x86-64, aarch64).
        unsafe {
            let slot_ptr = ptr
                .add(index as usize)
                .cast::<std::sync::atomic::AtomicU64>();
            (*slot_ptr).store(word, std::sync::atomic::Ordering::Release);
        }
        Ok(())
    }

    /// Reads a whole table back (for adoption, tests and `lb status`).
    pub fn read_table(&self, table: u32) -> Result<Vec<RingSlot>, DataPlaneError> {
        let ptr = self.table_ptr(table)?;
        // SAFETY: as in `write_table`; reads of plain integers.
        let table = unsafe { std::slice::from_raw_parts(ptr, self.ring_size as usize) };
        Ok(table.to_vec())
    }
}

impl Drop for RingMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped; no references into it outlive `self`.
        if let Err(errno) = unsafe { munmap(self.base.cast(), self.len_bytes.get()) } {
            tracing::warn!("munmap of RINGS failed: {errno}");
        }
    }
}
