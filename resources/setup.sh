#!/usr/bin/env bash
# Sets up a Debian 12 machine for ligera: installs the Debian packages it
# needs, builds ligera, the guest kernel and the initramfs (cached outside the
# clone, see resources/guest-kernel/README.md), then boots the demo guest.
#
#   resources/setup.sh            everything, then boot the demo guest
#   resources/setup.sh --no-demo  everything but the demo (what the tests use)
set -euo pipefail
cd "$(dirname "$0")/.."

# Every Debian package the build, the tests and the benchmarks use.
PACKAGES=(
    build-essential binutils python3        # ligera's test guests, benchmark launcher
    musl-tools                              # ligera links against musl (.cargo/config.toml): ring's C
    linux-source-6.1 bc flex bison libelf-dev cpio lz4 xz-utils  # guest kernel
    busybox-static                          # initramfs
    qemu-system-x86                         # the benchmark's peer
    iproute2 procps strace curl             # network tests, control socket tests, diagnostics
    e2fsprogs                               # ext4 images (Linux block test, sandbox images)
    docker-registry skopeo apache2-utils    # image tests: a local registry, pushes, htpasswd
    runc                                    # the sandbox benchmark's container peer
    mmdebstrap                              # ligera bench's image (sysbench, fio, iperf3, socat)
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing Debian packages: ${missing[*]}" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo not found: install a Rust toolchain (1.85 or newer)" >&2
    exit 1
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is not usable by $(id -un): ligera needs KVM" >&2
fi

# ligera is built for musl (.cargo/config.toml): its standard library comes
# from rustup, once per toolchain.
target=x86_64-unknown-linux-musl
if [ ! -d "$(rustc --print sysroot)/lib/rustlib/$target" ]; then
    if ! command -v rustup >/dev/null; then
        echo "setup: the Rust toolchain lacks the $target target, and rustup is not there to add it" >&2
        exit 1
    fi
    echo "setup: adding the Rust target $target (~40 MB download)" >&2
    rustup target add "$target"
fi

echo "setup: building ligera" >&2
cargo build --release

echo "setup: building the guest kernel (first time: ~6 minutes on 2 cores)" >&2
kernel_dir=$(resources/build-guest-kernel.sh --print-path)
echo "setup: building the initramfs" >&2
initrd=$(resources/build-initramfs.sh --print-path)
echo "setup: building the sandbox's default image" >&2
rootfs=$(resources/build-sandbox-rootfs.sh --print-path)
echo "setup: building ligera bench's image (first time: ~1 minute, downloads ~80 MB)" >&2
bench_image=$(resources/build-bench-image.sh --print-path)
echo "setup: guest kernel in $kernel_dir, initramfs $initrd, sandbox image $rootfs, bench image $bench_image" >&2

if [ "${1:-}" = "--no-demo" ]; then
    exit 0
fi
echo "setup: booting the demo guest: 2 vCPUs, 256 MiB; it prints LIGERA-INIT-OK and reboots" >&2
set -x
exec target/$target/release/ligera run --kernel "$kernel_dir/vmlinux" --initrd "$initrd" \
    --cpus 2 --memory 256M
