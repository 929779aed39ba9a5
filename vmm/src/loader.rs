//! Loading the guest kernel and initrd into guest memory.
//!
//! The kernel format is detected from the file's content: an ELF file is a
//! vmlinux, entered through PVH if it carries the PVH note and through the
//! 64-bit Linux boot protocol if not; a file with the "HdrS" setup header is a
//! bzImage, entered at its 64-bit entry point. `linux-loader` does the
//! loading; we check beforehand what it does not, so bad files get a precise
//! error instead of a partial load.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use arch::GuestLayout;
use arch::layout::HIMEM_START;
use arch::regs::EntryPoint;
use linux_loader::elf::{
    EI_CLASS, EI_DATA, ELFCLASS64, ELFDATA2LSB, EM_X86_64, Elf64_Ehdr, Elf64_Phdr, PT_LOAD,
};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::config::format_size;

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot open {kind} {path}: {source}")]
    Open {
        kind: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {kind} {path}: {source}")]
    Read {
        kind: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel {path} is empty")]
    Empty { path: PathBuf },
    #[error("kernel {path} is not a kernel: neither an ELF vmlinux nor a bzImage")]
    UnknownFormat { path: PathBuf },
    #[error("kernel {path} is not a usable ELF vmlinux: {why}")]
    BadElf { path: PathBuf, why: String },
    #[error("kernel {path} is not a usable bzImage: {why}")]
    BadBzImage { path: PathBuf, why: String },
    #[error(
        "kernel {path} needs guest memory up to {end:#x}, more than the {mem} of guest RAM (raise --memory)"
    )]
    KernelTooBig {
        path: PathBuf,
        end: u64,
        mem: String,
    },
    #[error("cannot load kernel {path}: {source}")]
    Load {
        path: PathBuf,
        source: linux_loader::loader::Error,
    },
    #[error("initrd {path} ({size}) does not fit in guest RAM: {source}")]
    InitrdTooBig {
        path: PathBuf,
        size: String,
        source: arch::Error,
    },
}

type Result<T> = std::result::Result<T, LoaderError>;

/// The kernel file's format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// ELF vmlinux entered in 64-bit mode with the Linux boot protocol.
    Elf,
    /// ELF vmlinux with a PVH note, entered in 32-bit mode.
    ElfPvh,
    /// bzImage, entered at its 64-bit entry.
    BzImage,
}

/// Where the kernel is and how to enter it.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub format: KernelFormat,
    pub entry: u64,
    /// First byte above everything the kernel occupies (or will, once unpacked).
    pub end: u64,
    pub setup_header: Option<setup_header>,
}

impl LoadedKernel {
    /// The entry point for the boot structures at `boot_info`.
    pub fn entry_point(&self, boot_info: u64) -> EntryPoint {
        match self.format {
            KernelFormat::ElfPvh => EntryPoint::Pvh {
                entry: self.entry,
                start_info: boot_info,
            },
            KernelFormat::Elf | KernelFormat::BzImage => EntryPoint::Linux64 {
                entry: self.entry,
                zero_page: boot_info,
            },
        }
    }
}

