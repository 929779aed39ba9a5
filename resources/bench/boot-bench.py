#!/usr/bin/env python3
"""Boot benchmark: ligera against QEMU's microvm machine, in one run.

1. A tiny guest (tiny-guest.S: write one byte to COM1, reset) booted N times
   by each VMM, interleaved: median wall time from exec to exit, CPU time
   (user + system, from wait4) and peak RSS.
2. ligera's memory outside the guest-memory mapping, from /proc/PID/smaps,
   while the same guest sits halted.
3. With --confinement, the same tiny guest with `--no-jail` and with
   `--no-jail --seccomp off` too: what the jail and the per-thread seccomp
   filters each add to start-up (the jail is on by default for root).
4. Optionally (--kernel/--initrd, or the images from resources/), the wall
   time until a Linux guest's init prints its marker, for both VMMs on the
   same kernel, initrd and command line.

These machines are shared and noisy: compare the ratios from one run, not
absolute numbers across runs.
"""
import argparse
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
QEMU_MICROVM = [
    "qemu-system-x86_64", "-M", "microvm,x-option-roms=off,rtc=off,pit=off,pic=off",
    "-enable-kvm", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
    "-no-reboot",
]
# Nested kvm_pvm hosts: QEMU aborts on MSR 0x10a without -arch-capabilities,
# and hypercall-based PV features never complete (see environment notes).
QEMU_CPU = "host,-arch-capabilities,kvm-pv-ipi=off,kvm-pv-sched-yield=off,kvm-pv-tlb-flush=off,kvm-pv-unhalt=off"


def build_tiny_guest(out_dir, hold=False):
    path = os.path.join(out_dir, "tiny-hold.elf" if hold else "tiny.elf")
    cmd = ["gcc", "-nostdlib", "-static", "-no-pie", "-Wl,--build-id=none",
           "-Wl,--no-warn-rwx-segments", "-Wl,-T," + os.path.join(HERE, "tiny-guest.ld"),
           "-o", path, os.path.join(HERE, "tiny-guest.S")]
    if hold:
        cmd.insert(1, "-DHOLD")
    subprocess.run(cmd, check=True)
    return path


def build_spawn(out_dir):
    path = os.path.join(out_dir, "spawn")
    subprocess.run(["gcc", "-O2", "-static", "-o", path, os.path.join(HERE, "spawn.c")], check=True)
    return path


def timed_run(spawn, cmd, env=None):
    """Runs cmd to completion; returns (wall s, cpu s, peak RSS KiB, status)."""
    res = subprocess.run([spawn, *cmd], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True,
                         env=None if env is None else {**os.environ, **env})
    wall, cpu, rss, status = res.stderr.strip().splitlines()[-1].split()
    return float(wall), float(cpu), int(rss), int(status)


def vm_process(pid):
    """The jailed VM process under ligera's supervisor `pid`, or pid itself."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = f.read().split()
    except OSError:
        return pid
    return int(children[0]) if len(children) == 1 else pid


def smaps_rollup(pid, key):
    """One field (KiB) of /proc/PID/smaps_rollup."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def smaps_outside_guest(pid, guest_bytes, key="Rss:"):
    """RSS (KiB; or `key`, e.g. "Pss:") of every mapping but the guest
    memory, and of the guest memory."""
    return smaps_outside_guest_keys(pid, guest_bytes, (key,))[key]


def smaps_outside_guest_keys(pid, guest_bytes, keys):
    """{key: (KiB outside the guest memory, KiB of the guest memory)} for
    each smaps field in `keys`, from one read of /proc/PID/smaps."""
    found = {k: [0, 0] for k in keys}
    size = None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                size = end - start
            elif parts[0] in found:
                kib = int(parts[1])
                totals = found[parts[0]]
                if size == guest_bytes and not totals[1]:
                    totals[1] = kib
                else:
                    totals[0] += kib
    return {k: tuple(v) for k, v in found.items()}


def wait_output(proc, marker, timeout):
    """Reads proc's stdout until marker appears; returns seconds waited or None."""
    start = time.perf_counter()
    seen = b""
    fd = proc.stdout.fileno()
    while marker not in seen:
        left = timeout - (time.perf_counter() - start)
        if left <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            seen += chunk
    return time.perf_counter() - start


def exit_on_signals():
    """SIGTERM and SIGHUP end the bench as Ctrl-C does: through its
    `finally` blocks, which stop what it started and remove its files."""
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda n, _: sys.exit(128 + n))


