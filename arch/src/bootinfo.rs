//! What the kernel is told at entry: the Linux zero page (`struct boot_params`)
//! for the 64-bit boot protocol, or the PVH `hvm_start_info` for the PVH entry;
//! plus the command line both point at.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, GuestLayout, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START,
};
use crate::{Error, Result};

const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448; // "HdrS"
const LOADER_UNDEFINED: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The initrd as placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// Writes the NUL-terminated command line at [`CMDLINE_START`]; `max` counts the NUL.
pub fn write_cmdline<M: GuestMemory>(mem: &M, cmdline: &str, max: usize) -> Result<u64> {
    let max = max.min(CMDLINE_MAX_SIZE);
    if cmdline.len() + 1 > max {
        return Err(Error::CmdlineTooLong {
            len: cmdline.len(),
            max: max - 1,
        });
    }
    let mut bytes = Vec::with_capacity(cmdline.len() + 1);
    bytes.extend_from_slice(cmdline.as_bytes());
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_START))
        .map_err(|_| Error::GuestWrite {
            what: "kernel command line",
            addr: CMDLINE_START,
        })?;
    Ok(CMDLINE_START)
}

/// The zero page for the 64-bit Linux boot protocol. `kernel_header` is the
/// setup header of a bzImage (kept, as the protocol asks); an ELF kernel has none.
pub fn zero_page(
    layout: &GuestLayout,
    kernel_header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> boot_params {
    let mut params = boot_params {
        hdr: kernel_header.unwrap_or_default(),
        ..Default::default()
    };
    let hdr = &mut params.hdr;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS_MAGIC;
    hdr.type_of_loader = LOADER_UNDEFINED;
    if kernel_header.is_none() {
        hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    hdr.cmd_line_ptr = CMDLINE_START as u32;
    hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        hdr.ramdisk_image = initrd.addr as u32;
        hdr.ramdisk_size = initrd.size as u32;
        params.ext_ramdisk_image = (initrd.addr >> 32) as u32;
        params.ext_ramdisk_size = (initrd.size >> 32) as u32;
    }
    let map = layout.memory_map();
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = map.len() as u8;
    params
}

/// The highest address the kernel accepts for the last initrd byte.
pub fn initrd_addr_max(kernel_header: Option<&setup_header>) -> u64 {
    match kernel_header {
        // Boot protocol 2.03 added the field; older kernels allow up to 0x37ffffff.
        Some(h) if h.version >= 0x203 => u64::from(h.initrd_addr_max),
        Some(_) => 0x37ff_ffff,
        // A 64-bit ELF kernel reads the full 64-bit address from the zero page.
        None => u64::MAX,
    }
}

/// Writes the zero page and returns its address (for RSI at entry).
pub fn write_zero_page<M: GuestMemory>(mem: &M, params: &boot_params) -> Result<u64> {
    mem.write_obj(*params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| Error::GuestWrite {
            what: "zero page",
            addr: ZERO_PAGE_START,
        })?;
    Ok(ZERO_PAGE_START)
}

/// Writes the PVH start info, module list and memory map, and returns the
/// start info's address (for EBX at entry).
pub fn write_pvh_start_info<M: GuestMemory>(
    mem: &M,
    layout: &GuestLayout,
    initrd: Option<Initrd>,
) -> Result<u64> {
    let write_err = |what, addr| Error::GuestWrite { what, addr };
    let map = layout.memory_map();
    for (i, entry) in map.iter().enumerate() {
        let addr = PVH_MEMMAP_START + (i * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
        let e = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind as u32,
            reserved: 0,
        };
        mem.write_obj(e, GuestAddress(addr))
            .map_err(|_| write_err("PVH memory map", addr))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    if let Some(initrd) = initrd {
        let module = hvm_modlist_entry {
            paddr: initrd.addr,
            size: initrd.size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| write_err("PVH module list", PVH_MODLIST_START))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START;
    }
    mem.write_obj(info, GuestAddress(PVH_INFO_START))
        .map_err(|_| write_err("PVH start info", PVH_INFO_START))?;
    Ok(PVH_INFO_START)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{GIB, MIB};

    fn mem() -> crate::GuestMemoryMmap {
        crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn zero_page_for_elf_kernel() {
        let layout = GuestLayout::new(6 * GIB).unwrap();
        let initrd = Initrd {
            addr: 0x8000_0000,
            size: 12345,
        };
        let p = zero_page(&layout, None, 10, Some(initrd));
        let m = mem();
        write_zero_page(&m, &p).unwrap();
        let back: boot_params = m.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        // Copy out of the packed struct before comparing.
        let (flag, magic, ptr, rd, rs) = (
            back.hdr.boot_flag,
            back.hdr.header,
            back.hdr.cmd_line_ptr,
            back.hdr.ramdisk_image,
            back.hdr.ramdisk_size,
        );
        assert_eq!(
            (flag, magic, ptr, rd, rs),
            (0xaa55, 0x5372_6448, 0x20000, 0x8000_0000, 12345)
        );
        assert_eq!(back.e820_entries, 4);
        let last = back.e820_table[3];
        let (a, s, t) = (last.addr, last.size, last.r#type);
        assert_eq!((a, s, t), (4 * GIB, 3 * GIB, 1));
    }

    #[test]
    fn zero_page_keeps_bzimage_header() {
        let layout = GuestLayout::new(64 * MIB).unwrap();
        let hdr = setup_header {
            version: 0x20f,
            initrd_addr_max: 0x7fff_ffff,
            code32_start: 0x10_0000,
            loadflags: 1,
            ..Default::default()
        };
        let p = zero_page(&layout, Some(hdr), 5, None);
        let (v, c32, lf) = (p.hdr.version, p.hdr.code32_start, p.hdr.loadflags);
        assert_eq!((v, c32, lf), (0x20f, 0x10_0000, 1));
        assert_eq!(initrd_addr_max(Some(&hdr)), 0x7fff_ffff);
        assert_eq!(initrd_addr_max(None), u64::MAX);
    }

    #[test]
    fn cmdline_limits() {
        let m = mem();
        assert_eq!(write_cmdline(&m, "console=ttyS0", 2048).unwrap(), 0x20000);
        let mut buf = [0u8; 14];
        m.read_slice(&mut buf, GuestAddress(0x20000)).unwrap();
        assert_eq!(&buf, b"console=ttyS0\0");
        let long = "x".repeat(2048);
        assert!(matches!(
            write_cmdline(&m, &long, 4096),
            Err(Error::CmdlineTooLong { max: 2047, .. })
        ));
        assert!(write_cmdline(&m, "abcd", 4).is_err());
        assert!(write_cmdline(&m, "abc", 4).is_ok());
    }

    #[test]
    fn pvh_start_info() {
        let layout = GuestLayout::new(32 * MIB).unwrap();
        let m = mem();
        let initrd = Initrd {
            addr: 0x1f0_0000,
            size: 4096,
        };
        let addr = write_pvh_start_info(&m, &layout, Some(initrd)).unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = m.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x1f0_0000, 4096));
        let e: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(info.memmap_paddr + 2 * 24))
            .unwrap();
        assert_eq!((e.addr, e.size, e.type_), (MIB, 31 * MIB, 1));
        // The structures must not overlap each other.
        const {
            assert!(
                PVH_MODLIST_START >= PVH_INFO_START + std::mem::size_of::<hvm_start_info>() as u64
            );
            assert!(PVH_MEMMAP_START >= PVH_MODLIST_START + 32);
        }
    }
}
