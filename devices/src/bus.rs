//! Address buses for port I/O and MMIO.
//!
//! A bus maps non-overlapping address ranges to devices. It is built before
//! the vCPUs start and never changes afterwards, so lookups take no lock; each
//! device has its own mutex.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device on a bus: accesses come with the offset into its range.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("bus range {base:#x}+{len:#x} is empty or overflows")]
    BadRange { base: u64, len: u64 },
    #[error("bus range {base:#x}+{len:#x} overlaps the device at {other:#x}")]
    Overlap { base: u64, len: u64, other: u64 },
}

struct Entry {
    len: u64,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// A set of devices keyed by the start of their address range.
#[derive(Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(
        &mut self,
        device: Arc<Mutex<dyn BusDevice>>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let overlap = |(&start, e): (&u64, &Entry)| start < base + len && base < start + e.len;
        if let Some((&other, _)) = self.devices.iter().find(|&kv| overlap(kv)) {
            return Err(BusError::Overlap { base, len, other });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    /// The device covering `addr` and the offset of `addr` in its range.
    fn lookup(&self, addr: u64) -> Option<(&Entry, u64)> {
        let (&base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset < entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`; false when no device is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.lookup(addr) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.lookup(addr) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, carrying on if another thread panicked while holding it:
/// device state is plain data and stays usable, and one failed access must
/// not take every vCPU down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 4).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d[0], 5);
        assert!(!bus.read(0x3f7, &mut d));
        assert!(!bus.read(0x404, &mut d));
        assert!(bus.write(0x403, &[9, 9]));
        assert_eq!(b.lock().unwrap().last, Some((3, vec![9, 9])));
        assert!(a.lock().unwrap().last.is_none());
    }

    #[test]
    fn rejects_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        let d = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(d.clone(), 0x100, 0x10).unwrap();
        assert!(matches!(
            bus.insert(d.clone(), 0x10f, 1),
            Err(BusError::Overlap { other: 0x100, .. })
        ));
        assert!(bus.insert(d.clone(), 0xf8, 9).is_err());
        assert!(bus.insert(d.clone(), 0xf8, 8).is_ok());
        assert!(bus.insert(d.clone(), 0x200, 0).is_err());
        assert!(bus.insert(d, u64::MAX, 2).is_err());
    }
}
