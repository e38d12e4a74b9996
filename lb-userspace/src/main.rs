//! `lb`: the XDP load balancer's command line.

mod cli;

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use cli::control::{AdminArgs, ApiArgs};
use lb::api::model::Admin;
use lb::config::Config;

#[derive(Parser)]
#[command(
    name = "lb",
    version,
    about = "Layer-4 XDP load balancer with L2 direct server return"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How log lines on stderr look: `text` for people, `json` (one object per line) for log
    /// collectors.
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        default_value_t = LogFormat::Text,
        global = true
    )]
    log_format: LogFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program onto the configured interface and balance until SIGINT/SIGTERM;
    /// SIGHUP re-reads the config.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config: exit 0, or print `FILE:LINE:COL: what is wrong` and exit 1.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Show every VIP (address, active pool, counters) and backend (pool, state, weight, last
    /// check, counters) of the running daemon.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        /// Print the daemon's JSON report (pretty-printed) instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Drain a backend: weight 0, so no new flows; existing flows stay on it.
    Drain(AdminArgs),
    /// Disable a backend: forced down whatever its health checks say; its flows move.
    Disable(AdminArgs),
    /// Enable a drained or disabled backend: back to its health checks' verdict.
    Enable(AdminArgs),
    /// Make the running daemon re-read its config file (as SIGHUP does) and apply only the
    /// difference; an invalid file is refused and the old config keeps running.
    Reload {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Remove lb's XDP program, link and pinned maps from an interface (after `lb run` has
    /// stopped), or with `--orphans` every pinned instance whose interface or network namespace
    /// is gone.
    Detach {
        #[arg(
            long,
            value_name = "IF",
            required_unless_present = "orphans",
            conflicts_with = "orphans"
        )]
        interface: Option<String>,
        /// Remove every orphaned pinned instance (its XDP link defunct, or its named network
        /// namespace gone); never a live one.
        #[arg(long)]
        orphans: bool,
    },
    /// Decapsulate the balancer's IPIP/GUE packets for the given VIPs on a backend, with no
    /// tunnel device (an XDP program, pinned); `--detach` removes it, `--status` shows it.
    Decap(cli::decap::DecapArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { config } => check_config(&config),
        Command::Status { api, json } => cli::control::status(&api, json),
        Command::Drain(args) => cli::control::set_admin(&args, Admin::Drained),
        Command::Disable(args) => cli::control::set_admin(&args, Admin::Disabled),
        Command::Enable(args) => cli::control::set_admin(&args, Admin::Enabled),
        Command::Reload { api } => cli::control::reload(&api),
        Command::Detach {
            interface: Some(interface),
            ..
        } => cli::detach::detach(&interface),
        Command::Detach {
            interface: None, ..
        } => cli::detach::detach_orphans(),
        Command::Decap(args) => cli::decap::decap(&args),
        Command::Run { config } => {
            init_logging(cli.log_format);
            match run(&config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn check_config(path: &std::path::Path) -> ExitCode {
    match Config::load(path) {
        Ok(config) => {
            let backends: usize = config.vips.iter().map(|v| v.backends.len()).sum();
            println!(
                "{}: ok ({} VIPs, {backends} backends)",
                path.display(),
                config.vips.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let snapshot = runtime.block_on(lb::daemon::run(config, path))?;
    print!("final counters\n{snapshot}");
    Ok(())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => {
            // Colours only on a terminal: journald and log files get plain text.
            let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
            builder.with_ansi(ansi).init();
        }
        // One JSON object per line: `{"timestamp":..,"level":"INFO","fields":{"message":..},
        // "target":..}`. Never coloured.
        LogFormat::Json => builder.json().with_ansi(false).init(),
    }
}
