//! Attaching an XDP program from an object file to an interface inside a namespace.

use anyhow::{Context, Result};
use aya::programs::Xdp;
use aya::programs::xdp::XdpMode;
use aya::{Ebpf, EbpfLoader};

use crate::netns::NetNs;

/// Loads `program_object`, loads its XDP program `program_name` and attaches it to `interface`
/// inside `namespace` in `mode`. The attachment lasts as long as the returned `Ebpf` lives.
///
/// Runs on a thread that has entered `namespace`, because aya resolves the interface name with
/// `if_nametoindex` in the calling thread's namespace. Every map of the object is created (not
/// pinned, unless the object asks for pinning by name), so this suits small objects or ones whose
/// maps are not huge.
pub fn attach_xdp_program(
    namespace: &NetNs,
    interface: &str,
    program_object: &[u8],
    program_name: &str,
    mode: XdpMode,
) -> Result<Ebpf> {
    let attached = namespace.try_run(|| -> Result<Ebpf> {
        let mut ebpf = EbpfLoader::new()
            .load(program_object)
            .context("cannot load the eBPF object")?;
        let program: &mut Xdp = ebpf
            .program_mut(program_name)
            .with_context(|| format!("the object has no program {program_name:?}"))?
            .try_into()
            .with_context(|| format!("program {program_name:?} is not an XDP program"))?;
        program
            .load()
            .with_context(|| format!("the kernel rejected program {program_name:?}"))?;
        program
            .attach(interface, mode)
            .with_context(|| format!("cannot attach {program_name:?} to {interface} ({mode:?})"))?;
        Ok(ebpf)
    })?;
    attached.with_context(|| {
        format!(
            "attaching XDP program {program_name:?} to {}/{interface}",
            namespace.name()
        )
    })
}
