//! `ligera bench` end to end on the default busybox image: real processes,
//! real runc containers and (ignored by a plain `cargo test`: each run boots
//! Linux, seconds here) real microVMs; then what is left behind.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::LIGERA;
use common::linux::{kernel, one_at_a_time, resources_output};

fn bench(args: &[&str]) -> Output {
    resources_output("build-sandbox-rootfs.sh", &[]);
    Command::new(LIGERA)
        .arg("bench")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cannot start ligera")
}

/// Runs a bench that must succeed, with its JSON report written to
/// `json`; returns its stdout, stderr and the parsed report.
fn bench_report(args: &[&str], json: &Path) -> (String, String, serde_json::Value) {
    let mut args = args.to_vec();
    args.extend(["--json", json.to_str().unwrap()]);
    let out = bench(&args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let report = serde_json::from_slice(&std::fs::read(json).unwrap()).expect("valid JSON");
    (stdout, stderr, report)
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The figure of `runtime` in `suite`/`case` of a JSON report.
fn figure<'a>(
    report: &'a serde_json::Value,
    suite: &str,
    case: &str,
    runtime: &str,
) -> &'a serde_json::Value {
    let results = report["results"].as_array().expect("results");
    let case = results
        .iter()
        .find(|c| c["suite"] == suite && c["case"] == case)
        .unwrap_or_else(|| panic!("no {suite}/{case} in {report}"));
    case["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["runtime"] == runtime)
        .unwrap_or_else(|| panic!("no {runtime} in {case}"))
}

#[test]
#[ignore = "boots Linux: run by resources/test.sh"]
fn qemu_boots_the_same_guest_for_every_suite() {
    if !is_root() {
        eprintln!("skipped: needs root (chroot, taps)");
        return;
    }
    let _one = one_at_a_time();
    let (table, _, report) = linux_bench("process,qemu", "1");
    assert!(table.contains("qemu"), "{table}");
    // Each run boots the kernel before its command: far above a process;
    // the command's status and output come back through the serial port,
    // and QEMU ends right after (isa-debug-exit), not at a timeout.
    let (running, exit) = (
        median(&report, "startup", "running", "qemu"),
        median(&report, "startup", "exit", "qemu"),
    );
    assert!(running > 10.0 * median(&report, "startup", "running", "process"));
    assert!(
        running <= exit && exit < running + 10_000.0,
        "{running} {exit}"
    );
    // On the bench's tap, eth0 configured by the agent from the command line.
    assert!(median(&report, "startup", "port", "qemu") > running);
    assert!(median(&report, "net", "tcp", "qemu") > 0.0);
    assert!(median(&report, "net", "rtt", "qemu") > 0.0);
    // sysbench and fio ran in the guest, their output read as for the others.
    assert!(median(&report, "cpu", "events", "qemu") > 0.0);
    assert!(median(&report, "memory", "bandwidth", "qemu") > 0.0);
    for case in ["randread", "randwrite", "seqread", "seqwrite"] {
        assert!(median(&report, "disk", case, "qemu") > 0.0, "disk {case}");
    }
    // QEMU's process holds the guest RAM it touched: more than a process,
    // less than the RAM (256 MiB) plus 128 MiB of QEMU.
    let (vm, process) = (
        median(&report, "memory", "instance", "qemu"),
        median(&report, "memory", "instance", "process"),
    );
    assert!(
        vm > process && vm < 384.0,
        "qemu {vm} MiB, process {process} MiB"
    );
    assert!(median(&report, "density", "all-up", "qemu") > 0.0);
    assert_nothing_left();
}

/// Every suite on the bench image with the guest kernel, `runs` runs
/// without warm-up, two instances for density, 1 s fixed-time runs.
fn linux_bench(runtimes: &str, runs: &str) -> (String, String, serde_json::Value) {
    let kernel = kernel("vmlinux");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "bench-{}-{}",
        runtimes.replace(',', "-"),
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    resources_output("build-bench-image.sh", &[]);
    let out = bench_report(
        &[
            "--runtime",
            runtimes,
            "--runs",
            runs,
            "--warmup",
            "0",
            "--density",
            "2",
            "--duration",
            "1s",
            "--kernel",
            kernel.to_str().unwrap(),
        ],
        &json,
    );
    let _ = std::fs::remove_dir_all(&dir);
    out
}

/// Nothing of a bench is left: scratch directories, runc containers and
/// their cgroups, VMs.
fn assert_nothing_left() {
    let base = Path::new("/run/ligera/bench");
    assert!(!base.exists(), "{base:?} left behind");
    // The VMs of suites that measure a running VM (persistent sandboxes).
    if let Ok(entries) = std::fs::read_dir("/run/ligera") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(!name.starts_with("sb-ligera-bench-"), "{name} left behind");
        }
    }
    // QEMU's instances (their scratch disks are in the bench's directory).
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !(cmdline.starts_with("qemu-system") && cmdline.contains("/run/ligera/bench/")),
            "QEMU left behind: {cmdline}"
        );
    }
    // The net suite's namespaces (and with them its veth and tap).
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with("ligera-bench-"),
                "netns {name} left behind"
            );
        }
    }
    for controller in ["memory", "cpu", "pids"] {
        let Ok(entries) = std::fs::read_dir(format!("/sys/fs/cgroup/{controller}")) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            assert!(
                !name.starts_with("ligera-bench-"),
                "cgroup {controller}/{name} left behind"
            );
        }
    }
}

