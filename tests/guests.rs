//! End-to-end tests with the purpose-built test guest (tests/guests/): the
//! real `ligera` binary boots it under KVM, and the guest reports over COM1
//! what it finds. Each run takes milliseconds, even on an emulating host.

mod common;

use std::time::Duration;

use common::{Outcome, fnv1a, guests, hex, random_file, run_guest, spawn};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn e820(out: &Outcome) -> Vec<(u64, u64, u64)> {
    out.lines("E820")
        .iter()
        .map(|l| {
            let v: Vec<u64> = l.split_whitespace().map(hex).collect();
            (v[0], v[1], v[2])
        })
        .collect()
}

/// The memory map ligera documents, written out independently of its code.
fn expected_map(mem: u64) -> Vec<(u64, u64, u64)> {
    let low = mem.min(0xc000_0000);
    let mut map = vec![(0, 0x9fc00, 1), (0x9fc00, 0x400, 2), (MIB, low - MIB, 1)];
    if mem > low {
        map.push((4 * GIB, mem - low, 1));
    }
    map
}

#[test]
fn zero_page_long_mode_and_machine_tables() {
    let g = guests();
    let out = run_guest(
        &g.elf64,
        &["--memory", "256M", "--cmdline", "test=report a=1 b"],
    );
    out.assert_ok();
    let boot = out.line("BOOT");
    assert!(boot.starts_with("zeropage at=7000"), "{out}");
    assert_eq!(out.field("BOOT", "boot_flag"), "aa55");
    assert_eq!(out.field("BOOT", "header"), "53726448");
    assert_eq!(out.field("BOOT", "loader"), "ff");
    assert_eq!(e820(&out), expected_map(256 * MIB));
    assert_eq!(out.line("CMDLINE"), "test=report a=1 b");
    assert_eq!(out.line("INITRD"), "none");
    // Entered in long mode with paging: CR0.PG and PE, CR4.PAE, EFER.LME|LMA.
    let cr0 = hex(&out.field("CPU", "entry_cr0"));
    assert_eq!(cr0 & 0x8000_0001, 0x8000_0001, "{out}");
    assert_ne!(hex(&out.field("CPU", "cr4")) & 0x20, 0);
    assert_eq!(hex(&out.field("CPU", "efer")) & 0x500, 0x500);
    assert_eq!(out.field("PAGING", "identity"), "ok");
    // One vCPU, APIC ID 0, consistent topology leaves.
    assert_eq!(out.field("CPUID leaf1", "apic"), "0");
    assert_eq!(out.field("CPUID leaf1", "hypervisor"), "1");
    assert_eq!(out.field("CPUID leafb", "x2apic"), "0");
    assert_eq!(out.field("CPUID leafb", "core_count"), "1");
    assert_eq!(out.field("CPUID kvm", "sig"), "KVMKVMKVM");
    // MP table: found where Linux looks, checksums valid, one BSP, the IOAPIC
    // at its standard address with all 24 ISA/IOAPIC interrupt entries.
    assert_eq!(out.field("MPTABLE", "cpus"), "1");
    assert_eq!(out.field("MPTABLE", "bsp"), "1");
    assert_eq!(out.field("MPTABLE", "lapic"), "fee00000");
    assert_eq!(out.field("MPTABLE", "ioapic_addr"), "fec00000");
    assert_eq!(out.field("MPTABLE", "irqs"), "18");
    assert_eq!(out.field("MPTABLE", "lints"), "2");
    // Unemulated ports and MMIO read as all ones and are not fatal.
    assert_eq!(out.field("UNEMULATED", "port"), "ff");
    assert_eq!(out.field("UNEMULATED", "mmio"), "ffffffff");
}

#[test]
fn pvh_entry_gets_start_info() {
    let g = guests();
    let initrd = random_file("pvh-initrd", 100_000, 7);
    let out = run_guest(
        &g.pvh,
        &[
            "--memory",
            "64M",
            "--initrd",
            initrd.to_str().unwrap(),
            "--cmdline",
            "test=report pvh",
        ],
    );
    out.assert_ok();
    assert!(out.line("BOOT").starts_with("pvh at=6000"), "{out}");
    assert_eq!(out.field("BOOT", "magic"), "336ec578");
    // PVH entry: protected mode without paging (the guest turns it on itself).
    assert_eq!(
        hex(&out.field("CPU", "entry_cr0")) & 0x8000_0001,
        1,
        "{out}"
    );
    assert_eq!(e820(&out), expected_map(64 * MIB));
    assert_eq!(out.line("CMDLINE"), "test=report pvh");
    let bytes = std::fs::read(&initrd).unwrap();
    assert_eq!(hex(&out.field("INITRD", "size")), bytes.len() as u64);
    assert_eq!(hex(&out.field("INITRD", "fnv")), fnv1a(&bytes), "{out}");
}

