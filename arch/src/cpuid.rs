//! Per-vCPU CPUID, starting from what KVM supports on this host.
//!
//! The topology we present: one socket, `count` cores, one thread per core,
//! APIC ID = vCPU index. Every leaf that describes the topology says the same.

use kvm_bindings::{KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_cpuid_entry2};

/// KVM's paravirtual feature leaf and the features in it that the guest can
/// only use by making hypercalls (`vmcall`/`vmmcall`).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
pub const KVM_FEATURE_PV_UNHALT: u32 = 7;
pub const KVM_FEATURE_PV_TLB_FLUSH: u32 = 9;
pub const KVM_FEATURE_PV_SEND_IPI: u32 = 11;
pub const KVM_FEATURE_PV_SCHED_YIELD: u32 = 13;
pub const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 16;
/// The features above: offered only where the host completes hypercalls.
pub const HYPERCALL_FEATURES: [u32; 5] = [
    KVM_FEATURE_PV_UNHALT,
    KVM_FEATURE_PV_TLB_FLUSH,
    KVM_FEATURE_PV_SEND_IPI,
    KVM_FEATURE_PV_SCHED_YIELD,
    KVM_FEATURE_HC_MAP_GPA_RANGE,
];

const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
const TOPOLOGY_LEVEL_SMT: u32 = 1;
const TOPOLOGY_LEVEL_CORE: u32 = 2;

/// What a vCPU's CPUID must say about itself and the machine.
#[derive(Clone, Copy, Debug)]
pub struct CpuidConfig {
    /// This vCPU's index, which is also its APIC ID.
    pub index: u8,
    /// How many vCPUs the VM has.
    pub count: u8,
    /// Offer the KVM paravirtual features that work through hypercalls.
    pub pv_hypercalls: bool,
}

/// Bits needed to number `count` items (ceil(log2(count))).
fn id_bits(count: u8) -> u32 {
    (u32::from(count).max(1) - 1)
        .checked_ilog2()
        .map_or(0, |b| b + 1)
}

/// Makes sure the extended topology leaf 0xB has its SMT, core and
/// terminating subleaves when the maximum basic leaf includes it (KVM on AMD
/// reports only subleaf 0).
fn add_topology_subleaves(entries: &mut Vec<kvm_cpuid_entry2>) {
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    if max_basic < 0xb {
        return;
    }
    for index in 0..3 {
        if !entries
            .iter()
            .any(|e| e.function == 0xb && e.index == index)
        {
            entries.push(kvm_cpuid_entry2 {
                function: 0xb,
                index,
                flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                ..Default::default()
            });
        }
    }
}

/// Sharing field (EAX[25:14], "logical CPUs sharing this cache - 1") of a
/// cache descriptor in leaf 4 or 0x8000_001D: the last level is shared by all.
fn cache_sharing(eax: u32, count: u32) -> u32 {
    if eax & 0x1f == 0 {
        return eax; // no cache: the end of the list
    }
    let level = (eax >> 5) & 0x7;
    let sharing = if level >= 3 { count - 1 } else { 0 };
    (eax & !(0xfff << 14)) | ((sharing & 0xfff) << 14)
}

