//! The jail, inspected from outside while the real `ligera` runs the test
//! guest: the VM process's credentials, capabilities, namespaces, root
//! directory, descriptors, rlimits and cgroup; what is left after SIGTERM
//! and SIGKILL; a VM that reaches its memory ceiling. These tests need root
//! (the jail does); as another user they check that the jail is refused.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{guests, spawn, vm_process};

/// The jailed VM's uid and gid: this plus its supervisor's pid.
const JAIL_ID_BASE: u32 = 1_000_000_000;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("jail-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn status_field(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_default()
}

/// Every path under `root`, relative to it, sorted (not following links).
fn tree(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            out.push(path.strip_prefix(root).unwrap().display().to_string());
            if e.file_type().unwrap().is_dir() {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The cgroup v1/v2 directory of `pid` for `controller`.
fn cgroup_dir(pid: i32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in text.lines() {
        let mut f = line.splitn(3, ':');
        let (_, list, path) = (f.next(), f.next().unwrap(), f.next().unwrap());
        if list.split(',').any(|c| c == controller) {
            return Path::new("/sys/fs/cgroup")
                .join(controller)
                .join(&path[1..]);
        }
    }
    // Pure cgroup v2.
    let path = text.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
    Path::new("/sys/fs/cgroup").join(&path[1..])
}

fn read_trim(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn a_jailed_vm_can_reach_only_what_it_was_given() {
    if !is_root() {
        let out = common::run(
            &[
                "run",
                "--kernel",
                guests().elf64.to_str().unwrap(),
                "--jail",
            ],
            Duration::from_secs(30),
        );
        assert_eq!(out.status, 2, "{out}");
        assert!(out.stderr.contains("--jail needs root"), "{out}");
        return;
    }
    let g = guests();
    let dir = scratch_dir("inspect");
    let sock = dir.join("api.sock");
    let serial = dir.join("serial.log");
    // A descriptor ligera inherits without being told about it.
    let secret = dir.join("secret");
    std::fs::write(&secret, b"host file").unwrap();
    let inherited = std::fs::File::open(&secret).unwrap();
    let inherited_fd = std::os::fd::AsRawFd::as_raw_fd(&inherited);
    // SAFETY: clearing close-on-exec on a descriptor we own.
    unsafe { libc::fcntl(inherited_fd, libc::F_SETFD, 0) };
    let vm = spawn(&[
        "run",
        "--kernel",
        g.elf64.to_str().unwrap(),
        "--no-host-quirks",
        "--memory",
        "32M",
        "--cmdline",
        "test=count",
        "--api-sock",
        sock.to_str().unwrap(),
        "--serial",
        &format!("file={}", serial.display()),
        "--cpu-quota",
        "50000",
        "--memory-limit",
        "100M",
    ]);
    drop(inherited);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&serial).is_ok_and(|s| s.contains("COUNT 3")) {
        assert!(Instant::now() < deadline, "the guest did not count");
        std::thread::sleep(Duration::from_millis(20));
    }
    let supervisor = vm.pid();
    let pid = vm_process(supervisor);
    assert_ne!(pid, supervisor, "no jailed VM process under {supervisor}");

    // Credentials and privileges, on every thread.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let tid: i32 = task.unwrap().file_name().to_str().unwrap().parse().unwrap();
        let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        let id = (JAIL_ID_BASE + supervisor as u32).to_string();
        assert_eq!(field("Uid:"), vec![id.clone(); 4], "{status}");
        assert_eq!(field("Gid:"), vec![id; 4], "{status}");
        for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            assert_eq!(field(caps), vec!["0000000000000000"], "{caps} {status}");
        }
        assert_eq!(field("NoNewPrivs:"), vec!["1"], "{status}");
        assert_eq!(field("Seccomp:"), vec!["2"], "{status}");
    }
    assert_eq!(status_field(pid, "Groups:"), "");

    // Namespaces of its own, and PID 1 in its PID namespace.
    for ns in ["mnt", "pid", "net", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap();
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).unwrap();
        assert_ne!(theirs, ours, "{ns} namespace shared with the host");
    }
    assert_eq!(
        status_field(pid, "NSpid:").split_whitespace().last(),
        Some("1")
    );

    // Its root holds the kernel, the serial file and the socket's
    // directory, nothing else (not even /dev/kvm, opened before); a host
    // file that was not given to it is not there.
    let root = PathBuf::from(format!("/proc/{pid}/root"));
    let mut expected: Vec<String> = Vec::new();
    for path in [g.elf64.canonicalize().unwrap(), dir.canonicalize().unwrap()] {
        for a in path.ancestors().take_while(|a| *a != Path::new("/")) {
            expected.push(a.strip_prefix("/").unwrap().display().to_string());
        }
    }
    let dir_rel = dir.canonicalize().unwrap();
    let dir_rel = dir_rel.strip_prefix("/").unwrap();
    // The socket's directory is the host's: what is in it shows.
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        expected.push(dir_rel.join(e.file_name()).display().to_string());
    }
    expected.sort();
    expected.dedup();
    assert_eq!(tree(&root), expected);
    assert!(!root.join("etc/passwd").exists());
    assert!(!root.join("proc/self").exists());
    // The kernel is read-only in the jail, and the sockets are the VM's.
    let info = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let kernel = g.elf64.canonicalize().unwrap();
    let kernel_line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == kernel.to_str())
        .unwrap_or_else(|| panic!("no mount for the kernel:\n{info}"));
    assert!(
        kernel_line.split(' ').nth(5).unwrap().starts_with("ro"),
        "{kernel_line}"
    );
    // The control socket stays root's: accepting needs no ownership.
    assert_eq!(std::fs::metadata(&sock).unwrap().uid(), 0);

    // Only its own descriptors: the inherited one is closed.
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(fd.path()).unwrap();
        assert_ne!(
            target,
            secret,
            "inherited descriptor {:?} kept",
            fd.file_name()
        );
    }

    // rlimits and cgroup limits.
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let limit = |name: &str| {
        limits
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap()
            .split_whitespace()
            .rev()
            .nth(2)
            .unwrap()
            .to_string()
    };
    assert_eq!(limit("Max core file size"), "0", "{limits}");
    assert_eq!(limit("Max open files"), "2048", "{limits}");
    assert_eq!(limit("Max file size"), (1u64 << 30).to_string(), "{limits}");
    let memory = cgroup_dir(pid, "memory");
    let cpu = cgroup_dir(pid, "cpu");
    assert!(
        memory.ends_with(format!("ligera/{supervisor}")),
        "{memory:?}"
    );
    if memory.join("memory.limit_in_bytes").exists() {
        assert_eq!(
            read_trim(&memory.join("memory.limit_in_bytes")),
            (100u64 << 20).to_string()
        );
        assert_eq!(read_trim(&cpu.join("cpu.cfs_quota_us")), "50000");
        assert_eq!(read_trim(&cpu.join("cpu.cfs_period_us")), "100000");
    } else {
        assert_eq!(
            read_trim(&memory.join("memory.max")),
            (100u64 << 20).to_string()
        );
        assert_eq!(read_trim(&memory.join("cpu.max")), "50000 100000");
    }

    // SIGTERM: the supervisor passes it on; nothing is left.
    let jail_dir = Path::new("/run/ligera/jail").join(supervisor.to_string());
    assert!(jail_dir.is_dir());
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(supervisor, libc::SIGTERM) };
    let out = vm.finish(Duration::from_secs(30));
    assert_eq!(out.status, 128 + libc::SIGTERM, "{out}");
    assert!(!jail_dir.exists(), "{jail_dir:?} left behind");
    assert!(!memory.exists(), "{memory:?} left behind");
    assert!(!cpu.exists(), "{cpu:?} left behind");
    assert!(!sock.exists(), "the control socket is left behind");
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn after_sigkill_the_next_ligera_cleans_up() {
    if !is_root() {
        return;
    }
    let g = guests();
    let vm = common::counting_guest(&[]);
    let supervisor = vm.pid();
    let pid = vm_process(supervisor);
    assert_ne!(pid, supervisor);
    let memory = cgroup_dir(pid, "memory");
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(supervisor, libc::SIGKILL) };
    let out = vm.finish(Duration::from_secs(30));
    assert_eq!(out.status, 128 + libc::SIGKILL, "{out}");
    // The VM process goes with its supervisor (parent-death signal).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the VM process outlived its supervisor"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let jail_dir = Path::new("/run/ligera/jail").join(supervisor.to_string());
    assert!(jail_dir.exists() && memory.exists(), "nothing to clean up?");
    // The next jailed ligera removes them.
    let out = common::run_guest(&g.elf64, &["--memory", "32M"]);
    out.assert_ok();
    assert!(!jail_dir.exists(), "{jail_dir:?} left behind");
    assert!(!memory.exists(), "{memory:?} left behind");
}

