#!/usr/bin/env bash
# Build the image `ligera bench` runs by default: a Debian 12 root file
# system directory made by mmdebstrap from Debian's packages, with the
# standard tools the suites read their figures from (sysbench, fio, iperf3, socat).
#
#   resources/build-bench-image.sh [--print-path]
#
# Output: ${LIGERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ligera}/bench-image-<hash>/
# with a symlink bench-image -> it; <hash> covers this script (the package
# list and options). Needs root (mmdebstrap's root mode), mmdebstrap and
# Debian's mirror (about 80 MB of packages; ~1 minute here).
set -euo pipefail
export LC_ALL=C

exec 3>&1 1>&2
log() { echo "build-bench-image: $*"; }
die() { echo "build-bench-image: error: $*"; exit 1; }

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

SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
PACKAGES=sysbench,fio,iperf3,socat
cache_root=${LIGERA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ligera}
hash=$(sha256sum <"$self" | cut -c1-16)
out="$cache_root/bench-image-$hash"

if [ -x "$out/usr/bin/sysbench" ]; then
	log "cached: $out"
else
	[ "$(id -u)" -eq 0 ] || die "needs root (mmdebstrap's root mode keeps file owners)"
	command -v mmdebstrap >/dev/null || die "mmdebstrap not found (apt-get install mmdebstrap)"
	mkdir -p "$cache_root"
	stage=$(mktemp -d "$cache_root/.bench-image-$hash.XXXXXX")
	trap 'rm -rf "$stage"' EXIT
	log "debootstrapping Debian $SUITE with $PACKAGES into $stage (downloads ~80 MB)"
	# essential: Debian's Essential:yes set (dash as /bin/sh, coreutils)
	# plus the tools; no documentation, manual pages or translations.
	mmdebstrap --variant=essential --include="$PACKAGES" \
		--dpkgopt='path-exclude=/usr/share/man/*' \
		--dpkgopt='path-exclude=/usr/share/doc/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' \
		--dpkgopt='path-exclude=/usr/share/info/*' \
		"$SUITE" "$stage/rootfs" "$MIRROR" 2>&1 \
		| grep --line-buffered -E '^(I|W|E): ' | sed -u 's/^/build-bench-image: /' || true
	for tool in sysbench fio iperf3 socat; do
		[ -x "$stage/rootfs/usr/bin/$tool" ] || die "mmdebstrap did not install $tool"
	done
	rm -rf "$out"
	mv "$stage/rootfs" "$out"
	log "built $out ($(du -sh "$out" | cut -f1))"
fi
ln -sfn "bench-image-$hash" "$cache_root/bench-image"
if [ "$print_path" = 1 ]; then
	echo "$out" >&3
fi
