//! virtio-net with a Linux guest: the resources/ kernel and busybox
//! initramfs booted by the real `ligera` inside a network namespace whose
//! tap has 10.0.2.1/24. The guest configures eth0 as 10.0.2.15/24, pings
//! the host, and echoes a TCP stream (`nc -e cat`); the test sends 256 KiB
//! through it and checks it comes back intact (with the checksum and
//! segmentation offloads the Linux driver negotiates), pings the guest from
//! the namespace, then stops the VM.
//!
//! Ignored by a plain `cargo test` like tests/linux.rs (a Linux boot takes
//! seconds here); `resources/test.sh` runs it with `--include-ignored`.
//! Needs root (network namespaces, taps): it fails, not skips, without.

mod common;

use common::linux::{BOOT_TIMEOUT, CMDLINE};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const HOST_IP: &str = "10.0.2.1";
const GUEST_IP: &str = "10.0.2.15";
const GUEST_MAC: &str = "02:4c:47:52:41:0f";
const ECHO_PORT: u16 = 5000;
const ECHO_BYTES: usize = 256 * 1024;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("the ip command (iproute2) is needed");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace holding a tap with the host's address; deleted
/// (with the tap) when dropped.
struct Namespace {
    name: String,
    tap: String,
}

impl Namespace {
    fn new() -> Namespace {
        let id = std::process::id() % 1_000_000;
        let ns = Namespace {
            name: format!("ligera-net-{id}"),
            tap: format!("lgnl{id}"),
        };
        let _ = Command::new("ip").args(["netns", "del", &ns.name]).output();
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "netns", "exec", &ns.name, "ip", "tuntap", "add", "dev", &ns.tap, "mode", "tap",
        ]);
        ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{HOST_IP}/24"),
            "dev",
            &ns.tap,
        ]);
        ip(&["-n", &ns.name, "link", "set", &ns.tap, "up"]);
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Runs `f` on a thread inside the namespace (sockets it opens live there).
    fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only, with a namespace fd we own.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// ligera running in the namespace, its console collected line by line.
struct Vm {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Vm {
    fn wait_for(&mut self, marker: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.seen.iter().find(|l| l.contains(marker)) {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no {marker:?} within {timeout:?}; console:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    fn console(&self) -> String {
        self.seen.join("\n")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
#[ignore = "boots Linux: run with --include-ignored (resources/test.sh does)"]
fn linux_guest_on_a_tap_pings_and_echoes_tcp() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("this test creates a network namespace and a tap: run it as root (CI does)");
    }
    let ns = Namespace::new();
    let initrd = common::linux::busybox_initramfs();
    let guest_cmd = format!(
        "echo FEATURES=$(cat /sys/class/net/eth0/device/features); \
         ip link set eth0 up && ip addr add {GUEST_IP}/24 dev eth0 && \
         ping -c 3 -W 10 {HOST_IP} && echo NET-PING-OK && \
         nc -l -p {ECHO_PORT} -e cat; echo NET-ECHO-DONE; sleep 600"
    );
    let cmdline = format!("{CMDLINE} ligera.cmd=\"{guest_cmd}\"");
    let net = format!("tap={},mac={GUEST_MAC}", ns.tap);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name, common::LIGERA, "run", "--kernel"])
        .arg(common::linux::kernel("vmlinux"))
        .arg("--initrd")
        .arg(&initrd)
        .args(["--memory", "128M", "--net", &net, "--cmdline", &cmdline])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("cannot start ligera");
    let (tx, lines) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line.trim_end_matches('\r').to_string()).is_err() {
                break;
            }
        }
    });
    let mut vm = Vm {
        child,
        lines,
        seen: Vec::new(),
    };
    let start = Instant::now();

    // The Linux driver negotiated the offloads and mergeable buffers.
    let features = vm.wait_for("FEATURES=", BOOT_TIMEOUT);
    eprintln!("guest up after {:.1} s", start.elapsed().as_secs_f64());
    let bits = features.split("FEATURES=").nth(1).unwrap().trim();
    for (bit, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (5, "MAC"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
        (15, "MRG_RXBUF"),
        (32, "VERSION_1"),
    ] {
        assert_eq!(
            bits.as_bytes().get(bit),
            Some(&b'1'),
            "{name} not negotiated: {bits}"
        );
    }

    // Guest to host: ping from the guest.
    vm.wait_for("NET-PING-OK", BOOT_TIMEOUT);
    assert!(
        vm.console()
            .contains("3 packets transmitted, 3 packets received"),
        "{}",
        vm.console()
    );
    eprintln!(
        "guest pinged the host after {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // A TCP stream through the guest's echo, both directions at once.
    let data: Vec<u8> = {
        let mut x = 0x1234_5678_9abc_def1u64;
        (0..ECHO_BYTES)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let sent = data.clone();
    let echoed = ns.run(move || {
        let addr: SocketAddr = format!("{GUEST_IP}:{ECHO_PORT}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut stream = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("connect: {e}; retrying");
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(e) => panic!("cannot connect to the guest: {e}"),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        let mut reader = stream.try_clone().unwrap();
        let receiver = std::thread::spawn(move || {
            let mut back = Vec::new();
            reader.read_to_end(&mut back).map(|_| back)
        });
        stream.write_all(&sent).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        receiver.join().unwrap().expect("reading the echo")
    });
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "the echoed stream differs");
    vm.wait_for("NET-ECHO-DONE", Duration::from_secs(60));
    eprintln!(
        "{ECHO_BYTES} bytes echoed after {:.1} s",
        start.elapsed().as_secs_f64()
    );

    // Host to guest: ping the guest from the namespace.
    let ping = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "busybox", "ping", "-c", "3", "-W", "5",
        ])
        .arg(GUEST_IP)
        .output()
        .expect("busybox (busybox-static) is needed for ping");
    let text = String::from_utf8_lossy(&ping.stdout);
    assert!(ping.status.success(), "{text}\n{}", vm.console());
    assert!(text.contains("3 packets received"), "{text}");

    // SAFETY: plain kill(2) on our child (ip netns exec became ligera).
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = vm.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "ligera did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(143), "{}", vm.console());
}
