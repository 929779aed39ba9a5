//! Snapshots end to end with the real `ligera`: the test guest counting on
//! its serial port is paused, snapshotted, and restored into new ligera
//! processes (one after another and side by side), which go on counting
//! from the snapshot point. Broken snapshots (cut short, corrupted, from a
//! newer ligera, with the wrong memory file) are refused with a message.
//! The Linux guest's snapshot (disk, vsock, clones side by side) is in
//! tests/firecracker.rs, booted through Firecracker's API.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Running, spawn};

fn work_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("snapshot-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The COUNT values the guest printed on whole lines.
fn counts(output: &str) -> Vec<u64> {
    output
        .lines()
        .filter_map(|l| l.strip_prefix("COUNT "))
        .filter_map(|v| u64::from_str_radix(v.trim(), 16).ok())
        .collect()
}

/// `ligera snapshot create` of the VM on `sock` into `dir`'s state and memory.
fn snapshot_create(dir: &Path, sock: &Path) -> common::Outcome {
    common::run(
        &[
            "snapshot",
            "create",
            "--api-sock",
            sock.to_str().unwrap(),
            "--state",
            dir.join("state").to_str().unwrap(),
            "--memory",
            dir.join("memory").to_str().unwrap(),
        ],
        Duration::from_secs(120),
    )
}

/// A snapshot of the counting guest (32 MiB) in `dir`, taken while it runs
/// with `extra` flags; the VM is then ended.
fn snapshot_counting_guest(dir: &Path, extra: &[&str]) {
    let sock = dir.join("api.sock");
    let mut args = vec!["--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut vm = common::counting_guest(&args);
    let paused = snapshot_create(dir, &sock);
    assert_eq!(paused.status, 0, "{paused}");
    // The VM runs on after the snapshot: it is separate from its clones.
    let before = vm.collect_for(Duration::from_millis(500));
    assert!(counts(&before).len() >= 3, "{before}");
    drop(vm);
}

#[test]
fn a_jailed_guest_larger_than_the_default_file_size_limit_is_snapshotted() {
    // The jail limits the size of files the VM writes; a snapshot's memory
    // file is as large as guest RAM, here more than the 1 GiB floor.
    let dir = work_dir("big");
    let sock = dir.join("api.sock");
    let mut vm = spawn(&[
        "run",
        "--kernel",
        common::guests().elf64.to_str().unwrap(),
        "--no-host-quirks",
        "--memory",
        "1536M",
        "--cmdline",
        "test=count",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    vm.wait_for("COUNT 3\n", Duration::from_secs(30));
    let out = snapshot_create(&dir, &sock);
    assert_eq!(out.status, 0, "{out}");
    drop(vm);
    assert_eq!(
        std::fs::metadata(dir.join("memory")).unwrap().len(),
        1536 << 20
    );
    let mut clone = restore(&dir, &[]);
    let c = counts(&clone.collect_for(Duration::from_secs(2)));
    assert!(c.len() > 3 && c[0] > 3, "{c:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn restore(dir: &Path, extra: &[&str]) -> Running {
    let mut args = vec![
        "snapshot",
        "restore",
        "--state",
        dir.join("state").to_str().unwrap().to_string().leak(),
        "--memory",
        dir.join("memory").to_str().unwrap().to_string().leak(),
    ];
    args.extend_from_slice(extra);
    spawn(&args)
}

#[test]
fn restored_guest_counts_on_in_several_clones_at_once() {
    let dir = work_dir("count");
    snapshot_counting_guest(&dir, &[]);
    // The memory file is sparse: the 32 MiB guest wrote little of its RAM.
    let memory = dir.join("memory");
    let meta = std::fs::metadata(&memory).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(meta.len(), 32 << 20);
    assert!(
        meta.blocks() * 512 < 8 << 20,
        "{} bytes on disk for a 32 MiB guest that touched little",
        meta.blocks() * 512
    );
    // One clone, then two side by side: each counts on from the snapshot
    // point, not from 0 (a boot), and exits cleanly on SIGTERM.
    for round in [1, 2] {
        let mut clones: Vec<Running> = (0..round).map(|_| restore(&dir, &[])).collect();
        let mut firsts = Vec::new();
        for clone in &mut clones {
            let out = clone.collect_for(Duration::from_secs(2));
            let c = counts(&out);
            assert!(c.len() > 3, "the clone counts: {out}");
            assert!(
                c.windows(2).all(|w| w[1] == w[0] + 1),
                "one count after the other: {c:?}"
            );
            firsts.push(c[0]);
        }
        assert!(
            firsts.iter().all(|&f| f == firsts[0] && f > 3),
            "every clone goes on from the same point, past the boot: {firsts:?}"
        );
        for clone in clones {
            // SAFETY: kill(2) on a child we started.
            unsafe { libc::kill(clone.pid(), libc::SIGTERM) };
            let out = clone.finish(Duration::from_secs(30));
            assert_eq!(out.status, 143, "{out}");
        }
    }
    // The snapshot files are untouched by the clones (mapped copy-on-write).
    assert_eq!(std::fs::metadata(&memory).unwrap().mtime(), meta.mtime());
}

/// Restores `state` with `memory` and returns what ligera says.
fn restore_fails(state: &Path, memory: &Path) -> common::Outcome {
    common::run(
        &[
            "snapshot",
            "restore",
            "--serial",
            "none",
            "--state",
            state.to_str().unwrap(),
            "--memory",
            memory.to_str().unwrap(),
        ],
        Duration::from_secs(60),
    )
}

#[test]
fn broken_snapshots_are_refused_with_the_reason() {
    let dir = work_dir("broken");
    let disk = dir.join("disk");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    let disk_arg = format!("path={}", disk.display());
    snapshot_counting_guest(&dir, &["--rng", "--disk", &disk_arg]);
    let state = std::fs::read(dir.join("state")).unwrap();
    let memory = dir.join("memory");
    let bad = dir.join("bad-state");
    let check = |bytes: &[u8], memory: &Path, expected: &str| {
        std::fs::write(&bad, bytes).unwrap();
        let out = restore_fails(&bad, memory);
        assert_eq!(out.status, 1, "{expected}: {out}");
        assert!(out.stdout.is_empty(), "no guest ran: {out}");
        let line = out.stderr.trim();
        assert!(
            line.lines().count() == 1 && line.contains(expected),
            "expected one line with {expected:?}: {out}"
        );
    };
    // Cut short: in the header, in the payload.
    check(&state[..20], &memory, "cut short");
    check(&state[..state.len() - 100], &memory, "cut short");
    // Not a snapshot at all; empty.
    check(b"#!/bin/sh\necho hi\n", &memory, "not a ligera snapshot");
    check(b"", &memory, "not a ligera snapshot");
    // One flipped bit in the payload.
    let mut flipped = state.clone();
    let at = flipped.len() / 2;
    flipped[at] ^= 0x10;
    check(&flipped, &memory, "checksum");
    // A newer format.
    let mut newer = state.clone();
    newer[8] = 99;
    check(&newer, &memory, "format 99");
    // The wrong memory file: too small, missing.
    let small = dir.join("small");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    check(
        &state,
        &small,
        "the memory file holds 4096 bytes, the snapshot's VM has 32 MiB",
    );
    check(&state, &dir.join("missing"), "missing");
    // The disk the snapshot names is gone.
    let snapshot: serde_json::Value = serde_json::from_slice(&state[32..]).unwrap();
    let disk = snapshot["config"]["disks"][0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::rename(&disk, format!("{disk}.moved")).unwrap();
    check(&state, &memory, &disk);
    std::fs::rename(format!("{disk}.moved"), &disk).unwrap();
    // Whole again, it restores.
    let mut clone = restore(&dir, &[]);
    let c = counts(&clone.collect_for(Duration::from_secs(2)));
    assert!(c.len() > 3 && c[0] > 3, "{c:?}");
}
