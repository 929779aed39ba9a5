//! Linux end to end: the guest kernel and initramfs from resources/, booted by
//! the real `ligera` binary to their init. Each boot takes seconds on the
//! development machines (nested, emulating KVM), so these tests are ignored
//! by a plain `cargo test`; `resources/test.sh` (and CI) runs them with
//! `--include-ignored`. The images are built (or taken from the cache) by the
//! resources/ scripts.

mod common;

use common::linux::{BOOT_TIMEOUT, CMDLINE, MARKER, initramfs, kernel, one_at_a_time};

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Outcome, spawn};

/// Boots `kernel` with `initrd`, feeding `input` to the console once the
/// init marker shows; returns the outcome and the time to the marker.
fn boot(kernel: &Path, initrd: &Path, extra: &[&str], input: Option<&str>) -> (Outcome, Duration) {
    let _one_at_a_time = one_at_a_time();
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "128M",
    ];
    args.extend_from_slice(extra);
    let start = Instant::now();
    let mut r = spawn(&args);
    r.wait_for(MARKER, BOOT_TIMEOUT);
    let to_marker = start.elapsed();
    if let Some(text) = input {
        r.write_stdin(text.as_bytes());
    }
    let out = r.finish(BOOT_TIMEOUT);
    eprintln!(
        "{}: init marker after {:.2} s, exit {} after {:.2} s",
        kernel.display(),
        to_marker.as_secs_f64(),
        out.status,
        start.elapsed().as_secs_f64()
    );
    (out, to_marker)
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn vmlinux_boots_to_init_with_initrd() {
    let (out, _) = boot(
        &kernel("vmlinux"),
        &initramfs(&[]),
        &["--cmdline", CMDLINE],
        None,
    );
    assert!(out.stdout.contains(MARKER), "{out}");
    assert_eq!(
        out.status, 0,
        "the init reboots, which ends ligera cleanly:\n{out}"
    );
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn vmlinux_brings_up_two_vcpus() {
    let cmdline = format!("{CMDLINE} ligera.cmd=\"cat /sys/devices/system/cpu/online\"");
    let (out, _) = boot(
        &kernel("vmlinux"),
        &initramfs(&["--busybox"]),
        &["--cpus", "2", "--cmdline", &cmdline],
        None,
    );
    assert_eq!(out.status, 0, "{out}");
    let online: Vec<&str> = out
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    assert!(online.contains(&"0-1"), "both CPUs online:\n{out}");
    assert!(out.stdout.contains("LIGERA-CMD-EXIT=0"), "{out}");
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn console_input_reaches_linux() {
    let cmdline = format!("{CMDLINE} ligera.cmd=\"read line; echo got:$line\"");
    let (out, _) = boot(
        &kernel("vmlinux"),
        &initramfs(&["--busybox"]),
        &["--cmdline", &cmdline],
        Some("hello from the host\n"),
    );
    assert_eq!(out.status, 0, "{out}");
    assert!(out.stdout.contains("got:hello from the host"), "{out}");
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn bzimage_boots_to_init() {
    let (out, _) = boot(
        &kernel("bzImage"),
        &initramfs(&[]),
        &["--cmdline", CMDLINE],
        None,
    );
    assert!(out.stdout.contains(MARKER), "{out}");
    assert_eq!(out.status, 0, "{out}");
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn kernel_panic_is_reported() {
    // This init exits: "Attempted to kill init!", reported through pvpanic.
    let (out, _) = boot(
        &kernel("vmlinux"),
        &initramfs(&["--panic"]),
        &["--cmdline", CMDLINE],
        None,
    );
    assert_eq!(out.status, 3, "{out}");
    assert!(out.stderr.contains("panicked"), "{out}");
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn init_arguments_keep_ligeras_kernel_parameters_apart() {
    // ligera adds virtio_mmio.device= for the disk and the vsock device; with
    // init arguments on the line they must still land before the `--`, or
    // Linux never probes the devices and hands their parameters to init.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("linux-init-args-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let vsock = format!("cid=3,socket={}", dir.join("v.sock").display());
    let cmdline = format!(
        "{CMDLINE} ligera.cmd=\"cat /sys/bus/virtio/devices/*/device; cat /sys/block/vda/size\" \
         -- first \"second  arg\" third"
    );
    let (out, _) = boot(
        &kernel("vmlinux"),
        &initramfs(&["--busybox"]),
        &[
            "--cmdline",
            &cmdline,
            "--disk",
            &format!("path={}", disk.display()),
            "--vsock",
            &vsock,
        ],
        None,
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.status, 0, "{out}");
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .collect();
    let args: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("LIGERA-INIT-ARG="))
        .collect();
    assert_eq!(args, ["[first]", "[second  arg]", "[third]"], "{out}");
    // Both devices probed: virtio-blk (ID 2) with its 2048 sectors, virtio-vsock (ID 19).
    assert!(
        lines.contains(&"0x0002") && lines.contains(&"0x0013"),
        "{out}"
    );
    assert!(lines.contains(&"2048"), "{out}");
    assert!(out.stdout.contains("LIGERA-CMD-EXIT=0"), "{out}");
}