#[test]
fn initrd_is_intact_at_the_top_of_ram() {
    let g = guests();
    let initrd = random_file("initrd", 300_001, 42);
    let bytes = std::fs::read(&initrd).unwrap();
    let out = run_guest(
        &g.elf64,
        &["--memory", "128M", "--initrd", initrd.to_str().unwrap()],
    );
    out.assert_ok();
    let addr = hex(&out.field("INITRD", "addr"));
    let size = hex(&out.field("INITRD", "size"));
    assert_eq!(size, bytes.len() as u64);
    assert_eq!(hex(&out.field("INITRD", "fnv")), fnv1a(&bytes));
    assert_eq!(addr % 4096, 0, "page aligned");
    assert!(
        addr + size <= 128 * MIB && 128 * MIB - (addr + size) < 4096,
        "{out}"
    );
}

#[test]
fn bzimage_header_is_kept_and_initrd_addr_max_respected() {
    let g = guests();
    let initrd = random_file("bz-initrd", 65_536, 3);
    let bytes = std::fs::read(&initrd).unwrap();
    let out = run_guest(
        &g.bzimage,
        &["--memory", "1G", "--initrd", initrd.to_str().unwrap()],
    );
    out.assert_ok();
    assert_eq!(out.field("BOOT", "version"), "20f");
    assert_eq!(out.field("BOOT", "code32_start"), "100000");
    assert_eq!(out.field("BOOT", "loader"), "ff");
    assert_eq!(hex(&out.field("INITRD", "fnv")), fnv1a(&bytes));
    // The wrapper says initrd_addr_max = 512 MiB - 1: the initrd ends right below it.
    let end = hex(&out.field("INITRD", "addr")) + bytes.len() as u64;
    assert!(end <= 512 * MIB && 512 * MIB - end < 4096, "{out}");
    assert_eq!(e820(&out), expected_map(GIB));
}

#[test]
fn memory_above_4g_is_mapped_and_usable() {
    let g = guests();
    let out = run_guest(&g.elf64, &["--memory", "5G"]);
    out.assert_ok();
    assert_eq!(e820(&out), expected_map(5 * GIB));
    assert!(out.line("HIGHMEM").starts_with("ok "), "{out}");
}

fn check_smp(vcpus: u64) {
    let g = guests();
    let n = vcpus.to_string();
    let out = run_guest(&g.elf64, &["--memory", "64M", "--cpus", &n]);
    out.assert_ok();
    assert_eq!(hex(&out.field("MPTABLE", "cpus")), vcpus);
    assert_eq!(out.field("MPTABLE", "ioapics"), "1");
    assert_eq!(hex(&out.field("CPUID leaf1", "count")), vcpus);
    // On the nested kvm_pvm host the feature bits of leaf 1 are the host's,
    // whatever the VMM sets (EBX, with the APIC ID, is the VMM's): check the
    // HTT bit only where KVM honours the VMM's CPUID.
    if !std::path::Path::new("/sys/module/kvm_pvm").exists() {
        assert_eq!(out.field("CPUID leaf1", "htt"), "1", "{out}");
    }
    assert_eq!(hex(&out.field("CPUID leafb", "core_count")), vcpus);
    assert_eq!(hex(&out.field("SMP", "started")), vcpus - 1);
    assert_eq!(hex(&out.field("SMP", "checked_in")), vcpus - 1, "{out}");
    // Every AP started by INIT/SIPI reports its own APIC ID in CPUID.
    let aps = out.lines("AP");
    assert_eq!(aps.len() as u64, vcpus - 1, "{out}");
    for (i, ap) in aps.iter().enumerate() {
        let id = (i + 1) as u64;
        let f = |k| hex(&common::field(ap, k).unwrap());
        assert_eq!(f("apic"), id, "{out}");
        assert_eq!(f("leaf1_apic"), id);
        assert_eq!(f("x2apic"), id);
        assert_eq!(f("count"), vcpus);
    }
}

