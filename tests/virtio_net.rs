//! virtio-net end to end: the test guest's driver (tests/guests/virtio-net.c)
//! booted by the real `ligera` with `--net`, exchanging Ethernet frames with
//! this test through a TAP device. The test reads and injects frames with a
//! packet socket bound to the tap interface (the tap's own descriptor
//! belongs to ligera: a tap has one reader).
//!
//! TAP devices need CAP_NET_ADMIN: these tests fail (they do not skip) when
//! not run as root; CI runs as root.

mod common;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{field, guests, spawn};

const ETHERTYPE_TEST: u16 = 0x88b5;
const GUEST_MAC: [u8; 6] = [0x02, 0x4c, 0x47, 0x52, 0x41, 0x01];
const HOST_MAC: [u8; 6] = [0x02, 0x4c, 0x47, 0x52, 0x41, 0xfe];
const TIMEOUT: Duration = Duration::from_secs(60);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "virtio-net tests create TAP devices and need root (CAP_NET_ADMIN); \
             run them as root (CI does)"
        );
    }
}

/// A tap name unique to this test process and purpose (at most 15 bytes).
fn tap_name(suffix: &str) -> String {
    format!("lgn{}{suffix}", std::process::id() % 1_000_000)
}

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

fn exists(tap: &str) -> bool {
    Path::new(&format!("/sys/class/net/{tap}")).exists()
}

/// A persistent tap made for one test, up, without IPv6 (so the host stack
/// stays quiet on it); deleted when dropped.
struct TapFixture {
    name: String,
}

impl TapFixture {
    fn new(suffix: &str) -> TapFixture {
        require_root();
        let name = tap_name(suffix);
        if exists(&name) {
            ip(&["link", "del", &name]);
        }
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"]);
        let fixture = TapFixture { name };
        let v6 = format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", fixture.name);
        if Path::new(&v6).exists() {
            std::fs::write(&v6, "1").unwrap();
        }
        ip(&["link", "set", &fixture.name, "up"]);
        fixture
    }
}

impl Drop for TapFixture {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// A raw packet socket on one interface, for frames of the test EtherType.
struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    fn bind(interface: &str) -> PacketSocket {
        let proto = ETHERTYPE_TEST.to_be();
        // SAFETY: plain socket(2) call.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "packet socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(interface).unwrap();
        // SAFETY: `name` is a NUL-terminated string.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {interface}");
        // SAFETY: sockaddr_ll is plain old data.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = index as i32;
        // SAFETY: `addr` is a sockaddr_ll of the size given.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());
        let timeout = libc::timeval {
            tv_sec: TIMEOUT.as_secs() as i64,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval of the size given.
        let ret = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(ret, 0);
        PacketSocket { fd }
    }

    /// The next frame (Ethernet header first), or None on timeout.
    fn recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65536];
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return None;
        }
        buf.truncate(n as usize);
        Some(buf)
    }

    fn send(&self, frame: &[u8]) {
        // SAFETY: send reads `frame.len()` bytes from `frame`.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send: {}",
            io::Error::last_os_error()
        );
    }
}

