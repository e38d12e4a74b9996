//! The guest kernel the VM tests boot under qemu (DESIGN §9): Debian's own kernel, whose ipip,
//! ip6_tunnel and fou modules decapsulate lb's packets where the host kernel has none.
//!
//! Prepared once into `/var/cache/lb-vm/<version>/` (`$LB_VM_CACHE` overrides the root):
//!
//! - `linux-image-<version>.deb` from `apt-get download` (the version `linux-image-amd64`
//!   depends on), unpacked into `root/` and indexed with `depmod -b root <version>` (the package
//!   ships no `modules.dep`);
//! - `vmlinux`, the ELF kernel extracted from the bzImage (qemu boots it ~6 s faster);
//! - `initramfs.cpio.gz`: a static busybox, the modules that mount the host's root over 9p with
//!   a tmpfs overlay, and an `/init` that switches into `/run/lb-guest/run.sh` from a third 9p
//!   share (written by the test harness, `tests/src/guest.rs`);
//! - `ready`: written last; its presence makes the next setup a no-op.
//!
//! `/var/cache/lb-vm/current` is a symlink to the prepared version's directory: what the tests use.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};

use crate::cmd;

/// Default root of the guest cache.
pub const CACHE_ROOT: &str = "/var/cache/lb-vm";
/// Overrides [`CACHE_ROOT`] (the tests read it too).
pub const CACHE_ENV: &str = "LB_VM_CACHE";
/// The meta-package whose dependency names the kernel version to boot.
const META_PACKAGE: &str = "linux-image-amd64";
/// Where the static busybox of `busybox-static` lives.
const BUSYBOX: &str = "/bin/busybox";
/// What the initramfs loads (each with its dependencies, in `modprobe --show-depends` order):
/// virtio PCI transport, 9p over virtio, overlayfs.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "overlay"];
/// The xz stream magic inside a bzImage.
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";

/// The initramfs's `/init` (busybox sh). It mounts the host root read-only over 9p (tag `root`)
/// under a tmpfs overlay, the guest kernel's modules (tag `mods`) on `/lib/modules/VERSION`, and
/// the harness's work directory (tag `work`, writable) on `/run/lb-guest`, then switches root
/// and runs `/run/lb-guest/run.sh`.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /proc /sys /dev
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules/order); do
    insmod "/modules/$m" || echo "lb-guest-init: insmod $m failed"
done
opts=trans=virtio,version=9p2000.L,msize=512000
mkdir -p /lower /rw /newroot
mount -t 9p -o "$opts,cache=loose,ro" root /lower || { echo "lb-guest-init: no 9p root"; poweroff -f; }
mount -t tmpfs -o size=256m tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot
release=$(uname -r)
mkdir -p "/newroot/lib/modules/$release" /newroot/run/lb-guest /newroot/tmp
mount -t tmpfs tmpfs /newroot/run
mkdir -p /newroot/run/lb-guest
mount -t tmpfs tmpfs /newroot/tmp
mount -t 9p -o "$opts,ro" mods "/newroot/lib/modules/$release"
mount -t 9p -o "$opts" work /newroot/run/lb-guest || { echo "lb-guest-init: no work share"; poweroff -f; }
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /run/lb-guest/run.sh
"#;

/// Makes sure the guest kernel is prepared in the cache; quick when it is.
pub fn ensure_guest() -> Result<()> {
    let root = cache_root();
    let version = kernel_version()?;
    let dir = root.join(&version);
    if is_ready(&dir) {
        link_current(&root, &version)?;
        println!(
            "ok: guest kernel {version} prepared in {} (VM tests)",
            dir.display()
        );
        return Ok(());
    }
    cmd::require_root(
        "preparing the guest kernel for the VM tests",
        &[format!("apt-get download linux-image-{version}")],
    )?;
    println!(
        "preparing: guest kernel {version} for the VM tests in {} (download ~70 MB, once)",
        dir.display()
    );
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let deb = download(&dir, &version)?;
    let image = dir.join("root");
    if image.exists() {
        fs::remove_dir_all(&image).with_context(|| format!("cannot clear {}", image.display()))?;
    }
    cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&image))?;
    cmd::run(Command::new("depmod").arg("-b").arg(&image).arg(&version))?;
    extract_vmlinux(&image.join(format!("boot/vmlinuz-{version}")), &dir)?;
    build_initramfs(&image, &version, &dir)?;
    fs::write(dir.join("ready"), format!("{version}\n"))
        .with_context(|| format!("cannot write {}/ready", dir.display()))?;
    link_current(&root, &version)?;
    println!("ok: guest kernel {version} prepared in {}", dir.display());
    Ok(())
}