fn open(kind: &'static str, path: &Path) -> Result<(File, u64)> {
    let open_err = |source| LoaderError::Open {
        kind,
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    if !meta.is_file() {
        return Err(open_err(std::io::Error::other("not a regular file")));
    }
    Ok((file, meta.len()))
}

/// Loads the kernel at `path` into guest memory.
pub fn load_kernel(
    mem: &arch::GuestMemoryMmap,
    layout: &GuestLayout,
    path: &Path,
) -> Result<LoadedKernel> {
    let (mut file, len) = open("kernel", path)?;
    if len == 0 {
        return Err(LoaderError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut magic = [0u8; 4];
    let n = read_up_to(&mut file, &mut magic).map_err(|source| LoaderError::Read {
        kind: "kernel",
        path: path.to_path_buf(),
        source,
    })?;
    if magic[..n] == *b"\x7fELF" {
        return load_elf(mem, layout, path, &mut file, len);
    }
    match read_header::<setup_header>(&mut file, SETUP_HEADER_OFFSET) {
        Ok(header) if header.header == BZIMAGE_MAGIC => {
            load_bzimage(mem, layout, path, &mut file, len)
        }
        _ => Err(LoaderError::UnknownFormat {
            path: path.to_path_buf(),
        }),
    }
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Reads a plain-data header (one of linux-loader's boot-protocol or ELF
/// structures) from `offset` of `file`.
fn read_header<T: ByteValued + Default>(file: &mut File, offset: u64) -> std::io::Result<T> {
    let mut header = T::default();
    file.seek(SeekFrom::Start(offset))?;
    file.read_exact(header.as_mut_slice())?;
    Ok(header)
}

/// Checks what linux-loader's ELF loader does not (64-bit class, x86-64,
/// segments inside the file and inside guest RAM above 1 MiB) before loading.
fn check_elf(layout: &GuestLayout, file: &mut File, len: u64) -> std::result::Result<(), String> {
    let ehdr: Elf64_Ehdr =
        read_header(file, 0).map_err(|_| "the ELF header is truncated".to_string())?;
    if ehdr.e_ident[EI_CLASS] != ELFCLASS64 {
        return Err("it is a 32-bit ELF file; ligera boots 64-bit x86 kernels".into());
    }
    if ehdr.e_ident[EI_DATA] != ELFDATA2LSB {
        return Err("it is a big-endian ELF file".into());
    }
    if ehdr.e_machine != EM_X86_64 {
        return Err(format!(
            "its ELF machine is {}, not x86-64 ({EM_X86_64})",
            ehdr.e_machine
        ));
    }
    let phdr_len = std::mem::size_of::<Elf64_Phdr>() as u64;
    if u64::from(ehdr.e_phentsize) != phdr_len || ehdr.e_phnum == 0 {
        return Err("it has no valid program headers".into());
    }
    let table_end = ehdr.e_phoff.checked_add(u64::from(ehdr.e_phnum) * phdr_len);
    if table_end.is_none_or(|end| end > len) {
        return Err("its program headers lie beyond the end of the file".into());
    }
    let mut loads = 0;
    for i in 0..u64::from(ehdr.e_phnum) {
        let ph: Elf64_Phdr =
            read_header(file, ehdr.e_phoff + i * phdr_len).map_err(|e| e.to_string())?;
        if ph.p_type != PT_LOAD || ph.p_filesz == 0 {
            continue;
        }
        loads += 1;
        if ph
            .p_offset
            .checked_add(ph.p_filesz)
            .is_none_or(|end| end > len)
            || ph.p_filesz > ph.p_memsz
        {
            return Err(format!("segment {i} is truncated or malformed"));
        }
        if ph.p_paddr < HIMEM_START {
            return Err(format!(
                "segment {i} loads at {:#x}, below 1 MiB where ligera keeps boot data",
                ph.p_paddr
            ));
        }
        if !layout.is_ram(ph.p_paddr, ph.p_memsz) {
            return Err(format!(
                "segment {i} at {:#x}+{:#x} lies outside the {} of guest RAM (raise --memory)",
                ph.p_paddr,
                ph.p_memsz,
                format_size(layout.mem_size())
            ));
        }
    }
    if loads == 0 {
        return Err("it has no loadable segments".into());
    }
    Ok(())
}

fn load_elf(
    mem: &arch::GuestMemoryMmap,
    layout: &GuestLayout,
    path: &Path,
    file: &mut File,
    len: u64,
) -> Result<LoadedKernel> {
    check_elf(layout, file, len).map_err(|why| LoaderError::BadElf {
        path: path.to_path_buf(),
        why,
    })?;
    let loaded = Elf::load(mem, None, file, Some(GuestAddress(HIMEM_START))).map_err(|source| {
        LoaderError::Load {
            path: path.to_path_buf(),
            source,
        }
    })?;
    // Memory comes fresh from an anonymous mapping, so each segment's tail
    // beyond its file size (the kernel's .bss) is already zero.
    let (format, entry) = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => (KernelFormat::ElfPvh, addr.0),
        _ => (KernelFormat::Elf, loaded.kernel_load.0),
    };
    Ok(LoadedKernel {
        format,
        entry,
        end: loaded.kernel_end,
        setup_header: None,
    })
}

const XLF_KERNEL_64: u16 = 1 << 0;
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// "HdrS": a setup header that follows the Linux boot protocol.
const BZIMAGE_MAGIC: u32 = u32::from_le_bytes(*b"HdrS");

fn load_bzimage(
    mem: &arch::GuestMemoryMmap,
    layout: &GuestLayout,
    path: &Path,
    file: &mut File,
    len: u64,
) -> Result<LoadedKernel> {
    let bad = |why: String| LoaderError::BadBzImage {
        path: path.to_path_buf(),
        why,
    };
    // The setup header sits at 0x1f1 in the boot sector (boot protocol §1).
    let header: setup_header = read_header(file, SETUP_HEADER_OFFSET)
        .map_err(|e| bad(format!("cannot read its setup header: {e}")))?;
    let version = header.version;
    if version < 0x20c {
        return Err(bad(format!(
            "boot protocol {}.{:02} is too old: the 64-bit entry needs 2.12",
            version >> 8,
            version & 0xff
        )));
    }
    if header.xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad("it has no 64-bit entry point".into()));
    }
    let setup_sects = u64::from(header.setup_sects.max(4));
    let setup_len = (setup_sects + 1) * 512;
    if setup_len >= len {
        return Err(bad("it is truncated: no kernel after the setup code".into()));
    }
    // The kernel is loaded at 1 MiB and unpacks itself to its preferred
    // address; all of that must be RAM.
    let pref_address = header.pref_address;
    let init_size = u64::from(header.init_size);
    let end = (HIMEM_START + (len - setup_len)).max(pref_address.saturating_add(init_size));
    if end > layout.low_ram_end() {
        return Err(LoaderError::KernelTooBig {
            path: path.to_path_buf(),
            end,
            mem: format_size(layout.mem_size()),
        });
    }
    let loaded =
        BzImage::load(mem, Some(GuestAddress(HIMEM_START)), file, None).map_err(|source| {
            LoaderError::Load {
                path: path.to_path_buf(),
                source,
            }
        })?;
    Ok(LoadedKernel {
        format: KernelFormat::BzImage,
        // The 64-bit entry point sits 0x200 bytes into the protected-mode code.
        entry: loaded.kernel_load.0 + 0x200,
        end,
        setup_header: loaded.setup_header,
    })
}

/// Loads the initrd at the highest aligned address the kernel allows.
pub fn load_initrd(
    mem: &arch::GuestMemoryMmap,
    layout: &GuestLayout,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<arch::bootinfo::Initrd> {
    let (mut file, size) = open("initrd", path)?;
    let addr_max = arch::bootinfo::initrd_addr_max(kernel.setup_header.as_ref());
    let addr = layout
        .initrd_address(size, kernel.end, addr_max)
        .map_err(|source| LoaderError::InitrdTooBig {
            path: path.to_path_buf(),
            size: format_size(size),
            source,
        })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| LoaderError::Read {
            kind: "initrd",
            path: path.to_path_buf(),
            source: std::io::Error::other(e.to_string()),
        })?;
    Ok(arch::bootinfo::Initrd { addr, size })
}