fn ethernet(dst: &[u8; 6], src: &[u8; 6], payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(dst);
    f.extend_from_slice(src);
    f.extend_from_slice(&ETHERTYPE_TEST.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    common::fnv1a(bytes)
}

#[test]
fn guest_exchanges_frames_with_the_tap() {
    let tap = TapFixture::new("a");
    let socket = PacketSocket::bind(&tap.name);
    let kernel = guests().elf64.to_str().unwrap().to_string();
    let net = format!("tap={},mac={}", tap.name, mac_text(&GUEST_MAC));
    let mut vm = spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--no-host-quirks",
        "--memory",
        "32M",
        "--cmdline",
        "test=virtio",
        "--net",
        &net,
    ]);
    vm.close_stdin();

    // Guest to host: the broadcast frame the guest driver sends, byte for byte.
    let from_guest = socket.recv().expect("no frame from the guest");
    let expected = ethernet(
        &[0xff; 6],
        &GUEST_MAC,
        b"LGRA-G2H hello from the ligera test guest",
    );
    assert_eq!(from_guest, expected);

    // Host to guest: a frame the guest must receive and echo.
    let mut payload = b"LGRA-H2G".to_vec();
    payload.extend((0..500u32).map(|i| (i * 7 + 3) as u8));
    let to_guest = ethernet(&GUEST_MAC, &HOST_MAC, &payload);
    socket.send(&to_guest);
    let echo = socket.recv().expect("no echo from the guest");
    let mut echo_payload = b"LGRA-ECH".to_vec();
    echo_payload.extend_from_slice(&payload[8..]);
    assert_eq!(echo, ethernet(&HOST_MAC, &GUEST_MAC, &echo_payload));

    let out = vm.finish(TIMEOUT);
    out.assert_ok();
    // The guest found the device and its MAC in configuration space.
    assert_eq!(
        field(out.line("VIRTIO dev"), "id").as_deref(),
        Some("1"),
        "{out}"
    );
    assert_eq!(out.field("VIRTIO-NET ready", "mac"), mac_text(&GUEST_MAC));
    assert_eq!(out.field("VIRTIO-NET ready", "status"), "f", "{out}");
    // VERSION_1, MAC and MRG_RXBUF agreed.
    assert_eq!(
        out.field("VIRTIO negotiate", "agreed"),
        "100008020",
        "{out}"
    );
    assert_eq!(out.field("VIRTIO-NET sent", "used"), "0", "{out}");
    // What the guest received: header (one buffer, no offloads) and the
    // frame exactly as sent.
    let rx = |k| out.field("VIRTIO-NET received", k);
    assert_eq!(rx("len"), format!("{:x}", 12 + to_guest.len()), "{out}");
    assert_eq!(rx("num_buffers"), "1");
    assert_eq!((rx("flags"), rx("gso")), ("0".into(), "0".into()));
    assert_eq!(rx("dst"), mac_text(&GUEST_MAC));
    assert_eq!(rx("src"), mac_text(&HOST_MAC));
    assert_eq!(rx("payload"), "LGRA-H2G");
    assert_eq!(rx("fnv"), format!("{:x}", fnv1a(&to_guest)), "{out}");
    assert_eq!(rx("skipped"), "0", "IPv6 is off on the tap: {out}");
    assert_eq!(out.field("VIRTIO-NET echoed", "used"), "0", "{out}");
    assert_eq!(
        out.field("VIRTIO-NET echoed", "isr"),
        "1",
        "used-buffer interrupt: {out}"
    );
    assert!(out.stderr.is_empty(), "{out}");
}

#[test]
fn a_missing_tap_is_created_and_goes_away_with_ligera() {
    require_root();
    let name = tap_name("c");
    if exists(&name) {
        ip(&["link", "del", &name]);
    }
    let kernel = guests().elf64.to_str().unwrap().to_string();
    let net = format!("tap={name}");
    let mut vm = spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--no-host-quirks",
        "--memory",
        "32M",
        "--log-level",
        "info",
        "--cmdline",
        "test=hang",
        "--net",
        &net,
    ]);
    vm.wait_for("HANG", TIMEOUT);
    assert!(exists(&name), "ligera should have created {name}");
    // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR
    let flags = std::fs::read_to_string(format!("/sys/class/net/{name}/tun_flags")).unwrap();
    assert_eq!(flags.trim(), "0x5002");
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.status, 143, "{out}");
    // A generated MAC: locally administered, unicast.
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("virtio-net: tap"))
        .unwrap_or_else(|| panic!("no MAC reported:\n{out}"));
    assert!(line.contains(", MAC 02:"), "{line}");
    // ligera's teardown child holds copies of its descriptors until ligera
    // has exited (see vmm/src/vm.rs): the tap goes a moment later.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while exists(&name) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!exists(&name), "{name} should be gone with ligera");
}