/// `$LB_VM_CACHE`, else [`CACHE_ROOT`].
pub fn cache_root() -> PathBuf {
    std::env::var_os(CACHE_ENV)
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from(CACHE_ROOT), PathBuf::from)
}

fn is_ready(dir: &Path) -> bool {
    ["ready", "vmlinux", "initramfs.cpio.gz", "root/lib/modules"]
        .iter()
        .all(|f| dir.join(f).exists())
}

/// The kernel release `linux-image-amd64` depends on (`6.1.0-48-amd64`), from `apt-cache depends`.
fn kernel_version() -> Result<String> {
    let query = || {
        cmd::probe(Command::new("apt-cache").args(["depends", META_PACKAGE]))
            .and_then(|out| parse_depends(&out))
    };
    if let Some(version) = query() {
        return Ok(version);
    }
    println!("updating: apt-get update (apt knows no {META_PACKAGE} yet)");
    cmd::run(Command::new("apt-get").arg("update"))?;
    query().with_context(|| {
        format!(
            "apt-cache depends {META_PACKAGE} names no linux-image-VERSION package: the VM tests \
             boot Debian's kernel and cannot be prepared without it (check the apt sources)"
        )
    })
}

/// `Depends: linux-image-6.1.0-48-amd64` → `6.1.0-48-amd64`.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends: linux-image-"))
        .map(str::trim)
        .find(|v| v.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .map(str::to_owned)
}

/// `apt-get download linux-image-VERSION` into `dir` (one `apt-get update` and a retry if the
/// index is stale); the path of the `.deb`.
fn download(dir: &Path, version: &str) -> Result<PathBuf> {
    let package = format!("linux-image-{version}");
    if let Some(deb) = find_deb(dir, &package)? {
        return Ok(deb);
    }
    let mut get = Command::new("apt-get");
    get.args(["download", &package]).current_dir(dir);
    println!("downloading: {} (in {})", cmd::display(&get), dir.display());
    if !cmd::status(&mut get)?.success() {
        println!("updating: apt-get update (the download failed; the index may be stale)");
        cmd::run(Command::new("apt-get").arg("update"))?;
        if !cmd::status(&mut get)?.success() {
            bail!(
                "cannot download {package} (`apt-get download {package}` failed twice): the VM \
                 tests need Debian's kernel package and the archive is not reachable from here; \
                 copy a {package}_*.deb into {} and run `cargo xtask setup` again",
                dir.display()
            );
        }
    }
    find_deb(dir, &package)?.with_context(|| {
        format!(
            "apt-get download left no {package}_*.deb in {}",
            dir.display()
        )
    })
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        if name.is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb")) {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

/// Extracts the ELF `vmlinux` from the xz stream inside the bzImage (`xz -dc --single-stream`
/// from the magic's offset). A kernel not compressed with xz is booted as the bzImage itself.
fn extract_vmlinux(bzimage: &Path, dir: &Path) -> Result<()> {
    let target = dir.join("vmlinux");
    let image = fs::read(bzimage).with_context(|| format!("cannot read {}", bzimage.display()))?;
    let Some(offset) = image.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC) else {
        println!(
            "note: {} has no xz stream; the guest boots the bzImage (a few seconds slower)",
            bzimage.display()
        );
        fs::copy(bzimage, &target)?;
        return Ok(());
    };
    let mut xz = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("cannot start xz")?;
    let mut stdin = xz.stdin.take().context("xz stdin")?;
    let stream = image[offset..].to_vec();
    let feeder = std::thread::spawn(move || {
        // xz stops reading after the stream and closes its end: a broken pipe here is expected.
        let _ = stdin.write_all(&stream);
    });
    let out = xz.wait_with_output().context("xz failed")?;
    let _ = feeder.join();
    if !out.stdout.starts_with(b"\x7fELF") {
        bail!(
            "xz -dc of {} at offset {offset} gave no ELF kernel ({})",
            bzimage.display(),
            out.status
        );
    }
    fs::write(&target, &out.stdout).with_context(|| format!("cannot write {}", target.display()))
}

