//! The Intel MultiProcessor Specification 1.4 table, which tells a kernel
//! without ACPI how many CPUs there are, their APIC IDs, the IOAPIC and how the
//! ISA interrupts reach it.
//!
//! The floating pointer sits at the start of the EBDA (Linux scans 639-640 KiB
//! for it) and the configuration table follows it directly.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START};
use crate::{Error, Result};

/// Most vCPUs the table holds in the 1 KiB of EBDA (and that ligera supports).
pub const MAX_VCPUS: u32 = 32;
/// The IOAPIC of KVM's in-kernel irqchip has 24 pins.
pub const IOAPIC_PINS: u8 = 24;

const MPC_ADDR: u64 = EBDA_START + 16;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
// Family 6 and "FPU | APIC" in the feature flags: what Linux reads from here.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;

/// The IOAPIC's ID: the first one after the CPUs' APIC IDs.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

/// The configuration table ("PCMP") for `vcpus` CPUs with APIC IDs 0..vcpus.
fn config_table(vcpus: u8) -> Vec<u8> {
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        entries.extend_from_slice(&[
            ENTRY_PROCESSOR,
            id,
            APIC_VERSION,
            CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 },
        ]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    let ioapic = ioapic_id(vcpus);
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;
    // ISA IRQ n is wired to IOAPIC pin n, as KVM's default GSI routing does;
    // flags 0 = polarity and trigger conform to the bus (ISA: high, edge).
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_VECTORED, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, pin, ioapic, pin]);
        count += 1;
    }
    // LINT0 of every CPU takes the PIC (ExtINT), LINT1 takes NMIs.
    for (kind, lint) in [(INT_EXTINT, 0), (INT_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0]);
        entries.extend_from_slice(&[ISA_BUS_ID, 0, 0xff, lint]);
        count += 1;
    }

    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"LIGERA  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // no extended table
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// The 16-byte floating pointer structure ("_MP_") pointing at the table.
fn floating_pointer() -> [u8; 16] {
    let mut mpf = [0u8; 16];
    mpf[0..4].copy_from_slice(b"_MP_");
    mpf[4..8].copy_from_slice(&(MPC_ADDR as u32).to_le_bytes());
    mpf[8] = 1; // length in 16-byte units
    mpf[9] = 4; // spec revision 1.4
    mpf[10] = checksum(&mpf);
    mpf
}

/// Writes the MP table for `vcpus` CPUs into the EBDA.
pub fn write_mptable<M: GuestMemory>(mem: &M, vcpus: u32) -> Result<()> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(Error::VcpuCount {
            count: vcpus,
            max: MAX_VCPUS,
        });
    }
    let table = config_table(vcpus as u8);
    // The whole table must fit in the EBDA, which ends at 640 KiB.
    debug_assert!(MPC_ADDR + table.len() as u64 <= 0xa0000);
    let err = |addr| Error::GuestWrite {
        what: "MP table",
        addr,
    };
    mem.write_slice(&floating_pointer(), GuestAddress(EBDA_START))
        .map_err(|_| err(EBDA_START))?;
    mem.write_slice(&table, GuestAddress(MPC_ADDR))
        .map_err(|_| err(MPC_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn checksums_are_valid_and_table_fits() {
        for n in [1u32, 2, 4, MAX_VCPUS] {
            let mem = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
            write_mptable(&mem, n).unwrap();
            let mut mpf = [0u8; 16];
            mem.read_slice(&mut mpf, GuestAddress(EBDA_START)).unwrap();
            assert_eq!(&mpf[0..4], b"_MP_");
            assert_eq!(sum(&mpf), 0);
            let table_addr = u32::from_le_bytes(mpf[4..8].try_into().unwrap()) as u64;
            let mut header = [0u8; 44];
            mem.read_slice(&mut header, GuestAddress(table_addr))
                .unwrap();
            assert_eq!(&header[0..4], b"PCMP");
            let len = u16::from_le_bytes([header[4], header[5]]) as usize;
            assert!(table_addr as usize + len <= 0xa0000, "n={n}");
            let mut table = vec![0u8; len];
            mem.read_slice(&mut table, GuestAddress(table_addr))
                .unwrap();
            assert_eq!(sum(&table), 0);
            // Count processor entries by walking the table.
            let (mut off, mut cpus, mut bsp) = (44, 0, 0);
            while off < len {
                let (size, kind) = match table[off] {
                    0 => (20, 0),
                    t @ 1..=4 => (8, t),
                    t => panic!("bad entry type {t}"),
                };
                if kind == 0 {
                    assert_eq!(table[off + 1], cpus as u8);
                    cpus += 1;
                    bsp += usize::from(table[off + 3] & CPU_BSP != 0);
                }
                off += size;
            }
            assert_eq!((cpus, bsp), (n, 1));
        }
    }

    #[test]
    fn rejects_bad_counts() {
        let mem = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        assert!(write_mptable(&mem, 0).is_err());
        assert!(write_mptable(&mem, MAX_VCPUS + 1).is_err());
    }
}
