/*
 * ligera tiny init: x86-64, no libc, no SSE, only the `syscall` instruction
 * (`int $0x80` gets #UD on the nested test machines).
 *
 *   1. open("/dev/console", O_WRONLY); if that fails, use fd 1
 *   2. write "LIGERA-INIT-OK\n"
 *   3. reboot(2) with LINUX_REBOOT_CMD_RESTART: with the kernel parameter
 *      `reboot=k` the kernel resets through the i8042 keyboard controller,
 *      which ends the VMM (without ACPI a power-off would only halt the CPU).
 *
 * Built with -DLIGERA_INIT_EXIT, step 3 becomes exit(1) instead: the kernel
 * then panics ("Attempted to kill init!"), which tests the panic path (pvpanic).
 *
 * Build: gcc -nostdlib -static -s -Wl,-z,noseparate-code -o init init.S
 * (one 4 KiB-aligned segment: a ~600-byte binary; see build-initramfs.sh)
 */
#define SYS_write	1
#define SYS_open	2
#define SYS_exit	60
#define SYS_reboot	169
#define O_WRONLY	1

	.globl	_start
	.text
_start:
	mov	$SYS_open, %eax
	lea	console(%rip), %rdi
	mov	$O_WRONLY, %esi
	xor	%edx, %edx
	syscall
	mov	%eax, %edi		/* fd */
	test	%eax, %eax
	jns	1f
	mov	$1, %edi		/* open failed: fall back to fd 1 */
1:	mov	$SYS_write, %eax
	lea	msg(%rip), %rsi
	mov	$msglen, %edx
	syscall
#ifdef LIGERA_INIT_EXIT
	mov	$SYS_exit, %eax
	mov	$1, %edi
	syscall
#else
	mov	$SYS_reboot, %eax
	mov	$0xfee1dead, %edi	/* LINUX_REBOOT_MAGIC1 */
	mov	$0x28121969, %esi	/* LINUX_REBOOT_MAGIC2 */
	mov	$0x01234567, %edx	/* LINUX_REBOOT_CMD_RESTART */
	xor	%r10d, %r10d
	syscall
#endif
2:	jmp	2b			/* not reached (reboot failed: spin) */

	.section .rodata
console: .asciz	"/dev/console"
msg:	.ascii	"LIGERA-INIT-OK\n"
	msglen = . - msg

	.section .note.GNU-stack, "", @progbits
