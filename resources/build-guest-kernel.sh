#!/usr/bin/env bash
# Build ligera's guest kernel (Linux 6.1 from Debian's linux-source-6.1) with
# the recipe in resources/guest-kernel/: tinyconfig + config-delta.sh + patches.
#
#   resources/build-guest-kernel.sh [--print-path]
#
# Produces vmlinux (ELF with the PVH note: load it directly) and bzImage
# (64-bit boot protocol, LZ4).  Output is cached outside the clone in
#   ${LIGERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ligera}/kernel-<hash>/
# where <hash> covers the source tarball (name, size, Debian package version),
# config-delta.sh, the patches, this script and the compiler version; an
# existing entry is reused ("cached").  A fresh build takes ~3 minutes on
# 2 cores; it runs in a temporary directory (under $TMPDIR, default /tmp),
# and is published atomically.  $CACHE/kernel is a symlink to the latest one.
#
#   --print-path   print only the directory holding vmlinux and bzImage on
#                  stdout (progress goes to stderr in every case)
#
# Environment: LIGERA_CACHE, LIGERA_KERNEL_TARBALL (default
# /usr/src/linux-source-6.1.tar.xz), JOBS (default: number of CPUs),
# LIGERA_KEEP_BUILD=1 keeps the temporary build tree.
# Missing packages (linux-source-6.1 and build tools) are installed with
# apt-get when run as root; otherwise the script says what to install.
set -euo pipefail
export LC_ALL=C

exec 3>&1 1>&2                  # everything but the result goes to stderr
log() { echo "build-guest-kernel: $*"; }
die() { echo "build-guest-kernel: error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
recipe="$here/guest-kernel"

print_path=0
for arg in "$@"; do
	case "$arg" in
	--print-path) print_path=1 ;;
	-h|--help) sed -n '2,/^set -e/p' "$self" | sed -e '$d' -e 's/^# \{0,1\}//' >&3; exit 0 ;;
	*) die "unknown argument: $arg (see --help)" ;;
	esac
done

