//! The KVM side of a snapshot: every vCPU's registers and the VM's
//! interrupt controllers, PIT and clock, read and written with KVM's own
//! structures, kept as their bytes.
//!
//! Ordering (the KVM API documentation and other VMMs agree on it):
//! - saving: `KVM_GET_MP_STATE` first (it makes the local APIC accept pending
//!   INIT/SIPI events, which changes other state), `KVM_GET_VCPU_EVENTS`
//!   last, every vCPU paused;
//! - restoring: CPUID before anything (it decides which MSRs and XSAVE
//!   features exist), special registers before the local APIC (they hold
//!   the APIC base), MSRs with the TSC before the TSC deadline (KVM's index
//!   list has that order), vCPU events last.

use kvm_bindings::{
    CpuId, KVM_CLOCK_HOST_TSC, KVM_CLOCK_REALTIME, KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// KVM's state structures: plain C data, for which every byte pattern is a
/// valid value.
///
/// # Safety
/// Only for `repr(C)` types made of integers and arrays or unions of them,
/// without `Drop`.
pub(crate) unsafe trait Pod {}

macro_rules! pod {
    ($($t:ty),*) => {$(
        // SAFETY: a bindgen'd KVM structure of integers, arrays and unions
        // of them, without Drop.
        unsafe impl Pod for $t {}
    )*};
}

pod!(
    kvm_regs,
    kvm_sregs,
    kvm_xsave,
    kvm_xcrs,
    kvm_debugregs,
    kvm_lapic_state,
    kvm_mp_state,
    kvm_vcpu_events,
    kvm_cpuid_entry2,
    kvm_irqchip,
    kvm_pit_state2,
    kvm_clock_data
);

/// A structure's bytes.
pub(crate) fn to_bytes<T: Pod>(value: &T) -> Vec<u8> {
    // SAFETY: `value` is a live T; Pod types have no padding that matters
    // (any byte of it is data KVM wrote or zero from Default/zeroed).
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
    .to_vec()
}

/// A structure from exactly its bytes.
pub(crate) fn from_bytes<T: Pod>(bytes: &[u8], what: &str) -> Result<T, String> {
    if bytes.len() != std::mem::size_of::<T>() {
        return Err(format!(
            "{what}: {} bytes, expected {}",
            bytes.len(),
            std::mem::size_of::<T>()
        ));
    }
    // SAFETY: the length matches, and any bytes are a valid T (Pod).
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

/// One vCPU's state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<Vec<u8>>,
    /// `(index, value)` of every MSR KVM could read, in KVM's list order.
    pub msrs: Vec<(u32, u64)>,
    pub mp_state: Vec<u8>,
    pub regs: Vec<u8>,
    pub sregs: Vec<u8>,
    pub xsave: Vec<u8>,
    pub xcrs: Vec<u8>,
    pub debug_regs: Vec<u8>,
    pub lapic: Vec<u8>,
    pub vcpu_events: Vec<u8>,
    /// The guest's TSC frequency, where KVM says.
    pub tsc_khz: Option<u32>,
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// Reads a paused vCPU's state; `msr_list` is KVM's list of MSRs to save.
pub fn save_vcpu(fd: &VcpuFd, msr_list: &[u32]) -> Result<VcpuState, String> {
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let msrs = read_msrs(fd, msr_list)?;
    let vcpu_events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid: cpuid.as_slice().iter().map(to_bytes).collect(),
        msrs,
        mp_state: to_bytes(&mp_state),
        regs: to_bytes(&regs),
        sregs: to_bytes(&sregs),
        xsave: to_bytes(&xsave),
        xcrs: to_bytes(&xcrs),
        debug_regs: to_bytes(&debug_regs),
        lapic: to_bytes(&lapic),
        vcpu_events: to_bytes(&vcpu_events),
        tsc_khz,
    })
}

const MSR_IA32_TSC: u32 = 0x10;

/// Most MSRs one KVM_GET_MSRS/KVM_SET_MSRS call takes here.
const MSR_CHUNK: usize = 64;

/// Reads every MSR of the list that KVM can read. KVM stops a batch at the
/// first MSR it refuses (one its CPUID or host lacks): that one is skipped
/// and the rest read on.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<(u32, u64)>, String> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend(msrs.as_slice()[..read].iter().map(|e| (e.index, e.data)));
        if read < batch.len() {
            log::debug!("snapshot: MSR {:#x} cannot be read; not saved", batch[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[read..];
        }
    }
    Ok(out)
}

