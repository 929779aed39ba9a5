//! The one place where a VM is assembled from a [`VmConfig`]: KVM, guest
//! memory, kernel and initrd, boot structures, devices and vCPUs.

use std::sync::Arc;

use arch::GuestLayout;
use arch::bootinfo::{write_cmdline, write_pvh_start_info, write_zero_page, zero_page};
use arch::cpuid::CpuidConfig;
use arch::gdt::write_gdt;
use arch::layout::CMDLINE_MAX_SIZE;
use arch::mptable::write_mptable;
use arch::paging::write_identity_page_tables;
use devices::virtio::vsock::VsockError;
use devices::virtio::{self, net};
use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{VmConfig, format_size};
use crate::device_manager::DeviceManager;
use crate::exit::ExitState;
use crate::host::{self, HostQuirks};
use crate::loader::{self, KernelFormat, LoaderError};
use crate::vcpu::{BootState, Vcpu, VcpuError};
use crate::vm::{EventLoop, Vm, VmParts};

/// Where KVM keeps the real-mode TSS it needs on Intel (three pages, in the MMIO hole).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user open /dev/kvm?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    KvmApiVersion(i32),
    #[error("KVM cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0} vCPUs requested, but this host's KVM supports at most {1}")]
    TooManyVcpus(u8, usize),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("--memory {}: {source}", format_size(*.size))]
    Layout { size: u64, source: arch::Error },
    #[error("--memory {}: more than this host's {} of RAM", format_size(*.size), format_size(*.host))]
    MemoryExceedsHost { size: u64, host: u64 },
    #[error("cannot allocate {} of guest memory: {reason}", format_size(*.size))]
    GuestMemory { size: u64, reason: String },
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("--cmdline: {0}")]
    Cmdline(String),
    #[error("{0}")]
    Seccomp(String),
    #[error("cannot write boot data: {0}")]
    Boot(arch::Error),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create an event fd: {0}")]
    EventFd(std::io::Error),
    #[error("cannot place a device on the bus: {0}")]
    Bus(#[from] devices::bus::BusError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot create the event loop: {0}")]
    EventLoop(String),
    #[error("too many virtio devices: ligera has interrupt lines for {0}")]
    TooManyDevices(u32),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error(
        "--disk: {} is given twice (also as {}): each image can back one disk",
        path.display(),
        first.display()
    )]
    DiskGivenTwice {
        path: std::path::PathBuf,
        first: std::path::PathBuf,
    },
    #[error("--disk: {0}")]
    Disk(#[from] devices::virtio::block::DiskError),
    #[error("--net: {0}")]
    Tap(#[from] net::TapError),
    #[error("cannot restore the snapshot: {0}")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("cannot restore the snapshot {}: {reason}", path.display())]
    Restore {
        path: std::path::PathBuf,
        reason: String,
    },
}

type Result<T> = std::result::Result<T, BuildError>;

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// What a VM starts from: KVM, guest memory (mapped from the snapshot's
/// memory file on a restore), the VM with that memory, irqchip and PIT, and
/// its vCPUs in KVM; on a restore, the in-kernel devices, clock and vCPUs
/// in their saved state. None of it depends on the file system or network
/// the VM process will see, so the jail makes it on a thread while it
/// builds the VM process's namespaces (see [`crate::jail::start`]).
pub struct Foundation {
    kvm: Kvm,
    layout: GuestLayout,
    mem: arch::GuestMemoryMmap,
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
    /// The snapshot of a restore.
    snapshot: Option<Arc<crate::snapshot::Snapshot>>,
}

/// Makes the [`Foundation`] of the VM of `config`.
pub fn lay_foundation(config: &VmConfig) -> Result<Foundation> {
    let snapshot = match &config.restore {
        Some(source) => Some(match &source.read.0 {
            Some(read) => read.clone(),
            None => Arc::new(crate::snapshot::read_state(&source.state)?),
        }),
        None => None,
    };
    if let (Some(source), Some(snapshot)) = (&config.restore, &snapshot)
        && (snapshot.config.vcpus != config.vcpus || snapshot.config.mem_size != config.mem_size)
    {
        return Err(BuildError::Restore {
            path: source.state.clone(),
            reason: "the configuration does not match the snapshot's (vCPUs, memory)".into(),
        });
    }
    let layout = check_config(config)?;
    let kvm = open_kvm(config)?;
    let mem = match &config.restore {
        Some(source) => {
            let failed = |reason: String| BuildError::Restore {
                path: source.state.clone(),
                reason: format!("memory file {}: {reason}", source.memory.display()),
            };
            let file = std::fs::File::open(&source.memory).map_err(|e| failed(e.to_string()))?;
            if let Some(placed) = source.memory_id {
                use std::os::unix::fs::MetadataExt;
                let meta = file.metadata().map_err(|e| failed(e.to_string()))?;
                if (meta.dev(), meta.ino()) != placed {
                    return Err(failed("it changed while the jail was made".into()));
                }
            }
            crate::snapshot::map_memory(&file, &source.memory, &layout)?
        }
        None => map_guest_memory(&layout)?,
    };
    let vm = create_vm(&kvm, &mem, &layout)?;
    let vcpus = (0..config.vcpus)
        .map(|index| Vcpu::create_fd(&vm, index))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if let (Some(source), Some(snapshot)) = (&config.restore, &snapshot) {
        // Before the devices exist (they only add interrupt lines and
        // notifiers); what they signal meanwhile reaches the restored
        // controllers.
        let mismatch = |reason: String| BuildError::Restore {
            path: source.state.clone(),
            reason,
        };
        crate::snapshot::kvm::restore_vm(&vm, &snapshot.vm).map_err(mismatch)?;
        if snapshot.vcpus.len() != vcpus.len() {
            return Err(mismatch(format!(
                "it holds {} vCPU states for {} vCPUs",
                snapshot.vcpus.len(),
                vcpus.len()
            )));
        }
        for (index, (fd, state)) in vcpus.iter().zip(&snapshot.vcpus).enumerate() {
            crate::snapshot::kvm::restore_vcpu(fd, state)
                .map_err(|e| mismatch(format!("vCPU {index}: {e}")))?;
        }
    }
    if config.seccomp {
        // Off the vCPU thread's way to its first KVM_RUN.
        crate::seccomp::prepare(crate::seccomp::Role::Vcpu);
    }
    Ok(Foundation {
        kvm,
        layout,
        mem,
        vm,
        vcpus,
        snapshot,
    })
}

/// Builds a VM ready to run: booting its kernel, or where its snapshot
/// was taken if `config.restore` names one.
pub fn build(config: &VmConfig) -> Result<Vm> {
    build_on(config, lay_foundation(config))
}

/// [`build`] on a foundation laid (or not) beforehand for `config`.
pub fn build_on(config: &VmConfig, foundation: Result<Foundation>) -> Result<Vm> {
    let Foundation {
        kvm,
        layout,
        mem,
        vm,
        vcpus,
        snapshot,
    } = foundation?;
    if let (Some(source), Some(snapshot)) = (&config.restore, snapshot) {
        return restore(config, source, &snapshot, kvm, mem, vm, vcpus);
    }
    let exit = Arc::new(ExitState::new().map_err(BuildError::EventFd)?);
    let mut events = EventLoop::new().map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
    let (devices, console) = DeviceManager::create(config, &vm, &mem, &exit, &mut events)?;
    let quirks = HostQuirks::detect(config);
    let boot = load_guest(
        config,
        &mem,
        &layout,
        &devices.virtio_mmio_windows(),
        &quirks,
    )?;
    let vcpus = configure_vcpus(config, &kvm, vcpus, &mem, &devices, &exit, &boot, &quirks)?;
    if config.seccomp {
        // The filters go on as each thread starts (before it runs guest
        // code or reads guest bytes); here the SIGSYS handler goes in.
        crate::seccomp::enable().map_err(BuildError::Seccomp)?;
    }
    log::debug!("VM built");
    let msr_list = msr_list(&kvm)?;
    Ok(Vm::new(VmParts {
        kvm,
        vm,
        mem,
        vcpus,
        exit,
        console,
        events,
        devices,
        msr_list,
    }))
}

/// The MSRs whose values a snapshot keeps: KVM's list of those it saves.
fn msr_list(kvm: &Kvm) -> Result<Vec<u32>> {
    kvm.get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .map_err(kvm_err("list the MSRs to save"))
}

/// Builds a VM as its snapshot left it: guest RAM mapped from the memory
/// file (private, copy-on-write), devices made from the snapshot's
/// configuration (`config`, with the overrides of the restore) and put in
/// their saved state, vCPUs and in-kernel devices loaded. Every check is
/// made before the VM runs: a snapshot either restores whole or not at all.
fn restore(
    config: &VmConfig,
    source: &crate::config::RestoreConfig,
    snapshot: &crate::snapshot::Snapshot,
    kvm: Kvm,
    mem: arch::GuestMemoryMmap,
    vm: VmFd,
    vcpus: Vec<VcpuFd>,
) -> Result<Vm> {
    let started = std::time::Instant::now();
    let mismatch = |reason: String| BuildError::Restore {
        path: source.state.clone(),
        reason,
    };
    let exit = Arc::new(ExitState::new().map_err(BuildError::EventFd)?);
    let mut events = EventLoop::new().map_err(|e| BuildError::EventLoop(format!("{e:?}")))?;
    let (devices, console) = DeviceManager::create(config, &vm, &mem, &exit, &mut events)?;
    let saved = &snapshot.devices;
    let names: Vec<&str> = devices.virtio.iter().map(|s| s.name.as_str()).collect();
    let saved_names: Vec<&str> = saved.virtio.iter().map(|(n, _)| n.as_str()).collect();
    if names != saved_names {
        return Err(mismatch(format!(
            "the snapshot has devices {saved_names:?}, this VM {names:?}"
        )));
    }
    for (slot, (_, state)) in devices.virtio.iter().zip(&saved.virtio) {
        devices::bus::lock(&slot.transport)
            .restore(state)
            .map_err(&mismatch)?;
    }
    devices::bus::lock(&devices.serial)
        .restore(&saved.serial)
        .map_err(&mismatch)?;
    devices::bus::lock(&devices.i8042)
        .restore(&saved.i8042)
        .map_err(&mismatch)?;
    // Interrupts the guest had not taken yet go again, into the controllers
    // restored with the foundation (an edge in flight when the snapshot was
    // taken is lost).
    for slot in &devices.virtio {
        devices::bus::lock(&slot.transport).resend_interrupt();
    }
    devices::bus::lock(&devices.serial).resend_interrupt();
    devices::bus::lock(&devices.i8042).resend_interrupt();
    let vcpus = vcpus
        .into_iter()
        .zip(0..)
        .map(|(fd, index)| {
            Vcpu::new(
                fd,
                index,
                devices.pio.clone(),
                devices.mmio.clone(),
                mem.clone(),
                exit.clone(),
            )
        })
        .collect();
    if config.seccomp {
        crate::seccomp::enable().map_err(BuildError::Seccomp)?;
    }
    log::info!(
        "VM restored from {} in {:?}",
        source.state.display(),
        started.elapsed()
    );
    let msr_list = msr_list(&kvm)?;
    Ok(Vm::new(VmParts {
        kvm,
        vm,
        mem,
        vcpus,
        exit,
        console,
        events,
        devices,
        msr_list,
    }))
}

/// Checks the configuration's rules and what depends on this host, before
/// touching KVM; returns the memory layout.
fn check_config(config: &VmConfig) -> Result<GuestLayout> {
    config.validate()?;
    let layout = GuestLayout::new(config.mem_size).map_err(|source| BuildError::Layout {
        size: config.mem_size,
        source,
    })?;
    if let Ok(host) = host::host_ram()
        && config.mem_size > host
    {
        return Err(BuildError::MemoryExceedsHost {
            size: config.mem_size,
            host,
        });
    }
    check_disks_distinct(config)?;
    Ok(layout)
}

/// The same image given twice would fail on its own lock with a message
/// about another VM; say what really happened. Files are compared by device
/// and inode, so a symlink or another path to the same image counts too.
pub(crate) fn check_disks_distinct(config: &VmConfig) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: Vec<((u64, u64), &std::path::Path)> = Vec::new();
    for disk in &config.disks {
        // A path that cannot be read is reported when it is opened.
        let Ok(meta) = std::fs::metadata(&disk.path) else {
            continue;
        };
        let key = (meta.dev(), meta.ino());
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
            return Err(BuildError::DiskGivenTwice {
                path: disk.path.clone(),
                first: first.to_path_buf(),
            });
        }
        seen.push((key, &disk.path));
    }
    Ok(())
}

