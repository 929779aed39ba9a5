//! The net suite's plumbing. The bench makes two network namespaces of its
//! own: the host side, where the clients run, and the container's. The
//! host side holds loopback (the process's server listens there too), a
//! veth pair whose other end is the container's `eth0`, and the tap of the
//! VM's sandbox (the sandbox is started in it). Both go when the bench
//! ends, and a SIGKILLed bench's are removed by the next one.
//!
//! In each runtime the workload runs iperf3's server and socat as an echo
//! server; from the host side iperf3's client (the image's, chrooted)
//! measures throughput and the bench's own client the request/response
//! round trip over TCP.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;
use super::runtime::{Kind, READY, container_prefix};

const IPERF_PORT: u16 = 5201;
const ECHO_PORT: u16 = 5202;
/// The startup suite's port case: a one-connection echo server.
const KNOCK_PORT: u16 = 5203;
const CONTAINER_HOST: Ipv4Addr = Ipv4Addr::new(10, 213, 1, 1);
const CONTAINER: Ipv4Addr = Ipv4Addr::new(10, 213, 1, 2);
const VM_HOST: Ipv4Addr = Ipv4Addr::new(10, 213, 2, 1);
const VM: Ipv4Addr = Ipv4Addr::new(10, 213, 2, 2);
/// The port case's new VMs, on a tap of their own.
const PORT_VM_HOST: Ipv4Addr = Ipv4Addr::new(10, 213, 3, 1);
const PORT_VM: Ipv4Addr = Ipv4Addr::new(10, 213, 3, 2);
/// How long a server may take to answer after the workload said it is up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);
/// Round trips per measurement at most (else --duration ends it).
const MAX_ROUND_TRIPS: usize = 100_000;

/// The namespaces and links of one bench.
pub struct Net {
    host: String,
    container: String,
    tap: String,
    /// The tap of the port case's VMs, one at a time.
    port_tap: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run ip (iproute2): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// The namespace names of bench `pid`.
fn names(pid: u32) -> (String, String) {
    let prefix = container_prefix(pid);
    (format!("{prefix}host"), format!("{prefix}ctr"))
}

impl Net {
    /// Makes the namespaces and links for this bench (root only).
    pub fn create() -> Result<Net, String> {
        let pid = std::process::id();
        let (host, container) = names(pid);
        let net = Net {
            host,
            container,
            tap: format!("lbt{pid}"),
            port_tap: format!("lbp{pid}"),
        };
        let veth = format!("lbv{pid}");
        let (h, c) = (net.host.as_str(), net.container.as_str());
        let (tap, port_tap) = (net.tap.as_str(), net.port_tap.as_str());
        let steps = [
            format!("netns add {h}"),
            format!("netns add {c}"),
            format!("-n {h} link set lo up"),
            format!("-n {c} link set lo up"),
            format!("-n {h} link add {veth} type veth peer name eth0 netns {c}"),
            format!("-n {h} addr add {CONTAINER_HOST}/24 dev {veth}"),
            format!("-n {h} link set {veth} up"),
            format!("-n {c} addr add {CONTAINER}/24 dev eth0"),
            format!("-n {c} link set eth0 up"),
            format!("-n {h} tuntap add dev {tap} mode tap"),
            format!("-n {h} addr add {VM_HOST}/24 dev {tap}"),
            format!("-n {h} link set {tap} up"),
            format!("-n {h} tuntap add dev {port_tap} mode tap"),
            format!("-n {h} addr add {PORT_VM_HOST}/24 dev {port_tap}"),
            format!("-n {h} link set {port_tap} up"),
        ];
        for step in &steps {
            // Names and addresses hold no spaces.
            let step: Vec<&str> = step.split_whitespace().collect();
            if let Err(e) = ip(&step) {
                remove(pid);
                return Err(e);
            }
        }
        Ok(net)
    }

    /// The host-side namespace, to enter.
    pub fn host_side(&self) -> Result<OwnedFd, BenchError> {
        let path = Path::new("/run/netns").join(&self.host);
        File::open(&path)
            .map(OwnedFd::from)
            .map_err(|e| BenchError::Setup(format!("cannot open {}: {e}", path.display())))
    }

