//! `lb decap --interface IF (--vip ADDR... | --config FILE) [--gue-port N] [--xdp-mode M]`,
//! `lb decap --interface IF --status [--json]`, `lb decap --interface IF --detach`.

use std::{collections::BTreeSet, path::PathBuf, process::ExitCode};

use anyhow::bail;
use lb::{
    config::XdpModeSetting,
    decap::{self, DecapSpec},
};

#[derive(clap::Args)]
pub struct DecapArgs {
    /// The interface the encapsulated packets arrive on.
    #[arg(long, value_name = "IF")]
    pub interface: String,
    /// A VIP to decapsulate for (repeat for several); it is put on `lo`.
    #[arg(long = "vip", value_name = "ADDR", conflicts_with = "config")]
    pub vips: Vec<String>,
    /// A TOML file with `vips = [...]` and optionally `gue_port = N`.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The GUE UDP port (default 6080; overrides the file's `gue_port`).
    #[arg(long, value_name = "N")]
    pub gue_port: Option<u16>,
    /// XDP mode: auto (native, generic on a veth or where the driver cannot), native or skb.
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub xdp_mode: String,
    /// Print the counters, VIPs and host changes instead of attaching.
    #[arg(long, conflicts_with_all = ["detach", "vips", "config", "gue_port"])]
    pub status: bool,
    /// With --status: JSON.
    #[arg(long, requires = "status")]
    pub json: bool,
    /// Remove lb decap from the interface and undo its host changes.
    #[arg(long, conflicts_with_all = ["vips", "config", "gue_port"])]
    pub detach: bool,
}

pub fn decap(args: &DecapArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Every message already carries its cause: the chain would repeat it.
            eprintln!("lb decap: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &DecapArgs) -> anyhow::Result<()> {
    if args.status {
        let status = decap::status(&args.interface)?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&status.to_json())?);
        } else {
            print!("{status}");
        }
        return Ok(());
    }
    if args.detach {
        println!("{}", decap::detach(&args.interface)?);
        return Ok(());
    }
    let mut spec = match &args.config {
        Some(path) => DecapSpec::load(path)?,
        None => {
            if args.vips.is_empty() {
                bail!("name the VIPs: --vip ADDR (repeated) or --config FILE");
            }
            let mut vips = BTreeSet::new();
            for vip in &args.vips {
                vips.insert(decap::config::parse_vip(vip).map_err(anyhow::Error::msg)?);
            }
            DecapSpec {
                vips,
                gue_port: lb_common::decap::DEFAULT_GUE_PORT,
            }
        }
    };
    if let Some(port) = args.gue_port {
        if port == 0 {
            bail!("--gue-port 0 is not a UDP port");
        }
        spec.gue_port = port;
    }
    let mode = match args.xdp_mode.as_str() {
        "auto" => XdpModeSetting::Auto,
        "native" => XdpModeSetting::Native,
        "skb" => XdpModeSetting::Skb,
        other => bail!("--xdp-mode {other:?}: expected auto, native or skb"),
    };
    let report = decap::attach(&args.interface, &spec, mode)?;
    println!("{report}");
    Ok(())
}
