//! What the Linux end-to-end tests share: the guest images from resources/
//! (built, or taken from the cache, by its scripts), the fast-boot command
//! line, and one boot at a time.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

/// Fast-boot options for the resources/ kernel (see resources/guest-kernel/README.md).
pub const CMDLINE: &str = "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux \
     i8042.nopnp i8042.dumbkbd rodata=off percpu_alloc=page noreplace-smp keep_initmem quiet";
/// What the initramfs init prints once it runs.
pub const MARKER: &str = "LIGERA-INIT-OK";
/// A boot takes seconds here, and up to minutes on a loaded machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// One Linux guest at a time: two boots on two cores would only slow both.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a resources/ build script with `--print-path` and returns the path.
pub fn resources_output(script: &str, args: &[&str]) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../resources")
        .join(script);
    let out = Command::new(&path)
        .args(args)
        .arg("--print-path")
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    assert!(out.status.success(), "{} {args:?} failed", path.display());
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

/// `vmlinux` or `bzImage` of the guest kernel ($LIGERA_KERNEL_DIR, else built).
pub fn kernel(name: &str) -> PathBuf {
    std::env::var_os("LIGERA_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| resources_output("build-guest-kernel.sh", &[]))
        .join(name)
}

/// The tiny initramfs ($LIGERA_INITRD, else built), or a variant of it
/// (`--busybox`, `--panic`).
pub fn initramfs(variant: &[&str]) -> PathBuf {
    match (variant, std::env::var_os("LIGERA_INITRD")) {
        ([], Some(path)) => PathBuf::from(path),
        _ => resources_output("build-initramfs.sh", variant),
    }
}

/// The busybox initramfs, which runs `ligera.cmd="..."` from the command line.
pub fn busybox_initramfs() -> PathBuf {
    initramfs(&["--busybox"])
}
