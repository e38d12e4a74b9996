//! A real Linux kernel as a test host: Debian's own kernel booted under qemu (software
//! emulation), for what this host's kernel lacks (ipip, ip6_tunnel, fou: no loadable modules).
//! DESIGN §9 has the recipe; `cargo xtask setup` prepares the kernel, its modules and the
//! initramfs in `/var/cache/lb-vm/<version>/` (`xtask/src/vm.rs`).
//!
//! [`Guest::boot`] creates a tap device in a test namespace and starts qemu there (the process
//! enters only the network namespace, so the tap is found there). The guest sees the host's root
//! read-only over 9p under a tmpfs overlay, so the host's `ip`, `modprobe`, `python3` run in it
//! against the guest kernel. Its init runs a wrapper this module writes: it loads `virtio_net`,
//! configures `eth0` from [`GuestNetwork`], runs the test's script (shell, as root, `set -e`),
//! prints [`READY_MARKER`] on the serial console, then serves [`Guest::exec`] commands read
//! from the console until qemu is killed. Dropping the [`Guest`] kills qemu, deletes the tap and
//! removes the work directory.
//!
//! Measured here (2 shared cores, TCG): the guest reaches its script ~7.5 s after qemu starts.

pub mod capture;
pub mod frames;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::links::MacAddress;
use crate::netns::{NetNs, describe_command, unique_interface_name};

/// Default root of the prepared guest kernels (`$LB_VM_CACHE` overrides it, as in xtask).
pub const CACHE_ROOT: &str = "/var/cache/lb-vm";
/// The environment variable that overrides [`CACHE_ROOT`].
pub const CACHE_ENV: &str = "LB_VM_CACHE";
/// Printed by the wrapper once the test's script has finished without error.
pub const READY_MARKER: &str = "LB-GUEST-READY";
/// Printed by the wrapper when the test's script failed (followed by its exit status).
pub const FAILED_MARKER: &str = "LB-GUEST-SCRIPT-FAILED";
/// Printed by the wrapper when its init starts it (followed by the guest's uptime).
pub const STARTED_MARKER: &str = "LB-GUEST-STARTED";
const BEGIN_MARKER: &str = "LB-GUEST-BEGIN";
const END_MARKER: &str = "LB-GUEST-END";
/// Mount point of the work share inside the guest (see the initramfs's `/init`).
const GUEST_WORK_DIR: &str = "/run/lb-guest";

/// What can go wrong with a guest.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error(
        "no prepared guest kernel in {0}: run `cargo xtask setup` (it downloads Debian's \
         linux-image and builds the initramfs; DESIGN §9)"
    )]
    ImageMissing(PathBuf),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("qemu exited ({status}) before {waiting_for}; stderr: {stderr}\nconsole:\n{console}")]
    QemuExited {
        status: String,
        waiting_for: String,
        stderr: String,
        console: String,
    },
    #[error("no {waiting_for} from the guest within {timeout:?}\nconsole:\n{console}")]
    Timeout {
        waiting_for: String,
        timeout: Duration,
        console: String,
    },
    #[error("the guest script failed (exit {status})\nconsole:\n{console}")]
    ScriptFailed { status: String, console: String },
    #[error("`{command}` in the guest exited {status}:\n{output}")]
    CommandFailed {
        command: String,
        status: i32,
        output: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GuestError {
    let what = what.into();
    move |source| GuestError::Io { what, source }
}

/// A prepared guest kernel: `vmlinux`, `initramfs.cpio.gz` and the modules directory.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub release: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub modules: PathBuf,
}

impl GuestImage {
    /// The image `cargo xtask setup` prepared (`CACHE_ROOT/current`).
    pub fn find() -> Result<Self, GuestError> {
        let root = std::env::var_os(CACHE_ENV)
            .filter(|v| !v.is_empty())
            .map_or_else(|| PathBuf::from(CACHE_ROOT), PathBuf::from);
        let dir = root.join("current");
        let missing = || GuestError::ImageMissing(root.clone());
        let ready = std::fs::read_to_string(dir.join("ready")).map_err(|_| missing())?;
        let release = ready.trim().to_owned();
        let image = Self {
            kernel: dir.join("vmlinux"),
            initramfs: dir.join("initramfs.cpio.gz"),
            modules: dir.join("root/lib/modules").join(&release),
            release,
        };
        if !(image.kernel.is_file() && image.initramfs.is_file() && image.modules.is_dir()) {
            return Err(missing());
        }
        Ok(image)
    }
}

