//! The boot GDT and the segment registers derived from it.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::GDT_START;
use crate::{Error, Result};

/// Selectors, as the Linux boot protocol wants them (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18).
pub const CODE64_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;
pub const CODE32_SELECTOR: u16 = 0x28;

/// A segment descriptor from flags (bits 8..24 of the high word), base and limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, 64-bit code, data, TSS, 32-bit code.
pub fn boot_gdt() -> [u64; 6] {
    [
        0,
        0,
        descriptor(0xa09b, 0, 0xfffff), // code, 64-bit (L), present, execute/read, accessed
        descriptor(0xc093, 0, 0xfffff), // data, 32-bit big, present, read/write, accessed
        descriptor(0x808b, 0, 0xfffff), // busy 32-bit TSS (KVM requires a usable TR)
        descriptor(0xc09b, 0, 0xfffff), // code, 32-bit (D), present, execute/read, accessed
    ]
}

/// Writes the boot GDT to guest memory and returns its (base, limit).
pub fn write_gdt<M: GuestMemory>(mem: &M) -> Result<(u64, u16)> {
    let gdt = boot_gdt();
    for (i, entry) in gdt.iter().enumerate() {
        let addr = GDT_START + 8 * i as u64;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(|_| Error::GuestWrite { what: "GDT", addr })?;
    }
    Ok((GDT_START, (gdt.len() * 8 - 1) as u16))
}

/// The hidden part of a segment register as KVM wants it, from a descriptor.
pub fn segment_from_descriptor(selector: u16, entry: u64) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granularity = ((entry >> 55) & 1) as u8;
    // With 4 KiB granularity the limit counts pages; KVM wants it in bytes.
    let limit = if granularity == 1 {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granularity,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if present == 1 { 0 } else { 1 },
    }
}

/// The segment for `selector` in the boot GDT.
pub fn boot_segment(selector: u16) -> kvm_segment {
    segment_from_descriptor(selector, boot_gdt()[usize::from(selector >> 3)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_known_encodings() {
        // Well-known flat descriptors.
        assert_eq!(descriptor(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(descriptor(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(descriptor(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
    }

    #[test]
    fn segments_decode() {
        let cs = boot_segment(CODE64_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.type_, cs.present, cs.s, cs.g),
            (1, 0, 0xb, 1, 1, 1)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.selector, 0x10);
        let ds = boot_segment(DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_), (0, 1, 0x3));
        let cs32 = boot_segment(CODE32_SELECTOR);
        assert_eq!((cs32.l, cs32.db, cs32.type_), (0, 1, 0xb));
        let tss = boot_segment(TSS_SELECTOR);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
        let d = segment_from_descriptor(0x30, descriptor(0x0093, 0x1234_5678, 0xabcd));
        assert_eq!((d.base, d.limit, d.g), (0x1234_5678, 0xabcd, 0));
    }

    #[test]
    fn gdt_lands_in_memory() {
        let mem = crate::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let (base, limit) = write_gdt(&mem).unwrap();
        assert_eq!((base, limit), (GDT_START, 47));
        let e: u64 = mem.read_obj(GuestAddress(GDT_START + 0x10)).unwrap();
        assert_eq!(e, 0x00af_9b00_0000_ffff);
    }
}