#[test]
fn two_vcpus_start_with_init_sipi() {
    check_smp(2);
}

#[test]
fn four_vcpus_start_with_init_sipi() {
    check_smp(4);
}

#[test]
fn serial_input_reaches_the_guest() {
    let g = guests();
    let mut r = spawn(&[
        "run",
        "--kernel",
        g.elf64.to_str().unwrap(),
        "--no-host-quirks",
        "--memory",
        "32M",
        "--cmdline",
        "test=echo",
    ]);
    r.wait_for("ECHO ready", Duration::from_secs(30));
    // More than the UART's 64-byte FIFO, so flow control is exercised too.
    let long: String = (0..100)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    r.write_stdin(format!("hello ligera\n{long}\nend\n").as_bytes());
    let out = r.finish(Duration::from_secs(30));
    out.assert_ok();
    let got = out.lines("ECHO");
    assert_eq!(got[1], "got=hello ligera len=c", "{out}");
    assert_eq!(got[2], format!("got={long} len=64"), "{out}");
    assert_eq!(got[3], "got=end len=3");
}

#[test]
fn guest_panic_reported_through_pvpanic() {
    let out = run_guest(
        &guests().elf64,
        &["--memory", "32M", "--cmdline", "test=panic"],
    );
    assert_eq!(out.field("PVPANIC", "caps"), "1");
    assert_eq!(out.status, 3, "{out}");
    assert!(out.stderr.contains("panicked"), "{out}");
}

#[test]
fn triple_fault_names_vcpu_rip_and_bytes() {
    let out = run_guest(
        &guests().elf64,
        &["--memory", "32M", "--cmdline", "test=triplefault"],
    );
    assert_eq!(out.status, 4, "{out}");
    // ud2 with an empty IDT.
    assert!(out.stderr.contains("vCPU 0"), "{out}");
    assert!(out.stderr.contains("triple fault"), "{out}");
    assert!(out.stderr.contains(" at RIP 0x"), "{out}");
    assert!(out.stderr.contains("instruction bytes: 0f 0b"), "{out}");
}

#[test]
fn kvm_internal_error_is_reported_not_hung() {
    // Jumping into the MMIO hole leaves KVM nothing to fetch code from.
    let out = run_guest(
        &guests().elf64,
        &["--memory", "32M", "--cmdline", "test=badfetch"],
    );
    assert_eq!(out.status, 5, "{out}");
    assert!(out.stderr.contains("vCPU 0"), "{out}");
    assert!(out.stderr.contains("RIP 0xd0000000"), "{out}");
    assert_eq!(out.stderr.lines().count(), 1, "{out}");
}

fn stop_with(signal: i32, status: i32) {
    let g = guests();
    let mut r = spawn(&[
        "run",
        "--kernel",
        g.elf64.to_str().unwrap(),
        "--no-host-quirks",
        "--cpus",
        "2",
        "--memory",
        "32M",
        "--cmdline",
        "test=hang",
    ]);
    r.wait_for("HANG", Duration::from_secs(30));
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(r.pid(), signal) }, 0);
    let out = r.finish(Duration::from_secs(10));
    assert_eq!(out.status, status, "{out}");
    assert!(out.stderr.contains("stopped by signal"), "{out}");
}

#[test]
fn sigterm_stops_the_vm() {
    stop_with(libc::SIGTERM, 143);
}

#[test]
fn sigint_stops_the_vm() {
    stop_with(libc::SIGINT, 130);
}

#[test]
fn host_quirks_follow_the_host() {
    let g = guests();
    let out = common::run(
        &[
            "run",
            "--kernel",
            g.elf64.to_str().unwrap(),
            "--memory",
            "32M",
            "--cmdline",
            "test=report",
        ],
        Duration::from_secs(60),
    );
    out.assert_ok();
    let nested = std::path::Path::new("/sys/module/kvm_pvm").exists();
    assert_eq!(out.line("CMDLINE").contains("clearcpuid="), nested, "{out}");
    // PV features that need hypercalls are offered only where they complete.
    let features = hex(&out.field("CPUID kvm", "features"));
    let hypercall_bits = (1 << 7) | (1 << 9) | (1 << 11) | (1 << 13);
    if nested {
        assert_eq!(features & hypercall_bits, 0, "{out}");
    }
    assert_ne!(features & 1, 0, "kvm-clock offered: {out}");
}

