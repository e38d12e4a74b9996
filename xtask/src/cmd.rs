//! Running commands and describing them to the operator.

use std::env;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus, Output};

use anyhow::{Context, Result, bail};

/// The environment variable the lb-userspace build script reads to pick the eBPF toolchain.
pub const EBPF_TOOLCHAIN_ENV: &str = "LB_EBPF_TOOLCHAIN";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// The directory cargo builds into, honouring `CARGO_TARGET_DIR`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// The cargo that runs us (`CARGO` is set by `cargo run`), else `cargo` from PATH.
pub fn cargo_program() -> OsString {
    env::var_os("CARGO").unwrap_or_else(|| "cargo".into())
}

/// A cargo command at the workspace root with the chosen eBPF toolchain in its environment.
pub fn cargo(ebpf_toolchain: &str) -> Command {
    let mut cmd = Command::new(cargo_program());
    cmd.current_dir(workspace_root())
        .env(EBPF_TOOLCHAIN_ENV, ebpf_toolchain);
    cmd
}

/// Whether we run as root (installs, mounts, namespaces and XDP need it).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Fails, telling the operator the exact commands to run, unless we are root.
pub fn require_root(what: &str, commands: &[String]) -> Result<()> {
    if is_root() {
        return Ok(());
    }
    let with_sudo: Vec<_> = commands.iter().map(|c| format!("sudo {c}")).collect();
    bail!(
        "{what} needs root: run `{}` yourself, or run `cargo xtask setup` as root",
        with_sudo.join(" && ")
    )
}

/// Whether an executable called `name` is on PATH.
pub fn on_path(name: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|path| env::split_paths(&path).any(|dir| dir.join(name).is_file()))
}

/// Runs `cmd` with inherited stdio; an error if it cannot start or fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = status(cmd)?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Runs `cmd` with inherited stdio and returns its exit status.
pub fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Runs `cmd` capturing its output, whatever its exit status.
pub fn capture(cmd: &mut Command) -> Result<Output> {
    cmd.output()
        .with_context(|| format!("could not start `{}`", display(cmd)))
}

/// Trimmed stdout of `cmd` if it starts and succeeds; `None` otherwise (for probes).
pub fn probe(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok().filter(|out| out.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The exit code a shell would report for `status` (128 + signal when killed).
pub fn exit_code(status: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|sig| 128 + sig))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `cmd` as an operator would type it: environment overrides, then program and arguments.
pub fn display(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        let value = value?;
        Some(format!(
            "{}={}",
            key.to_string_lossy(),
            env_value(key, value)
        ))
    });
    // `cargo run` sets CARGO to the toolchain's cargo binary: show it as plain `cargo`.
    let program = if env::var_os("CARGO").is_some_and(|c| c == cmd.get_program()) {
        OsStr::new("cargo")
    } else {
        cmd.get_program()
    };
    let words = std::iter::once(program).chain(cmd.get_args()).map(quote);
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

/// An environment value, with the current PATH abbreviated to `$PATH` in a PATH override.
fn env_value(key: &OsStr, value: &OsStr) -> String {
    let value = value.to_string_lossy();
    if key == "PATH"
        && let Some(current) = env::var_os("PATH")
        && let Some(prefix) = value.strip_suffix(&*current.to_string_lossy())
    {
        return format!("{prefix}$PATH");
    }
    quote(OsStr::new(&*value))
}

/// Quotes a word for a POSIX shell when it needs it.
fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-./=:@+,%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Builds the release `lb` and the `tests` crate's binaries, then starts `target/release/<name>`
/// with `args` from the workspace root (the demo and the benchmarks are such binaries).
pub fn build_and_spawn_release_bin(
    ebpf_toolchain: &str,
    name: &str,
    args: &[String],
) -> Result<std::process::Child> {
    let mut build = cargo(ebpf_toolchain);
    build.args([
        "build",
        "--release",
        "-p",
        "lb-userspace",
        "-p",
        "tests",
        "--bins",
    ]);
    println!("building: {}", display(&build));
    run(&mut build)?;
    let bin = target_dir().join("release").join(name);
    if !bin.is_file() {
        bail!(
            "{} was not built: the `tests` crate must provide a `{name}` binary",
            bin.display()
        );
    }
    let mut command = Command::new(&bin);
    command.args(args).current_dir(workspace_root());
    println!("running: {}", display(&command));
    command
        .spawn()
        .with_context(|| format!("could not start {}", bin.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_and_shows_env() {
        let mut cmd = Command::new("dpkg-query");
        cmd.args(["-W", "-f=${Status}", "it's"]).env("A", "b c");
        assert_eq!(
            display(&cmd),
            r"A='b c' dpkg-query -W '-f=${Status}' 'it'\''s'"
        );
    }
}