/// Rewrites the entries (as returned by `KVM_GET_SUPPORTED_CPUID`) for one vCPU.
pub fn configure_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, cfg: CpuidConfig) {
    add_topology_subleaves(entries);
    let apic_id = u32::from(cfg.index);
    let count = u32::from(cfg.count);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (count << 16) | (apic_id << 24);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 if e.eax & 0x1f != 0 => {
                // Deterministic cache parameters (Intel): cores per package in EAX[31:26].
                e.eax = (cache_sharing(e.eax, count) & 0x03ff_ffff) | (((count - 1) & 0x3f) << 26);
            }
            0x8000_001d => e.eax = cache_sharing(e.eax, count),
            0xb | 0x1f => {
                // Extended topology: SMT level (1 thread), then the core level.
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (TOPOLOGY_LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(cfg.count);
                        e.ebx = count;
                        e.ecx = (TOPOLOGY_LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            KVM_CPUID_FEATURES if !cfg.pv_hypercalls => {
                for bit in HYPERCALL_FEATURES {
                    e.eax &= !(1 << bit);
                }
            }
            0x8000_0001 => {
                if count > 1 {
                    e.ecx |= EXT1_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT1_ECX_CMP_LEGACY;
                }
            }
            0x8000_0008 => {
                // AMD: NC (cores - 1) and the APIC ID bits used for the core.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(cfg.count) << 12) | ((count - 1) & 0xff);
            }
            0x8000_001e => {
                // AMD extended APIC ID; one thread per compute unit, node 0.
                e.eax = apic_id;
                e.ebx = apic_id & 0xff;
                e.ecx = 0;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(entries: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *entries
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            kvm_cpuid_entry2 {
                eax: 0xd,
                ..entry(0x0, 0)
            },
            entry(0x1, 0),
            kvm_cpuid_entry2 {
                eax: 0x0000_0063, // level 3 unified cache
                ..entry(0x4, 3)
            },
            kvm_cpuid_entry2 {
                eax: 0x0000_0021, // level 1 data cache
                ..entry(0x4, 0)
            },
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(KVM_CPUID_FEATURES, 0),
            entry(0x8000_0008, 0),
            kvm_cpuid_entry2 {
                eax: 0x0000_0163, // level 3 unified cache
                ..entry(0x8000_001d, 3)
            },
            entry(0x8000_001e, 0),
        ]
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 32].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 5]
        );
    }

    #[test]
    fn topology_for_vcpu_2_of_4() {
        let mut e = sample();
        configure_cpuid(
            &mut e,
            CpuidConfig {
                index: 2,
                count: 4,
                pv_hypercalls: false,
            },
        );
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 2);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0xffff, "CLFLUSH size and brand kept");
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        let smt = find(&e, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&e, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 2));
        let end = find(&e, 0xb, 2);
        assert_eq!((end.ecx >> 8) & 0xff, 0, "topology enumeration ends");
        assert_eq!(find(&e, 4, 3).eax >> 26, 3);
        assert_eq!((find(&e, 4, 3).eax >> 14) & 0xfff, 3);
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!(find(&e, 0x8000_0008, 0).ecx & 0xf0ff, 0x2003);
        assert_eq!(find(&e, 0x8000_001e, 0).eax, 2);
        assert_eq!((find(&e, 0x8000_001d, 3).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&e, 0x8000_001d, 3).eax & 0x3fff, 0x163);
        let kvm = find(&e, KVM_CPUID_FEATURES, 0);
        for bit in HYPERCALL_FEATURES {
            assert_eq!(kvm.eax & (1 << bit), 0);
        }
        assert_ne!(kvm.eax & 1, 0, "kvm-clock stays");
    }

    #[test]
    fn single_vcpu_and_pv_hypercalls_kept() {
        let mut e = sample();
        configure_cpuid(
            &mut e,
            CpuidConfig {
                index: 0,
                count: 1,
                pv_hypercalls: true,
            },
        );
        assert_eq!(find(&e, 1, 0).edx & LEAF1_EDX_HTT, 0);
        assert_eq!(find(&e, 0xb, 1).eax, 0);
        assert_eq!(find(&e, KVM_CPUID_FEATURES, 0).eax, 0xffff_ffff);
    }

    #[test]
    fn missing_topology_subleaves_are_added() {
        let mut e = vec![
            kvm_cpuid_entry2 {
                eax: 0x10,
                ..entry(0x0, 0)
            },
            entry(0xb, 0),
        ];
        configure_cpuid(
            &mut e,
            CpuidConfig {
                index: 3,
                count: 4,
                pv_hypercalls: false,
            },
        );
        assert_eq!(e.len(), 4);
        let core = find(&e, 0xb, 1);
        assert_eq!((core.ebx, core.edx, core.flags), (4, 3, 1));
        // A CPU without leaf 0xB gets none.
        let mut e = vec![entry(0x0, 0)];
        e[0].eax = 0x7;
        configure_cpuid(
            &mut e,
            CpuidConfig {
                index: 0,
                count: 2,
                pv_hypercalls: false,
            },
        );
        assert_eq!(e.len(), 1);
    }
}
