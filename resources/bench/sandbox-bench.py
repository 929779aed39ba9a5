#!/usr/bin/env python3
"""Sandbox benchmark: what `ligera sandbox run` costs, side by side, in one run.

1. N interleaved runs (after one warm-up) of
     sandbox   ligera sandbox run --image IMAGE -- true   (image cached,
               started from its cached snapshot)
     sandbox-cold  the same with LIGERA_SANDBOX_SNAPSHOT=off: booted
     runc      runc run of a bundle whose root is the same image's files,
               process `true`
     boot      ligera run of the same kernel to its init (the tiny
               initramfs: prints its marker and reboots), no agent or image
   with the median wall time (exec to exit) and CPU time (user + system of
   the process and its children, from wait4), and ligera's peak memory
   outside the guest-RAM mapping (sampled from /proc/PID/smaps while the
   sandbox runs), alone and per sandbox with --density N of them running
   `sleep 10` at once (the binary's pages are shared between them).
2. Preparing a ~50 MB image the first time (`ligera image pull` of an OCI
   layout into an empty cache: unpack + mkfs.ext4) against `tar -xzf` of
   its layer plus the same `mkfs.ext4 -d`.

Targets (issue 7): sandbox <= 1.1x boot; preparation <= 2x tar + mkfs;
ligera's own memory <= 4 MiB. These machines are shared and noisy, and
their KVM emulates guest code: compare the ratios of one run.
"""
import argparse
import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
_spec = importlib.util.spec_from_file_location("boot_bench", os.path.join(HERE, "boot-bench.py"))
boot_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(boot_bench)


def progress(msg):
    print(f"sandbox-bench: {msg}", file=sys.stderr, flush=True)


def runc_bundle(work, rootfs):
    """An OCI bundle for runc: the image's files, process `true`."""
    bundle = os.path.join(work, "bundle")
    shutil.copytree(rootfs, os.path.join(bundle, "rootfs"), symlinks=True)
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    path = os.path.join(bundle, "config.json")
    with open(path) as f:
        spec = json.load(f)
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["true"]
    spec["root"] = {"path": "rootfs", "readonly": True}
    with open(path, "w") as f:
        json.dump(spec, f)
    return bundle


def sandboxes_sampled(ligera, image, memory_mib, env, argv, n):
    """n sandboxes run at once (`ligera sandbox run -- argv`), sampling
    ligera's memory outside guest RAM in their processes (each one's jail
    supervisor and VM process): their PSS (the binary's pages they share
    count once in the total) and their private dirty memory (what each
    further sandbox adds: clean pages of the binary are shared by every
    sandbox through the page cache). Returns (peak total PSS KiB, peak
    total private dirty KiB, exit statuses)."""
    procs = [subprocess.Popen([ligera, "sandbox", "run", "--memory", f"{memory_mib}M",
                               "--image", image, "--", *argv],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env) for _ in range(n)]
    peak = {"Pss:": 0, "Private_Dirty:": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            pids = []
            for proc in procs:
                try:
                    with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
                        pids += [proc.pid, *map(int, f.read().split())]
                except (OSError, ValueError):
                    pass
            total = dict.fromkeys(peak, 0)
            for p in pids:
                try:
                    found = boot_bench.smaps_outside_guest_keys(p, memory_mib << 20, tuple(peak))
                except (OSError, ValueError):
                    continue
                for key in peak:
                    total[key] += found[key][0]
            for key in peak:
                peak[key] = max(peak[key], total[key])
            time.sleep(0.1)

    t = threading.Thread(target=sample)
    t.start()
    try:
        statuses = [proc.wait() for proc in procs]
    finally:
        done.set()
        t.join()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return peak["Pss:"], peak["Private_Dirty:"], statuses


def fifty_mb_layout(work, source, target_mb):
    """An OCI image layout with one gzip layer of about target_mb of files
    from the host directory `source`; returns (layout dir, layer path)."""
    layout = os.path.join(work, "layout-50mb")
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    raw = io.BytesIO()
    total = 0
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for dirpath, dirnames, filenames in os.walk(source):
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not os.path.isfile(path) or os.path.islink(path):
                    continue
                tar.add(path, arcname=os.path.relpath(path, "/"))
                total += os.path.getsize(path)
                if total >= target_mb << 20:
                    break
            if total >= target_mb << 20:
                break
    diff_id = hashlib.sha256(raw.getvalue()).hexdigest()
    layer = gzip.compress(raw.getvalue(), compresslevel=1)

    def blob(data, media):
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(blobs, digest), "wb") as f:
            f.write(data)
        return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}

    layer_desc = blob(layer, "application/vnd.oci.image.layer.v1.tar+gzip")
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]}}).encode()
    manifest = json.dumps({"schemaVersion": 2,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "config": blob(config, "application/vnd.oci.image.config.v1+json"),
                           "layers": [layer_desc]}).encode()
    index = {"schemaVersion": 2,
             "manifests": [blob(manifest, "application/vnd.oci.image.manifest.v1+json")]}
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    layer_path = os.path.join(blobs, layer_desc["digest"].split(":")[1])
    return layout, layer_path, total