    /// The container's namespace, for its bundle.
    pub fn container_side(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.container)
    }

    /// `--net` of the VM's sandbox.
    pub fn vm_flag(&self) -> String {
        format!("tap={},ip={VM}/24,gw={VM_HOST}", self.tap)
    }

    /// `--net` of the port case's new VMs.
    pub fn vm_port_flag(&self) -> String {
        format!("tap={},ip={PORT_VM}/24,gw={PORT_VM_HOST}", self.port_tap)
    }

    /// Where the host side reaches `kind`'s servers.
    pub fn address(kind: Kind) -> Ipv4Addr {
        match kind {
            Kind::Process => Ipv4Addr::LOCALHOST,
            Kind::Runc => CONTAINER,
            Kind::Vm => VM,
            Kind::Qemu => PORT_VM,
        }
    }

    /// QEMU's tap and guest address (`ligera.ip=`): the port case's, which
    /// no ligera VM holds while QEMU runs.
    pub fn qemu_tap(&self) -> (String, String) {
        (
            self.port_tap.clone(),
            format!("{PORT_VM}/24,{PORT_VM_HOST}"),
        )
    }

    /// Where the host side reaches the port case's server in `kind`: a new
    /// VM is on the port case's own tap.
    pub fn port_address(kind: Kind) -> Ipv4Addr {
        match kind {
            Kind::Vm => PORT_VM,
            _ => Net::address(kind),
        }
    }
}

