//! The few legacy PC devices a Linux guest relies on: enough of the i8042
//! keyboard controller to reset the machine, and the pvpanic port.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::{BusDevice, GuestEvent, GuestEventSink};

/// The i8042's data and command/status ports (0x60 and 0x64).
pub const I8042_PORT: u64 = 0x60;
pub const I8042_PORT_LEN: u64 = 5;
/// QEMU's pvpanic ISA port.
pub const PVPANIC_PORT: u64 = 0x505;
/// pvpanic bits: the guest panicked / the guest loaded a crash kernel.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// Turns the i8042's CPU reset command into a [`GuestEvent::Reset`].
pub struct ResetTrigger(pub Arc<dyn GuestEventSink>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.guest_event(GuestEvent::Reset);
        Ok(())
    }
}

/// Keyboard controller: status reads say "idle", command 0xfe resets.
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    pub fn new(sink: Arc<dyn GuestEventSink>) -> Self {
        I8042 {
            inner: I8042Device::new(ResetTrigger(sink)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data {
            [byte] => *byte = self.inner.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let &[value] = data {
            let Ok(()) = self.inner.write(offset as u8, value);
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

    #[test]
    fn i8042_reset_command() {
        let events = Arc::new(Events::default());
        let mut kbd = I8042::new(events.clone());
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
