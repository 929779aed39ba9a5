//! The few legacy PC devices a Linux guest relies on: an i8042 keyboard
//! controller (enough to reset the machine and to type Ctrl-Alt-Del), and
//! the pvpanic port.

use std::collections::VecDeque;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use crate::{BusDevice, GuestEvent, GuestEventSink};

/// The i8042's data and command/status ports (0x60 and 0x64).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
/// The keyboard's interrupt line.
pub const I8042_IRQ: u32 = 1;
/// QEMU's pvpanic ISA port.
pub const PVPANIC_PORT: u64 = 0x505;
/// pvpanic bits: the guest panicked / the guest loaded a crash kernel.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
const STATUS_SYSTEM: u8 = 1 << 2;
const STATUS_COMMAND: u8 = 1 << 3;
const STATUS_UNLOCKED: u8 = 1 << 4;
/// Configuration byte bits.
const CONFIG_KBD_INTERRUPT: u8 = 1 << 0;
const CONFIG_SYSTEM: u8 = 1 << 2;
const CONFIG_KBD_DISABLED: u8 = 1 << 4;
const CONFIG_TRANSLATE: u8 = 1 << 6;
/// Bytes the controller holds for the guest; more are dropped.
const OUTPUT_LIMIT: usize = 16;
/// Keyboard answers.
const KBD_ACK: u8 = 0xfa;

/// Ctrl, Alt, Delete pressed and released, in scan code set 1 (what the
/// guest reads with translation on, as PCs have it).
pub const CTRL_ALT_DEL: [u8; 10] = [0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d, 0, 0];
const CTRL_ALT_DEL_LEN: usize = 8;

/// What the next byte written to the data port is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum DataTarget {
    Keyboard,
    /// A keyboard command's parameter (LEDs, typematic rate, scan code set).
    KeyboardParameter,
    /// Controller command 0x60: the new configuration byte.
    Config,
    /// Controller command 0xd1: the output port (bit 0 low resets the CPU).
    OutputPort,
    /// Controller command 0xd2: a byte to hand back as if typed.
    EchoKeyboard,
}

/// The keyboard controller with a keyboard behind it (no mouse port).
pub struct I8042 {
    sink: Arc<dyn GuestEventSink>,
    irq: EventFd,
    config: u8,
    output: VecDeque<u8>,
    /// The last byte read, returned again when the guest reads an empty buffer.
    last: u8,
    data_target: DataTarget,
    last_was_command: bool,
}

/// The controller's state, as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042Snapshot {
    pub config: u8,
    pub output: Vec<u8>,
    pub last: u8,
    pub data_target: DataTarget,
    pub last_was_command: bool,
}

impl I8042 {
    pub fn save(&self) -> I8042Snapshot {
        I8042Snapshot {
            config: self.config,
            output: self.output.iter().copied().collect(),
            last: self.last,
            data_target: self.data_target,
            last_was_command: self.last_was_command,
        }
    }

    /// Interrupts the guest again if bytes wait for it (after a restore).
    pub fn resend_interrupt(&self) {
        if !self.output.is_empty() {
            self.interrupt();
        }
    }

    pub fn restore(&mut self, s: &I8042Snapshot) -> Result<(), String> {
        if s.output.len() > OUTPUT_LIMIT {
            return Err(format!(
                "i8042: {} bytes in a {OUTPUT_LIMIT}-byte buffer",
                s.output.len()
            ));
        }
        self.config = s.config;
        self.output = s.output.iter().copied().collect();
        self.last = s.last;
        self.data_target = s.data_target;
        self.last_was_command = s.last_was_command;
        Ok(())
    }

    /// A controller whose reset goes to `sink` and whose keyboard interrupt
    /// is `irq` (a KVM irqfd on IRQ 1).
    pub fn new(sink: Arc<dyn GuestEventSink>, irq: EventFd) -> Self {
        I8042 {
            sink,
            irq,
            config: CONFIG_KBD_INTERRUPT | CONFIG_SYSTEM | CONFIG_TRANSLATE,
            output: VecDeque::new(),
            last: 0,
            data_target: DataTarget::Keyboard,
            last_was_command: false,
        }
    }

