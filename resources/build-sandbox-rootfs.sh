#!/usr/bin/env bash
# Build the default image of `ligera sandbox`: a root file system directory
# with Debian's static busybox and its applets, plus /etc/passwd, /etc/group
# and the usual empty directories.
#
#   resources/build-sandbox-rootfs.sh [--print-path]
#
# Output: ${LIGERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ligera}/rootfs-busybox-<hash>/
# with a symlink rootfs-busybox -> it (what ligera uses when no --image is
# given); <hash> covers busybox and this script. Needs busybox-static.
set -euo pipefail
export LC_ALL=C

exec 3>&1 1>&2
log() { echo "build-sandbox-rootfs: $*"; }
die() { echo "build-sandbox-rootfs: error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
self="$here/$(basename "${BASH_SOURCE[0]}")"
print_path=0
for arg in "$@"; do
	case "$arg" in
	--print-path) print_path=1 ;;
	-h|--help) sed -n '2,/^set -e/p' "$self" | sed -e '$d' -e 's/^# \{0,1\}//' >&3; exit 0 ;;
	*) die "unknown argument: $arg (see --help)" ;;
	esac
done

BUSYBOX=${BUSYBOX:-/bin/busybox}
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found (apt-get install busybox-static)"
readelf -l "$BUSYBOX" 2>/dev/null | grep -q 'Requesting program interpreter' \
	&& die "$BUSYBOX is not a static binary (need busybox-static)"
cache_root=${LIGERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ligera}
hash=$({ sha256sum <"$BUSYBOX"; sha256sum <"$self"; } | sha256sum | cut -c1-16)
out="$cache_root/rootfs-busybox-$hash"

if [ -x "$out/bin/busybox" ]; then
	log "cached: $out"
else
	mkdir -p "$cache_root"
	stage=$(mktemp -d "$cache_root/.rootfs-busybox-$hash.XXXXXX")
	trap 'rm -rf "$stage"' EXIT
	log "populating $stage with $BUSYBOX and its applets"
	for d in bin sbin usr/bin usr/sbin etc root tmp proc sys dev run var/tmp home; do
		mkdir -p "$stage/$d"
	done
	chmod 1777 "$stage/tmp" "$stage/var/tmp"
	chmod 700 "$stage/root"
	install -m 755 "$BUSYBOX" "$stage/bin/busybox"
	n=0
	while read -r applet; do
		case "$applet" in ""|bin/busybox) continue ;; esac
		mkdir -p "$stage/$(dirname "$applet")"
		ln -sf /bin/busybox "$stage/$applet"
		n=$((n + 1))
	done < <("$BUSYBOX" --list-full)
	[ "$n" -gt 10 ] || die "$BUSYBOX --list-full listed only $n applets"
	printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$stage/etc/passwd"
	printf 'root:x:0:\nnogroup:x:65534:\n' >"$stage/etc/group"
	echo sandbox >"$stage/etc/hostname"
	chmod 755 "$stage"
	if ! mv -T "$stage" "$out" 2>/dev/null; then
		rm -rf "$stage"
		[ -x "$out/bin/busybox" ] || die "could not publish $out"
	fi
	trap - EXIT
	log "built: $out ($n applets)"
fi
ln -sfn "$(basename "$out")" "$cache_root/rootfs-busybox"
if [ "$print_path" = 1 ]; then echo "$out" >&3; else echo "rootfs: $out" >&3; fi
