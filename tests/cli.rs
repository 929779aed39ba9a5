//! Bad input: every mistake gets one clear line on stderr that names the
//! input, and a non-zero exit status; never a panic or a hang.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{guests, run};

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("cli-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

/// Runs ligera and checks: the status, a single stderr line, the line
/// mentions `needle`, and nothing panicked.
fn rejects(args: &[&str], status: i32, needle: &str) {
    let out = run(args, Duration::from_secs(30));
    assert_eq!(out.status, status, "{args:?}\n{out}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected for {args:?}\n{out}");
    assert!(lines[0].starts_with("ligera: error: "), "{out}");
    assert!(
        lines[0].contains(needle),
        "{needle:?} not in {:?}",
        lines[0]
    );
    assert!(!out.stderr.contains("panicked"), "{out}");
}

fn kernel() -> &'static str {
    guests().elf64.to_str().unwrap()
}

#[test]
fn missing_kernel() {
    rejects(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        1,
        "/nonexistent/vmlinux",
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let text = scratch("notes.txt", b"just some text, not a kernel\n");
    rejects(
        &["run", "--kernel", text.to_str().unwrap()],
        1,
        "is not a kernel",
    );
    let empty = scratch("empty", b"");
    rejects(&["run", "--kernel", empty.to_str().unwrap()], 1, "empty");
    rejects(&["run", "--kernel", "/tmp"], 1, "not a regular file");
}

#[test]
fn elf_that_is_not_an_x86_64_kernel() {
    // A 32-bit ELF header.
    let mut elf32 = vec![0u8; 64];
    elf32[..6].copy_from_slice(b"\x7fELF\x01\x01");
    let f = scratch("elf32", &elf32);
    rejects(&["run", "--kernel", f.to_str().unwrap()], 1, "32-bit");
    // A host program: its segments start at 0, where boot data lives.
    rejects(&["run", "--kernel", "/bin/true"], 1, "/bin/true");
    // A truncated kernel.
    let whole = std::fs::read(kernel()).unwrap();
    let cut = scratch("truncated.elf", &whole[..whole.len() / 3]);
    rejects(&["run", "--kernel", cut.to_str().unwrap()], 1, "truncated");
}

#[test]
fn bzimage_with_bad_header() {
    let image = std::fs::read(&guests().bzimage).unwrap();
    let mut old = image.clone();
    old[0x206..0x208].copy_from_slice(&0x0204u16.to_le_bytes());
    let f = scratch("old.bzImage", &old);
    rejects(&["run", "--kernel", f.to_str().unwrap()], 1, "2.04");
    let mut no64 = image;
    no64[0x236] = 0;
    let f = scratch("no64.bzImage", &no64);
    rejects(&["run", "--kernel", f.to_str().unwrap()], 1, "64-bit entry");
}

#[test]
fn initrd_problems() {
    rejects(
        &[
            "run",
            "--kernel",
            kernel(),
            "--initrd",
            "/nonexistent/initrd",
        ],
        1,
        "/nonexistent/initrd",
    );
    let big = scratch("big-initrd", &vec![0u8; 40 << 20]);
    rejects(
        &[
            "run",
            "--kernel",
            kernel(),
            "--memory",
            "32M",
            "--initrd",
            big.to_str().unwrap(),
        ],
        1,
        "does not fit",
    );
}

#[test]
fn vcpu_counts() {
    rejects(&["run", "--kernel", kernel(), "--cpus", "0"], 2, "--cpus");
    rejects(&["run", "--kernel", kernel(), "--cpus", "33"], 2, "--cpus");
    rejects(&["run", "--kernel", kernel(), "--cpus", "two"], 2, "two");
}

#[test]
fn memory_sizes() {
    rejects(
        &["run", "--kernel", kernel(), "--memory", "1T"],
        1,
        "more than this host's",
    );
    rejects(
        &["run", "--kernel", kernel(), "--memory", "2M"],
        2,
        "minimum is 4 MiB",
    );
    rejects(
        &["run", "--kernel", kernel(), "--memory", "lots"],
        2,
        "lots",
    );
    rejects(
        &["run", "--kernel", kernel(), "--memory", "1.5G"],
        2,
        "1.5G",
    );
}

#[test]
fn unknown_flags_and_values() {
    rejects(
        &["run", "--kernel", kernel(), "--frobnicate"],
        2,
        "--frobnicate",
    );
    rejects(&["fly"], 2, "fly");
    rejects(&["run"], 2, "--kernel");
    rejects(
        &["run", "--kernel", kernel(), "--serial", "tcp:1"],
        2,
        "tcp:1",
    );
    rejects(
        &[
            "run",
            "--kernel",
            kernel(),
            "--serial",
            "file=/nonexistent/dir/log",
        ],
        1,
        "/nonexistent/dir/log",
    );
    rejects(
        &["run", "--kernel", kernel(), "--cmdline", &"x".repeat(3000)],
        1,
        "command line",
    );
}

#[test]
fn help_and_version() {
    let out = run(&["--version"], Duration::from_secs(10));
    assert_eq!(out.status, 0);
    assert!(out.stdout.starts_with("ligera "), "{out}");
    let out = run(&["run", "--help"], Duration::from_secs(10));
    assert_eq!(out.status, 0);
    for text in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "Examples:",
        "Exit status:",
    ] {
        assert!(
            out.stdout.contains(text),
            "{text} missing from help:\n{out}"
        );
    }
}
