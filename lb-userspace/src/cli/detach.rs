//! `lb detach --interface IF`: removes what a stopped `lb run` left on an interface (its XDP
//! link, and with it the program, and its maps, all pinned), in the current network namespace,
//! and withdraws lb's VIP routes through that interface (the node no longer forwards, so it must
//! no longer attract VIP traffic).

use std::process::ExitCode;

use lb::{
    announce::{self, routes::describe},
    dataplane::detach_interface,
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
