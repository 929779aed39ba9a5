//! x86_64 boot layout for ligera guests.
//!
//! Everything here is a pure function over guest memory or over KVM's plain
//! data structures: where RAM and the MMIO hole are, what goes into the zero
//! page or the PVH start info, the page tables and GDT for long-mode entry,
//! the MP table, CPUID and the boot registers. Nothing here owns a KVM file
//! descriptor, so all of it is unit-tested without `/dev/kvm`.

pub mod bootinfo;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;

pub use layout::GuestLayout;

/// Guest memory as ligera maps it.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Errors from building the boot layout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest memory size is outside what ligera can lay out.
    #[error("guest memory size {size} bytes is invalid: {why}")]
    MemorySize { size: u64, why: &'static str },
    /// A boot structure could not be written to guest memory.
    #[error("cannot write the {what} to guest memory at {addr:#x}")]
    GuestWrite { what: &'static str, addr: u64 },
    /// The kernel command line does not fit.
    #[error("kernel command line is {len} bytes, the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    /// The initrd does not fit anywhere the kernel can reach.
    #[error(
        "initrd of {size} bytes does not fit in guest RAM between the kernel end {kernel_end:#x} and {limit:#x}"
    )]
    InitrdTooBig {
        size: u64,
        kernel_end: u64,
        limit: u64,
    },
    /// Too many vCPUs for the MP table or the APIC ID space.
    #[error("{count} vCPUs requested, ligera supports 1 to {max}")]
    VcpuCount { count: u32, max: u32 },
}

pub type Result<T> = std::result::Result<T, Error>;