/// Writes a saved state into a new vCPU (created, never run).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), String> {
    let entries = s
        .cpuid
        .iter()
        .map(|b| from_bytes::<kvm_cpuid_entry2>(b, "CPUID entry"))
        .collect::<Result<Vec<_>, _>>()?;
    let cpuid = CpuId::from_entries(&entries)
        .map_err(|_| format!("{} CPUID entries are too many", entries.len()))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz
        && fd.get_tsc_khz().ok() != Some(khz)
        && let Err(e) = fd.set_tsc_khz(khz)
    {
        log::warn!("snapshot: cannot set the guest's TSC to its {khz} kHz: {e}");
    }
    fd.set_mp_state(from_bytes(&s.mp_state, "MP state")?)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&from_bytes(&s.regs, "registers")?)
        .map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&from_bytes(&s.sregs, "special registers")?)
        .map_err(kvm("KVM_SET_SREGS"))?;
    let xsave: kvm_xsave = from_bytes(&s.xsave, "XSAVE area")?;
    // SAFETY: a whole kvm_xsave (4 KiB); the VM enabled no dynamic XSAVE
    // features (AMX), so KVM reads no more than that.
    unsafe { fd.set_xsave(&xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&from_bytes(&s.xcrs, "XCRs")?)
        .map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&from_bytes(&s.debug_regs, "debug registers")?)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&from_bytes(&s.lapic, "local APIC")?)
        .map_err(kvm("KVM_SET_LAPIC"))?;
    for chunk in s.msrs.chunks(MSR_CHUNK) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| format!("MSR list: {e:?}"))?;
        let set = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
        if set != entries.len() {
            return Err(format!(
                "KVM refused MSR {:#x} = {:#x}",
                entries[set].index, entries[set].data
            ));
        }
    }
    fd.set_vcpu_events(&from_bytes(&s.vcpu_events, "vCPU events")?)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    if let Some(&(_, saved)) = s.msrs.iter().find(|(i, _)| *i == MSR_IA32_TSC)
        && let Ok(now) = read_msrs(fd, &[MSR_IA32_TSC])
    {
        // Hosts that do not offset the guest's TSC (the nested kvm_pvm one)
        // leave it at theirs: see host::EMULATING_HOST_CMDLINE.
        log::debug!(
            "snapshot: guest TSC saved {saved:#x}, now {:#x}",
            now.first().map_or(0, |m| m.1)
        );
    }
    Ok(())
}

/// The VM's in-kernel devices and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmKvmState {
    pub pic_master: Vec<u8>,
    pub pic_slave: Vec<u8>,
    pub ioapic: Vec<u8>,
    pub pit: Vec<u8>,
    pub clock: Vec<u8>,
}

fn irqchip(vm: &VmFd, chip_id: u32) -> Result<Vec<u8>, String> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
    Ok(to_bytes(&chip))
}

pub fn save_vm(vm: &VmFd) -> Result<VmKvmState, String> {
    let mut clock = vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?;
    // KVM_SET_CLOCK takes no TSC_STABLE flag (it is KVM's to decide), and
    // without REALTIME/HOST_TSC it sets the clock to the saved value rather
    // than advancing it by the time since the snapshot: the guest's
    // monotonic time goes on from the snapshot as after a pause (a jump of
    // hours would fire every timer and watchdog at once). Its wall clock is
    // set by the sandbox agent, or by the guest's own NTP.
    clock.flags &= !(KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC);
    Ok(VmKvmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: to_bytes(&vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?),
        clock: to_bytes(&clock),
    })
}

/// Writes the saved irqchips, PIT and clock into a new VM (with its
/// irqchip and PIT created).
pub fn restore_vm(vm: &VmFd, s: &VmKvmState) -> Result<(), String> {
    for (bytes, chip_id, what) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER, "PIC master"),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE, "PIC slave"),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC, "IOAPIC"),
    ] {
        let chip: kvm_irqchip = from_bytes(bytes, what)?;
        if chip.chip_id != chip_id {
            return Err(format!("{what}: chip id {}", chip.chip_id));
        }
        vm.set_irqchip(&chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&from_bytes(&s.pit, "PIT")?)
        .map_err(kvm("KVM_SET_PIT2"))?;
    let clock: kvm_clock_data = from_bytes(&s.clock, "KVM clock")?;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    Ok(())
}
