/* The boot benchmark's guest: entered through PVH (32-bit protected mode),
 * it writes one byte to COM1 and resets the machine: through the keyboard
 * controller (ligera), then by a triple fault for VMMs without one (QEMU's
 * microvm machine, which ends on it with -no-reboot). With "hold" it halts
 * instead, so the benchmark can read the VMM's memory map while it runs. */
        .section .text, "ax"
        .code32
        .globl _start
_start:
        mov     $0x3f8, %dx
        mov     $'x', %al
        out     %al, %dx
#ifdef HOLD
1:      hlt
        jmp     1b
#endif
        mov     $0xfe, %al
        out     %al, $0x64              /* i8042: pulse the reset line */
        lidt    empty_idt
        ud2                             /* no IDT: triple fault */

        .balign 8
empty_idt:
        .word   0
        .long   0

        .section .note.pvh, "a"
        .balign 4
        .long   4, 4, 18                /* "Xen", 4-byte desc, XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .long   _start

        .section .note.GNU-stack, "", @progbits
