//! Each role's seccomp filter, applied for real: a child process (this test
//! binary again, running only `child`) installs ligera's SIGSYS handler and
//! one role's filter on its thread, then makes one system call. A call the
//! role must not make ends the child with status 159 and one line naming
//! the role and the call; calls the role needs go through.

use std::process::Command;

use vmm::seccomp::{EXIT_BAD_SYSCALL, Role};

const CASE: &str = "LIGERA_SECCOMP_TEST_CASE";

fn role(name: &str) -> Role {
    *Role::ALL
        .iter()
        .find(|r| r.name() == name)
        .unwrap_or_else(|| panic!("no role {name}"))
}

/// Makes the call named `call`; returns its result (for the allowed ones).
fn make_call(call: &str) -> i64 {
    // SAFETY: each call gets valid arguments (paths are NUL-terminated
    // literals, buffers are ours); results are only returned.
    unsafe {
        match call {
            "openat" => {
                libc::openat(libc::AT_FDCWD, c"/etc/hostname".as_ptr(), libc::O_RDONLY) as i64
            }
            // musl's open() is the open call.
            "open" => libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) as i64,
            "socket-inet" => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) as i64,
            "socket-unix" => libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) as i64,
            "execve" => {
                let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
                libc::execv(c"/bin/true".as_ptr(), argv.as_ptr()) as i64
            }
            "mmap-exec" => libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as i64,
            "mmap-rw" => libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            ) as i64,
            "ioctl-tunsetiff" => libc::ioctl(2, libc::TUNSETIFF, 0) as i64,
            "kill-init" => libc::kill(1, 0) as i64,
            "ptrace" => libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0),
            "rt_sigaction" => {
                let mut old: libc::sigaction = std::mem::zeroed();
                libc::sigaction(libc::SIGSYS, std::ptr::null(), &mut old) as i64
            }
            "write" => libc::write(2, c"".as_ptr().cast(), 0) as i64,
            "open-dir" => libc::open(c"/tmp".as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) as i64,
            "open-tmpfile" => {
                let flags = libc::O_TMPFILE | libc::O_RDWR;
                libc::openat(libc::AT_FDCWD, c"/tmp".as_ptr(), flags, 0o600) as i64
            }
            "thread" => std::thread::spawn(|| 7i64).join().unwrap(),
            // A SIGSYS that seccomp did not send is not a verdict: ignored.
            // (tgkill, as glibc's raise; musl's raise uses tkill, which the
            // filters allow only for the vCPU kick and SIGABRT.)
            "raise-sigsys" => libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::gettid(),
                libc::SIGSYS,
            ),
            other => panic!("unknown call {other}"),
        }
    }
}

/// The child's side: runs only when the parent below sets the case.
#[test]
fn child() {
    let Ok(case) = std::env::var(CASE) else {
        return;
    };
    let (name, call) = case.split_once(':').unwrap();
    vmm::seccomp::enable().unwrap();
    vmm::seccomp::install(role(name)).unwrap();
    let result = make_call(call);
    println!("CALLED {call} = {result}");
}

/// Runs one case in a child; returns (status, stdout, stderr).
fn run_case(role: &str, call: &str) -> (i32, String, String) {
    let out = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child", "--nocapture", "--test-threads", "1"])
        .env(CASE, format!("{role}:{call}"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_role_is_stopped_at_calls_it_must_not_make() {
    let forbidden: &[(&str, &[(&str, &str)])] = &[
        (
            "vcpu",
            &[
                ("openat", "openat (257)"),
                ("open", "open (2)"),
                ("socket-unix", "socket (41)"),
                ("mmap-exec", "mmap (9)"),
                ("ioctl-tunsetiff", "ioctl (16)"),
                ("execve", "execve (59)"),
            ],
        ),
        (
            "block",
            &[("socket-unix", "socket (41)"), ("openat", "openat (257)")],
        ),
        (
            "vmm",
            &[
                // Directories only: a file may not be opened, nor a
                // temporary file made in a directory.
                ("openat", "openat (257)"),
                ("open", "open (2)"),
                ("open-tmpfile", "openat (257)"),
                ("socket-inet", "socket (41)"),
                ("execve", "execve (59)"),
                ("kill-init", "kill (62)"),
                ("rt_sigaction", "rt_sigaction (13)"),
            ],
        ),
        (
            "api",
            &[
                // Files only (the path form of PUT /snapshot/create): no
                // directory, no temporary file made in one.
                ("open-tmpfile", "openat (257)"),
                ("ptrace", "ptrace (101)"),
                // It accepts connections, never makes one.
                ("socket-unix", "socket (41)"),
            ],
        ),
        ("console", &[("socket-unix", "socket (41)")]),
        (
            "sandbox",
            &[
                ("openat", "openat (257)"),
                ("socket-inet", "socket (41)"),
                ("execve", "execve (59)"),
            ],
        ),
    ];
    for (role, calls) in forbidden {
        for (call, named) in *calls {
            let (status, stdout, stderr) = run_case(role, call);
            assert_eq!(
                status, EXIT_BAD_SYSCALL,
                "{role} making {call}: stdout {stdout:?} stderr {stderr:?}"
            );
            assert!(
                stderr.contains(&format!(
                    "ligera: seccomp: the {role} thread made a system call outside its filter: {named}"
                )),
                "{role} making {call}: {stderr}"
            );
            assert!(!stdout.contains("CALLED"), "{role} went on after {call}");
        }
    }
}

#[test]
fn calls_a_role_needs_go_through() {
    let allowed: &[(&str, &str)] = &[
        ("vcpu", "write"),
        ("vcpu", "mmap-rw"),
        ("block", "mmap-rw"),
        ("vmm", "socket-unix"),
        ("vmm", "open-dir"),
        ("api", "write"),
        ("sandbox", "socket-unix"),
        ("sandbox", "thread"),
        ("console", "write"),
        ("vcpu", "raise-sigsys"),
    ];
    for (role, call) in allowed {
        let (status, stdout, stderr) = run_case(role, call);
        assert_eq!(status, 0, "{role} making {call}: {stdout} {stderr}");
        assert!(stdout.contains(&format!("CALLED {call} = ")), "{stdout}");
        assert!(!stdout.contains(&format!("CALLED {call} = -1")), "{stdout}");
    }
}
