//! Identity page tables for entering a kernel in long mode.
//!
//! The 64-bit Linux boot protocol wants paging on, with the kernel, the zero
//! page and the command line identity-mapped. We map the whole first 4 GiB
//! with 2 MiB pages (one PML4 entry, one PDPT with four entries, four PDs),
//! which also covers the local APIC and IOAPIC for small test guests.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{PD_START, PDPT_START, PML4_START};
use crate::{Error, Result};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const PAGE_SIZE_2M: u64 = 1 << 7;

/// Number of page directories: each maps 1 GiB.
pub const PD_COUNT: u64 = 4;

/// Writes the tables and returns the value for CR3.
pub fn write_identity_page_tables<M: GuestMemory>(mem: &M) -> Result<u64> {
    let write = |value: u64, addr: u64| {
        mem.write_obj(value, GuestAddress(addr))
            .map_err(|_| Error::GuestWrite {
                what: "page tables",
                addr,
            })
    };
    write(PDPT_START | PRESENT | WRITABLE, PML4_START)?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_START + pd * 0x1000;
        write(pd_addr | PRESENT | WRITABLE, PDPT_START + pd * 8)?;
        for i in 0..512u64 {
            let phys = (pd << 30) | (i << 21);
            write(phys | PRESENT | WRITABLE | PAGE_SIZE_2M, pd_addr + i * 8)?;
        }
    }
    Ok(PML4_START)
}

/// Walks the tables like the MMU would (for tests): virtual to physical.
pub fn translate<M: GuestMemory>(mem: &M, cr3: u64, virt: u64) -> Option<u64> {
    let entry = |table: u64, index: u64| -> Option<u64> {
        let e: u64 = mem.read_obj(GuestAddress(table + index * 8)).ok()?;
        (e & PRESENT != 0).then_some(e)
    };
    let pml4e = entry(cr3 & !0xfff, (virt >> 39) & 0x1ff)?;
    let pdpte = entry(pml4e & 0x000f_ffff_ffff_f000, (virt >> 30) & 0x1ff)?;
    let pde = entry(pdpte & 0x000f_ffff_ffff_f000, (virt >> 21) & 0x1ff)?;
    if pde & PAGE_SIZE_2M == 0 {
        return None;
    }
    Some((pde & 0x000f_ffff_ffe0_0000) | (virt & 0x1f_ffff))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_maps_first_4g() {
        let mem = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let cr3 = write_identity_page_tables(&mem).unwrap();
        for addr in [
            0u64,
            0x7000,
            0x10_0000,
            0x123_4567,
            0xfee0_0000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&mem, cr3, addr), Some(addr), "{addr:#x}");
        }
        assert_eq!(translate(&mem, cr3, 0x1_0000_0000), None);
    }

    #[test]
    fn fails_cleanly_without_memory() {
        let mem = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        assert!(write_identity_page_tables(&mem).is_err());
    }
}
