//! What a pinned link is attached to. aya's `LinkInfo` gives the link's id and program but not
//! the XDP interface, so the pin is opened and `BPF_OBJ_GET_INFO_BY_FD` asked directly.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_cmd, bpf_link_info, bpf_link_type};

/// The kernel's view of a link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkFacts {
    pub id: u32,
    pub program_id: u32,
    /// `Some(ifindex)` for an XDP link; 0 once its interface is gone (the link is defunct).
    pub xdp_ifindex: Option<u32>,
}

/// `BPF_OBJ_GET` attributes (the leading fields of `union bpf_attr`; the kernel zero-fills the
/// rest). The padding is explicit: the kernel refuses (EINVAL) any non-zero byte after the
/// command's last field, and implicit padding is not guaranteed to be zero.
#[repr(C)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `BPF_OBJ_GET_INFO_BY_FD` attributes.
#[repr(C)]
struct InfoByFdAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

pub(crate) fn bpf<T>(cmd: bpf_cmd, attr: &mut T) -> io::Result<i64> {
    // SAFETY: `attr` is a live, initialised `#[repr(C)]` prefix of `union bpf_attr` for `cmd`,
    // and its size is passed along, so the kernel reads (and writes) only inside it. Pointers in
    // it point to memory the caller keeps alive for the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            std::ptr::from_mut(attr),
            size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the BPF object pinned at `path`.
pub(crate) fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    let mut attr = ObjGetAttr {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    let fd = bpf(bpf_cmd::BPF_OBJ_GET, &mut attr)?;
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("fd out of range"))?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the link pinned at `path` is: its ids and, for XDP, its interface.
pub fn pinned_link_facts(path: &Path) -> io::Result<LinkFacts> {
    let fd = obj_get(path)?;
    // SAFETY: `bpf_link_info` is plain data (integers and unions of integers): all zeroes is a
    // valid value.
    let mut info: bpf_link_info = unsafe { std::mem::zeroed() };
    let mut attr = InfoByFdAttr {
        bpf_fd: u32::try_from(fd.as_raw_fd()).map_err(|_| io::Error::other("negative fd"))?,
        info_len: size_of::<bpf_link_info>() as u32,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    bpf(bpf_cmd::BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    let xdp_ifindex = if info.type_ == bpf_link_type::BPF_LINK_TYPE_XDP as u32 {
        // SAFETY: for an XDP link the kernel fills the union's `xdp` member; every bit pattern
        // is a valid u32 anyway.
        Some(unsafe { info.__bindgen_anon_1.xdp.ifindex })
    } else {
        None
    };
    Ok(LinkFacts {
        id: info.id,
        program_id: info.prog_id,
        xdp_ifindex,
    })
}