fn open_kvm(config: &VmConfig) -> Result<Kvm> {
    let kvm = Kvm::new().map_err(BuildError::OpenKvm)?;
    if kvm.get_api_version() != 12 {
        return Err(BuildError::KvmApiVersion(kvm.get_api_version()));
    }
    if usize::from(config.vcpus) > kvm.get_max_vcpus() {
        return Err(BuildError::TooManyVcpus(config.vcpus, kvm.get_max_vcpus()));
    }
    Ok(kvm)
}

/// A VM with its guest memory, the in-kernel irqchip (PIC, IOAPIC, local
/// APICs) and PIT.
///
/// Memory goes first: each KVM memory-slot or device-bus change waits for
/// an SRCU grace period, which the kernel expedites only while the VM has not
/// had one recently. Registering memory before the irqchip and PIT (which
/// register I/O devices) makes it take ~0.2 ms instead of a 4 ms timer tick
/// on the development machines.
fn create_vm(kvm: &Kvm, mem: &arch::GuestMemoryMmap, layout: &GuestLayout) -> Result<VmFd> {
    let vm = kvm.create_vm().map_err(kvm_err("create a VM"))?;
    register_guest_memory(&vm, mem, layout)?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("set the TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(kvm_err("create the in-kernel PIT"))?;
    log::debug!("VM created with its memory");
    Ok(vm)
}

/// Loads kernel and initrd, writes the command line and the boot structures;
/// returns how the boot vCPU starts.
fn load_guest(
    config: &VmConfig,
    mem: &arch::GuestMemoryMmap,
    layout: &GuestLayout,
    device_cmdline: &[(u64, u32)],
    quirks: &HostQuirks,
) -> Result<BootState> {
    let kernel = loader::load_kernel(mem, layout, &config.kernel)?;
    log::info!(
        "kernel {}: {:?}, entry {:#x}, ends at {:#x}",
        config.kernel.display(),
        kernel.format,
        kernel.entry,
        kernel.end
    );
    let initrd = match &config.initrd {
        Some(path) => Some(loader::load_initrd(mem, layout, path, &kernel)?),
        None => None,
    };
    let cmdline = kernel_cmdline(config, device_cmdline, quirks.guest_cmdline())?;
    let cmdline_max = kernel
        .setup_header
        .map_or(CMDLINE_MAX_SIZE, |h| h.cmdline_size as usize + 1);
    write_cmdline(mem, &cmdline, cmdline_max).map_err(BuildError::Boot)?;
    log::info!("kernel command line: {cmdline}");

    write_mptable(mem, u32::from(config.vcpus)).map_err(BuildError::Boot)?;
    let gdt = write_gdt(mem).map_err(BuildError::Boot)?;
    let cr3 = write_identity_page_tables(mem).map_err(BuildError::Boot)?;
    let boot_info = match kernel.format {
        KernelFormat::ElfPvh => write_pvh_start_info(mem, layout, initrd),
        KernelFormat::Elf | KernelFormat::BzImage => write_zero_page(
            mem,
            &zero_page(layout, kernel.setup_header, cmdline.len(), initrd),
        ),
    }
    .map_err(BuildError::Boot)?;
    log::debug!("kernel loaded");
    Ok(BootState {
        entry: kernel.entry_point(boot_info),
        gdt,
        cr3,
    })
}

/// Creates and configures every vCPU; vCPU 0 starts at the kernel entry.
#[allow(clippy::too_many_arguments)]
fn configure_vcpus(
    config: &VmConfig,
    kvm: &Kvm,
    fds: Vec<VcpuFd>,
    mem: &arch::GuestMemoryMmap,
    devices: &DeviceManager,
    exit: &Arc<ExitState>,
    boot: &BootState,
    quirks: &HostQuirks,
) -> Result<Vec<Vcpu>> {
    let pv_hypercalls = quirks.pv_hypercalls();
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report the supported CPUID"))?;
    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for (fd, index) in fds.into_iter().zip(0..) {
        let vcpu = Vcpu::new(
            fd,
            index,
            devices.pio.clone(),
            devices.mmio.clone(),
            mem.clone(),
            exit.clone(),
        );
        let cpuid = CpuidConfig {
            index,
            count: config.vcpus,
            pv_hypercalls,
        };
        vcpu.configure(&supported_cpuid, cpuid, (index == 0).then_some(boot))?;
        vcpus.push(vcpu);
    }
    log::debug!("{} vCPU(s) configured", config.vcpus);
    Ok(vcpus)
}

/// The command line the guest gets: the configured one with ligera's own
/// kernel parameters (the virtio-mmio windows, and the workarounds for an
/// emulating nested host when running on one) added to the kernel's part.
/// Whatever follows the first ` -- ` outside double quotes is init's
/// arguments: it stays last, unchanged and in order, as Linux hands
/// everything after `--` to init instead of parsing it.
fn kernel_cmdline(
    config: &VmConfig,
    virtio_mmio: &[(u64, u32)],
    host_workarounds: Option<&str>,
) -> Result<String> {
    let bad = |e: linux_loader::cmdline::Error| BuildError::Cmdline(e.to_string());
    // Spaces around the text make a leading `-- ` or trailing ` --` count as
    // the separator too. The length limit is checked when the line is
    // written, against what the kernel accepts.
    let padded = format!(" {} ", config.cmdline);
    let mut cmdline = Cmdline::try_from(&padded, usize::MAX).map_err(bad)?;
    for &(base, gsi) in virtio_mmio {
        cmdline
            .add_virtio_mmio_device(virtio::mmio::WINDOW_SIZE, GuestAddress(base), gsi, None)
            .map_err(bad)?;
    }
    if let Some(workarounds) = host_workarounds {
        cmdline.insert_str(workarounds).map_err(bad)?;
    }
    let text = cmdline.as_cstring().map_err(|e| match e {
        linux_loader::cmdline::Error::NoBootArgsInserted => BuildError::Cmdline(
            "it has init arguments (after --) but no kernel parameters before them".into(),
        ),
        e => bad(e),
    })?;
    text.into_string()
        .map_err(|_| BuildError::Cmdline("it is not valid UTF-8".into()))
}

/// Maps guest RAM, lazily: pages cost host memory only once touched.
fn map_guest_memory(layout: &GuestLayout) -> Result<arch::GuestMemoryMmap> {
    let ranges: Vec<_> = layout
        .ram_regions()
        .into_iter()
        .map(|(start, len)| (start, len as usize))
        .collect();
    arch::GuestMemoryMmap::from_ranges(&ranges).map_err(|e| BuildError::GuestMemory {
        size: layout.mem_size(),
        reason: e.to_string(),
    })
}

/// Gives the guest RAM mappings to KVM, one memory slot per region.
fn register_guest_memory(
    vm: &VmFd,
    mem: &arch::GuestMemoryMmap,
    layout: &GuestLayout,
) -> Result<()> {
    for (slot, region) in mem.iter().enumerate() {
        let host_addr =
            mem.get_host_address(region.start_addr())
                .map_err(|e| BuildError::GuestMemory {
                    size: layout.mem_size(),
                    reason: e.to_string(),
                })?;
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_addr as u64,
            flags: 0,
        };
        // SAFETY: the mapping belongs to `mem`, which the VM keeps alive for as
        // long as the VM fd exists (both live in `Vm`, and the VM fd is dropped first).
        unsafe { vm.set_user_memory_region(region) }.map_err(kvm_err("register guest memory"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmdline_for(text: &str, devices: &[(u64, u32)]) -> Result<String> {
        let config = VmConfig {
            cmdline: text.into(),
            host_quirks: false,
            ..VmConfig::new("k".into())
        };
        kernel_cmdline(&config, devices, None)
    }

    const DEV: &str = "virtio_mmio.device=4K@0xd0000000:5";

    #[test]
    fn device_parameters_go_before_init_arguments() {
        let devices = [(0xd000_0000, 5)];
        assert_eq!(
            cmdline_for("console=ttyS0", &devices).unwrap(),
            format!("console=ttyS0 {DEV}")
        );
        assert_eq!(
            cmdline_for(
                r#"root=/dev/vda init=/bin/sh -- -c "echo hi;  reboot -f" x"#,
                &devices
            )
            .unwrap(),
            format!(r#"root=/dev/vda init=/bin/sh {DEV} -- -c "echo hi;  reboot -f" x"#)
        );
        // Only the first separator splits; a later one is init's.
        assert_eq!(
            cmdline_for("a -- b -- c", &devices).unwrap(),
            format!("a {DEV} -- b -- c")
        );
        // A `--` inside double quotes is a value, not the separator.
        assert_eq!(
            cmdline_for(r#"x="a -- b" y"#, &devices).unwrap(),
            format!(r#"x="a -- b" y {DEV}"#)
        );
        // A leading separator: everything is init's.
        assert_eq!(
            cmdline_for("-- a b", &devices).unwrap(),
            format!("{DEV} -- a b")
        );
        assert_eq!(cmdline_for("", &devices).unwrap(), DEV);
        assert_eq!(cmdline_for("", &[]).unwrap(), "");
    }

    #[test]
    fn bad_command_lines_are_errors() {
        assert!(
            cmdline_for("-- a", &[])
                .unwrap_err()
                .to_string()
                .contains("no kernel parameters")
        );
    }
}
