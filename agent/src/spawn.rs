//! Starting a command without fork(2).
//!
//! The agent is a multi-threaded process, and in a sandbox every page-table
//! copy and copy-on-write fault that fork(2) brings is emulated guest work:
//! fork took about 0.5 s of the 1.5 s an `exec -- true` took here. The
//! command is started with `clone(CLONE_VM | CLONE_VFORK)` instead, as
//! glibc's posix_spawn does: the child runs on a stack of its own in the
//! agent's memory, while the calling thread waits, until it has exec'd.
//! posix_spawn itself cannot chroot, make a controlling terminal or change
//! the user, which is why this exists.
//!
//! Everything the child needs is prepared before the clone; the child only
//! makes system calls, and the user is changed with raw system calls (the
//! libc wrappers would broadcast the change to the agent's threads, whose
//! memory the child shares).

use std::collections::BTreeMap;
use std::ffi::{CString, c_void};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicI32, Ordering};

/// What the child does between the clone and exec.
pub struct Plan {
    /// The program and its arguments.
    pub argv: Vec<String>,
    /// `KEY=VALUE` entries; the last one of a key wins.
    pub env: Vec<String>,
    /// Where to chroot, with the working directory inside it; None leaves
    /// both as they are (the agent's own helpers).
    pub root: Option<(CString, CString)>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// A pseudo-terminal's slave end for stdin, stdout and stderr (made the
    /// controlling terminal); None gives the command three pipes.
    pub tty: Option<File>,
    /// Set oom_score_adj back to 0 (the agent as PID 1 runs at -1000).
    pub reset_oom_score: bool,
}

/// A started command: its pid and the agent's ends of its pipes.
pub struct Child {
    pub pid: libc::pid_t,
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
}

/// Where a program name without a slash is looked for when the command's
/// environment has no PATH (what execvp(3) uses).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// The paths to try for `program`, in order, as execvp(3) would.
fn candidates(program: &str, env: &BTreeMap<&str, &str>) -> Vec<String> {
    if program.contains('/') {
        return vec![program.to_string()];
    }
    let path = env.get("PATH").copied().unwrap_or(DEFAULT_PATH);
    path.split(':')
        .map(|dir| match dir {
            "" => program.to_string(),
            dir => format!("{}/{program}", dir.trim_end_matches('/')),
        })
        .collect()
}

fn cstrings<'a>(items: impl Iterator<Item = &'a str>) -> io::Result<Vec<CString>> {
    items
        .map(|s| CString::new(s).map_err(|_| io::Error::other("a NUL in an argument")))
        .collect()
}

fn null_terminated(items: &[CString]) -> Vec<*const libc::c_char> {
    items
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two new descriptors we own.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// What the child reads: raw pointers into memory the parent keeps alive
/// (and does not touch) until the child has exec'd or exited.
struct ChildArgs {
    programs: Vec<*const libc::c_char>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    stdio: [libc::c_int; 3],
    tty: bool,
    root: Option<(*const libc::c_char, *const libc::c_char)>,
    uid: Option<u32>,
    gid: Option<u32>,
    reset_oom_score: bool,
    /// The errno that stopped the child, 0 if it exec'd.
    error: AtomicI32,
}

/// Runs in the child, on its own stack, in the agent's memory: system
/// calls only, no allocation, no locks.
extern "C" fn child_main(arg: *mut c_void) -> libc::c_int {
    // SAFETY: `arg` is the ChildArgs the parent passed; it outlives us.
    let a = unsafe { &*(arg as *const ChildArgs) };
    // SAFETY: each call below is a plain system call on values prepared
    // by the parent.
    let errno = unsafe { child_steps(a) };
    a.error.store(errno.max(1), Ordering::SeqCst);
    // SAFETY: ends the child without running anything of the agent's.
    unsafe { libc::_exit(127) }
}

/// The child's steps up to exec; returns the errno that stopped them.
unsafe fn child_steps(a: &ChildArgs) -> libc::c_int {
    let errno = || {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    };
    // SAFETY: (for the whole function) system calls on prepared values.
    unsafe {
        // Every signal at its default: a command must not inherit what
        // the agent ignores (started in the background by a shell, it
        // ignores SIGINT, and then Ctrl-C on a terminal would not reach
        // the command). Then the mask the parent set for the clone goes.
        for sig in 1..32 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
        if a.reset_oom_score {
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY);
            if fd >= 0 {
                libc::write(fd, c"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
        if libc::setsid() < 0 {
            return errno();
        }
        for (target, &fd) in a.stdio.iter().enumerate() {
            let target = target as libc::c_int;
            let ok = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0) == 0
            } else {
                libc::dup2(fd, target) == target
            };
            if !ok {
                return errno();
            }
        }
        if a.tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
            return errno();
        }
        if let Some((root, cwd)) = a.root
            && (libc::chroot(root) != 0 || libc::chdir(cwd) != 0)
        {
            return errno();
        }
        // Raw system calls: they change this process only.
        if let Some(gid) = a.gid
            && (libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setgid, gid) != 0)
        {
            return errno();
        }
        if let Some(uid) = a.uid
            && libc::syscall(libc::SYS_setuid, uid) != 0
        {
            return errno();
        }
        // As execvp(3): a program found but not executable is remembered
        // while the search goes on; any other error ends it.
        let mut first = 0;
        for &program in &a.programs[..a.programs.len() - 1] {
            libc::execve(program, a.argv.as_ptr(), a.envp.as_ptr());
            match errno() {
                libc::EACCES => first = libc::EACCES,
                libc::ENOENT | libc::ENOTDIR => {}
                e => return e,
            }
        }
        if first != 0 { first } else { libc::ENOENT }
    }
}

