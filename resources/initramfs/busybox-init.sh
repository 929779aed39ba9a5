#!/bin/sh
# /init of ligera's busybox test initramfs (run by busybox sh as PID 1).
#
# Mounts /proc, /sys and /dev, prints the marker LIGERA-INIT-OK, runs a command
# if one was given, then restarts (with `reboot=k` the i8042 reset ends the VMM).
#
# The command comes from the kernel command line, either
#   ligera.cmd=word  or  ligera.cmd="several words"   (read from /proc/cmdline)
# or as arguments after `--` (the kernel passes those to init as "$@").
# Its exit status is printed as LIGERA-CMD-EXIT=<n>.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs tmpfs /tmp
exec </dev/console >/dev/console 2>&1

echo LIGERA-INIT-OK
# init's own arguments (what followed `--` on the kernel command line), one
# a line, so tests can check that each arrives intact and in order
for arg in "$@"; do
	echo "LIGERA-INIT-ARG=[$arg]"
done

cmd=$(sed -n -e 's/.*ligera\.cmd="\([^"]*\)".*/\1/p' -e t \
             -e 's/.*ligera\.cmd=\([^ ]*\).*/\1/p' /proc/cmdline)
if [ -z "$cmd" ] && [ $# -gt 0 ]; then
	cmd="$*"
fi
if [ -n "$cmd" ]; then
	sh -c "$cmd"
	echo "LIGERA-CMD-EXIT=$?"
fi

sync
reboot -f
# reboot failed (should not happen): do not let init exit, that would panic
while :; do sleep 3600; done