#[test]
fn tap_errors_are_one_line_naming_the_tap() {
    require_root();
    let kernel = guests().elf64.to_str().unwrap().to_string();
    let busy = TapFixture::new("b");
    // Attach to the tap first, so ligera finds it busy.
    let holder = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .unwrap();
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in ifr.ifr_name.iter_mut().zip(busy.name.bytes()) {
        *d = s as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as i16;
    // SAFETY: TUNSETIFF reads and writes an ifreq.
    let ret = unsafe { libc::ioctl(holder.as_raw_fd(), libc::TUNSETIFF, &mut ifr) };
    assert_eq!(ret, 0, "TUNSETIFF: {}", io::Error::last_os_error());
    let twice = format!("tap={}", tap_name("d"));
    // Names that break the rules are usage errors (2); taps the host
    // refuses are ligera errors (1).
    let cases: Vec<(Vec<String>, i32, &str)> = vec![
        (vec![format!("tap={}", busy.name)], 1, "already in use"),
        (vec!["tap=lo".into()], 1, "is not a TAP device"),
        (vec!["tap=a/b".into()], 2, "without '/'"),
        (vec![twice.clone(), twice], 2, "given twice"),
    ];
    for (nets, status, message) in cases {
        let mut args = vec![
            "run".to_string(),
            "--kernel".into(),
            kernel.clone(),
            "--memory".into(),
            "32M".into(),
        ];
        for n in &nets {
            args.extend(["--net".to_string(), n.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = common::run(&args, TIMEOUT);
        assert_eq!(out.status, status, "{nets:?}: {out}");
        assert_eq!(out.stderr.lines().count(), 1, "{nets:?}: {out}");
        assert!(out.stderr.contains(message), "{nets:?}: {out}");
        let name = nets[0].trim_start_matches("tap=");
        assert!(out.stderr.contains(name), "{nets:?}: {out}");
        assert!(
            !out.stdout.contains("LIGERA-TEST-GUEST"),
            "the guest never ran"
        );
    }
    assert!(
        !exists(&tap_name("d")),
        "a failed start leaves no tap behind"
    );
}

/// CPU time (user + system, in clock ticks) of one thread of `pid`.
fn thread_cpu_ticks(pid: i32, tid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn a_deleted_tap_does_not_make_the_event_loop_spin() {
    let tap = TapFixture::new("e");
    let kernel = guests().elf64.to_str().unwrap().to_string();
    let net = format!("tap={}", tap.name);
    let mut vm = spawn(&[
        "run",
        "--kernel",
        &kernel,
        "--no-host-quirks",
        "--memory",
        "32M",
        "--cmdline",
        "test=hang",
        "--net",
        &net,
    ]);
    vm.wait_for("HANG", TIMEOUT);
    ip(&["link", "del", &tap.name]);
    // The event loop runs on ligera's main thread; the vCPU spins on its own.
    let before = thread_cpu_ticks(vm.pid(), vm.pid());
    std::thread::sleep(Duration::from_secs(1));
    let spent = thread_cpu_ticks(vm.pid(), vm.pid()) - before;
    // SAFETY: plain kill(2) on our child.
    unsafe { libc::kill(vm.pid(), libc::SIGTERM) };
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.status, 143, "still running, and stops cleanly: {out}");
    assert!(spent < 20, "event loop used {spent} ticks in 1 s:\n{out}");
    assert_eq!(out.stderr.lines().count(), 1, "only the signal: {out}");
}

#[test]
fn each_net_flag_is_a_device_with_its_own_mac() {
    require_root();
    let (a, b) = (tap_name("f"), tap_name("g"));
    let kernel = guests().elf64.to_str().unwrap().to_string();
    let out = common::run(
        &[
            "run",
            "--kernel",
            &kernel,
            "--no-host-quirks",
            "--memory",
            "32M",
            "--log-level",
            "info",
            "--net",
            &format!("tap={a}"),
            "--net",
            &format!("tap={b},mac=02:00:00:00:00:42"),
            "--cmdline",
            "test=report",
        ],
        TIMEOUT,
    );
    out.assert_ok();
    let cmdline = out.line("CMDLINE");
    assert!(
        cmdline.contains("virtio_mmio.device=4K@0xd0000000:5")
            && cmdline.contains("virtio_mmio.device=4K@0xd0001000:6"),
        "{out}"
    );
    let macs: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("virtio-net: tap"))
        .collect();
    assert_eq!(macs.len(), 2, "{out}");
    assert!(macs[0].contains(&format!("tap {a}, MAC 02:")), "{out}");
    assert!(
        macs[1].contains(&format!("tap {b}, MAC 02:00:00:00:00:42")),
        "{out}"
    );
}
