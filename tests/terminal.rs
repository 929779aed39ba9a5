//! The serial console on a real terminal (a pseudo-terminal here): raw mode
//! while the guest runs, keys reach the guest, Ctrl-C stops the VM, and the
//! terminal settings come back on every way out.

mod common;

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{LIGERA, guests};

struct Pty {
    master: std::fs::File,
    slave: OwnedFd,
}

fn open_pty() -> Pty {
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the integers we own.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors are new and owned by nothing else.
    unsafe {
        Pty {
            master: std::fs::File::from_raw_fd(master),
            slave: OwnedFd::from_raw_fd(slave),
        }
    }
}

fn termios(fd: &OwnedFd) -> libc::termios {
    let mut t = std::mem::MaybeUninit::<libc::termios>::zeroed();
    // SAFETY: tcgetattr fills the struct we own.
    let ret = unsafe { libc::tcgetattr(fd.as_raw_fd(), t.as_mut_ptr()) };
    assert_eq!(ret, 0);
    // SAFETY: initialised by tcgetattr.
    unsafe { t.assume_init() }
}

/// Starts ligera on the pty as its controlling terminal, in its own session,
/// so Ctrl-C typed on the terminal sends it SIGINT.
fn spawn_on(pty: &Pty, test: &str) -> std::process::Child {
    let fd = |_| Stdio::from(pty.slave.try_clone().unwrap());
    let mut cmd = Command::new(LIGERA);
    cmd.args([
        "run",
        "--kernel",
        guests().elf64.to_str().unwrap(),
        "--no-host-quirks",
        "--memory",
        "32M",
        "--cmdline",
        &format!("test={test}"),
    ])
    .stdin(fd(0))
    .stdout(fd(1))
    .stderr(fd(2));
    // SAFETY: setsid and ioctl are async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().expect("cannot start ligera")
}

/// Reads the pty until `text` shows up.
fn read_until(master: &mut std::fs::File, text: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&seen).contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} on the terminal; got:\n{}",
            String::from_utf8_lossy(&seen)
        );
        let mut pfd = libc::pollfd {
            fd: master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: polling one descriptor we own.
        if unsafe { libc::poll(&mut pfd, 1, 100) } > 0 {
            match master.read(&mut buf) {
                Ok(n) if n > 0 => seen.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
    }
    String::from_utf8_lossy(&seen).into_owned()
}

fn wait(child: &mut std::process::Child) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("ligera did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn same_settings(a: &libc::termios, b: &libc::termios) -> bool {
    (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag, a.c_cc)
        == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag, b.c_cc)
}

#[test]
fn raw_mode_input_and_ctrl_c() {
    let mut pty = open_pty();
    let before = termios(&pty.slave);
    assert_ne!(
        before.c_lflag & libc::ICANON,
        0,
        "a fresh pty is in canonical mode"
    );
    let mut child = spawn_on(&pty, "echo");
    read_until(&mut pty.master, "ECHO ready", Duration::from_secs(20));
    let during = termios(&pty.slave);
    assert_eq!(
        during.c_lflag & (libc::ICANON | libc::ECHO),
        0,
        "raw while running"
    );
    assert_ne!(during.c_lflag & libc::ISIG, 0, "Ctrl-C still signals");
    // Keys go to the guest as they are typed, without echo from the host.
    pty.master.write_all(b"typed\r").unwrap();
    let out = read_until(&mut pty.master, "ECHO got=typed", Duration::from_secs(20));
    assert!(!out.contains("typed\r\n"), "no host echo: {out:?}");
    pty.master.write_all(&[0x03]).unwrap(); // Ctrl-C
    assert_eq!(wait(&mut child), 130);
    assert!(
        same_settings(&termios(&pty.slave), &before),
        "terminal restored"
    );
}

#[test]
fn terminal_restored_after_guest_reboot_and_sigterm() {
    let mut pty = open_pty();
    let before = termios(&pty.slave);
    let mut child = spawn_on(&pty, "report");
    read_until(&mut pty.master, "DONE", Duration::from_secs(20));
    assert_eq!(wait(&mut child), 0);
    assert!(same_settings(&termios(&pty.slave), &before));

    let mut child = spawn_on(&pty, "hang");
    read_until(&mut pty.master, "HANG", Duration::from_secs(20));
    assert_eq!(termios(&pty.slave).c_lflag & libc::ICANON, 0);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(wait(&mut child), 143);
    assert!(same_settings(&termios(&pty.slave), &before));
}

#[test]
fn terminal_restored_after_a_vmm_error_exit() {
    let mut pty = open_pty();
    let before = termios(&pty.slave);
    let mut child = spawn_on(&pty, "triplefault");
    read_until(&mut pty.master, "triple fault", Duration::from_secs(20));
    assert_eq!(wait(&mut child), 4);
    assert!(same_settings(&termios(&pty.slave), &before));
}
