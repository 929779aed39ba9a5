//! `ligera sandbox run` end to end: the resources/ guest kernel boots the
//! agent (agent/) as init from its disk, over the default busybox image;
//! the command's output, input and status cross vsock. Each run boots Linux
//! (seconds here), so these are ignored by a plain `cargo test`;
//! `resources/test.sh` runs them (after building the agent and the image).

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::LIGERA;
use common::linux::{kernel, one_at_a_time, resources_output};
use common::oci::{Entry, Layer, write_layout};

struct Run {
    status: i32,
    stdout: Vec<u8>,
    stderr: String,
}

/// Runs `ligera sandbox run ARGS`, feeding `input` to its stdin.
fn sandbox(args: &[&str], input: &[u8]) -> Run {
    let _one = one_at_a_time();
    // The default image (setup builds it; building it here is cheap).
    resources_output("build-sandbox-rootfs.sh", &[]);
    let kernel = kernel("vmlinux");
    let mut cmd = Command::new(LIGERA);
    cmd.args(["sandbox", "run", "--kernel", kernel.to_str().unwrap()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = cmd.spawn().expect("cannot start ligera");
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let mut out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let mut err = child.stderr.take().unwrap();
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ligera sandbox run {args:?} did not end");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = feeder.join();
    let run = Run {
        status: status.code().unwrap_or(-1),
        stdout: reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    eprintln!(
        "sandbox {args:?}: status {} after {:.1} s",
        run.status,
        start.elapsed().as_secs_f64()
    );
    run
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn output_input_and_status_cross_the_vm() {
    // From the cached snapshot (the default), then booted: the same.
    for how in [&[][..], &["--no-snapshot"][..]] {
        let mut args = how.to_vec();
        args.extend([
            "--env",
            "GREETING=hello there",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING\"; echo to-stderr >&2; cat; uname -s; exit 42",
        ]);
        let r = sandbox(&args, b"piped input\nsecond line\n");
        let stdout = String::from_utf8_lossy(&r.stdout);
        assert_eq!(
            r.status, 42,
            "{how:?}: stdout {stdout}\nstderr {}",
            r.stderr
        );
        assert_eq!(
            stdout, "hello there\npiped input\nsecond line\nLinux\n",
            "{how:?}: stderr {}",
            r.stderr
        );
        // ligera's own lines, if this run made the snapshot, then the command's.
        let command_stderr: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| !l.starts_with("ligera: booting the sandbox VM once"))
            .filter(|l| !l.starts_with("ligera: sandbox snapshot ready"))
            .collect();
        assert_eq!(command_stderr, ["to-stderr"], "{how:?}");
    }
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn sandboxes_from_one_snapshot_get_fresh_randomness_and_the_time() {
    let script = "head -c 16 /dev/urandom | od -An -tx1; date +%s";
    let runs: Vec<Vec<String>> = (0..2)
        .map(|_| {
            let r = sandbox(&["--", "sh", "-c", script], b"");
            assert_eq!(r.status, 0, "{}", r.stderr);
            // Restored, not booted because the snapshot could not be made.
            assert!(!r.stderr.contains("no snapshot"), "{}", r.stderr);
            String::from_utf8_lossy(&r.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .collect()
        })
        .collect();
    // Both are clones of one booted VM, whose RNG state they restored;
    // yet their random numbers differ (the agent reseeded the RNG), and
    // their clocks say now, not when the snapshot was taken.
    assert_ne!(runs[0][0], runs[1][0], "{runs:?}");
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for r in &runs {
        let guest: u64 = r[1].parse().unwrap_or_else(|e| panic!("{e}: {runs:?}"));
        assert!(
            host.abs_diff(guest) < 120,
            "guest clock {guest}, host {host}"
        );
    }
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn binary_output_is_byte_exact() {
    // 3 MB of random bytes on stdout (more than the credit window many
    // times over); the guest's sha256 of them on stderr.
    let r = sandbox(
        &[
            "--",
            "sh",
            "-c",
            "head -c 3000000 /dev/urandom > /tmp/blob && sha256sum /tmp/blob >&2 && cat /tmp/blob",
        ],
        b"",
    );
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(r.stdout.len(), 3_000_000, "{}", r.stderr);
    let ours = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(&r.stdout)?;
            c.wait_with_output()
        })
        .unwrap();
    let ours = String::from_utf8_lossy(&ours.stdout);
    let ours = ours.split_whitespace().next().unwrap();
    let theirs = r.stderr.split_whitespace().next().unwrap_or("");
    assert_eq!(ours, theirs, "stderr: {}", r.stderr);
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn a_missing_command_is_127() {
    let r = sandbox(&["--", "no-such-command", "x"], b"");
    assert_eq!(r.status, 127, "{}", r.stderr);
    assert!(r.stderr.contains("no-such-command"), "{}", r.stderr);
    assert!(r.stdout.is_empty());
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn the_timeout_ends_the_run_with_124_and_nothing_is_left() {
    // As ligera picks it (the tests run as root).
    let runtime = std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| std::path::PathBuf::from(d).join("ligera"))
        .unwrap_or_else(|| "/run/ligera".into());
    let before: Vec<_> = std::fs::read_dir(&runtime)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let r = sandbox(&["--timeout", "3s", "--", "sleep", "1000"], b"");
    assert_eq!(r.status, 124, "{}", r.stderr);
    assert!(r.stderr.contains("did not finish"), "{}", r.stderr);
    let after: Vec<_> = std::fs::read_dir(&runtime)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        after.iter().all(|n| before.contains(n)),
        "left behind in {}: {after:?}",
        runtime.display()
    );
}

/// The run-time directory ligera uses (the tests run as root).
fn runtime_dir() -> std::path::PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(|d| std::path::PathBuf::from(d).join("ligera"))
        .unwrap_or_else(|| "/run/ligera".into())
}

fn ligera(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(LIGERA).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_network_flags_are_status_2_before_any_vm() {
    for (flag, says) in [
        ("tap=t0,gw=10.0.0.1", "'gw=' needs 'ip='"),
        ("tap=t0,ip=10.0.0.300/24", "want ip=ADDR/PREFIX"),
        ("tap=t0,ip=10.0.0.2/33", "want ip=ADDR/PREFIX"),
        ("tap=t0,ip=10.0.0.2", "want ip=ADDR/PREFIX"),
        ("ip=10.0.0.2/24", "'tap=' is required"),
        ("tap=t0,dns=1.1.1.1", "unknown key 'dns'"),
        (
            "tap=t0,ip=10.0.0.2/24 rdinit=/bin/sh",
            "want ip=ADDR/PREFIX",
        ),
        (
            "tap=t0,ip=10.0.0.2/24,gw=10.0.1.1",
            "not another address in 10.0.0.2/24",
        ),
        ("tap=t0,ip=10.0.0.2/32,gw=10.0.0.1", "not another address"),
        ("tap=t0,ip=10.0.0.2/24,gw=10.0.0.2", "not another address"),
    ] {
        let (code, _, err) = ligera(&["sandbox", "run", "--net", flag, "--", "true"]);
        assert_eq!(code, 2, "{flag}: {err}");
        assert!(err.contains(says), "{flag}: {err}");
    }
}

#[test]
fn missing_and_dead_sandboxes_are_handled_without_a_vm() {
    let (code, _, err) = ligera(&["sandbox", "exec", "no-such-sandbox", "--", "true"]);
    assert_eq!((code, err.lines().count()), (125, 1), "{err}");
    assert!(
        err.contains("no running sandbox named no-such-sandbox"),
        "{err}"
    );
    let (code, _, err) = ligera(&["sandbox", "rm", "no-such-sandbox"]);
    assert_eq!(code, 125, "{err}");
    let (code, _, err) = ligera(&["sandbox", "create", "--name", "../escape"]);
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("not a sandbox name"), "{err}");

    // A sandbox whose ligera died (SIGKILL): its directory, with a pid
    // that no longer runs.
    let name = format!("dead-{}", std::process::id());
    let dir = runtime_dir().join(format!("sb-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = Command::new("true").spawn().unwrap();
    let dead_pid = child.id();
    child.wait().unwrap();
    std::fs::write(dir.join("pid"), dead_pid.to_string()).unwrap();
    std::fs::write(
        dir.join("info.json"),
        format!(r#"{{"name":"{name}","image":"(default)","memory":268435456,"created":0}}"#),
    )
    .unwrap();
    let (code, out, _) = ligera(&["sandbox", "ls"]);
    assert_eq!(code, 0);
    let row = out
        .lines()
        .find(|l| l.starts_with(&name))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains("dead") && row.contains("256 MiB"), "{row}");
    let (code, out, err) = ligera(&["sandbox", "rm", &name]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), name);
    assert!(!dir.exists(), "rm removes what the dead sandbox left");
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn an_oci_image_runs_with_its_entrypoint_cmd_env_workdir_and_user() {
    // Two layers: busybox and a few applets, then the working directory
    // and a file the second layer's whiteout removes.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sandbox-oci-{}", std::process::id()));
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static");
    let base = Layer::gzip(&[
        Entry::Dir("bin", 0o755),
        Entry::File("bin/busybox", busybox, 0o755),
        Entry::Symlink("bin/sh", "busybox"),
        Entry::Symlink("bin/echo", "busybox"),
        Entry::Symlink("bin/id", "busybox"),
        Entry::Symlink("bin/ls", "busybox"),
        Entry::Dir("work", 0o777),
        Entry::File("work/old", b"gone".to_vec(), 0o644),
    ]);
    let top = Layer::plain(&[
        Entry::File("work/.wh.old", Vec::new(), 0o644),
        Entry::File("work/kept", b"here".to_vec(), 0o644),
    ]);
    let config = serde_json::json!({
        "Entrypoint": ["/bin/sh", "-c"],
        "Cmd": ["echo \"$GREETING from $(pwd) as $(id -u):$(id -g), $(ls)\""],
        "Env": ["GREETING=hello", "PATH=/bin"],
        "WorkingDir": "/work",
        "User": "1000:1000",
    });
    write_layout(&dir, &[base, top], config, "latest");
    let r = sandbox(&["--image", dir.to_str().unwrap()], b"");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(r.status, 0, "{}", r.stderr);
    assert_eq!(
        String::from_utf8_lossy(&r.stdout),
        "hello from /work as 1000:1000, kept\n",
        "{}",
        r.stderr
    );
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn a_hostile_agent_ends_the_run_with_125() {
    // tests/hostile-agent/hostile-agent.c boots in place of the agent.
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/hostile-agent/hostile-agent.c");
    let bin = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hostile-agent");
    let built = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-Werror", "-o"])
        .arg(&bin)
        .arg(&src)
        .status()
        .expect("gcc builds the hostile agent");
    assert!(built.success());
    let _one = one_at_a_time();
    resources_output("build-sandbox-rootfs.sh", &[]);
    let kernel = kernel("vmlinux");
    let start = Instant::now();
    let out = Command::new(LIGERA)
        .args([
            "sandbox",
            "run",
            "--kernel",
            kernel.to_str().unwrap(),
            "--",
            "true",
        ])
        .env("LIGERA_AGENT", &bin)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "hostile agent: {:?} after {:.1} s: {stderr}",
        out.status,
        start.elapsed().as_secs_f64()
    );
    assert_eq!(out.status.code(), Some(125), "{stderr}");
    assert!(stderr.contains("broke the protocol"), "{stderr}");
    assert!(stderr.contains("larger than"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// The agent on the host (`ligera-agent --unix SOCKET --root DIR`).
struct HostAgent {
    child: std::process::Child,
    socket: std::path::PathBuf,
}

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HostAgent {
    fn start(root: &std::path::Path, socket: std::path::PathBuf) -> HostAgent {
        let agent = std::path::Path::new(LIGERA).with_file_name("ligera-agent");
        let child = Command::new(&agent)
            .arg("--unix")
            .arg(&socket)
            .arg("--root")
            .arg(root)
            .spawn()
            .expect("ligera-agent (resources/test.sh builds it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the agent did not listen");
            std::thread::sleep(Duration::from_millis(5));
        }
        HostAgent { child, socket }
    }

    fn session(
        &self,
        request: vmm::sandbox::client::Request<'_>,
        stdin: Option<Box<dyn Read + Send>>,
        stdout: impl Write,
    ) -> (agent::protocol::ExitStatus, String) {
        let stream = std::os::unix::net::UnixStream::connect(&self.socket).unwrap();
        let mut err = Vec::new();
        let st = vmm::sandbox::client::run_session(stream, request, stdin, stdout, &mut err)
            .expect("session");
        (st, String::from_utf8_lossy(&err).into_owned())
    }
}

#[test]
fn files_copy_in_and_out_through_the_agent() {
    use agent::copy;
    use vmm::sandbox::client::Request;
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sandbox-cp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("guest-root");
    std::fs::create_dir_all(root.join("srv")).unwrap();
    // A guest symlink pointing at "/": resolved inside the guest's root.
    std::os::unix::fs::symlink("/", root.join("srv/up")).unwrap();
    let agent = HostAgent::start(&root, dir.join("agent.sock"));

    let src = dir.join("tree");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let blob: Vec<u8> = (0..2_000_000u32).map(|i| (i ^ (i >> 9)) as u8).collect();
    std::fs::write(src.join("sub/blob"), &blob).unwrap();
    std::fs::write(src.join("note"), b"hello").unwrap();
    std::os::unix::fs::symlink("note", src.join("link")).unwrap();
    let pack = |path: std::path::PathBuf| -> Box<dyn Read + Send> {
        let (r, w) = std::io::pipe().unwrap();
        std::thread::spawn(move || copy::pack(&path, w));
        Box::new(r)
    };

    // In: into an existing directory, then to a new name.
    let (st, err) = agent.session(
        Request::CopyIn("/srv"),
        Some(pack(src.clone())),
        std::io::sink(),
    );
    assert_eq!(st.host_code(), 0, "{err}");
    assert_eq!(std::fs::read(root.join("srv/tree/sub/blob")).unwrap(), blob);
    assert_eq!(
        std::fs::read_link(root.join("srv/tree/link")).unwrap(),
        std::path::Path::new("note")
    );
    let (st, _) = agent.session(
        Request::CopyIn("/srv/up/renamed"),
        Some(pack(src.join("note"))),
        std::io::sink(),
    );
    assert_eq!(st.host_code(), 0);
    assert_eq!(
        std::fs::read(root.join("renamed")).unwrap(),
        b"hello",
        "inside the root"
    );
    // Into a directory that does not exist: the agent's error, status 1.
    let (st, err) = agent.session(
        Request::CopyIn("/no/such/dir/x"),
        Some(pack(src.join("note"))),
        std::io::sink(),
    );
    assert!(
        st.host_code() != 0 && err.contains("no such directory"),
        "{err}"
    );

    // Out: the tree back, unpacked with the host-side rules.
    let (r, w) = std::io::pipe().unwrap();
    let out = dir.join("out");
    let dest = out.clone();
    let unpacker = std::thread::spawn(move || copy::unpack(r, &dest, copy::Limits::default()));
    let (st, err) = agent.session(Request::CopyOut("/srv/tree"), None, w);
    assert_eq!(st.host_code(), 0, "{err}");
    unpacker.join().unwrap().unwrap();
    assert_eq!(std::fs::read(out.join("sub/blob")).unwrap(), blob);
    assert_eq!(std::fs::read(out.join("note")).unwrap(), b"hello");
    // A path that is not there.
    let (st, err) = agent.session(Request::CopyOut("/nothing"), None, std::io::sink());
    assert!(st.host_code() != 0 && err.contains("/nothing"), "{err}");
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ligera ARGS` with stdin from `input`: (status, stdout bytes, stderr).
fn ligera_with(args: &[&str], input: &[u8]) -> (i32, Vec<u8>, String) {
    let mut child = Command::new(LIGERA)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = input.to_vec();
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    let _ = feeder.join();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Ends the sandbox `name` however the test ends.
struct Sandbox(String);

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new(LIGERA)
            .args(["sandbox", "rm", "-f", &self.0])
            .output();
    }
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn a_persistent_sandbox_serves_execs_copies_terminals_and_limits() {
    let _one = one_at_a_time();
    resources_output("build-sandbox-rootfs.sh", &[]);
    let kernel = kernel("vmlinux");
    let name = format!("e2e-{}", std::process::id());
    let start = Instant::now();
    let (code, out, err) = ligera_with(
        &[
            "sandbox",
            "create",
            "--name",
            &name,
            "--memory",
            "128M",
            "--kernel",
            kernel.to_str().unwrap(),
        ],
        b"",
    );
    let _sandbox = Sandbox(name.clone());
    assert_eq!(code, 0, "{err}");
    assert_eq!(String::from_utf8_lossy(&out).trim(), name);
    eprintln!("created in {:.1} s", start.elapsed().as_secs_f64());
    // Every thread of the sandbox's VM process runs under a seccomp filter:
    // the main thread, the vCPU, the three disks' threads, the control
    // socket's (sandbox-ready has ended: the sandbox answered).
    let pid = std::fs::read_to_string(runtime_dir().join(format!("sb-{name}/pid"))).unwrap();
    let mut threads = common::filtered_threads(pid.trim().parse().unwrap());
    // sandbox-ready may still be on its way out.
    threads.retain(|t| t != "sandbox-ready");
    assert_eq!(
        threads,
        ["api", "blk0", "blk1", "blk2", "ligera", "vcpu0"],
        "threads of the sandbox's VM process"
    );
    let exec = |cmd: &[&str], input: &[u8]| {
        let mut args = vec!["sandbox", "exec", &name, "--"];
        args.extend_from_slice(cmd);
        ligera_with(&args, input)
    };

    // cp in: a tree; its bytes arrive intact.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sandbox-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("tree/sub")).unwrap();
    let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 + i / 7) as u8).collect();
    std::fs::write(dir.join("tree/sub/blob"), &blob).unwrap();
    let dest = format!("{name}:/tmp");
    let (code, _, err) = ligera_with(
        &["sandbox", "cp", dir.join("tree").to_str().unwrap(), &dest],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = exec(&["sh", "-c", "wc -c < /tmp/tree/sub/blob"], b"");
    assert_eq!(
        (code, String::from_utf8_lossy(&out).trim()),
        (0, "1000000"),
        "{err}"
    );

    // Several execs at once, each with its own streams and status.
    let runs: Vec<_> = (0..3)
        .map(|i| {
            let name = name.clone();
            std::thread::spawn(move || {
                let script = format!("sleep 1; echo out-{i}; echo err-{i} >&2; exit {}", 40 + i);
                ligera_with(&["sandbox", "exec", &name, "--", "sh", "-c", &script], b"")
            })
        })
        .collect();
    for (i, r) in runs.into_iter().enumerate() {
        let (code, out, err) = r.join().unwrap();
        assert_eq!(code, 40 + i as i32, "{err}");
        assert_eq!(String::from_utf8_lossy(&out), format!("out-{i}\n"));
        assert!(err.contains(&format!("err-{i}")), "{err}");
    }

    // cp out: what a command wrote, back on the host.
    let (code, _, err) = exec(
        &[
            "sh",
            "-c",
            "mkdir -p /out/d && echo made-inside > /out/d/f && cat /tmp/tree/sub/blob > /out/d/blob",
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    let back = dir.join("back");
    let (code, _, err) = ligera_with(
        &[
            "sandbox",
            "cp",
            &format!("{name}:/out"),
            back.to_str().unwrap(),
        ],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(back.join("d/f")).unwrap(), b"made-inside\n");
    assert!(std::fs::read(back.join("d/blob")).unwrap() == blob);

    // -t: a terminal in the guest, with the host terminal's size (under
    // script(1), which gives ligera a pseudo-terminal of its own).
    let inner =
        format!("stty rows 41 cols 101; {LIGERA} sandbox exec -t {name} -- sh -c 'tty; stty size'");
    let out = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("/dev/pts/") && text.contains("41 101"),
        "{text}"
    );

    // Runaway commands end at their timeout with 124; the sandbox lives on.
    let timed = |secs: &str, script: &str| {
        let start = Instant::now();
        let r = ligera_with(
            &[
                "sandbox",
                "exec",
                "--timeout",
                secs,
                &name,
                "--",
                "sh",
                "-c",
                script,
            ],
            b"",
        );
        eprintln!(
            "{script}: {} after {:.1} s",
            r.0,
            start.elapsed().as_secs_f64()
        );
        r
    };
    let (code, out, err) = timed("20s", "while :; do echo spam; done");
    assert_eq!(code, 124, "{err}");
    assert!(out.starts_with(b"spam\n"), "output streamed until the end");
    // The writable layer is bounded by --disk-size, on the host too.
    let (code, _, err) = timed(
        "15s",
        "while :; do cat /tmp/tree/sub/blob >> /fill 2>/dev/null; done",
    );
    assert_eq!(code, 124, "{err}");
    let scratch = runtime_dir().join(format!("sb-{name}/scratch.ext4"));
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&scratch).unwrap());
    assert!(
        blocks * 512 <= 64 << 20,
        "scratch holds {} bytes",
        blocks * 512
    );

    // Not executable: 126.
    let (code, _, err) = exec(&["/etc/passwd"], b"");
    assert_eq!(code, 126, "{err}");

    // -t: Ctrl-C typed on the host terminal reaches the command as SIGINT.
    let inner = format!("{LIGERA} sandbox exec -t {name} -- sh -c 'echo ready; sleep 60'");
    let mut script = Command::new("script")
        .args(["-qec", &inner, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut typed = script.stdin.take().unwrap();
    let mut screen = script.stdout.take().unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&seen).contains("ready") {
        let n = screen.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "exec -t ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    typed.write_all(b"\x03").unwrap();
    typed.flush().unwrap();
    let status = script.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&seen)
    );

    // Setup (what a snapshot restore sends): the guest's clock follows,
    // its RNG takes the bytes.
    let socket = runtime_dir().join(format!("sb-{name}/v.sock"));
    let stream = vmm::sandbox::client::connect(&socket, Duration::from_secs(10), || false).unwrap();
    let setup = agent::protocol::Setup {
        realtime_ns: Some(1_900_000_000 * 1_000_000_000),
        entropy: vec![0x5a; 64],
    };
    let st = vmm::sandbox::client::run_session(
        stream,
        vmm::sandbox::client::Request::Setup(&setup),
        None,
        std::io::sink(),
        std::io::sink(),
    )
    .unwrap();
    assert_eq!(st.host_code(), 0, "{st:?}");
    let (code, out, _) = exec(&["date", "-u", "+%Y"], b"");
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (0, "2030"));

    // The sandbox is still there afterwards.
    let (code, out, _) = exec(&["echo", "alive"], b"");
    assert_eq!((code, String::from_utf8_lossy(&out).trim()), (0, "alive"));

    let (code, _, err) = ligera_with(&["sandbox", "rm", "-f", &name], b"");
    assert_eq!(code, 0, "{err}");
    assert!(!runtime_dir().join(format!("sb-{name}")).exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn a_fork_bomb_ends_at_the_timeout() {
    let r = sandbox(
        &[
            "--timeout",
            "20s",
            "--",
            "sh",
            "-c",
            "b() { b | b & }; b; sleep 1000",
        ],
        b"",
    );
    assert_eq!(r.status, 124, "{}", r.stderr);
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn more_memory_than_the_vm_has_ends_with_137_reported() {
    let r = sandbox(
        &[
            "--memory",
            "64M",
            "--",
            "sh",
            "-c",
            "echo 1 > /proc/sys/vm/overcommit_memory; exec dd if=/dev/zero of=/dev/null bs=100M count=1",
        ],
        b"",
    );
    assert_eq!(r.status, 137, "{}", r.stderr);
    assert!(r.stderr.contains("ran out of memory"), "{}", r.stderr);
}