#[test]
fn a_vm_reaching_its_memory_ceiling_is_reported() {
    if !is_root() {
        return;
    }
    let g = guests();
    let out = common::run(
        &[
            "run",
            "--kernel",
            g.elf64.to_str().unwrap(),
            "--no-host-quirks",
            "--memory",
            "256M",
            "--memory-limit",
            "48M",
            "--cmdline",
            "test=touch touch_mib=100",
        ],
        Duration::from_secs(120),
    );
    assert_eq!(out.status, 128 + libc::SIGKILL, "{out}");
    assert!(
        out.stderr.contains("reached its memory ceiling (48 MiB"),
        "{out}"
    );
}

#[test]
fn jail_options_are_checked() {
    let g = guests();
    let kernel = g.elf64.to_str().unwrap();
    let out = common::run(
        &[
            "run",
            "--kernel",
            kernel,
            "--no-jail",
            "--cpu-quota",
            "50000",
        ],
        Duration::from_secs(30),
    );
    assert_eq!(out.status, 2, "{out}");
    assert!(out.stderr.contains("--no-jail"), "{out}");
    if is_root() {
        let out = common::run(
            &["run", "--kernel", kernel, "--uid", "0"],
            Duration::from_secs(30),
        );
        assert_eq!(out.status, 2, "{out}");
        let out = common::run(
            &["run", "--kernel", kernel, "--api-sock", "/ligera-test.sock"],
            Duration::from_secs(30),
        );
        assert_eq!(out.status, 1, "{out}");
        assert!(out.stderr.contains("directory of its own"), "{out}");
        // /tmp is everyone's: the jail would show all of it.
        let out = common::run(
            &[
                "run",
                "--kernel",
                kernel,
                "--vsock",
                "cid=3,socket=/tmp/ligera-test.sock",
            ],
            Duration::from_secs(30),
        );
        assert_eq!(out.status, 1, "{out}");
        assert!(out.stderr.contains("writable by others"), "{out}");
        assert!(!Path::new("/tmp/ligera-test.sock").exists());
    }
    // Unjailed, the VM is ligera's own process.
    let vm = common::counting_guest(&["--no-jail"]);
    assert_eq!(vm_process(vm.pid()), vm.pid());
    let ours = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/ns/mnt", vm.pid())).unwrap(),
        ours
    );
    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    assert_eq!(
        vm.finish(Duration::from_secs(30)).status,
        128 + libc::SIGTERM
    );
}
