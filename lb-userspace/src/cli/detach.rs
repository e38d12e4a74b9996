//! `lb detach --interface IF`: removes what a stopped `lb run` left pinned on an interface (its
//! XDP link, and with it the program, and its maps), in the current network namespace.

use std::process::ExitCode;

use lb::dataplane::detach_interface;

/// One line on stdout saying what was removed (or that nothing was there), exit 0; the error on
/// stderr and exit 1 (an `lb run` still holding the interface, or a bpffs error).
pub fn detach(interface: &str) -> ExitCode {
    match detach_interface(interface) {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb detach: {e}");
            ExitCode::FAILURE
        }
    }
}
