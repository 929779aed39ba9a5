#!/usr/bin/env bash
# Build ligera's test initramfs images: uncompressed newc cpio archives, meant
# to be passed to the guest kernel as an external initrd.
#
#   resources/build-initramfs.sh [--busybox | --panic] [--print-path]
#
#   (default)   initramfs-tiny.cpio:    /init from initramfs/init.S (prints
#               LIGERA-INIT-OK, then reboot(2) RESTART; boot with reboot=k)
#   --panic     initramfs-panic.cpio:   the same init, but it exits instead of
#               rebooting, so the kernel panics ("Attempted to kill init!")
#   --busybox   initramfs-busybox.cpio: static busybox with applet links,
#               /init = initramfs/busybox-init.sh (runs ligera.cmd=..., if given)
#               and /bin/vsock-echo (initramfs/vsock-echo.c, built static)
#   --print-path  print only the path of the cpio file on stdout
#
# Output is cached in ${LIGERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ligera}/
# initramfs-<variant>-<hash>/, where <hash> covers every input; an existing
# entry is reused.  The archive is written by this script itself (no cpio tool,
# no root needed for the /dev/console node), with fixed owners and timestamps.
# Needs: gcc (static libc for --busybox), busybox-static (--busybox), sha256sum.
set -euo pipefail
export LC_ALL=C

exec 3>&1 1>&2                  # everything but the result goes to stderr
log() { echo "build-initramfs: $*"; }
die() { echo "build-initramfs: error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
src="$here/initramfs"

variant=tiny
print_path=0
for arg in "$@"; do
	case "$arg" in
	--busybox) variant=busybox ;;
	--panic) variant=panic ;;
	--print-path) print_path=1 ;;
	-h|--help) sed -n '2,/^set -e/p' "$self" | sed -e '$d' -e 's/^# \{0,1\}//' >&3; exit 0 ;;
	*) die "unknown argument: $arg (see --help)" ;;
	esac
done

BUSYBOX=${BUSYBOX:-/bin/busybox}
cache_root=${LIGERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ligera}

# ---- inputs and their hash ----------------------------------------------------
inputs() {  # contents only, so the hash does not depend on where the clone is
	echo "variant $variant"
	(cd "$here" && sha256sum "$(basename "$self")")
	case "$variant" in
	tiny|panic)
		command -v gcc >/dev/null || die "gcc not found (apt-get install gcc)"
		(cd "$here" && sha256sum initramfs/init.S)
		gcc --version | head -n1
		;;
	busybox)
		[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (apt-get install busybox-static)"
		file_is_static "$BUSYBOX" || die "$BUSYBOX is not a static binary (need busybox-static)"
		echo "busybox $(sha256sum <"$BUSYBOX")"
		(cd "$here" && sha256sum initramfs/busybox-init.sh initramfs/vsock-echo.c)
		command -v gcc >/dev/null || die "gcc not found (apt-get install gcc)"
		gcc --version | head -n1
		;;
	esac
}
file_is_static() {
	# a static executable has no PT_INTERP program header; check without `file`
	! LC_ALL=C readelf -l "$1" 2>/dev/null | grep -q 'Requesting program interpreter'
}
hash=$(inputs | sha256sum | cut -c1-16)
name="initramfs-$variant.cpio"
out="$cache_root/initramfs-$variant-$hash"

if [ -f "$out/$name" ]; then
	log "cached: $out/$name"
else
	mkdir -p "$cache_root"
	stage=$(mktemp -d "$cache_root/.initramfs-$variant-$hash.XXXXXX")
	trap 'rm -rf "$stage"' EXIT

	# ---- newc cpio writer ---------------------------------------------------
	cpio_out="$stage/$name"
	: >"$cpio_out"
	ino=0
	pad4() { # pad4 <length so far>: NUL bytes up to a multiple of 4
		local n=$(( (4 - $1 % 4) % 4 ))
		if [ "$n" -gt 0 ]; then head -c "$n" /dev/zero; fi
	}
	entry() { # entry <mode> <nlink> <rdevmajor> <rdevminor> <name> [<data file>]
		local mode=$1 nlink=$2 rmaj=$3 rmin=$4 path=$5 data=${6:-} size=0
		if [ -n "$data" ]; then size=$(stat -c %s "$data"); fi
		ino=$((ino + 1))
		{
			printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
				"$ino" "$mode" 0 0 "$nlink" 0 "$size" 0 0 "$rmaj" "$rmin" \
				$(( ${#path} + 1 )) 0
			printf '%s\0' "$path"
			pad4 $(( 110 + ${#path} + 1 ))
			if [ -n "$data" ]; then cat "$data"; pad4 "$size"; fi
		} >>"$cpio_out"
	}
	dir() { entry $((0040755)) 2 0 0 "$1"; }
	regfile() { entry $((0100755)) 1 0 0 "$1" "$2"; }
	symlink() { # symlink <name> <target>
		printf '%s' "$2" >"$stage/.link"
		entry $((0120777)) 1 0 0 "$1" "$stage/.link"
	}
	chardev() { entry $((0020600)) 1 "$2" "$3" "$1"; }
	trailer() { entry 0 1 0 0 "TRAILER!!!"; }

	case "$variant" in
	tiny|panic)
		log "assembling init.S ($variant)"
		defs=()
		if [ "$variant" = panic ]; then defs=(-DLIGERA_INIT_EXIT); fi
		gcc -nostdlib -static -s -Wl,--build-id=none -Wl,-z,noseparate-code "${defs[@]}" \
			-o "$stage/init" "$src/init.S"
		dir dev
		chardev dev/console 5 1
		dir root
		regfile init "$stage/init"
		;;
	busybox)
		log "packing $BUSYBOX with its applet links"
		for d in bin sbin usr usr/bin usr/sbin dev proc sys tmp root etc mnt; do dir "$d"; done
		chardev dev/console 5 1
		regfile bin/busybox "$BUSYBOX"
		n=0
		while read -r applet; do
			case "$applet" in
			""|bin/busybox) continue ;;
			esac
			symlink "$applet" /bin/busybox
			n=$((n + 1))
		done < <("$BUSYBOX" --list-full)
		[ "$n" -gt 10 ] || die "$BUSYBOX --list-full listed only $n applets"
		log "$n applet links"
		log "building vsock-echo"
		gcc -static -O2 -s -Wall -Wextra -Werror -o "$stage/vsock-echo" "$src/vsock-echo.c"
		regfile bin/vsock-echo "$stage/vsock-echo"
		regfile init "$src/busybox-init.sh"
		;;
	esac
	trailer
	rm -f "$stage/.link" "$stage/init" "$stage/vsock-echo"

	chmod 755 "$stage"
	if ! mv -T "$stage" "$out" 2>/dev/null; then
		rm -rf "$stage"
		[ -f "$out/$name" ] || die "could not publish $out"
		log "another build published $out first; using it"
	fi
	trap - EXIT
	log "built: $out/$name ($(stat -c %s "$out/$name") bytes)"
fi

if [ "$print_path" = 1 ]; then
	echo "$out/$name" >&3
else
	echo "$name: $out/$name" >&3
fi
