#!/usr/bin/env python3
"""Snapshot and Firecracker-API benchmark (issue 10), side by side in one run.

1. restore: a Linux guest (the busybox initramfs running a vsock echo
   server) is booted and snapshotted once at 128 MiB and once at 2 GiB.
   Then N interleaved rounds of
     restore-128M   ligera snapshot restore of the 128 MiB snapshot
     restore-2G     ligera snapshot restore of the 2 GiB snapshot
     cold-128M      ligera run booting the same VM
   each timed from exec to its first KVM_RUN (ligera's debug line
   "vCPU I: first KVM_RUN (CLOCK_MONOTONIC N ns)", written by the vCPU
   thread just before it first enters the guest, against the bench's own
   CLOCK_MONOTONIC before exec) and from exec to the guest answering on
   vsock (an echo through the guest's server). Each run starts once the
   processes of the one before are gone (a VM's teardown outlives it).
2. sandbox: N interleaved `ligera sandbox run -- true` from the cached
   snapshot and with --no-snapshot (a cold boot), wall time.
3. density: host memory (PSS of every process of the sandbox, so pages
   shared through the page cache count once in total) of 1 sandbox, then of
   10 started at once from one snapshot.
4. api: `firecracker` (a link to ligera): PUT /actions InstanceStart to the
   first KVM_RUN, against `ligera run` exec to first KVM_RUN of the same
   VM; and 1000 GET /machine-config on one connection.

Targets: restore to first KVM_RUN <= 5 ms at 128 MiB and within 1.5x of
that at 2 GiB; sandbox from a snapshot <= 0.1x its cold boot; 10 sandboxes
< 3x the memory of one; InstanceStart to first KVM_RUN <= ligera run's
exec to first KVM_RUN; 1000 GET /machine-config < 1 s. These machines are
shared and noisy and emulate guest code: compare the ratios of one run.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CMDLINE = ("console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.nopnp "
           "i8042.dumbkbd rodata=off percpu_alloc=page noreplace-smp keep_initmem quiet")
KVM_RUN = re.compile(rb"vCPU \d+: first KVM_RUN \(CLOCK_MONOTONIC (\d+) ns\)")
_spec = importlib.util.spec_from_file_location("boot_bench", os.path.join(HERE, "boot-bench.py"))
boot_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(boot_bench)
image_path = boot_bench.image_path


def progress(msg):
    print(f"snapshot-bench: {msg}", file=sys.stderr, flush=True)


def stop(proc, sig=signal.SIGTERM):
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def vsock_echo(path, deadline):
    """Connects to guest port 5000 through the hybrid-vsock socket and has
    one byte echoed; returns when it has, or raises at the deadline."""
    while time.monotonic() < deadline:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            s.connect(path)
            s.sendall(b"CONNECT 5000\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = s.recv(64)
                if not chunk:
                    break
                answer += chunk
            if answer.startswith(b"OK "):
                s.sendall(b"x")
                if s.recv(1) == b"x":
                    s.close()
                    return
            s.close()
        except OSError:
            pass
        time.sleep(0.005)
    raise TimeoutError(f"no echo through {path}")


class Timed:
    """A ligera process started with debug logging, timed from just before
    its exec (posix_spawn: no fork of this Python process in the way)."""

    def __init__(self, cmd):
        self.log = tempfile.TemporaryFile()
        null = os.open(os.devnull, os.O_RDWR)
        actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                   (os.POSIX_SPAWN_DUP2, self.log.fileno(), 2)]
        self.t0 = time.monotonic_ns()
        self.pid = os.posix_spawn(cmd[0], cmd, os.environ, file_actions=actions)
        os.close(null)
        self.status = None

    def poll(self):
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
        return self.status

    def kvm_run_ns(self, since=None, timeout=60):
        """CLOCK_MONOTONIC of the first KVM_RUN, less `since` (default: exec)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.log.seek(0)
            m = KVM_RUN.search(self.log.read())
            if m:
                return int(m.group(1)) - (self.t0 if since is None else since)
            if self.poll() is not None:
                break
            time.sleep(0.001)
        self.log.seek(0)
        raise RuntimeError("no 'first KVM_RUN' line: " + self.log.read()[-2000:].decode(errors="replace"))

    def end(self):
        if self.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while self.poll() is None:
                if time.monotonic() > deadline:
                    os.kill(self.pid, signal.SIGKILL)
                    os.waitpid(self.pid, 0)
                    break
                time.sleep(0.005)
        self.log.close()


def linux_vm_args(kernel, initrd, mib, vsock, extra=()):
    return ["--kernel", kernel, "--initrd", initrd, "--memory", f"{mib}M",
            "--cmdline", f'{CMDLINE} ligera.cmd="while :; do vsock-echo 5000; done"',
            "--vsock", f"cid=3,socket={vsock}", *extra]