/// Starts `plan`; returns once the command has exec'd, or with the error
/// that stopped it (its child is reaped then). What `guard` returns is held
/// from just before the clone to the end, so that a reaper waiting for it
/// cannot take a failed child first.
pub fn spawn<G>(plan: Plan, guard: impl FnOnce() -> G) -> io::Result<Child> {
    let mut env = BTreeMap::new();
    for kv in &plan.env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k, v);
        }
    }
    let program = plan
        .argv
        .first()
        .ok_or_else(|| io::Error::other("no command"))?;
    let programs = cstrings(candidates(program, &env).iter().map(String::as_str))?;
    let argv = cstrings(plan.argv.iter().map(String::as_str))?;
    let env_entries: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let envp = cstrings(env_entries.iter().map(String::as_str))?;

    // The child's ends are closed here once it has exec'd (they are
    // close-on-exec, and dup2 gives it its own 0, 1 and 2).
    let tty = plan.tty.is_some();
    let (child_fds, ours): ([OwnedFd; 3], [Option<File>; 3]) = match plan.tty {
        Some(slave) => (
            [
                OwnedFd::from(slave.try_clone()?),
                OwnedFd::from(slave.try_clone()?),
                OwnedFd::from(slave),
            ],
            [None, None, None],
        ),
        None => {
            let (in_r, in_w) = pipe()?;
            let (out_r, out_w) = pipe()?;
            let (err_r, err_w) = pipe()?;
            (
                [in_r.into(), out_w.into(), err_w.into()],
                [Some(in_w), Some(out_r), Some(err_r)],
            )
        }
    };
    let args = ChildArgs {
        programs: null_terminated(&programs),
        argv: null_terminated(&argv),
        envp: null_terminated(&envp),
        stdio: [
            child_fds[0].as_raw_fd(),
            child_fds[1].as_raw_fd(),
            child_fds[2].as_raw_fd(),
        ],
        tty,
        root: plan.root.as_ref().map(|(r, c)| (r.as_ptr(), c.as_ptr())),
        uid: plan.uid,
        gid: plan.gid,
        reset_oom_score: plan.reset_oom_score,
        error: AtomicI32::new(0),
    };
    let mut stack = vec![0u8; 64 * 1024];
    // The stack grows down from its (16-byte aligned) end.
    let top = (stack.as_mut_ptr() as usize + stack.len()) & !15;

    let _guard = guard();
    // No signal handler of the agent's may run in the child: all signals
    // are blocked across the clone, and the child resets them first.
    // SAFETY: sigset_t is plain data, all zeroes is valid; the masks are
    // valid for pthread_sigmask.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    // SAFETY: CLONE_VFORK suspends this thread until the child exec'd or
    // exited, so `args` and `stack` outlive its use of them.
    let pid = unsafe {
        libc::clone(
            child_main,
            top as *mut c_void,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            (&args as *const ChildArgs).cast_mut().cast(),
        )
    };
    let clone_error = io::Error::last_os_error();
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid < 0 {
        return Err(clone_error);
    }
    let error = args.error.load(Ordering::SeqCst);
    if error != 0 {
        let mut status = 0;
        // SAFETY: reaps our own child, which has exited.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        return Err(io::Error::from_raw_os_error(error));
    }
    drop(child_fds);
    let [stdin, stdout, stderr] = ours;
    Ok(Child {
        pid,
        stdin,
        stdout,
        stderr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_are_searched_as_execvp_does() {
        let mut env = BTreeMap::new();
        assert_eq!(candidates("/bin/sh", &env), ["/bin/sh"]);
        assert_eq!(candidates("./run", &env), ["./run"]);
        assert_eq!(candidates("sh", &env), ["/bin/sh", "/usr/bin/sh"]);
        env.insert("PATH", "/opt/x/:/usr/bin::");
        assert_eq!(
            candidates("sh", &env),
            ["/opt/x/sh", "/usr/bin/sh", "sh", "sh"]
        );
    }
}