#[test]
fn process_and_container_side_by_side_in_json_csv_and_a_table() {
    if !is_root() {
        eprintln!("skipped: needs root (chroot, runc)");
        return;
    }
    let _one = one_at_a_time();
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let csv = dir.join("out.csv");
    let svg = dir.join("out.svg");
    let busybox = resources_output("build-sandbox-rootfs.sh", &[]);
    let (stdout, stderr, report) = bench_report(
        &[
            "--image",
            busybox.to_str().unwrap(),
            "--suite",
            "startup,cpu",
            "--runtime",
            "process,runc",
            "--runs",
            "3",
            "--duration",
            "1s",
            "--csv",
            csv.to_str().unwrap(),
            "--plot",
            svg.to_str().unwrap(),
        ],
        &json,
    );
    // Progress while it runs.
    assert!(stderr.contains("startup: process run 3/3"), "{stderr}");

    assert_eq!(report["schema"], "ligera-bench/1");
    assert_eq!(report["settings"]["runs"], 3);
    assert!(report["host"]["cpus"].as_u64().unwrap() >= 1);
    for case in ["running", "exit"] {
        let p = figure(&report, "startup", case, "process");
        let runs: Vec<f64> = p["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        assert_eq!(runs.len(), 3, "{p}");
        let median = p["median"].as_f64().unwrap();
        assert!(median > 0.0 && median < 10_000.0, "{p}");
        assert!(p["min"].as_f64().unwrap() <= median && median <= p["max"].as_f64().unwrap());
        assert_eq!(p["ratio_to_process"].as_f64(), Some(1.0));
        let r = figure(&report, "startup", case, "runc");
        if Path::new("/usr/sbin/runc").exists() {
            // A container starts slower than a bare process: namespaces,
            // cgroups, and runc's own start-up.
            let ratio = r["ratio_to_process"]
                .as_f64()
                .unwrap_or_else(|| panic!("{r}"));
            assert!(ratio > 1.0, "runc {case}: {r}");
        } else {
            assert!(r["skipped"].as_str().is_some(), "{r}");
        }
    }
    // The busybox image has no sysbench: skipped with the reason, not zero.
    for runtime in ["process", "runc"] {
        let f = figure(&report, "cpu", "events", runtime);
        assert!(f["median"].is_null(), "{f}");
        assert_eq!(f["skipped"], "the image has no sysbench", "{f}");
    }
    // The table says the same.
    assert!(
        stdout.contains("startup   running    ms        process"),
        "{stdout}"
    );
    assert!(
        stdout.contains("skipped: the image has no sysbench"),
        "{stdout}"
    );
    if report["host"]["nested_emulation"] == true {
        assert!(stdout.contains("WARNING: "), "{stdout}");
        assert!(report["warning"].as_str().is_some());
    }
    // CSV: a header and one row per runtime and case.
    let text = std::fs::read_to_string(&csv).unwrap();
    let mut lines = text.lines();
    assert_eq!(
        lines.next(),
        Some("suite,case,unit,runtime,median,min,max,ratio_to_process,runs,skipped")
    );
    assert_eq!(lines.count(), 8, "{text}");
    // The plot: well-formed SVG, one labelled element per runtime and case
    // (four panels: startup/running, startup/exit, startup/port, cpu/events).
    let text = std::fs::read_to_string(&svg).unwrap();
    let doc = roxmltree::Document::parse(&text).expect("well-formed SVG");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let labels: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .filter_map(|n| n.text().map(|t| t.trim().to_string()))
        .collect();
    for runtime in ["process", "runc"] {
        let n = labels
            .iter()
            .filter(|l| l.starts_with(&format!("{runtime}: ")))
            .count();
        assert_eq!(n, 4, "{runtime} in {labels:?}");
    }
    assert_eq!(
        labels.iter().filter(|l| l.ends_with(": skipped")).count(),
        4,
        "cpu and the port case are skipped for both: {labels:?}"
    );
    // The busybox image has no socat for the port case's server.
    let port = figure(&report, "startup", "port", "runc");
    assert_eq!(port["skipped"], "the image has no socat", "{port}");
    assert_nothing_left();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The median of `runtime` in `suite`/`case`, which must be there.
fn median(report: &serde_json::Value, suite: &str, case: &str, runtime: &str) -> f64 {
    let f = figure(report, suite, case, runtime);
    f["median"].as_f64().unwrap_or_else(|| panic!("{f}"))
}

/// The bench image (Debian's sysbench, fio, iperf3, socat) through every suite in a
/// container and a process: the tools' own figures, sane, and a container
/// computes as fast as a bare process.
#[test]
fn the_bench_image_suites_in_a_container_and_a_process() {
    if !is_root() {
        eprintln!("skipped: needs root (chroot, runc, mmdebstrap)");
        return;
    }
    let _one = one_at_a_time();
    resources_output("build-bench-image.sh", &[]);
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench-cpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("out.json");
    let (stdout, _, report) = bench_report(
        &[
            "--suite",
            "startup,cpu,memory,disk,net,density",
            "--runtime",
            "process,runc",
            "--runs",
            "2",
            "--duration",
            "1s",
            "--density",
            "3",
        ],
        &json,
    );
    assert!(
        report["settings"]["image"]
            .as_str()
            .unwrap()
            .contains("bench-image"),
        "the default image is the bench image"
    );
    assert_eq!(report["settings"]["density"], 3);
    let (p, r) = (
        median(&report, "cpu", "events", "process"),
        median(&report, "cpu", "events", "runc"),
    );
    assert!(p > 0.0 && r > 0.0);
    assert!(
        p / r < 1.5 && r / p < 1.5,
        "process {p} against container {r} events/s"
    );
    for runtime in ["process", "runc"] {
        // sysbench memory moves at least 100 MiB/s anywhere.
        let bw = median(&report, "memory", "bandwidth", runtime);
        assert!(bw > 100.0, "{runtime}: {bw} MiB/s");
        // A shell waiting on its stdin: more than nothing, less than the
        // container's memory limit (256 MiB).
        let mem = median(&report, "memory", "instance", runtime);
        assert!(mem > 0.05 && mem < 256.0, "{runtime}: {mem} MiB");
        for case in ["randread", "randwrite", "seqread", "seqwrite"] {
            let v = median(&report, "disk", case, runtime);
            assert!(v > 1.0, "{runtime} disk {case}: {v}");
        }
        // iperf3 over loopback (process) and a veth (container) moves more
        // than 100 Mbit/s anywhere; a TCP round trip takes time, and less
        // than a second.
        let tcp = median(&report, "net", "tcp", runtime);
        assert!(tcp > 0.1, "{runtime}: {tcp} Gbit/s");
        let rtt = median(&report, "net", "rtt", runtime);
        assert!(rtt > 1.0 && rtt < 1e6, "{runtime}: {rtt} us");
        // Three instances at once: up within a minute, and together they
        // cost more than one.
        let up = median(&report, "density", "all-up", runtime);
        assert!(up > 0.0 && up < 60_000.0, "{runtime}: all up in {up} ms");
        let all = median(&report, "density", "memory", runtime);
        assert!(all > mem, "{runtime}: 3 instances {all} MiB, one {mem} MiB");
    }
    // The port case: a one-connection echo server in each new instance
    // answers the host side, and a container's takes longer to.
    let (p, r) = (
        median(&report, "startup", "port", "process"),
        median(&report, "startup", "port", "runc"),
    );
    assert!(
        p > 0.0 && r > p && r < 60_000.0,
        "port: process {p} ms, runc {r} ms"
    );
    // A container's start costs more than a process's.
    assert!(
        median(&report, "density", "all-up", "runc")
            > median(&report, "density", "all-up", "process")
    );
    for row in [
        "memory    bandwidth",
        "disk      randread",
        "density   all-up",
    ] {
        assert!(stdout.contains(row), "no {row} in {stdout}");
    }
    assert_nothing_left();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A copy of the busybox image whose `sysbench` is the shell script
/// `script`: a workload that misbehaves as a hostile image or guest may.
fn image_with_sysbench(name: &str, script: &str) -> std::path::PathBuf {
    let busybox = resources_output("build-sandbox-rootfs.sh", &[]);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let status = Command::new("cp")
        .arg("-a")
        .arg(busybox.canonicalize().unwrap())
        .arg(&dir)
        .status()
        .unwrap();
    assert!(status.success());
    let tool = dir.join("usr/bin/sysbench");
    std::fs::create_dir_all(tool.parent().unwrap()).unwrap();
    std::fs::write(&tool, format!("#!/bin/sh\n{script}\n")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// A workload that never ends is ended at --run-timeout, and one that
/// prints a figure that is no number (inf) is no figure: both skipped with
/// the reason, the bench carries on and leaves nothing.
#[test]
fn hanging_and_lying_workloads_are_skipped_with_the_reason() {
    if !is_root() {
        eprintln!("skipped: needs root (chroot)");
        return;
    }
    let _one = one_at_a_time();
    for (name, script, suite, why) in [
        ("hang", "sleep 100000", "cpu", "did not finish within 2 s"),
        (
            "hang-hold",
            "sleep 100000",
            "memory",
            "did not finish within 2 s",
        ),
        (
            "inf",
            "echo '    events per second: inf'",
            "cpu",
            "inf is not a events/s figure",
        ),
    ] {
        let image = image_with_sysbench(name, script);
        let json = image.with_extension("json");
        let started = Instant::now();
        let (_, _, report) = bench_report(
            &[
                "--image",
                image.to_str().unwrap(),
                "--suite",
                &format!("{suite},startup"),
                "--runtime",
                "process",
                "--runs",
                "1",
                "--run-timeout",
                "2s",
            ],
            &json,
        );
        assert!(started.elapsed() < Duration::from_secs(60), "{name}");
        let case = if suite == "cpu" {
            "events"
        } else {
            "bandwidth"
        };
        let f = figure(&report, suite, case, "process");
        assert_eq!(f["skipped"], why, "{name}: {f}");
        // The suite after it ran.
        assert!(median(&report, "startup", "exit", "process") > 0.0);
        assert_nothing_left();
        let _ = std::fs::remove_dir_all(&image);
        let _ = std::fs::remove_file(&json);
    }
}

#[test]
fn bad_arguments_and_images_are_clear_errors() {
    let _one = one_at_a_time();
    let out = bench(&["--runs", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = bench(&["--suite", "nope"]);
    assert_eq!(out.status.code(), Some(2));
    let out = bench(&["--image", "/no/such/image", "--runtime", "process"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ligera: bench: error:"), "{stderr}");
    assert_nothing_left();
}

/// A bench that runs containers for minutes, 2 s into its run: a signal
/// now lands in the middle of a container's start or run, with the net
/// suite's namespaces, veth and tap made.
fn busy_bench() -> std::process::Child {
    let child = Command::new(LIGERA)
        .args([
            "bench",
            "--suite",
            "startup,net",
            "--runtime",
            "runc,process",
        ])
        .args(["--runs", "1000", "--duration", "1s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2000));
    child
}

#[test]
fn ctrl_c_stops_the_run_in_flight_and_leaves_nothing() {
    if !is_root() {
        eprintln!("skipped: needs root for runc");
        return;
    }
    let _one = one_at_a_time();
    resources_output("build-sandbox-rootfs.sh", &[]);
    let mut child = busy_bench();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the bench did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(130));
    assert_nothing_left();

    // SIGKILL leaves its containers, cgroups and scratch files; the next
    // bench removes them.
    let mut child = busy_bench();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(Path::new(&format!("/run/ligera/bench/{}", child.id())).exists());
    let host_side = format!("/run/netns/ligera-bench-{}-host", child.id());
    assert!(Path::new(&host_side).exists());
    let out = bench(&["--suite", "startup", "--runtime", "process", "--runs", "1"]);
    assert_eq!(out.status.code(), Some(0));
    assert_nothing_left();
}

#[test]
#[ignore = "boots Linux: run by resources/test.sh"]
fn the_vm_runs_beside_the_container_and_the_process() {
    if !is_root() {
        eprintln!("skipped: needs root (chroot, runc)");
        return;
    }
    let _one = one_at_a_time();
    let (_, stderr, report) = linux_bench("process,runc,vm", "2");
    // One VM for the suites that measure a running VM.
    assert_eq!(
        stderr.matches("starting a VM for the suites").count(),
        1,
        "{stderr}"
    );
    for case in ["running", "exit"] {
        let (v, p) = (
            median(&report, "startup", case, "vm"),
            median(&report, "startup", case, "process"),
        );
        // A VM boots a kernel before the command runs: far above a process.
        assert!(v > 10.0 * p, "vm {v} ms against process {p} ms");
        let vm = figure(&report, "startup", case, "vm");
        assert!(vm["ratio_to_process"].as_f64().unwrap() > 10.0);
    }
    let running = median(&report, "startup", "running", "vm");
    let exit = median(&report, "startup", "exit", "vm");
    assert!(running <= exit, "output after exit? {running} > {exit}");
    // A new VM on its own tap, its eth0 set up by the agent: its echo
    // server answers the host side, after a boot (`--net` boots cold).
    let port = median(&report, "startup", "port", "vm");
    assert!(
        port > 10.0 * median(&report, "startup", "port", "process"),
        "vm port {port} ms"
    );
    // sysbench and fio ran in the VM and reported figures.
    let vm = figure(&report, "cpu", "events", "vm");
    assert!(vm["median"].as_f64().unwrap_or_else(|| panic!("{vm}")) > 0.0);
    assert_eq!(vm["runs"].as_array().unwrap().len(), 2);
    assert!(median(&report, "memory", "bandwidth", "vm") > 0.0);
    // The sandbox's tap in the bench's namespace, eth0 configured by the
    // agent: iperf3 and the echo server answer.
    assert!(median(&report, "net", "tcp", "vm") > 0.0);
    assert!(median(&report, "net", "rtt", "vm") > 0.0);
    for case in ["randread", "randwrite", "seqread", "seqwrite"] {
        assert!(median(&report, "disk", case, "vm") > 0.0, "disk {case}");
    }
    // A VM costs its VMM and the guest RAM its kernel touched: more than
    // a process, less than its RAM (256 MiB) plus 64 MiB.
    let (vm, process) = (
        median(&report, "memory", "instance", "vm"),
        median(&report, "memory", "instance", "process"),
    );
    assert!(
        vm > process && vm < 320.0,
        "vm {vm} MiB, process {process} MiB"
    );
    // Two VMs at once: both up; they cost more than two processes and less
    // than twice a VM's RAM and 64 MiB.
    assert!(median(&report, "density", "all-up", "vm") > 0.0);
    let (two, processes) = (
        median(&report, "density", "memory", "vm"),
        median(&report, "density", "memory", "process"),
    );
    assert!(
        two > processes && two < 640.0,
        "two VMs {two} MiB, two processes {processes} MiB"
    );
    if report["host"]["nested_emulation"] == true {
        assert!(
            report["warning"]
                .as_str()
                .unwrap()
                .contains("not representative")
        );
    }
    assert_nothing_left();
}