def make_snapshot(ligera, kernel, initrd, mib, work):
    d = os.path.join(work, f"snap-{mib}")
    os.makedirs(d)
    api, vsock = os.path.join(d, "api.sock"), os.path.join(d, "v.sock")
    proc = subprocess.Popen([ligera, "run", *linux_vm_args(kernel, initrd, mib, vsock),
                             "--serial", "none", "--api-sock", api],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    try:
        vsock_echo(vsock, time.monotonic() + 600)
        subprocess.run([ligera, "snapshot", "create", "--api-sock", api,
                        "--state", os.path.join(d, "state"), "--memory", os.path.join(d, "memory")],
                       check=True)
    finally:
        stop(proc)
    du = subprocess.run(["du", "-k", os.path.join(d, "memory")], stdout=subprocess.PIPE,
                        text=True).stdout.split()[0]
    progress(f"{mib} MiB snapshot: {int(du) / 1024:.1f} MiB of memory file on disk")
    return d


def to_answer(cmd, vsock, timeout):
    """Runs a ligera command line (with debug logging) until the guest
    answers on `vsock`; returns (exec -> first KVM_RUN, exec -> answer) in ms."""
    t = Timed(cmd)
    try:
        kvm = t.kvm_run_ns()
        vsock_echo(vsock, time.monotonic() + timeout)
        return kvm / 1e6, (time.monotonic_ns() - t.t0) / 1e6
    finally:
        t.end()


def restore_round(ligera, snap, work):
    vsock = os.path.join(work, "restore-v.sock")
    return to_answer([ligera, "--log-level", "debug", "snapshot", "restore",
                      "--state", os.path.join(snap, "state"), "--memory", os.path.join(snap, "memory"),
                      "--serial", "none", "--vsock-socket", vsock], vsock, 120)


def cold_round(ligera, kernel, initrd, mib, work):
    vsock = os.path.join(work, "cold-v.sock")
    return to_answer([ligera, "--log-level", "debug", "run",
                      *linux_vm_args(kernel, initrd, mib, vsock, ["--serial", "none"])], vsock, 600)


def quiesce(ligera, timeout=10):
    """Waits until no process of `ligera` is left: a stopped VM's memory is
    freed and its VM destroyed by a child that outlives it, which would
    otherwise share the CPUs with the next timed run."""
    exe = os.path.realpath(ligera)

    def running():
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{p}/exe") == exe:
                    return True
            except OSError:
                pass
        return False

    deadline = time.monotonic() + timeout
    while running() and time.monotonic() < deadline:
        time.sleep(0.01)


def descendants(pid):
    """pid and every process under it."""
    children = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open(f"/proc/{p}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(p))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def pss_kib(pids):
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def sandbox_pids(name):
    for base in ("/run/ligera", os.path.join(os.environ.get("XDG_RUNTIME_DIR", "/nonexistent"), "ligera")):
        try:
            with open(os.path.join(base, f"sb-{name}", "pid")) as f:
                return descendants(int(f.read()))
        except OSError:
            continue
    return []


def density(ligera, n):
    names = [f"snapbench-{os.getpid()}-{i}" for i in range(n)]
    try:
        procs = [subprocess.Popen([ligera, "sandbox", "create", "--name", name],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
                 for name in names]
        for p in procs:
            if p.wait(900) != 0:
                raise RuntimeError("sandbox create failed")
        # Let each guest settle after its first command-ready point.
        time.sleep(2)
        return sum(pss_kib(sandbox_pids(name)) for name in names)
    finally:
        subprocess.run([ligera, "sandbox", "rm", "-f", *names], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


class Api:
    """HTTP/1.1 over the API socket, one keep-alive connection."""

    def __init__(self, path):
        deadline = time.monotonic() + 10
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.s.connect(path)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        self.buf = b""

    def request(self, method, path, body=None):
        data = b"" if body is None else json.dumps(body).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(data)}\r\n"
        if data:
            head += "Content-Type: application/json\r\n"
        self.s.sendall(head.encode() + b"\r\n" + data)
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.s.recv(65536)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status = int(head.split()[1])
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(self.buf) < length:
            self.buf += self.s.recv(65536)
        body, self.buf = self.buf[:length], self.buf[length:]
        if status >= 300:
            raise RuntimeError(f"{method} {path}: {status} {body!r}")
        return body


def api_round(link, kernel, initrd, work):
    sock = os.path.join(work, "fc.sock")
    vsock = os.path.join(work, "fc-v.sock")
    t = Timed([link, "--api-sock", sock, "--level", "Debug"])
    try:
        api = Api(sock)
        api.request("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
        api.request("PUT", "/boot-source", {"kernel_image_path": kernel, "initrd_path": initrd,
                                            "boot_args": f'{CMDLINE} ligera.cmd="while :; do vsock-echo 5000; done"'})
        api.request("PUT", "/vsock", {"guest_cid": 3, "uds_path": vsock})
        start = time.monotonic_ns()
        api.request("PUT", "/actions", {"action_type": "InstanceStart"})
        kvm = t.kvm_run_ns(since=start) / 1e6
        t1 = time.perf_counter()
        for _ in range(1000):
            api.request("GET", "/machine-config")
        gets = time.perf_counter() - t1
        return kvm, gets
    finally:
        t.end()


def run_exec_to_kvm(ligera, kernel, initrd, work):
    t = Timed([ligera, "--log-level", "debug", "run",
               *linux_vm_args(kernel, initrd, 128, os.path.join(work, "run-v.sock"),
                              ["--serial", "none"])])
    try:
        return t.kvm_run_ns() / 1e6
    finally:
        t.end()


def med(xs):
    return statistics.median(xs)


def show(name, xs, unit="ms"):
    print(f"  {name:<34} median {med(xs):10.2f} {unit}   (min {min(xs):.2f}, max {max(xs):.2f}, n={len(xs)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ligera", default=os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release/ligera"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--density", type=int, default=10)
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: restore,sandbox,density,api")
    args = ap.parse_args()
    boot_bench.exit_on_signals()
    skip = set(filter(None, args.skip.split(",")))
    if not os.access(args.ligera, os.X_OK):
        sys.exit(f"no {args.ligera}: build with cargo build --release (setup does)")
    kernel = os.path.join(image_path("build-guest-kernel.sh"), "vmlinux")
    initrd = image_path("build-initramfs.sh", "--busybox")
    work = tempfile.mkdtemp(prefix="ligera-snapshot-bench-")
    print(f"snapshot-bench: {time.strftime('%Y-%m-%d %H:%M')} on {os.uname().nodename}, "
          f"{args.runs} interleaved rounds")
    try:
        if "restore" not in skip:
            progress("booting and snapshotting the Linux guest at 128 MiB and 2 GiB")
            snaps = {mib: make_snapshot(args.ligera, kernel, initrd, mib, work) for mib in (128, 2048)}
            r = {k: ([], []) for k in ("restore-128M", "restore-2G", "cold-128M")}
            for i in range(args.runs):
                progress(f"restore round {i + 1}/{args.runs}")
                for k, f in (("restore-128M", lambda: restore_round(args.ligera, snaps[128], work)),
                             ("restore-2G", lambda: restore_round(args.ligera, snaps[2048], work)),
                             ("cold-128M", lambda: cold_round(args.ligera, kernel, initrd, 128, work))):
                    quiesce(args.ligera)
                    kvm, answered = f()
                    r[k][0].append(kvm)
                    r[k][1].append(answered)
            print("restore (exec -> first KVM_RUN; exec -> guest answers on vsock):")
            for k, (kvm, answered) in r.items():
                show(f"{k} to first KVM_RUN", kvm)
                show(f"{k} to vsock answer", answered)
            print(f"  2 GiB / 128 MiB restore to KVM_RUN: {med(r['restore-2G'][0]) / med(r['restore-128M'][0]):.2f}x"
                  f"; restore / cold boot to answer: {med(r['restore-128M'][1]) / med(r['cold-128M'][1]):.4f}x")
        if "sandbox" not in skip:
            progress("sandbox: warming the image and snapshot caches")
            subprocess.run([args.ligera, "sandbox", "run", "--", "true"], check=True)
            s = {"snapshot": [], "cold": []}
            for i in range(args.runs):
                for k, extra in (("snapshot", []), ("cold", ["--no-snapshot"])):
                    progress(f"sandbox round {i + 1}/{args.runs}: {k}")
                    t0 = time.perf_counter()
                    subprocess.run([args.ligera, "sandbox", "run", *extra, "--", "true"], check=True)
                    s[k].append(time.perf_counter() - t0)
            print("sandbox run -- true (exec -> exit):")
            show("from the snapshot", s["snapshot"], "s")
            show("cold boot (--no-snapshot)", s["cold"], "s")
            print(f"  snapshot / cold: {med(s['snapshot']) / med(s['cold']):.3f}x")
        if "density" not in skip:
            progress("density: 1 sandbox")
            one = density(args.ligera, 1)
            progress(f"density: {args.density} sandboxes at once")
            many = density(args.ligera, args.density)
            print(f"density (PSS of every sandbox process, guest RAM included):")
            print(f"  1 sandbox: {one / 1024:.1f} MiB; {args.density} sandboxes: {many / 1024:.1f} MiB"
                  f" = {many / max(one, 1):.2f}x one")
        if "api" not in skip:
            link = os.path.join(work, "firecracker")
            os.symlink(args.ligera, link)
            a = {"start": [], "run": [], "gets": []}
            for i in range(args.runs):
                progress(f"api round {i + 1}/{args.runs}")
                quiesce(args.ligera)
                kvm, gets = api_round(link, kernel, initrd, work)
                a["start"].append(kvm)
                a["gets"].append(gets)
                quiesce(args.ligera)
                a["run"].append(run_exec_to_kvm(args.ligera, kernel, initrd, work))
            print("Firecracker API:")
            show("InstanceStart -> first KVM_RUN", a["start"])
            show("ligera run exec -> first KVM_RUN", a["run"])
            show("1000 GET /machine-config", a["gets"], "s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