def tar_and_mkfs(work, layer):
    """The baseline: tar -xzf the layer, then mkfs.ext4 -d as ligera runs it."""
    d = tempfile.mkdtemp(dir=work)
    start = time.perf_counter()
    subprocess.run(["tar", "-xzf", layer, "-C", d], check=True)
    size = int(subprocess.run(["du", "-sb", d], check=True, stdout=subprocess.PIPE,
                              text=True).stdout.split()[0])
    img = d + ".ext4"
    with open(img, "wb") as f:
        f.truncate(((size + size // 4 + (8 << 20)) + (1 << 20) - 1) // (1 << 20) << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", "-E",
                    "lazy_itable_init=0,lazy_journal_init=0", "-d", d, img], check=True)
    elapsed = time.perf_counter() - start
    shutil.rmtree(d)
    os.remove(img)
    return elapsed


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ligera", default=os.path.join(
        ROOT, "target/x86_64-unknown-linux-musl/release/ligera"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--memory", type=int, default=256, help="guest MiB")
    ap.add_argument("--image", help="image for the sandbox and runc (default: the busybox "
                    "root file system setup builds)")
    ap.add_argument("--density", type=int, default=10,
                    help="sandboxes running at once for the per-sandbox memory figure")
    ap.add_argument("--prepare-runs", type=int, default=3)
    ap.add_argument("--prepare-source", default="/usr/lib/python3.11",
                    help="host directory whose files make the ~50 MB image")
    args = ap.parse_args()
    boot_bench.exit_on_signals()

    if not os.path.exists(args.ligera):
        sys.exit(f"no {args.ligera}: build with cargo build --release (setup does)")
    kernel_dir = boot_bench.image_path("build-guest-kernel.sh")
    initrd = boot_bench.image_path("build-initramfs.sh")
    rootfs = args.image or boot_bench.image_path("build-sandbox-rootfs.sh")
    work = tempfile.mkdtemp(prefix="ligera-sandbox-bench-")
    try:
        spawn = boot_bench.build_spawn(work)
        bundle = runc_bundle(work, rootfs)
        kernel = os.path.join(kernel_dir, "vmlinux")
        sandbox_cmd = [args.ligera, "sandbox", "run", "--memory", f"{args.memory}M",
                       "--kernel", kernel, "--image", rootfs, "--", "true"]
        boot_cmd = [args.ligera, "run", "--kernel", kernel, "--initrd", initrd,
                    "--memory", f"{args.memory}M"]
        counter = iter(range(1_000_000))

        def runc_cmd():
            return ["runc", "run", "--bundle", bundle, f"ligera-bench-{os.getpid()}-{next(counter)}"]

        progress("warm-up (the image disk is built and cached on the first sandbox run)")
        for cmd in (sandbox_cmd, boot_cmd, runc_cmd()):
            wall, _, _, status = boot_bench.timed_run(spawn, cmd)
            if status != 0:
                sys.exit(f"{cmd[0]} {cmd[1]} exited with {status} in the warm-up")
        results = {"sandbox": [], "sandbox-cold": [], "runc": [], "boot": []}
        started = time.perf_counter()
        for i in range(args.runs):
            for name in results:
                cmd = {"sandbox": sandbox_cmd, "sandbox-cold": sandbox_cmd,
                       "boot": boot_cmd}.get(name) or runc_cmd()
                # sandbox-cold boots the sandbox instead of restoring its snapshot.
                env = {"LIGERA_SANDBOX_SNAPSHOT": "off"} if name == "sandbox-cold" else None
                wall, cpu, _, status = boot_bench.timed_run(spawn, cmd, env)
                if status != 0:
                    sys.exit(f"{name} exited with {status} (run {i + 1})")
                results[name].append((wall, cpu))
            per = (time.perf_counter() - started) / (i + 1)
            progress(f"run {i + 1}/{args.runs} done, about {per * (args.runs - i - 1) / 60:.1f} min left")

        progress("sampling ligera's memory outside guest RAM during one sandbox run")
        env = {**os.environ, "LIGERA_KERNEL": kernel}
        peak_kib, dirty_kib, _ = sandboxes_sampled(args.ligera, rootfs, args.memory, env,
                                                   ["true"], 1)
        progress(f"... and during {args.density} sandboxes running `sleep 10` at once")
        many_kib, many_dirty_kib, statuses = sandboxes_sampled(
            args.ligera, rootfs, args.memory, env, ["sleep", "10"], args.density)
        if any(statuses):
            sys.exit(f"sandboxes running sleep exited with {statuses}")
        progress(f"preparing a ~50 MB image {args.prepare_runs} times each way")
        layout, layer, raw_bytes = fifty_mb_layout(work, args.prepare_source, 50)
        prep_ligera, prep_tar = [], []
        for _ in range(args.prepare_runs):
            cache = tempfile.mkdtemp(dir=work)
            start = time.perf_counter()
            subprocess.run([args.ligera, "image", "pull", layout], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env={**os.environ, "LIGERA_CACHE": cache})
            prep_ligera.append(time.perf_counter() - start)
            shutil.rmtree(cache)
            prep_tar.append(tar_and_mkfs(work, layer))

        print(f"Sandbox `true` vs runc vs a bare boot, {args.memory} MiB guest, "
              f"{args.runs} interleaved runs each (medians):")
        print(f"{'runtime':<12} {'wall s':>9} {'CPU s':>9}")
        med = {}
        for name, rows in results.items():
            med[name] = (statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows))
            print(f"{name:<12} {med[name][0]:9.3f} {med[name][1]:9.3f}")
        sw, sc = med["sandbox"]
        bw, bc = med["boot"]
        rw, rc = med["runc"]
        ratio = sw / bw
        print(f"sandbox / boot: wall {ratio:.2f}x, CPU {sc / bc:.2f}x "
              f"(target <= 1.1x: {'met' if ratio <= 1.1 else 'NOT met'})")
        cw, cc = med["sandbox-cold"]
        print(f"sandbox booted (no snapshot) / boot: wall {cw / bw:.2f}x, CPU {cc / bc:.2f}x")
        print(f"sandbox / runc: wall {sw / rw:.0f}x, CPU {sc / max(rc, 1e-9):.0f}x")
        print(f"ligera's peak memory outside guest RAM during a sandbox run: PSS {peak_kib / 1024:.2f} MiB "
              f"(target <= 4 MiB: {'met' if peak_kib <= 4096 else 'NOT met'}), of which private "
              f"dirty (what each further sandbox adds) {dirty_kib / 1024:.2f} MiB")
        per = many_kib / args.density
        print(f"... per sandbox with {args.density} running at once: PSS {per / 1024:.2f} MiB "
              f"(target <= 4 MiB: {'met' if per <= 4096 else 'NOT met'}), private dirty "
              f"{many_dirty_kib / args.density / 1024:.2f} MiB")
        pl, pt = statistics.median(prep_ligera), statistics.median(prep_tar)
        print(f"preparing a {raw_bytes / 1e6:.0f} MB image: ligera image pull {pl:.2f} s, "
              f"tar -xzf + mkfs.ext4 -d {pt:.2f} s: {pl / pt:.2f}x "
              f"(target <= 2x: {'met' if pl / pt <= 2 else 'NOT met'})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
