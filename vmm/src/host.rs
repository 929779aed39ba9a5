//! Facts about the host that change how a VM is set up, and the one place
//! that decides what to do about them ([`HostQuirks`]).

use std::path::Path;

use crate::config::{PvHypercalls, VmConfig};

/// What this host makes ligera do differently, decided once per VM from
/// the host and the configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostQuirks {
    /// Offer KVM's hypercall-based paravirtual features.
    pv_hypercalls: bool,
    /// Add [`EMULATING_HOST_CMDLINE`] to the guest's command line.
    guest_workarounds: bool,
}

impl HostQuirks {
    /// Looks at the host (the nested `kvm_pvm` module) and applies the
    /// configuration's choices (`--pv-hypercalls`, `--no-host-quirks`).
    pub fn detect(config: &VmConfig) -> Self {
        Self::decide(config, is_emulating_nested_host())
    }

    fn decide(config: &VmConfig, emulating_nested: bool) -> Self {
        let quirks = HostQuirks {
            pv_hypercalls: match config.pv_hypercalls {
                PvHypercalls::On => true,
                PvHypercalls::Off => false,
                PvHypercalls::Auto => !emulating_nested,
            },
            guest_workarounds: config.host_quirks && emulating_nested,
        };
        if emulating_nested {
            log::info!("nested kvm_pvm host: {quirks:?}");
        }
        quirks
    }

    pub fn pv_hypercalls(&self) -> bool {
        self.pv_hypercalls
    }

    /// Kernel parameters the guest needs on this host, if any.
    pub fn guest_cmdline(&self) -> Option<&'static str> {
        self.guest_workarounds.then_some(EMULATING_HOST_CMDLINE)
    }
}

/// Guest kernel parameters that a guest needs on a nested `kvm_pvm` host,
/// whose instruction emulator rejects XSAVE, POPCNT and other post-2008
/// instructions while CPUID still reports them: clear those feature bits in
/// the guest (Linux 6.1 honours only the last `clearcpuid=`, so it is one list).
/// Measured on these machines; see resources/guest-kernel/README.md.
///
/// `tsc=unstable`: this host gives the guest the host's own TSC, whatever
/// the VMM sets (`KVM_SET_MSRS` of the TSC does not move it; measured), so
/// a guest restored from a snapshot would see its TSC clocksource leap by
/// the snapshot's age, and past about 15 minutes (the TSC clocksource's
/// `max_idle_ns`) its timekeeping breaks and it stops answering. With the
/// TSC marked unstable the guest keeps time with kvm-clock, which the
/// snapshot restores (`KVM_SET_CLOCK`), and goes on from the snapshot.
pub const EMULATING_HOST_CMDLINE: &str = "clearcpuid=151,154,155,156,293,304,147,148,137,153,140,150,157,158,291,296,297,580,308,295,288,145,298,306,307,311,312,317,534,514 tsc=unstable";

/// Whether the host KVM is the nested `kvm_pvm` module, which runs a
/// normal guest through its instruction emulator and never completes a
/// guest's hypercall (`vmcall`/`vmmcall` spins forever). Looked up once
/// (the jail has no /sys).
pub fn is_emulating_nested_host() -> bool {
    static NESTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *NESTED.get_or_init(|| Path::new("/sys/module/kvm_pvm").exists())
}

/// Total RAM of the host in bytes.
pub fn host_ram() -> std::io::Result<u64> {
    let mut info = std::mem::MaybeUninit::<libc::sysinfo>::zeroed();
    // SAFETY: sysinfo() writes a `struct sysinfo` into the buffer we own.
    let ret = unsafe { libc::sysinfo(info.as_mut_ptr()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sysinfo() succeeded, so the struct is initialised.
    let info = unsafe { info.assume_init() };
    Ok(info.totalram * u64::from(info.mem_unit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_decision_per_host_and_config() {
        let mut c = VmConfig::new("k".into());
        let nested = HostQuirks::decide(&c, true);
        assert!(!nested.pv_hypercalls());
        assert_eq!(nested.guest_cmdline(), Some(EMULATING_HOST_CMDLINE));
        let plain = HostQuirks::decide(&c, false);
        assert!(plain.pv_hypercalls());
        assert_eq!(plain.guest_cmdline(), None);
        c.pv_hypercalls = PvHypercalls::On;
        c.host_quirks = false;
        let forced = HostQuirks::decide(&c, true);
        assert!(forced.pv_hypercalls());
        assert_eq!(forced.guest_cmdline(), None);
    }

    #[test]
    fn host_ram_is_plausible() {
        let ram = host_ram().unwrap();
        assert!(ram > 64 << 20, "{ram}");
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
        let kib: u64 = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        assert_eq!(ram / 1024, kib);
    }
}