/// The guest's one interface (`eth0`, virtio-net on a tap) and the host side of that link.
#[derive(Clone, Debug)]
pub struct GuestNetwork {
    /// Prefix of the tap's name (a unique suffix is added).
    pub tap_prefix: String,
    pub host_mac: MacAddress,
    pub guest_mac: MacAddress,
    /// The tap's address in the namespace (the guest's default gateway), on a /24.
    pub host_v4: Ipv4Addr,
    pub guest_v4: Ipv4Addr,
    /// The same on a /64.
    pub host_v6: Ipv6Addr,
    pub guest_v6: Ipv6Addr,
}

impl Default for GuestNetwork {
    fn default() -> Self {
        Self {
            tap_prefix: "lbtap".to_owned(),
            host_mac: MacAddress([0x02, 0x00, 0x00, 0x77, 0x00, 0x01]),
            guest_mac: MacAddress([0x52, 0x54, 0x00, 0x77, 0x00, 0x02]),
            host_v4: Ipv4Addr::new(10, 77, 0, 1),
            guest_v4: Ipv4Addr::new(10, 77, 0, 2),
            host_v6: "fd00:77::1".parse().expect("valid address"),
            guest_v6: "fd00:77::2".parse().expect("valid address"),
        }
    }
}

/// How to boot a guest.
#[derive(Clone, Debug)]
pub struct GuestConfig {
    /// For messages and the work directory's name.
    pub name: String,
    pub network: GuestNetwork,
    /// Shell commands run as root in the guest after `eth0` is up (`set -e`: the first failing
    /// command fails the boot). Background servers may be started (`&`).
    pub script: String,
    /// From qemu's start to [`READY_MARKER`].
    pub boot_timeout: Duration,
    pub memory_mb: u32,
    pub cpus: u32,
}

impl GuestConfig {
    pub fn new(name: &str, script: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            network: GuestNetwork::default(),
            script: script.into(),
            boot_timeout: Duration::from_secs(90),
            memory_mb: 1024,
            cpus: 2,
        }
    }
}

/// A shell line for a guest script: a TCP server on `port` (IPv4 and IPv6, any address) that
/// answers each line it reads with `identity`, like [`crate::TcpIdentityServer`]; started in
/// the background with the host's `python3`.
pub fn identity_server_command(port: u16, identity: &str) -> String {
    assert!(
        identity
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
        "identity {identity:?} must be plain"
    );
    let program = format!(
        "import socket,threading\n\
         def serve(c):\n\
         \x20   f=c.makefile('rwb')\n\
         \x20   for _ in f:\n\
         \x20       f.write(b'{identity}\\n'); f.flush()\n\
         \x20   c.close()\n\
         s=socket.socket(socket.AF_INET6)\n\
         s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
         s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\n\
         s.bind(('::',{port})); s.listen(128)\n\
         print('LB-GUEST-SERVER {identity} {port}',flush=True)\n\
         while True:\n\
         \x20   c,_=s.accept(); threading.Thread(target=serve,args=(c,),daemon=True).start()\n"
    );
    format!(
        "python3 -c '{}' </dev/null &\nwait_for_listener {port}",
        program.replace('\'', r"'\''")
    )
}

/// Lines the serial reader has seen, and whether qemu's stdout has ended.
#[derive(Default)]
struct Console {
    lines: Vec<String>,
    closed: bool,
}

type SharedConsole = Arc<(Mutex<Console>, Condvar)>;

/// A booted guest. Dropping it kills qemu, deletes the tap and removes the work directory.
pub struct Guest {
    name: String,
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    console: SharedConsole,
    stderr: Arc<Mutex<String>>,
    namespace: PathBuf,
    namespace_name: String,
    tap: String,
    work_dir: PathBuf,
    network: GuestNetwork,
    boot_time: Duration,
    next_command: u64,
}

