//! Guest-physical memory layout.
//!
//! ```text
//! 0x0000_0000  low RAM: GDT, PVH start info, zero page, boot stack, page tables,
//!              kernel command line (all below 640 KiB)
//! 0x0009_fc00  EBDA: the MP table (not RAM in the e820 map)
//! 0x000a_0000  legacy VGA/BIOS hole (not RAM)
//! 0x0010_0000  RAM: kernel, initrd at the top, up to the MMIO hole
//! 0xc000_0000  32-bit MMIO hole: virtio-mmio devices, IOAPIC, local APIC
//! 0x1_0000_0000 RAM above 4 GiB for guests bigger than 3 GiB
//! ```

use vm_memory::GuestAddress;

use crate::{Error, Result};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20), 32-bit code (0x28).
pub const GDT_START: u64 = 0x500;
/// An empty IDT: the guest installs its own before it enables interrupts.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by the module list and the memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6080;
/// Linux boot protocol zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Stack pointer at entry (grows down into 0x8000..0x9000).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables for the 64-bit entry: PML4, one PDPT, four PDs.
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// x86 Linux's `COMMAND_LINE_SIZE`, including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area, where the MP table lives (Linux scans 639-640 KiB).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of RAM above the legacy hole, where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where virtio-mmio device windows start, inside the MMIO hole.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Default IOAPIC and local APIC addresses (KVM's in-kernel irqchip).
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Smallest guest ligera boots: page tables and boot data below 1 MiB, a kernel above.
pub const MIN_MEMORY: u64 = 4 * MIB;

/// Type of an e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    Ram = 1,
    Reserved = 2,
}

/// One entry of the memory map given to the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryMapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: MemoryType,
}

/// Where guest RAM is, for a guest of a given size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestLayout {
    mem_size: u64,
}

impl GuestLayout {
    /// A layout for `mem_size` bytes of guest RAM (page multiple, at least [`MIN_MEMORY`]).
    pub fn new(mem_size: u64) -> Result<Self> {
        if mem_size < MIN_MEMORY {
            return Err(Error::MemorySize {
                size: mem_size,
                why: "the minimum is 4 MiB",
            });
        }
        if !mem_size.is_multiple_of(4 * KIB) {
            return Err(Error::MemorySize {
                size: mem_size,
                why: "it must be a multiple of 4 KiB",
            });
        }
        // Keep the top of guest RAM inside a 46-bit physical address space, which
        // every x86_64 host KVM runs on offers.
        if mem_size > (1 << 46) - MMIO_HOLE_END {
            return Err(Error::MemorySize {
                size: mem_size,
                why: "it exceeds the guest physical address space",
            });
        }
        Ok(GuestLayout { mem_size })
    }

    /// Total guest RAM in bytes, as asked for.
    pub fn mem_size(&self) -> u64 {
        self.mem_size
    }

    /// The guest RAM regions to map: below the MMIO hole, and above 4 GiB if needed.
    pub fn ram_regions(&self) -> Vec<(GuestAddress, u64)> {
        let low = self.mem_size.min(MMIO_HOLE_START);
        let mut regions = vec![(GuestAddress(0), low)];
        if self.mem_size > low {
            regions.push((GuestAddress(MMIO_HOLE_END), self.mem_size - low));
        }
        regions
    }

    /// End (exclusive) of the RAM below the MMIO hole.
    pub fn low_ram_end(&self) -> u64 {
        self.mem_size.min(MMIO_HOLE_START)
    }

    /// The memory map the guest sees (e820 or PVH): usable RAM below 640 KiB,
    /// the EBDA reserved, RAM from 1 MiB to the hole, and RAM above 4 GiB.
    pub fn memory_map(&self) -> Vec<MemoryMapEntry> {
        let mut map = vec![
            MemoryMapEntry {
                addr: 0,
                size: EBDA_START,
                kind: MemoryType::Ram,
            },
            MemoryMapEntry {
                addr: EBDA_START,
                size: 0xa0000 - EBDA_START,
                kind: MemoryType::Reserved,
            },
            MemoryMapEntry {
                addr: HIMEM_START,
                size: self.low_ram_end() - HIMEM_START,
                kind: MemoryType::Ram,
            },
        ];
        if let Some(&(start, size)) = self.ram_regions().get(1) {
            map.push(MemoryMapEntry {
                addr: start.0,
                size,
                kind: MemoryType::Ram,
            });
        }
        map
    }

    /// Where an initrd of `size` bytes goes: the highest 4 KiB-aligned address
    /// where it ends at or below `addr_max` (the last byte the kernel accepts)
    /// and at the top of low RAM, above `kernel_end`.
    pub fn initrd_address(&self, size: u64, kernel_end: u64, addr_max: u64) -> Result<u64> {
        let limit = self.low_ram_end().min(addr_max.saturating_add(1));
        let too_big = || Error::InitrdTooBig {
            size,
            kernel_end,
            limit,
        };
        let start = limit.checked_sub(size).ok_or_else(too_big)? & !(4 * KIB - 1);
        if start < kernel_end.max(HIMEM_START) {
            return Err(too_big());
        }
        Ok(start)
    }

    /// Whether `[addr, addr + size)` lies entirely in guest RAM.
    pub fn is_ram(&self, addr: u64, size: u64) -> bool {
        let Some(end) = addr.checked_add(size) else {
            return false;
        };
        self.ram_regions()
            .iter()
            .any(|&(start, len)| addr >= start.0 && end <= start.0 + len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guest_has_one_region_and_three_map_entries() {
        let l = GuestLayout::new(256 * MIB).unwrap();
        assert_eq!(l.ram_regions(), vec![(GuestAddress(0), 256 * MIB)]);
        let map = l.memory_map();
        assert_eq!(map.len(), 3);
        assert_eq!(map[2].addr, MIB);
        assert_eq!(map[2].size, 255 * MIB);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == MemoryType::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 256 * MIB - (MIB - EBDA_START));
    }

    #[test]
    fn big_guest_continues_above_4g() {
        let l = GuestLayout::new(5 * GIB).unwrap();
        assert_eq!(
            l.ram_regions(),
            vec![
                (GuestAddress(0), MMIO_HOLE_START),
                (GuestAddress(4 * GIB), 5 * GIB - MMIO_HOLE_START)
            ]
        );
        let map = l.memory_map();
        assert_eq!(map.last().unwrap().addr, 4 * GIB);
        assert_eq!(map.last().unwrap().size, 2 * GIB);
        assert!(l.is_ram(4 * GIB, 2 * GIB));
        assert!(!l.is_ram(MMIO_HOLE_START, 1));
        assert!(!l.is_ram(6 * GIB - 1, 2));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(GuestLayout::new(MIB).is_err());
        assert!(GuestLayout::new(4 * MIB + 1).is_err());
        assert!(GuestLayout::new(1 << 47).is_err());
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let l = GuestLayout::new(64 * MIB).unwrap();
        let a = l.initrd_address(10_000, 2 * MIB, u64::MAX).unwrap();
        assert_eq!(a % 4096, 0);
        assert!(a + 10_000 <= 64 * MIB);
        assert!(64 * MIB - (a + 10_000) < 4096);
        // Respect the kernel's initrd_addr_max.
        let a = l.initrd_address(4096, 2 * MIB, 32 * MIB - 1).unwrap();
        assert_eq!(a, 32 * MIB - 4096);
        // Too big to fit above the kernel.
        assert!(l.initrd_address(63 * MIB, 2 * MIB, u64::MAX).is_err());
        assert!(l.initrd_address(u64::MAX, 0, u64::MAX).is_err());
    }
}
