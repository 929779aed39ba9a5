#!/bin/sh
# ligera guest kernel configuration (Linux 6.1, x86_64).
#
# Run in the kernel source (or with KCONFIG_CONFIG / O= set up by the caller)
# after `make ARCH=x86_64 tinyconfig`; then run `make ARCH=x86_64 olddefconfig`.
# README.md in this directory explains each group.  Derived from the measured
# recipe for the nested "kvm_pvm" machines, where every guest instruction is
# emulated: everything that costs boot time and is not needed stays off.
set -eu
C="scripts/config ${KCONFIG_CONFIG:+--file $KCONFIG_CONFIG}"

# --- boot protocol / hypervisor -------------------------------------------
# PVH ELF note (vmlinux can be loaded directly), 64-bit boot protocol (bzImage),
# KVM guest support (kvm-clock).  No KASLR: the loaders put us at a fixed place.
$C -e 64BIT -e HYPERVISOR_GUEST -e PARAVIRT -e KVM_GUEST -e PVH
$C -d RANDOMIZE_BASE -d RANDOMIZE_MEMORY
# bzImage: LZ4, the guest decompresses itself slowly when emulated.
$C -d KERNEL_XZ -d KERNEL_GZIP -e KERNEL_LZ4
$C -e SMP --set-val NR_CPUS 8
# kvm-clock is fine, but the KVM PTP driver issues a hypercall (vmcall) at
# init, which never completes on the nested machines.
$C -d PTP_1588_CLOCK -d PTP_1588_CLOCK_KVM

# --- console / printk --------------------------------------------------------
$C -e PRINTK -e PRINTK_TIME -e EARLY_PRINTK -e TTY -e SERIAL_8250 -e SERIAL_8250_CONSOLE
$C --set-val SERIAL_8250_NR_UARTS 1 --set-val SERIAL_8250_RUNTIME_UARTS 1
$C -e KALLSYMS
# Virtual terminals and legacy BSD PTYs off: legacy pty_init (256 pairs)
# alone took 6.7 s here.  UNIX98 PTYs (/dev/ptmx, devpts) are on: the
# sandbox's -t needs them, and they register no devices at boot.
$C -e UNIX98_PTYS -d LEGACY_PTYS -d VT
$C --set-val LOG_BUF_SHIFT 12           # smaller __log_buf in .bss

# --- initramfs: external, uncompressed ------------------------------------------
# The initramfs is passed by the VMM (--initrd / -initrd) as an uncompressed newc
# cpio (a 1 MB gzip one took ~110 s to unpack here).  Built-in one: the kernel's
# default (just /dev, /dev/console, /root).
$C -e BLK_DEV_INITRD --set-str INITRAMFS_SOURCE ""
$C -d RD_GZIP -d RD_BZIP2 -d RD_LZMA -d RD_XZ -d RD_LZO -d RD_LZ4 -d RD_ZSTD

# --- user space ------------------------------------------------------------------
# tinyconfig removes system calls that a static busybox/glibc program expects.
$C -e BINFMT_ELF -e BINFMT_SCRIPT -e X86_IOPL_IOPERM
$C -e MULTIUSER -e FUTEX -e POSIX_TIMERS -e EPOLL -e SIGNALFD -e TIMERFD -e EVENTFD
$C -e FILE_LOCKING -e SHMEM
# System V IPC: fio (the bench's disk suite) and databases need shmget.
$C -e SYSVIPC
$C -e PROC_FS -e SYSFS -e TMPFS -e DEVTMPFS -e DEVTMPFS_MOUNT

# --- devices: virtio-mmio, described on the kernel command line ------------------
$C -e BLOCK -e BLK_DEV -e VIRTIO_MENU -e VIRTIO -e VIRTIO_MMIO -e VIRTIO_MMIO_CMDLINE_DEVICES
$C -e VIRTIO_BLK
$C -e HW_RANDOM -e HW_RANDOM_VIRTIO
$C -e EXT4_FS
# ligera sandbox: the writable layer over the image is an overlay.
$C -e OVERLAY_FS

# --- networking: IPv4, packet sockets, virtio-net, vsock ------------------------
$C -e NET -e INET -e PACKET -e UNIX -d IPV6
$C -d INET_DIAG -d SYN_COOKIES -d ETHTOOL_NETLINK -d WIRELESS -d WLAN -d ETHERNET
$C -e NETDEVICES -e NET_CORE -e VIRTIO_NET
$C -e VSOCKETS -e VIRTIO_VSOCKETS -d VSOCKETS_DIAG -d VSOCKETS_LOOPBACK

# --- panic reporting (patch 0003) ------------------------------------------------
$C -e PVPANIC -e PVPANIC_ISA_PORT -d PVPANIC_MMIO -d PVPANIC_PCI

# --- less work ---------------------------------------------------------------------
$C -d ACPI -d PCI -d RTC_CLASS -d INPUT -d MODULES
$C -d INIT_STACK_ALL_ZERO -e INIT_STACK_NONE
$C -d HZ_250 -e HZ_100 --set-val HZ 100
# tickless when idle: a periodic tick wakes an idle guest 100 times a second,
# and each wake-up is emulated guest work (an idle sandbox cost ~12% of a host CPU)
$C -d HZ_PERIODIC -e NO_HZ_IDLE
# no int3: no jump labels, kprobes or ftrace (tinyconfig has them off; make sure)
$C -d JUMP_LABEL -d KPROBES -d FTRACE
# crypto self-tests off (blake2s self-test alone: 4 s)
$C -e CRYPTO -e CRYPTO_MANAGER_DISABLE_TESTS