/// Builds `initramfs.cpio.gz`: busybox, the modules in load order, `/init`.
fn build_initramfs(image: &Path, version: &str, dir: &Path) -> Result<()> {
    let tree = dir.join("initramfs");
    if tree.exists() {
        fs::remove_dir_all(&tree)?;
    }
    let modules = tree.join("modules");
    fs::create_dir_all(tree.join("bin"))?;
    fs::create_dir_all(&modules)?;
    fs::copy(BUSYBOX, tree.join("bin/busybox")).with_context(|| {
        format!(
            "cannot copy {BUSYBOX}: is busybox-static installed? (`apt-get install busybox-static`)"
        )
    })?;
    let mut order = Vec::new();
    for path in module_load_order(image, version)? {
        let name = path
            .file_name()
            .context("module path without a name")?
            .to_string_lossy()
            .into_owned();
        let plain = name.strip_suffix(".xz").unwrap_or(&name).to_owned();
        if name.ends_with(".xz") {
            let out = cmd::capture(Command::new("xz").arg("-dc").arg(&path))?;
            fs::write(modules.join(&plain), out.stdout)?;
        } else {
            fs::copy(&path, modules.join(&plain))?;
        }
        order.push(plain);
    }
    fs::write(modules.join("order"), order.join("\n") + "\n")?;
    let init = tree.join("init");
    fs::write(&init, INIT)?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    let archive = dir.join("initramfs.cpio.gz");
    let script = format!(
        "cd {} && find . | cpio -o -H newc --quiet | gzip -1 > {}",
        tree.display(),
        archive.display()
    );
    cmd::run(Command::new("sh").args(["-c", &script]))?;
    println!(
        "ok: initramfs with busybox and modules {} ({})",
        order.join(" "),
        archive.display()
    );
    Ok(())
}

/// The module files [`INITRAMFS_MODULES`] need, dependencies first, each once
/// (`modprobe -d IMAGE -S VERSION --show-depends` prints `insmod PATH` lines in load order;
/// built-in modules print `builtin NAME`).
fn module_load_order(image: &Path, version: &str) -> Result<Vec<PathBuf>> {
    let mut order: Vec<PathBuf> = Vec::new();
    for module in INITRAMFS_MODULES {
        let out = cmd::capture(Command::new("modprobe").arg("-d").arg(image).args([
            "-S",
            version,
            "--show-depends",
            module,
        ]))?;
        if !out.status.success() {
            bail!(
                "modprobe --show-depends {module} for {version} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        for path in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("insmod "))
        {
            let path = PathBuf::from(path.split_whitespace().next().unwrap_or(path));
            if !order.contains(&path) {
                order.push(path);
            }
        }
    }
    Ok(order)
}

/// Points `ROOT/current` at `version` (atomically: a new symlink renamed over the old one).
fn link_current(root: &Path, version: &str) -> Result<()> {
    let current = root.join("current");
    if fs::read_link(&current).is_ok_and(|target| target == Path::new(version)) {
        return Ok(());
    }
    let temporary = root.join(".current.new");
    let _ = fs::remove_file(&temporary);
    std::os::unix::fs::symlink(version, &temporary)?;
    fs::rename(&temporary, &current)
        .with_context(|| format!("cannot point {} at {version}", current.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_line() {
        let text = "linux-image-amd64\n  Depends: linux-image-6.1.0-48-amd64\n";
        assert_eq!(parse_depends(text).as_deref(), Some("6.1.0-48-amd64"));
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }
}