impl Guest {
    /// Creates a tap in `namespace` (with `host_v4/24` and `host_v6/64`), boots the guest on it
    /// and returns once the guest's script has run ([`READY_MARKER`]).
    pub fn boot(namespace: &NetNs, config: &GuestConfig) -> Result<Self, GuestError> {
        let image = GuestImage::find()?;
        let network = config.network.clone();
        let tap = unique_interface_name(&network.tap_prefix)
            .map_err(|e| GuestError::Setup(format!("{e:#}")))?;
        let work_dir = std::env::temp_dir().join(format!(
            "lb-guest-{}-{}",
            config.name,
            crate::netns::short_unique_suffix()
        ));
        let mut guest = Self {
            name: config.name.clone(),
            child: None,
            stdin: None,
            console: Arc::default(),
            stderr: Arc::default(),
            namespace: namespace.path(),
            namespace_name: namespace.name().to_owned(),
            tap,
            work_dir,
            network,
            boot_time: Duration::ZERO,
            next_command: 0,
        };
        // From here on, dropping `guest` undoes whatever was done.
        guest.create_tap(namespace)?;
        std::fs::create_dir_all(&guest.work_dir).map_err(io_error(format!(
            "cannot create {}",
            guest.work_dir.display()
        )))?;
        write_file(&guest.work_dir.join("script.sh"), &config.script)?;
        write_file(
            &guest.work_dir.join("run.sh"),
            &wrapper_script(&guest.network),
        )?;
        let started = Instant::now();
        guest.spawn_qemu(namespace, &image, config)?;
        guest.wait_for_boot(config.boot_timeout)?;
        guest.boot_time = started.elapsed();
        Ok(guest)
    }

    /// Wall time from qemu's start to [`READY_MARKER`].
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// How the boot went, for test logs: the guest's uptime when its init started the wrapper
    /// and when the script was done, and the wall time from qemu's start.
    pub fn boot_report(&self) -> String {
        let uptime = |marker: &str| {
            self.lines_from(0)
                .iter()
                .find_map(|l| l.split_once(marker).map(|(_, rest)| rest.trim().to_owned()))
                .unwrap_or_else(|| "?".to_owned())
        };
        format!(
            "guest {}: kernel and init done at {}, script done at {}, {:.1} s wall from qemu's start",
            self.name,
            uptime(STARTED_MARKER),
            uptime(READY_MARKER),
            self.boot_time.as_secs_f64()
        )
    }

    /// qemu's process id (while it runs).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The tap device in the namespace (the guest's link).
    pub fn tap(&self) -> &str {
        &self.tap
    }

    pub fn network(&self) -> &GuestNetwork {
        &self.network
    }

    /// Everything the guest printed on its console so far.
    pub fn console(&self) -> String {
        let (lock, _) = &*self.console;
        let console = lock.lock().unwrap_or_else(|p| p.into_inner());
        console.lines.join("\n")
    }