    /// Types Ctrl-Alt-Del: the keys go to the guest's keyboard driver
    /// (Firecracker's SendCtrlAltDel). Returns false if the guest has not
    /// read what it was sent before and the keys do not fit.
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        if self.output.len() + CTRL_ALT_DEL_LEN > OUTPUT_LIMIT {
            return false;
        }
        for &b in &CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN] {
            self.push(b);
        }
        true
    }

    /// Queues a byte for the guest, interrupting it if it was the first.
    fn push(&mut self, byte: u8) {
        if self.output.len() >= OUTPUT_LIMIT {
            log::debug!("i8042: output buffer full, byte {byte:#x} dropped");
            return;
        }
        self.output.push_back(byte);
        if self.output.len() == 1 {
            self.interrupt();
        }
    }

    fn interrupt(&self) {
        if self.config & CONFIG_KBD_INTERRUPT != 0
            && let Err(e) = self.irq.write(1)
        {
            log::warn!("i8042: cannot raise the keyboard interrupt: {e}");
        }
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.config & CONFIG_SYSTEM != 0 {
            s |= STATUS_SYSTEM;
        }
        if self.last_was_command {
            s |= STATUS_COMMAND;
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        if let Some(b) = self.output.pop_front() {
            self.last = b;
            if !self.output.is_empty() {
                self.interrupt();
            }
        }
        self.last
    }

    fn command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.data_target = DataTarget::Keyboard;
        match cmd {
            0x20 => self.push(self.config),
            0x60 => self.data_target = DataTarget::Config,
            0xa7 | 0xa8 => {}        // mouse port off/on: there is none
            0xa9 => self.push(0xff), // mouse port test: no port
            0xaa => {
                // Self test passed; it also sets the system flag.
                self.config |= CONFIG_SYSTEM;
                self.push(0x55);
            }
            0xab => self.push(0x00), // keyboard port test: OK
            0xad => self.config |= CONFIG_KBD_DISABLED,
            0xae => self.config &= !CONFIG_KBD_DISABLED,
            0xd0 => self.push(0x01), // output port: reset line high, no A20 games
            0xd1 => self.data_target = DataTarget::OutputPort,
            0xd2 => self.data_target = DataTarget::EchoKeyboard,
            0xfe => self.sink.guest_event(GuestEvent::Reset),
            other => log::debug!("i8042: command {other:#x} ignored"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.last_was_command = false;
        let target = std::mem::replace(&mut self.data_target, DataTarget::Keyboard);
        match target {
            DataTarget::Config => self.config = value,
            DataTarget::OutputPort => {
                if value & 1 == 0 {
                    self.sink.guest_event(GuestEvent::Reset);
                }
            }
            DataTarget::EchoKeyboard => self.push(value),
            DataTarget::KeyboardParameter => self.push(KBD_ACK),
            DataTarget::Keyboard => self.keyboard_command(value),
        }
    }

    /// A byte sent to the keyboard itself.
    fn keyboard_command(&mut self, value: u8) {
        match value {
            0xff => {
                self.push(KBD_ACK);
                self.push(0xaa); // self test passed
            }
            0xf2 => {
                self.push(KBD_ACK);
                self.push(0xab); // MF2 keyboard
                self.push(0x83);
            }
            0xee => self.push(0xee), // echo
            0xed | 0xf0 | 0xf3 => {
                self.push(KBD_ACK);
                self.data_target = DataTarget::KeyboardParameter;
            }
            _ => self.push(KBD_ACK),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (offset, &mut *data) {
            (0, [byte]) => *byte = self.read_data(),
            (4, [byte]) => *byte = self.status(),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, &[value]) => self.write_data(value),
            (4, &[value]) => self.command(value),
            _ => log::debug!(
                "i8042: {}-byte write at offset {offset} ignored",
                data.len()
            ),
        }
    }
}

/// pvpanic: reading gives the supported events, writing PANICKED reports a panic.
pub struct PvPanic {
    sink: Arc<dyn GuestEventSink>,
}

impl PvPanic {
    pub fn new(sink: Arc<dyn GuestEventSink>) -> Self {
        PvPanic { sink }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
        data[0] = PVPANIC_PANICKED;
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        match data.first() {
            Some(v) if v & PVPANIC_PANICKED != 0 => self.sink.guest_event(GuestEvent::Panic),
            Some(v) if v & PVPANIC_CRASH_LOADED != 0 => {
                log::warn!("guest reports a crash kernel loaded after a panic")
            }
            _ => {}
        }
    }
}

/// The value a guest writes to the boot timer when it has booted (the
/// number Firecracker's test guests write).
pub const BOOT_DONE: u8 = 123;

/// Firecracker's boot timer: a guest that writes [`BOOT_DONE`] to offset 0
/// of its window gets the wall and CPU time since the VMM started logged, in
/// Firecracker's line format (tools read "Guest-boot-time").
pub struct BootTimer {
    started: std::time::Instant,
}

impl BootTimer {
    /// `started`: when the VMM process started.
    pub fn new(started: std::time::Instant) -> Self {
        BootTimer { started }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 || data != [BOOT_DONE] {
            return;
        }
        let wall = self.started.elapsed().as_micros();
        let mut cpu = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into `cpu`, which we own.
        unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut cpu) };
        let cpu = cpu.tv_sec as u128 * 1_000_000 + cpu.tv_nsec as u128 / 1000;
        log::info!(
            "Guest-boot-time = {wall:>6} us {} ms, {cpu:>6} CPU us {} CPU ms",
            wall / 1000,
            cpu / 1000
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Events(Mutex<Vec<GuestEvent>>);

    impl GuestEventSink for Events {
        fn guest_event(&self, event: GuestEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    fn kbd(events: &Arc<Events>) -> (I8042, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(events.clone(), irq.try_clone().unwrap()), irq)
    }

    fn read_all(kbd: &mut I8042) -> Vec<u8> {
        let mut out = Vec::new();
        let mut b = [0u8];
        loop {
            kbd.read(4, &mut b);
            if b[0] & STATUS_OUTPUT_FULL == 0 {
                return out;
            }
            kbd.read(0, &mut b);
            out.push(b[0]);
        }
    }

    #[test]
    fn i8042_commands_and_keyboard() {
        let events = Arc::new(Events::default());
        let (mut kbd, irq) = kbd(&events);
        kbd.write(4, &[0xaa]);
        assert_eq!(read_all(&mut kbd), [0x55]);
        assert_eq!(irq.read().unwrap(), 1);
        kbd.write(4, &[0x20]);
        let config = read_all(&mut kbd)[0];
        kbd.write(4, &[0x60]);
        kbd.write(0, &[config & !CONFIG_KBD_INTERRUPT]);
        let _ = irq.read();
        kbd.write(0, &[0xff]);
        assert_eq!(read_all(&mut kbd), [KBD_ACK, 0xaa]);
        assert!(irq.read().is_err(), "interrupts off: none raised");
        kbd.write(0, &[0xed]);
        kbd.write(0, &[0x07]);
        assert_eq!(read_all(&mut kbd), [KBD_ACK, KBD_ACK]);
        // The buffer is bounded; Ctrl-Alt-Del waits for room.
        for _ in 0..20 {
            kbd.write(4, &[0xd2]);
            kbd.write(0, &[0x42]);
        }
        assert!(!kbd.send_ctrl_alt_del());
        assert_eq!(read_all(&mut kbd).len(), OUTPUT_LIMIT);
        assert!(kbd.send_ctrl_alt_del());
        assert_eq!(read_all(&mut kbd), CTRL_ALT_DEL[..CTRL_ALT_DEL_LEN]);
        // Odd accesses are harmless.
        kbd.write(2, &[1, 2]);
        let mut wide = [0u8; 2];
        kbd.read(0, &mut wide);
        assert_eq!(wide, [0xff, 0xff]);
        assert!(events.0.lock().unwrap().is_empty());
    }

    #[test]
    fn i8042_reset_command() {
        let events = Arc::new(Events::default());
        let (mut kbd, _irq) = kbd(&events);
        let mut status = [0xaau8];
        kbd.read(4, &mut status);
        assert_eq!(
            status[0] & 0x2,
            0,
            "input buffer empty, so Linux sends the command"
        );
        kbd.write(4, &[0xfd]);
        kbd.write(0, &[0xfe]);
        assert!(events.0.lock().unwrap().is_empty());
        kbd.write(4, &[0xfe]);
        assert_eq!(*events.0.lock().unwrap(), vec![GuestEvent::Reset]);
        // Also through the output port's reset line.
        kbd.write(4, &[0xd1]);
        kbd.write(0, &[0xfe]);
        assert_eq!(events.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn pvpanic_reports() {
        let events = Arc::new(Events::default());
        let mut p = PvPanic::new(events.clone());
        let mut caps = [0u8];
        p.read(0, &mut caps);
        assert_eq!(caps[0], PVPANIC_PANICKED);
        p.write(0, &[0]);
        p.write(0, &[PVPANIC_CRASH_LOADED]);
        p.write(0, &[]);
        assert!(events.0.lock().unwrap().is_empty());
        p.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(*events.0.lock().unwrap(), vec![GuestEvent::Panic]);
    }
}
