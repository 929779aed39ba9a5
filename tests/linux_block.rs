//! virtio-blk with the Linux guest from resources/: ext4 images made on the
//! host, mounted, written, trimmed and read by the guest's own virtio-blk
//! driver, and checked on the host afterwards without mounting them. Like
//! tests/linux.rs (whose conventions and helpers this copies), ignored by a
//! plain `cargo test`; `resources/test.sh` runs it with `--include-ignored`.

mod common;

use common::linux::{BOOT_TIMEOUT, CMDLINE, MARKER, busybox_initramfs, kernel, one_at_a_time};

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::{Outcome, spawn};

/// Boots the busybox initramfs with `extra` flags and runs `cmd` in it.
fn boot_cmd(cmd: &str, extra: &[&str]) -> Outcome {
    let _one_at_a_time = one_at_a_time();
    let kernel = kernel("vmlinux");
    let initrd = busybox_initramfs();
    let cmdline = format!("{CMDLINE} ligera.cmd=\"{cmd}\"");
    let mut args = vec![
        "run",
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--memory",
        "128M",
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    let start = Instant::now();
    let mut r = spawn(&args);
    r.wait_for(MARKER, BOOT_TIMEOUT);
    let out = r.finish(BOOT_TIMEOUT);
    eprintln!(
        "{}: exit {} after {:.2} s",
        kernel.display(),
        out.status,
        start.elapsed().as_secs_f64()
    );
    out
}

fn tool(program: &str, args: &[&str]) -> std::process::Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (e2fsprogs): {e}"))
}

/// A fresh ext4 image of `mib` MiB.
fn ext4_image(name: &str, mib: u64) -> PathBuf {
    let path =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&path);
    std::fs::File::create(&path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
    let out = tool("mkfs.ext4", &["-F", "-q", path.to_str().unwrap()]);
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
    path
}

/// `debugfs -R 'cat PATH' IMAGE`: a file's content, read without mounting.
fn debugfs_cat(image: &Path, file: &str) -> String {
    let out = tool(
        "debugfs",
        &["-R", &format!("cat {file}"), image.to_str().unwrap()],
    );
    assert!(out.status.success(), "debugfs: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn fsck_clean(image: &Path) {
    let out = tool("e2fsck", &["-f", "-n", image.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "e2fsck finds the file system inconsistent: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn linux_writes_a_file_on_an_ext4_disk() {
    let rw = ext4_image("linux-rw.ext4", 32);
    // A read-only second disk with a file put there on the host.
    let ro = ext4_image("linux-ro.ext4", 16);
    let src = rw.with_extension("src");
    std::fs::write(&src, "from the host\n").unwrap();
    let out = tool(
        "debugfs",
        &[
            "-w",
            "-R",
            &format!("write {} g", src.display()),
            ro.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let ro_before = std::fs::read(&ro).unwrap();

    let cmd = "mount /dev/vda /mnt && echo hello > /mnt/f && sync && fstrim /mnt && umount /mnt \
         && echo serial=$(cat /sys/block/vda/serial) ro=$(cat /sys/block/vdb/ro) \
         && mount -o ro /dev/vdb /root && cat /root/g && umount /root";
    let out = boot_cmd(
        cmd,
        &[
            "--disk",
            &format!("path={},id=data-disk", rw.display()),
            "--disk",
            &format!("path={},readonly=on", ro.display()),
        ],
    );
    assert!(out.stdout.contains("LIGERA-CMD-EXIT=0"), "{out}");
    assert_eq!(out.status, 0, "the init reboots: {out}");
    assert!(out.stdout.contains("serial=data-disk ro=1"), "{out}");
    assert!(out.stdout.contains("from the host"), "{out}");

    // On the host, without mounting: the file is there, the file system
    // is consistent (after the guest's writes and fstrim's discards), and
    // the read-only image did not change.
    assert_eq!(debugfs_cat(&rw, "/f"), "hello\n");
    fsck_clean(&rw);
    assert_eq!(std::fs::read(&ro).unwrap(), ro_before);
    for p in [rw, ro, src] {
        let _ = std::fs::remove_file(p);
    }
}