    /// Runs `command` (one shell line) in the guest and returns its output (stdout and stderr
    /// interleaved, as the console carries them); an error if it exits non-zero or does not
    /// finish within `timeout`.
    pub fn exec(&mut self, command: &str, timeout: Duration) -> Result<String, GuestError> {
        if command.contains('\n') {
            return Err(GuestError::Setup(format!(
                "guest commands are one line: {command:?}"
            )));
        }
        let id = self.next_command;
        self.next_command += 1;
        let start_index = self.line_count();
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| GuestError::Setup("qemu's stdin is gone".to_owned()))?;
        writeln!(stdin, "{id} {command}")
            .and_then(|()| stdin.flush())
            .map_err(io_error("cannot write to the guest's console"))?;
        let end = format!("{END_MARKER} {id} ");
        let (index, line) = self.wait_for(
            start_index,
            |l| l.contains(&end),
            &format!("the end of `{command}`"),
            timeout,
        )?;
        let status: i32 = line
            .split_once(&end)
            .and_then(|(_, rest)| rest.trim().parse().ok())
            .unwrap_or(-1);
        let begin = format!("{BEGIN_MARKER} {id}");
        let lines = self.lines_from(start_index);
        let output: Vec<&str> = lines
            .iter()
            .take(index - start_index)
            .skip_while(|l| !l.contains(&begin))
            .skip(1)
            .map(String::as_str)
            .collect();
        let output = output.join("\n");
        if status != 0 {
            return Err(GuestError::CommandFailed {
                command: command.to_owned(),
                status,
                output,
            });
        }
        Ok(output)
    }

    /// Waits until a console line (from the beginning) contains `needle`; returns it.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Result<String, GuestError> {
        self.wait_for(0, |l| l.contains(needle), needle, timeout)
            .map(|(_, line)| line)
    }

    fn create_tap(&self, namespace: &NetNs) -> Result<(), GuestError> {
        let setup = |args: &[&str]| {
            namespace.ip(args).map(drop).map_err(|e| {
                GuestError::Setup(format!("tap set-up for guest {}: {e:#}", self.name))
            })
        };
        let host_v4 = format!("{}/24", self.network.host_v4);
        let host_v6 = format!("{}/64", self.network.host_v6);
        let mac = self.network.host_mac.to_string();
        setup(&["tuntap", "add", "dev", &self.tap, "mode", "tap"])?;
        setup(&["link", "set", "dev", &self.tap, "address", &mac])?;
        setup(&["addr", "add", &host_v4, "dev", &self.tap])?;
        setup(&["-6", "addr", "add", &host_v6, "dev", &self.tap, "nodad"])?;
        setup(&["link", "set", "dev", &self.tap, "up"])
    }

    fn spawn_qemu(
        &mut self,
        namespace: &NetNs,
        image: &GuestImage,
        config: &GuestConfig,
    ) -> Result<(), GuestError> {
        let share = |path: &Path, tag: &str, extra: &str| {
            format!(
                "local,path={},mount_tag={tag},security_model=none{extra}",
                path.display()
            )
        };
        let mut qemu = Command::new("qemu-system-x86_64");
        qemu.args(["-accel", "tcg,thread=multi", "-cpu", "max"])
            .args(["-m", &config.memory_mb.to_string()])
            .args(["-smp", &config.cpus.to_string()])
            .args(["-nodefaults", "-display", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-no-reboot"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&image.initramfs)
            .args([
                "-append",
                "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off",
            ])
            .arg("-virtfs")
            .arg(share(
                Path::new("/"),
                "root",
                ",readonly=on,multidevs=remap",
            ))
            .arg("-virtfs")
            .arg(share(&image.modules, "mods", ",readonly=on"))
            .arg("-virtfs")
            .arg(share(&self.work_dir, "work", ""))
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script=no,downscript=no",
                self.tap
            ))
            .arg("-device")
            .arg(format!(
                "virtio-net-pci,netdev=n0,mac={}",
                self.network.guest_mac
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let command_line = describe_command(&qemu);
        let mut child = namespace
            .spawn(&mut qemu)
            .map_err(|e| GuestError::Setup(format!("cannot start qemu: {e:#}")))?;
        eprintln!("guest {}: started `{command_line}`", self.name);
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        self.stdin = child.stdin.take();
        self.child = Some(child);
        let console = Arc::clone(&self.console);
        std::thread::spawn(move || read_console(stdout, &console));
        let stderr_text = Arc::clone(&self.stderr);
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut text);
            *stderr_text.lock().unwrap_or_else(|p| p.into_inner()) = text;
        });
        Ok(())
    }

    fn wait_for_boot(&mut self, timeout: Duration) -> Result<(), GuestError> {
        let (_, line) = self.wait_for(
            0,
            |l| l.contains(READY_MARKER) || l.contains(FAILED_MARKER),
            "readiness (the guest script's end)",
            timeout,
        )?;
        if let Some((_, status)) = line.split_once(FAILED_MARKER) {
            return Err(GuestError::ScriptFailed {
                status: status.trim().to_owned(),
                console: self.console(),
            });
        }
        Ok(())
    }

    fn line_count(&self) -> usize {
        let (lock, _) = &*self.console;
        lock.lock().unwrap_or_else(|p| p.into_inner()).lines.len()
    }

    fn lines_from(&self, start: usize) -> Vec<String> {
        let (lock, _) = &*self.console;
        let console = lock.lock().unwrap_or_else(|p| p.into_inner());
        console.lines.get(start..).unwrap_or_default().to_vec()
    }

    /// The first console line at or after `start` that `matches`, with its index.
    fn wait_for(
        &self,
        start: usize,
        matches: impl Fn(&str) -> bool,
        waiting_for: &str,
        timeout: Duration,
    ) -> Result<(usize, String), GuestError> {
        let deadline = Instant::now() + timeout;
        let (lock, ready) = &*self.console;
        let mut console = lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut checked = start;
        loop {
            if let Some(offset) = console
                .lines
                .get(checked..)
                .unwrap_or_default()
                .iter()
                .position(|l| matches(l))
            {
                let index = checked + offset;
                return Ok((index, console.lines[index].clone()));
            }
            checked = console.lines.len().max(start);
            if console.closed {
                let text = console.lines.join("\n");
                drop(console);
                return Err(self.exited(waiting_for, text));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(GuestError::Timeout {
                    waiting_for: waiting_for.to_owned(),
                    timeout,
                    console: console.lines.join("\n"),
                });
            }
            console = ready
                .wait_timeout(console, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    fn exited(&self, waiting_for: &str, console: String) -> GuestError {
        // stdout closed: qemu is ending; give its stderr reader a moment.
        std::thread::sleep(Duration::from_millis(200));
        GuestError::QemuExited {
            status: "stdout closed".to_owned(),
            waiting_for: waiting_for.to_owned(),
            stderr: self
                .stderr
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
            console,
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let deleted = Command::new("ip")
            .args(["-n", &self.namespace_name, "link", "del", "dev", &self.tap])
            .output();
        if !deleted.is_ok_and(|o| o.status.success()) && self.namespace.exists() {
            eprintln!(
                "warning: cannot delete tap {} in {}",
                self.tap, self.namespace_name
            );
        }
        let _ = std::fs::remove_dir_all(&self.work_dir);
    }
}

fn write_file(path: &Path, text: &str) -> Result<(), GuestError> {
    std::fs::write(path, text).map_err(io_error(format!("cannot write {}", path.display())))
}

/// Reads qemu's stdout (the guest's serial console) into lines until it closes.
fn read_console(stdout: impl Read, console: &SharedConsole) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    loop {
        line.clear();
        let read = reader.read_until(b'\n', &mut line);
        let (lock, ready) = &**console;
        let mut state = lock.lock().unwrap_or_else(|p| p.into_inner());
        match read {
            Ok(0) | Err(_) => {
                state.closed = true;
                ready.notify_all();
                return;
            }
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                state
                    .lines
                    .push(text.trim_end_matches(['\r', '\n']).to_owned());
                ready.notify_all();
            }
        }
    }
}

/// The guest's `/run/lb-guest/run.sh`: network, the test's script, readiness, command loop.
fn wrapper_script(network: &GuestNetwork) -> String {
    let mut script = String::new();
    let _ = write!(
        script,
        r#"export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
echo "{STARTED_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime)"
# Waits (up to 10 s) until something listens on TCP port $1.
wait_for_listener() {{
    for _ in $(seq 100); do
        ss -Hltn "sport = :$1" | grep -q . && return 0
        sleep 0.1
    done
    echo "nothing listens on port $1"; return 1
}}
modprobe virtio_net
ip link set lo up
ip link set eth0 up
ip addr add {guest_v4}/24 dev eth0
ip -6 addr add {guest_v6}/64 dev eth0 nodad
ip route add default via {host_v4}
ip -6 route add default via {host_v6}
( set -e; . {GUEST_WORK_DIR}/script.sh )
status=$?
if [ "$status" -ne 0 ]; then
    echo "{FAILED_MARKER} $status"
    echo o > /proc/sysrq-trigger
    sleep 10
fi
echo "{READY_MARKER} uptime=$(cut -d' ' -f1 /proc/uptime)"
stty -echo 2>/dev/null
while IFS= read -r line; do
    id=${{line%% *}}
    command=${{line#* }}
    echo "{BEGIN_MARKER} $id"
    eval "$command" 2>&1
    echo "{END_MARKER} $id $?"
done
echo o > /proc/sysrq-trigger
sleep 10
"#,
        guest_v4 = network.guest_v4,
        guest_v6 = network.guest_v6,
        host_v4 = network.host_v4,
        host_v6 = network.host_v6,
    );
    script
}
