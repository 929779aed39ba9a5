/* Entry points of the ligera test guest.
 *
 * _start:    the 64-bit Linux boot protocol (long mode, paging on, RSI = zero page),
 *            0x200 bytes into the image, where a bzImage has its 64-bit entry.
 * pvh_start: the PVH entry (32-bit protected mode, paging off, EBX = start info),
 *            announced by the PVH ELF note only when built with -DPVH; it builds
 *            its own identity map and enters long mode itself.
 * ap_trampoline: real-mode code the guest copies below 1 MiB and starts its
 *            secondary vCPUs in with INIT/SIPI; each AP records its CPUID
 *            topology and checks in.
 */
        .section .text.boot, "ax"
        /* A bzImage's protected-mode code starts here and its 64-bit entry
         * is 0x200 bytes in: keep that layout so the same image, wrapped
         * in a bzImage setup header by the test suite, boots that way too. */
        .code32
startup_32:
        jmp     startup_32
        .org    0x200
        .code64
        .globl _start
_start:
        lea     stack_top(%rip), %rsp
        mov     %cr0, %rax
        mov     %rax, entry_cr0(%rip)
        mov     %rsi, %rdi              /* boot info: the zero page */
        xor     %esi, %esi              /* kind 0: zero page */
        call    guest_main
        jmp     halt

        .globl halt
halt:
        cli
        hlt
        jmp     halt

#ifdef PVH
        .code32
        .globl pvh_start
pvh_start:
        mov     %ebx, %esi              /* start info survives in ESI */
        mov     %cr0, %eax
        mov     %eax, entry_cr0
        lgdt    pvh_gdt_desc
        mov     %cr4, %eax
        or      $0x20, %eax             /* PAE */
        mov     %eax, %cr4
        mov     $pvh_pml4, %eax
        mov     %eax, %cr3
        mov     $0xc0000080, %ecx       /* EFER.LME */
        rdmsr
        or      $0x100, %eax
        wrmsr
        mov     %cr0, %eax
        or      $0x80000001, %eax       /* PG | PE */
        mov     %eax, %cr0
        ljmp    $0x08, $pvh_long
        .code64
pvh_long:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        lea     stack_top(%rip), %rsp
        mov     %esi, %edi              /* boot info: the PVH start info */
        mov     $1, %esi                /* kind 1: PVH */
        call    guest_main
        jmp     halt

        .section .note.pvh, "a"
        .balign 4
        .long   4                       /* name size: "Xen\0" */
        .long   4                       /* descriptor size */
        .long   18                      /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz  "Xen"
        .long   pvh_start

        .data
        .balign 8
pvh_gdt:
        .quad   0
        .quad   0x00af9a000000ffff      /* 0x08: 64-bit code */
        .quad   0x00cf92000000ffff      /* 0x10: data */
pvh_gdt_desc:
        .word   pvh_gdt_desc - pvh_gdt - 1
        .long   pvh_gdt

        .balign 4096
pvh_pml4:
        .quad   pvh_pdpt + 3
        .fill   511, 8, 0
pvh_pdpt:
        .quad   pvh_pd + 0x0003, pvh_pd + 0x1003, pvh_pd + 0x2003, pvh_pd + 0x3003
        .fill   508, 8, 0
pvh_pd:                                 /* 4 GiB identity map in 2 MiB pages */
        .set    page, 0
        .rept   2048
        .quad   (page << 21) | 0x83
        .set    page, page + 1
        .endr
#endif

/* Real-mode AP trampoline, copied to AP_TRAMPOLINE (a 4 KiB-aligned address
 * below 1 MiB) and entered at offset 0 with CS = address >> 4. Offsets of the
 * data below are relative to ap_trampoline. */
        .text
        .code16
        .globl ap_trampoline, ap_trampoline_end, ap_count_offset, ap_slots_offset
ap_trampoline:
        cli
        mov     %cs, %ax
        mov     %ax, %ds
        mov     $1, %eax
        cpuid
        shr     $24, %ebx               /* initial APIC ID (leaf 1) */
        and     $0x1f, %ebx
        mov     %bx, %di
        shl     $2, %di                 /* 4-byte slot per APIC ID */
        movb    $1, (ap_slots - ap_trampoline)(%di)
        movb    %bl, (ap_slots - ap_trampoline + 1)(%di)
        mov     $0xb, %eax              /* extended topology, core level */
        mov     $1, %ecx
        cpuid
        movb    %dl, (ap_slots - ap_trampoline + 2)(%di)   /* x2APIC ID */
        movb    %bl, (ap_slots - ap_trampoline + 3)(%di)   /* logical CPUs */
        lock incw (ap_count - ap_trampoline)
1:      cli
        hlt
        jmp     1b
        .balign 4
ap_count:
        .word   0
        .balign 4
ap_slots:
        .fill   32, 4, 0
ap_trampoline_end:
        .code64

        .section .rodata
        .balign 4
ap_count_offset:
        .long   ap_count - ap_trampoline
ap_slots_offset:
        .long   ap_slots - ap_trampoline

        .bss
        .balign 16
        .globl entry_cr0
entry_cr0:
        .quad   0
        .balign 16
        .skip   16384
stack_top:

        .section .note.GNU-stack, "", @progbits