TARBALL=${LIGERA_KERNEL_TARBALL:-/usr/src/linux-source-6.1.tar.xz}
SOURCE_PKG=linux-source-6.1
cache_root=${LIGERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ligera}
JOBS=${JOBS:-$(nproc 2>/dev/null || echo 2)}
shopt -s nullglob
patches=("$recipe"/patches/*.patch)
shopt -u nullglob
[ -f "$recipe/config-delta.sh" ] || die "$recipe/config-delta.sh missing"
[ "${#patches[@]}" -gt 0 ] || die "no patches in $recipe/patches"

# ---- packages ------------------------------------------------------------------
# tool -> Debian package; libelf is needed by objtool, lz4 for the bzImage.
need_pkgs=()
[ -f "$TARBALL" ] || need_pkgs+=("$SOURCE_PKG")
for pair in gcc:gcc make:make bc:bc flex:flex bison:bison lz4:lz4 xz:xz-utils \
	    perl:perl patch:patch sha256sum:coreutils; do
	command -v "${pair%%:*}" >/dev/null || need_pkgs+=("${pair#*:}")
done
[ -f /usr/include/libelf.h ] || need_pkgs+=(libelf-dev)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
	if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
		log "installing missing Debian packages: ${need_pkgs[*]}"
		DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}" \
			|| { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need_pkgs[@]}"; }
	else
		die "missing Debian packages: ${need_pkgs[*]} (as root: apt-get install ${need_pkgs[*]})"
	fi
fi
[ -f "$TARBALL" ] || die "$TARBALL not found"

# ---- inputs and their hash --------------------------------------------------------
inputs() {
	local pkgver=unknown
	if command -v dpkg-query >/dev/null; then
		pkgver=$(dpkg-query -W -f '${Version}' "$SOURCE_PKG" 2>/dev/null || echo unknown)
	fi
	echo "tarball $(basename "$TARBALL") $(stat -c %s "$TARBALL") $SOURCE_PKG=$pkgver"
	(cd "$here" && sha256sum "guest-kernel/config-delta.sh" "${patches[@]#"$here/"}" \
		"$(basename "$self")")
	gcc --version | head -n1
}
hash=$(inputs | sha256sum | cut -c1-16)
out="$cache_root/kernel-$hash"

publish_link() {
	ln -sfn "kernel-$hash" "$cache_root/.kernel-link.$$"
	mv -T "$cache_root/.kernel-link.$$" "$cache_root/kernel"
}

if [ -f "$out/vmlinux" ] && [ -f "$out/bzImage" ]; then
	log "cached: $out"
else
	mkdir -p "$cache_root"
	work=$(mktemp -d "${TMPDIR:-/tmp}/ligera-kernel.XXXXXX")
	stage=""
	cleanup() {
		if [ -n "$stage" ]; then rm -rf "$stage"; fi
		if [ "${LIGERA_KEEP_BUILD:-0}" = 1 ]; then
			log "kept build tree: $work"
		else
			rm -rf "$work"
		fi
	}
	trap cleanup EXIT
	start=$SECONDS
	phase() { log "[$1/5] $2 (+$((SECONDS - start)) s)"; }
	src="$work/linux"
	mkdir "$src"

	phase 1 "extracting $(basename "$TARBALL") into $work"
	tar -xf "$TARBALL" -C "$src" --strip-components=1

	phase 2 "applying ${#patches[@]} patches"
	for p in "${patches[@]}"; do
		log "  $(basename "$p")"
		patch -d "$src" -p1 --batch --forward --quiet <"$p"
	done

	phase 3 "configuring (tinyconfig + config-delta.sh)"
	mk() { make -C "$src" ARCH=x86_64 KBUILD_BUILD_USER=ligera KBUILD_BUILD_HOST=ligera "$@"; }
	mk -s tinyconfig >/dev/null
	(cd "$src" && sh "$recipe/config-delta.sh")
	mk -s olddefconfig
	# Kconfig drops options whose dependencies are unmet without a word; check
	# the ones the VMM relies on.
	missing=()
	for sym in 64BIT PVH KVM_GUEST SMP KERNEL_LZ4 SERIAL_8250_CONSOLE VIRTIO_MMIO \
		   VIRTIO_MMIO_CMDLINE_DEVICES VIRTIO_BLK VIRTIO_NET HW_RANDOM_VIRTIO \
		   VSOCKETS VIRTIO_VSOCKETS NET INET PACKET EXT4_FS DEVTMPFS \
		   DEVTMPFS_MOUNT PROC_FS SYSFS TMPFS BLK_DEV_INITRD BINFMT_ELF \
		   BINFMT_SCRIPT PVPANIC_ISA_PORT CRYPTO_MANAGER_DISABLE_TESTS UNIX98_PTYS SYSVIPC \
		   NO_HZ_IDLE; do
		grep -qx "CONFIG_$sym=y" "$src/.config" || missing+=("$sym")
	done
	for sym in MODULES ACPI PCI RTC_CLASS VT LEGACY_PTYS PTP_1588_CLOCK_KVM \
		   RANDOMIZE_BASE JUMP_LABEL KPROBES FTRACE RD_GZIP; do
		if grep -q "^CONFIG_$sym=" "$src/.config"; then missing+=("!$sym"); fi
	done
	[ "${#missing[@]}" -eq 0 ] || die "kernel config does not match the recipe: ${missing[*]}"
	log "  $(grep -c '=y$' "$src/.config") options enabled, NR_CPUS=$(sed -n 's/^CONFIG_NR_CPUS=//p' "$src/.config")"

	phase 4 "compiling vmlinux and bzImage with make -j$JOBS (~3 min on 2 cores)"
	mk -j"$JOBS" vmlinux bzImage

	phase 5 "publishing to $out"
	stage=$(mktemp -d "$cache_root/.kernel-$hash.XXXXXX")
	cp "$src/vmlinux" "$src/arch/x86/boot/bzImage" "$src/System.map" "$stage/"
	cp "$src/.config" "$stage/config"
	{
		echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start)) s"
		echo "kernel $(mk -s --no-print-directory kernelrelease)"
		inputs
	} >"$stage/inputs.txt"
	chmod 755 "$stage"
	if mv -T "$stage" "$out" 2>/dev/null; then
		stage=""
	else
		[ -f "$out/vmlinux" ] || die "could not publish $out"
		log "another build published $out first; using it"
	fi
	log "done in $((SECONDS - start)) s"
fi
publish_link

if [ "$print_path" = 1 ]; then
	echo "$out" >&3
else
	log "$cache_root/kernel -> kernel-$hash"
	echo "vmlinux: $out/vmlinux" >&3
	echo "bzImage: $out/bzImage" >&3
fi