/// Removes the namespaces of bench `pid` (and with them its veth and tap).
pub fn remove(pid: u32) {
    let (host, container) = names(pid);
    for ns in [host, container] {
        if Path::new("/run/netns").join(&ns).exists() {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

/// The workload: iperf3's server for one test and socat echoing one
/// connection, both ended when the bench closes the workload's stdin.
pub fn server_script() -> String {
    format!(
        "iperf3 -s -1 -p {IPERF_PORT} >/dev/null 2>&1 & a=$!; \
         socat TCP-LISTEN:{ECHO_PORT},reuseaddr,nodelay PIPE & b=$!; \
         echo {READY}; read x || :; kill $a $b 2>/dev/null; exit 0"
    )
}

/// The port case's workload: socat echoing one connection, then exiting.
pub fn port_script() -> String {
    format!("exec socat TCP-LISTEN:{KNOCK_PORT},reuseaddr PIPE")
}

/// The port case's client: from the host side, it connects to the new
/// instance's server again and again from its spawn on, until a byte it
/// sends comes back; that ends the server, and with it the run.
pub struct Knock {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<Instant>>,
}

impl Knock {
    pub fn start(net: &Net, kind: Kind) -> Result<Knock, BenchError> {
        let ns = net.host_side()?;
        let addr = Net::port_address(kind);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("knock".into())
            .spawn(move || knock(&ns, addr, &stopped))
            .map_err(|e| BenchError::Setup(format!("cannot start a thread: {e}")))?;
        Ok(Knock { stop, thread })
    }

    /// When the server answered, once its run has ended (None: it never
    /// did).
    pub fn answered(self) -> Option<Instant> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().ok().flatten()
    }
}

/// On this thread: enters `ns` and knocks at `addr` until answered or
/// stopped.
fn knock(ns: &OwnedFd, addr: Ipv4Addr, stop: &std::sync::atomic::AtomicBool) -> Option<Instant> {
    // SAFETY: setns on this thread only (a thread of our own).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return None;
    }
    let target = SocketAddr::from((addr, KNOCK_PORT));
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        // A guest not up yet does not answer ARP: each try waits a little.
        if let Ok(mut s) = TcpStream::connect_timeout(&target, Duration::from_millis(100)) {
            let mut byte = [0u8; 1];
            let echoed = s.set_read_timeout(Some(Duration::from_secs(10))).is_ok()
                && s.write_all(b"k").is_ok()
                && s.read_exact(&mut byte).is_ok()
                && byte == *b"k";
            if echoed {
                return Some(Instant::now());
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

/// `cmd` starts in the network namespace `ns`.
pub fn enter(cmd: &mut Command, ns: OwnedFd) {
    // SAFETY: setns is async-signal-safe; `ns` moves into the closure and
    // stays open until the child execs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// `cmd` starts chrooted into `root`, in namespace `ns` if given.
pub fn confine(cmd: &mut Command, root: &Path, ns: Option<OwnedFd>) -> Result<(), BenchError> {
    if let Some(ns) = ns {
        enter(cmd, ns);
    }
    let root = std::ffi::CString::new(root.as_os_str().as_encoded_bytes())
        .map_err(|_| BenchError::Setup("the root path has a NUL byte".into()))?;
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::chroot(root.as_ptr()) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Throughput (Gbit/s, iperf3's) and the median request/response round
/// trip (µs) from the host side to `addr`, each for `duration`.
pub fn measure(
    net: &Net,
    root: &Path,
    addr: Ipv4Addr,
    duration: Duration,
) -> Result<(f64, f64), String> {
    let ns = net.host_side().map_err(|e| e.to_string())?;
    let rtt = std::thread::scope(|s| {
        s.spawn(|| round_trips(&ns, addr, duration))
            .join()
            .unwrap_or_else(|_| Err("the round-trip client panicked".into()))
    })?;
    let gbits = iperf3(net, root, addr, duration)?;
    Ok((gbits, rtt))
}

/// On this thread: enters `ns`, connects to the echo server and times
/// one-byte round trips.
fn round_trips(ns: &OwnedFd, addr: Ipv4Addr, duration: Duration) -> Result<f64, String> {
    // SAFETY: setns on this thread only (a scoped thread of our own).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "cannot enter the host-side namespace: {}",
            std::io::Error::last_os_error()
        ));
    }
    let target = SocketAddr::from((addr, ECHO_PORT));
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    let mut stream = loop {
        match TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                return Err(format!("the echo server at {target} did not answer: {e}"));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let io = |e: std::io::Error| format!("echo at {target}: {e}");
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(io)?;
    let mut times = Vec::new();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    while started.elapsed() < duration && times.len() < MAX_ROUND_TRIPS {
        let t = Instant::now();
        stream.write_all(b"x").map_err(io)?;
        stream.read_exact(&mut byte).map_err(io)?;
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    super::median(&times).ok_or_else(|| "no round trip".into())
}

/// The stdout (at most 1 MiB) of `cmd`, which is killed if it runs
/// longer than `limit` (a server that accepts and then says nothing would
/// hold iperf3's client forever).
fn output_within(mut cmd: Command, limit: Duration) -> Result<Vec<u8>, String> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut stdout = stdout;
        let _ = (&mut stdout).take(1 << 20).read_to_end(&mut out);
        let _ = std::io::copy(&mut stdout, &mut std::io::sink());
        out
    });
    let deadline = Instant::now() + limit;
    let killed = loop {
        match child.try_wait() {
            Ok(Some(_)) => break false,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break true;
            }
        }
    };
    let out = reader.join().unwrap_or_default();
    if killed {
        return Err(format!(
            "{:?} did not finish within {} s",
            cmd.get_program(),
            limit.as_secs()
        ));
    }
    Ok(out)
}

/// iperf3's client from the image, chrooted, in the host-side namespace;
/// tried again while the server is not up yet.
fn iperf3(net: &Net, root: &Path, addr: Ipv4Addr, duration: Duration) -> Result<f64, String> {
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        let mut cmd = Command::new("iperf3");
        cmd.args(["-c", &addr.to_string(), "-p", &IPERF_PORT.to_string()])
            .args(["-t", &duration.as_secs().max(1).to_string(), "-J"])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .stdin(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: prctl is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
                Ok(())
            });
        }
        let ns = net.host_side().map_err(|e| e.to_string())?;
        confine(&mut cmd, root, Some(ns)).map_err(|e| e.to_string())?;
        let stdout = output_within(cmd, duration + CONNECT_TIMEOUT)?;
        let report: serde_json::Value = serde_json::from_slice(&stdout)
            .map_err(|e| format!("iperf3's output is not JSON: {e}"))?;
        if let Some(bits) = report["end"]["sum_received"]["bits_per_second"].as_f64() {
            return Ok(bits / 1e9);
        }
        let error = report["error"].as_str().unwrap_or("no result").to_string();
        if Instant::now() > deadline || !error.contains("connect") {
            return Err(format!("iperf3 to {addr}: {error}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