#[test]
fn serial_to_file_and_none() {
    let g = guests();
    let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("serial-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let arg = format!("file={}", log.display());
    let out = run_guest(&g.elf64, &["--memory", "32M", "--serial", &arg]);
    assert_eq!(out.status, 0, "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("LIGERA-TEST-GUEST up") && text.contains("DONE"),
        "{text}"
    );
    let out = run_guest(&g.elf64, &["--memory", "32M", "--serial", "none"]);
    assert_eq!(out.status, 0, "{out}");
    assert!(out.stdout.is_empty(), "{out}");
}

#[test]
fn virtio_rng_serves_random_bytes() {
    let out = run_guest(
        &guests().elf64,
        &["--memory", "32M", "--rng", "--cmdline", "test=virtio"],
    );
    out.assert_ok();
    // Announced on the command line, found by the guest where announced.
    assert!(
        out.line("CMDLINE")
            .contains("virtio_mmio.device=4K@0xd0000000:5"),
        "{out}"
    );
    let dev = out.line("VIRTIO dev");
    for (k, v) in [
        ("base", "d0000000"),
        ("irq", "5"),
        ("magic", "74726976"),
        ("version", "2"),
        ("id", "4"),
    ] {
        assert_eq!(common::field(dev, k).as_deref(), Some(v), "{out}");
    }
    // VERSION_1 agreed; the status reads back FEATURES_OK, then DRIVER_OK.
    assert_eq!(out.field("VIRTIO negotiate", "agreed"), "100000000");
    assert_eq!(out.field("VIRTIO negotiate", "status"), "b");
    assert_eq!(out.field("VIRTIO-RNG ready", "status"), "f");
    assert_eq!(out.field("VIRTIO-RNG result", "bytes"), "200", "{out}");
    assert_eq!(
        out.field("VIRTIO-RNG result", "random_rounds"),
        "2",
        "{out}"
    );
    assert_eq!(
        out.field("VIRTIO-RNG result", "isr"),
        "1",
        "used-buffer interrupt: {out}"
    );
}

#[test]
fn virtio_survives_a_hostile_driver() {
    let out = run_guest(
        &guests().elf64,
        &["--memory", "32M", "--rng", "--cmdline", "test=hostile"],
    );
    out.assert_ok();
    // A queue size of 12: DEVICE_NEEDS_RESET (0x40), never DRIVER_OK work.
    assert_eq!(
        hex(&out.field("HOSTILE badsize", "status")) & 0x40,
        0x40,
        "{out}"
    );
    // Unoffered features: FEATURES_OK (8) refused.
    assert_eq!(
        hex(&out.field("HOSTILE features", "status")) & 0x8,
        0,
        "{out}"
    );
    // Buffers outside guest memory get nothing; a looping chain is cut at
    // the queue size; a bogus avail index is ignored; the device carries on.
    assert_eq!(out.field("HOSTILE run", "outside"), "0", "{out}");
    assert_eq!(out.field("HOSTILE run", "loop"), "1/100", "{out}");
    assert_eq!(out.field("HOSTILE run", "after"), "20", "{out}");
    assert_eq!(out.field("HOSTILE run", "status"), "f", "{out}");
    assert_eq!(out.field("HOSTILE run", "magic"), "74726976");
    // Driver mistakes are reported once, not once per mistake.
    assert!(out.stderr.lines().count() <= 1, "{out}");
}

#[test]
fn guest_memory_costs_only_what_is_touched() {
    // A 4 GiB guest that writes to 50 MiB: its peak RSS is those 50 MiB plus
    // ligera's own few MiB, not 4 GiB.
    let g = guests();
    let (out, peak_kib) = common::run_measured(
        &[
            "run",
            "--kernel",
            g.elf64.to_str().unwrap(),
            "--no-host-quirks",
            "--memory",
            "4G",
            "--cmdline",
            "test=touch touch_mib=50",
        ],
        Duration::from_secs(120),
    );
    out.assert_ok();
    assert_eq!(out.field("TOUCHED", "mib"), "32", "0x32 = 50: {out}");
    let peak_mib = peak_kib / 1024;
    // 50 MiB touched plus ligera's own (a debug build: 8-10 MiB here,
    // varying with where huge pages fall), not 4 GiB.
    assert!(
        (50..=62).contains(&peak_mib),
        "peak RSS {peak_mib} MiB:\n{out}"
    );
}
