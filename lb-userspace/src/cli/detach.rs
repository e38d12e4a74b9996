//! `lb detach --interface IF`: removes what a stopped `lb run` left on an interface (its XDP
//! link, and with it the program, and its maps, all pinned), in the current network namespace,
//! and withdraws lb's VIP routes through that interface (the node no longer forwards, so it must
//! no longer attract VIP traffic).
//!
//! `lb detach --orphans`: removes every pinned instance whose interface or named network
//! namespace is gone (see `lb::dataplane::pins::orphans`), in the bpffs this process sees; live
//! ones (locked by a daemon, or attached to a live interface) are never touched.

use std::process::ExitCode;

use lb::{
    announce::{self, routes::describe},
    dataplane::{
        detach_interface,
        pins::{
            location,
            orphans::{self, OrphanOutcome},
        },
    },
    net::{NetError, NetlinkHandle},
};

/// One line on stdout saying what was removed (or that nothing was there), a line per withdrawn
/// route, exit 0; the error on stderr and exit 1 (an `lb run` still holding the interface, or a
/// bpffs or netlink error).
pub fn detach(interface: &str) -> ExitCode {
    match detach_interface(interface) {
        Ok(report) => println!("{report}"),
        Err(e) => {
            eprintln!("lb detach: {e}");
            return ExitCode::FAILURE;
        }
    }
    match withdraw_routes(interface) {
        Ok(withdrawn) => {
            for route in withdrawn {
                println!("withdrew route {}", describe(&route));
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb detach: withdrawing lb's routes via {interface}: {e}");
            ExitCode::FAILURE
        }
    }
}

fn withdraw_routes(interface: &str) -> Result<Vec<announce::LbRoute>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the tokio runtime: {e}"))?;
    runtime.block_on(async {
        let netlink = NetlinkHandle::new().map_err(|e| e.to_string())?;
        let index = match netlink.interface_by_name(interface).await {
            Ok(found) => found.index,
            // The kernel removed the interface's routes with it.
            Err(NetError::NoSuchInterface { .. }) => return Ok(Vec::new()),
            Err(e) => return Err(e.to_string()),
        };
        announce::withdraw_routes_via(&netlink, index)
            .await
            .map_err(|e| e.to_string())
    })
}

/// A line per orphan removed (`removed orphan DIR (what is gone, N MB freed): ...`) or left alone
/// (`skipped DIR: why`, on stderr); `no orphaned pinned state` when there is none. Exit 1 when a
/// removal failed.
pub fn detach_orphans() -> ExitCode {
    let root = match location::bpffs_root(false) {
        Ok(Some(root)) => root,
        Ok(None) => {
            println!("no bpffs here: no orphaned pinned state");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("lb detach --orphans: {e}");
            return ExitCode::FAILURE;
        }
    };
    // `lb decap`'s instances are laid out like the balancer's, beside them.
    let mut outcomes = orphans::detach_orphans(&root.join(location::TOP));
    outcomes.extend(orphans::detach_orphans(&root.join(location::DECAP_TOP)));
    if outcomes.is_empty() {
        println!("no orphaned pinned state");
    }
    let mut failed = false;
    for outcome in outcomes {
        match outcome {
            OrphanOutcome::Removed { orphan, report } => println!(
                "removed orphan {} ({}; {} freed): {} pinned maps{}",
                orphan.dir,
                orphan.what_is_gone(),
                orphans::megabytes(orphan.memory_bytes),
                report.pins.len(),
                if report.link {
                    " and the defunct XDP link"
                } else {
                    ""
                }
            ),
            OrphanOutcome::Skipped { orphan, why } => {
                eprintln!("skipped {}: {why}", orphan.dir);
            }
            OrphanOutcome::Failed { orphan, error } => {
                eprintln!("lb detach --orphans: {}: {error}", orphan.dir);
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
