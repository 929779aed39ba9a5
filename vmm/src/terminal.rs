//! The host terminal while a guest console runs on it.
//!
//! Input goes to the guest byte by byte (no line editing, no echo, no
//! CR/LF translation, no XON/XOFF), but Ctrl-C still raises SIGINT so it stops
//! the VM; Ctrl-\ and Ctrl-Z reach the guest instead of quitting or suspending
//! ligera. Output processing stays on. The saved settings are restored on
//! every way out: normal return, error, panic (see [`restore`]) and signals
//! (they are handled in the event loop, which then returns normally).

use std::os::fd::RawFd;
use std::sync::Mutex;

static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Puts a terminal in raw mode until dropped.
pub struct RawTerminal(());

impl RawTerminal {
    /// Switches `fd` to raw mode if it is a terminal; `None` if it is not.
    pub fn enter(fd: RawFd) -> std::io::Result<Option<RawTerminal>> {
        Self::enter_mode(fd, true)
    }

    /// Raw mode with Ctrl-C, Ctrl-\ and Ctrl-Z passed on as bytes too (for
    /// a terminal in the guest, whose line discipline turns them into
    /// signals for the command).
    pub fn enter_passing_signals(fd: RawFd) -> std::io::Result<Option<RawTerminal>> {
        Self::enter_mode(fd, false)
    }

    fn enter_mode(fd: RawFd, keep_isig: bool) -> std::io::Result<Option<RawTerminal>> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return Ok(None);
        }
        let mut saved = std::mem::MaybeUninit::<libc::termios>::zeroed();
        // SAFETY: tcgetattr fills the termios struct we own.
        if unsafe { libc::tcgetattr(fd, saved.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: tcgetattr succeeded and initialised it.
        let saved = unsafe { saved.assume_init() };
        let mut raw = saved;
        raw.c_iflag &= !(libc::IGNBRK
            | libc::BRKINT
            | libc::PARMRK
            | libc::ISTRIP
            | libc::INLCR
            | libc::IGNCR
            | libc::ICRNL
            | libc::IXON);
        raw.c_lflag &= !(libc::ECHO | libc::ECHONL | libc::ICANON | libc::IEXTEN);
        raw.c_cflag = (raw.c_cflag & !(libc::CSIZE | libc::PARENB)) | libc::CS8;
        if !keep_isig {
            raw.c_lflag &= !libc::ISIG;
            raw.c_oflag &= !libc::OPOST;
        }
        raw.c_cc[libc::VQUIT] = 0; // _POSIX_VDISABLE on Linux
        raw.c_cc[libc::VSUSP] = 0;
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, saved));
        // SAFETY: tcsetattr reads the termios struct we pass.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            let err = std::io::Error::last_os_error();
            restore();
            return Err(err);
        }
        Ok(Some(RawTerminal(())))
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        restore();
    }
}

/// [`restore`] for a signal handler: never waits for the lock (the thread
/// the signal interrupted may hold it); tcsetattr is async-signal-safe.
pub fn restore_from_signal_handler() {
    if let Ok(saved) = SAVED.try_lock()
        && let Some((fd, termios)) = saved.as_ref()
    {
        // SAFETY: tcsetattr reads the termios struct saved earlier.
        unsafe { libc::tcsetattr(*fd, libc::TCSANOW, termios) };
    }
}

/// Restores the terminal settings saved by [`RawTerminal::enter`], if any.
/// Safe to call more than once and from a panic hook.
pub fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((fd, termios)) = saved {
        // SAFETY: tcsetattr reads the termios struct saved earlier.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}
