//! The 16550A UART on COM1, built on `vm-superio`.
//!
//! Output goes to a writer (stdout, a file or nowhere). Input is pushed in by
//! the VMM's event loop; when the guest has drained the receive FIFO, the
//! `input_space` event fd tells the loop it can read more.

use std::io::Write;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// COM1's port range and interrupt line.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_PORT_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// An interrupt line: an event fd the VMM registers as a KVM irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the event loop when the guest has emptied the receive FIFO.
pub struct InputSpace(pub EventFd);

impl SerialEvents for InputSpace {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.0.write(1) {
            log::warn!("serial: cannot signal input space: {e}");
        }
    }
}

/// The guest's serial console.
pub struct SerialConsole {
    uart: Serial<IrqTrigger, InputSpace, Box<dyn Write + Send>>,
    output_failed: bool,
}

impl SerialConsole {
    pub fn new(irq: EventFd, input_space: EventFd, out: Box<dyn Write + Send>) -> Self {
        SerialConsole {
            uart: Serial::with_events(IrqTrigger(irq), InputSpace(input_space), out),
            output_failed: false,
        }
    }

    /// How many input bytes the receive FIFO takes now.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues input for the guest; returns how many bytes were taken.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("serial: input not queued: {e:?}");
                0
            }
        }
    }
}

/// The UART's registers and receive FIFO, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

/// Bytes the UART's receive FIFO holds.
const FIFO_SIZE: usize = 64;

impl SerialConsole {
    /// The UART's state.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Interrupts the guest again if the UART has an interrupt pending
    /// (IIR bit 0 clear), after a restore.
    pub fn resend_interrupt(&self) {
        if self.uart.state().interrupt_identification & 1 == 0
            && let Err(e) = self.uart.interrupt_evt().trigger()
        {
            log::warn!("serial: cannot raise the interrupt: {e}");
        }
    }

    /// Puts the UART in the state `s`, keeping its interrupt, events and output.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), String> {
        if s.in_buffer.len() > FIFO_SIZE {
            return Err(format!(
                "serial: {} bytes in a {FIFO_SIZE}-byte FIFO",
                s.in_buffer.len()
            ));
        }
        let dup = |e: &EventFd| e.try_clone().map_err(|e| format!("serial: {e}"));
        let irq = dup(&self.uart.interrupt_evt().0)?;
        let space = dup(&self.uart.events().0)?;
        let placeholder = Serial::with_events(
            IrqTrigger(dup(&irq)?),
            InputSpace(dup(&space)?),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        // Cannot fail: the FIFO length was checked above.
        self.uart = Serial::from_state(&state, IrqTrigger(irq), InputSpace(space), out)
            .map_err(|e| format!("serial: {e:?}"))?;
        Ok(())
    }
}

impl BusDevice for SerialConsole {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers; wider accesses read as all ones.
        match data {
            [byte] => *byte = self.uart.read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let &[value] = data else {
            return;
        };
        if let Err(e) = self.uart.write(offset as u8, value) {
            // A closed or failing output must not stop the guest; say it once.
            if !self.output_failed {
                log::warn!("serial: output failed, dropping console output: {e:?}");
                self.output_failed = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn console() -> (SerialConsole, EventFd, EventFd, Shared) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let space = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = Shared::default();
        let c = SerialConsole::new(
            irq.try_clone().unwrap(),
            space.try_clone().unwrap(),
            Box::new(out.clone()),
        );
        (c, irq, space, out)
    }

    #[test]
    fn output_reaches_writer_and_raises_irq_when_enabled() {
        let (mut c, irq, _, out) = console();
        c.write(1, &[0x02]); // IER: transmitter empty interrupt
        let mut iir = [0u8];
        for b in b"hi" {
            let _ = irq.read();
            c.read(2, &mut iir); // the driver acknowledges the interrupt
            c.write(0, &[*b]);
            assert_eq!(irq.read().unwrap(), 1);
        }
        assert_eq!(&*out.0.lock().unwrap(), b"hi");
    }

    #[test]
    fn input_fifo_fills_and_signals_space() {
        let (mut c, irq, space, _) = console();
        c.write(1, &[0x01]); // IER: received data interrupt
        let cap = c.input_capacity();
        assert_eq!(c.enqueue_input(&vec![b'x'; cap + 10]), cap);
        assert_eq!(c.input_capacity(), 0);
        assert_eq!(c.enqueue_input(b"y"), 0);
        assert!(irq.read().unwrap() >= 1);
        let mut d = [0u8];
        c.read(5, &mut d);
        assert_ne!(d[0] & 1, 0, "LSR data ready");
        for _ in 0..cap {
            c.read(0, &mut d);
            assert_eq!(d[0], b'x');
        }
        assert_eq!(space.read().unwrap(), 1);
        c.read(5, &mut d);
        assert_eq!(d[0] & 1, 0);
    }

    #[test]
    fn odd_sized_accesses_are_harmless() {
        let (mut c, _, _, out) = console();
        let mut d = [0u8; 4];
        c.read(0, &mut d);
        assert_eq!(d, [0xff; 4]);
        c.write(0, &[1, 2]);
        c.write(200, &[1]);
        assert!(out.0.lock().unwrap().is_empty());
    }
}
