//! Attaching the program: the XDP mode the config asks for, with `auto`'s fallback.

use tracing::{info, warn};

use super::RunError;
use crate::{
    config::XdpModeSetting,
    dataplane::{AttachMode, DataPlane, DataPlaneError},
    net::Interface,
};

/// Attaches as the config asks. `auto` tries native first and falls back to generic (skb) XDP;
/// on a veth it takes generic at once: native `XDP_TX` into a veth is only delivered when the
/// peer runs an XDP program, and frames from local sockets keep an unfinished checksum (DESIGN.md
/// §5), two surprises generic mode does not have.
pub(super) fn attach(
    dataplane: &mut DataPlane,
    interface: &Interface,
    setting: XdpModeSetting,
) -> Result<AttachMode, RunError> {
    let native = || AttachMode::Native;
    match setting {
        XdpModeSetting::Native => dataplane.attach(&interface.name, interface.index, native())?,
        XdpModeSetting::Skb => {
            dataplane.attach(&interface.name, interface.index, AttachMode::Skb)?
        }
        XdpModeSetting::Auto if interface.kind.as_deref() == Some("veth") => {
            info!(
                "{} is a veth: using generic (skb) XDP, which needs nothing from the peer; \
                 xdp_mode = \"native\" forces native XDP (then the peer must run an XDP program \
                 and local senders need `ethtool -K <if> tx off`; see README, \"Containers and veth\")",
                interface.name
            );
            dataplane.attach(&interface.name, interface.index, AttachMode::Skb)?;
            return Ok(AttachMode::Skb);
        }
        XdpModeSetting::Auto => {
            if let Err(e) = dataplane.attach(&interface.name, interface.index, native()) {
                if matches!(e, DataPlaneError::AlreadyAttached { .. }) {
                    return Err(e.into());
                }
                warn!(
                    "native XDP on {} failed ({}); falling back to generic (skb) mode",
                    interface.name,
                    error_chain(&e)
                );
                dataplane.attach(&interface.name, interface.index, AttachMode::Skb)?;
                return Ok(AttachMode::Skb);
            }
        }
    }
    Ok(match setting {
        XdpModeSetting::Skb => AttachMode::Skb,
        XdpModeSetting::Native | XdpModeSetting::Auto => AttachMode::Native,
    })
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so big rings load there too.
/// Newer kernels charge the memory cgroup instead, so failing here is only worth a debug line.
pub(super) fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass and has no other effect on memory.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK ({}); only kernels before 5.11 need it",
            std::io::Error::last_os_error()
        );
    }
}

/// `error: cause: cause` on one line.
fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
