//! Why `lb decap` failed. Each message carries its cause's text (callers print `{}`, not the
//! source chain).

use std::{io, path::PathBuf};

use crate::{config::ConfigError, dataplane::PinError, net::NetError};

#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(
        "no bpffs to pin in (mount one: `mount -t bpf bpf /sys/fs/bpf`); `lb decap` must pin to outlive its command"
    )]
    NoBpffs,
    #[error("the embedded XDP object is empty (built with AYA_BUILD_SKIP=1?)")]
    NoObject,
    #[error("loading the XDP object: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("the XDP object has no program {0:?}")]
    MissingProgram(&'static str),
    #[error("program lb_decap: {0}")]
    Program(#[source] aya::programs::ProgramError),
    #[error("attaching lb_decap to {interface} ({mode} XDP): {source}")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error(
        "another XDP program is attached to {interface}; lb decap cannot share it (is `lb run` balancing on it?)"
    )]
    AlreadyAttached { interface: String },
    #[error("map {map} pinned in {}: {source}", dir.display())]
    Map {
        map: &'static str,
        dir: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {message}")]
    Ip { command: String, message: String },
    #[error("lb decap is not attached to {interface} (nothing pinned in {})", dir.display())]
    NotAttached { interface: String, dir: PathBuf },
    #[error("at most {max} VIPs can be decapsulated, {given} given")]
    TooManyVips { max: u32, given: usize },
}