def stop(proc):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def linux_time(cmd, marker, timeout):
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    waited = wait_output(proc, marker, timeout)
    elapsed = time.perf_counter() - start if waited is not None else None
    stop(proc)
    return elapsed


def image_path(script, *args):
    out = subprocess.run([os.path.join(ROOT, "resources", script), "--print-path", *args],
                         check=True, stdout=subprocess.PIPE, text=True).stdout.strip()
    return out


def median_ms(xs):
    return statistics.median(xs) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ligera", default=os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release/ligera"))
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--memory", default="128", help="guest MiB for the tiny guest")
    ap.add_argument("--linux", action="store_true", help="also time a Linux boot to init")
    ap.add_argument("--kernel", help="vmlinux for --linux (default: resources/build-guest-kernel.sh)")
    ap.add_argument("--initrd", help="initramfs for --linux (default: resources/build-initramfs.sh)")
    ap.add_argument("--linux-runs", type=int, default=5)
    ap.add_argument("--baseline", help="another ligera binary (e.g. the previous commit's) to run "
                    "side by side on the tiny guest")
    ap.add_argument("--confinement", action="store_true",
                    help="also run ligera with --no-jail and with --no-jail --seccomp off: what "
                    "the jail and the seccomp filters cost at start-up")
    ap.add_argument("--teardown", action="store_true",
                    help="also run ligera with LIGERA_INLINE_TEARDOWN=1 (no teardown child)")
    args = ap.parse_args()
    exit_on_signals()

    work = tempfile.mkdtemp(prefix="ligera-bench-")
    spawn = build_spawn(work)
    tiny = build_tiny_guest(work)
    hold = build_tiny_guest(work, hold=True)
    mem = int(args.memory)
    # VMM against VMM: ligera's jail (on by default for root) is measured
    # on its own with --confinement.
    ligera_cmd = [args.ligera, "run", "--kernel", tiny, "--memory", f"{mem}M", "--no-jail"]
    qemu_cmd = QEMU_MICROVM + ["-cpu", QEMU_CPU, "-m", str(mem), "-smp", "1", "-kernel", tiny]

    runners = [("ligera", ligera_cmd, None), ("qemu", qemu_cmd, None)]
    if args.baseline:
        # An older binary has no jail (nor --no-jail).
        runners.append(("baseline", [args.baseline, *ligera_cmd[1:-1]], None))
    if args.teardown:
        runners.append(("ligera-inline-teardown", ligera_cmd, {"LIGERA_INLINE_TEARDOWN": "1"}))
    if args.confinement:
        runners.append(("ligera-jailed", ligera_cmd[:-1], None))
        runners.append(("ligera-unconfined", ligera_cmd + ["--seccomp", "off"], None))
    results = {name: [] for name, _, _ in runners}
    for i in range(args.runs):
        print(f"\rrun {i + 1}/{args.runs}", end="", file=sys.stderr, flush=True)
        for name, cmd, env in runners:
            wall, cpu, rss, status = timed_run(spawn, cmd, env)
            if name != "qemu" and status != 0:
                sys.exit(f"{name} exited with {status} on the tiny guest")
            results[name].append((wall, cpu, rss))
    print(file=sys.stderr)

    print(f"Tiny guest (write one byte to COM1, reset), {mem} MiB, {args.runs} interleaved runs each:")
    print(f"{'VMM':<24} {'wall ms':>9} {'CPU ms':>9} {'peak RSS MiB':>13}")
    summary = {}
    for name, rows in results.items():
        wall = median_ms([r[0] for r in rows])
        cpu = median_ms([r[1] for r in rows])
        rss = statistics.median([r[2] for r in rows]) / 1024
        summary[name] = (wall, cpu, rss)
        print(f"{name:<24} {wall:9.2f} {cpu:9.2f} {rss:13.2f}")
    lw, lc, lr = summary["ligera"]
    qw, qc, qr = summary["qemu"]
    print(f"ratio ligera/qemu: wall {lw / qw:.2f}x (target <= 0.25x), CPU {lc / qc:.2f}x, "
          f"peak RSS {lr / qr:.2f}x (target <= 8 MiB: {'met' if lr <= 8 else 'NOT met'})")
    if args.baseline:
        bw, bc, br = summary["baseline"]
        print(f"ratio ligera/baseline: wall {lw / bw:.2f}x, CPU {lc / bc:.2f}x, peak RSS {lr / br:.2f}x")
    if args.teardown:
        tw, tc, tr = summary["ligera-inline-teardown"]
        print(f"exit cost: the teardown child saves {tw - lw:.2f} ms of wall time "
              f"(inline teardown {tw:.2f} ms vs {lw:.2f} ms)")

    if args.confinement:
        jailed = os.geteuid() == 0
        jw, jc, jr = summary["ligera-jailed"]
        ow, oc, orss = summary["ligera-unconfined"]
        print(f"seccomp cost at start-up (--no-jail vs --no-jail --seccomp off): "
              f"{lw - ow:+.2f} ms wall (target <= +1 ms: {'met' if lw - ow <= 1 else 'NOT met'}), "
              f"{lc - oc:+.2f} ms CPU, peak RSS {lr - orss:+.2f} MiB")
        if jailed:
            print(f"jail cost at start-up (jailed vs --no-jail): {jw - lw:+.2f} ms wall "
                  f"(target <= +1 ms: {'met' if jw - lw <= 1 else 'NOT met'}), "
                  f"{jc - lc:+.2f} ms CPU, peak RSS {jr - lr:+.2f} MiB")
            print(f"confinement cost at start-up, both: {jw:.2f} ms vs unconfined {ow:.2f} ms "
                  f"= {jw - ow:+.2f} ms wall, CPU {jc - oc:+.2f} ms")
        else:
            print("jail: not measured (the jail needs root; run the bench as root)")

    binaries = [("ligera", args.ligera, ["--no-jail"])]
    if args.baseline:
        binaries.append(("baseline", args.baseline, []))
    if args.confinement and os.geteuid() == 0:
        binaries.append(("ligera-jailed", args.ligera, []))
    for name, binary, extra in binaries:
        proc = subprocess.Popen([binary, "run", "--kernel", hold, "--memory", f"{mem}M", *extra],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        if wait_output(proc, b"x", 10) is None:
            stop(proc)
            sys.exit(f"the halting tiny guest did not start under {name}")
        vm = vm_process(proc.pid)
        outside, guest = smaps_outside_guest(vm, mem << 20)
        supervisor = smaps_rollup(proc.pid, "Pss") if vm != proc.pid else 0
        stop(proc)
        print(f"{name} memory outside the guest-memory mapping (smaps RSS): {outside / 1024:.2f} MiB "
              f"(target <= 3 MiB: {'met' if outside <= 3 * 1024 else 'NOT met'}); "
              f"guest memory touched: {guest / 1024:.2f} MiB")
        if supervisor:
            print(f"{name} jail supervisor process (smaps PSS): {supervisor / 1024:.2f} MiB")

    if args.linux:
        kernel = args.kernel or os.path.join(image_path("build-guest-kernel.sh"), "vmlinux")
        initrd = args.initrd or image_path("build-initramfs.sh")
        cmdline = ("console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux "
                   "i8042.nopnp i8042.dumbkbd rodata=off percpu_alloc=page noreplace-smp "
                   "keep_initmem quiet")
        if os.path.exists("/sys/module/kvm_pvm"):
            # The same workaround ligera adds by itself on this host.
            cmdline += (" clearcpuid=151,154,155,156,293,304,147,148,137,153,140,150,157,158,"
                        "291,296,297,580,308,295,288,145,298,306,307,311,312,317,534,514")
        lcmd = [args.ligera, "run", "--kernel", kernel, "--initrd", initrd, "--memory", "128M",
                "--cmdline", cmdline, "--no-host-quirks"]
        qcmd = QEMU_MICROVM + ["-cpu", QEMU_CPU, "-m", "128", "-smp", "1", "-kernel", kernel,
                               "-initrd", initrd, "-append", cmdline]
        times = {"ligera": [], "qemu": []}
        for _ in range(args.linux_runs):
            for name, cmd in (("ligera", lcmd), ("qemu", qcmd)):
                t = linux_time(cmd, b"LIGERA-INIT-OK", 120)
                if t is None:
                    print(f"{name}: no init marker within 120 s")
                else:
                    times[name].append(t)
        print(f"Linux boot to the init marker ({kernel}), {args.linux_runs} interleaved runs each:")
        for name, ts in times.items():
            if ts:
                print(f"{name:<8} median {median_ms(ts) / 1e3:6.2f} s  (min {min(ts):.2f}, max {max(ts):.2f})")
        if times["ligera"] and times["qemu"]:
            r = statistics.median(times["ligera"]) / statistics.median(times["qemu"])
            print(f"ratio ligera/qemu: {r:.2f}x (target <= 1)")


if __name__ == "__main__":
    main()
