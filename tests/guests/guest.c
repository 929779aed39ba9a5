/*
 * ligera test guest: boots like a kernel and reports over COM1 what Linux
 * would find (boot info, memory map, command line, initrd, paging, CPUID
 * topology, MP table, secondary vCPUs), one fact per line, for the test
 * suite to check against what it asked ligera for. The kernel command line
 * picks the test: "test=report" (default), "test=echo", "test=panic",
 * "test=triplefault", "test=badfetch", "test=hang", "test=touch touch_mib=N",
 * "test=count" (counts for ever, echoing i8042 keyboard bytes), "test=busydisk"
 * (synchronous disk writes all the time while echoing vsock bytes)
 * (write to N MiB of RAM), "test=virtio" (every
 * virtio device on the command line), "test=hostile" (a misbehaving driver
 * against the first virtio device), "test=boottimer" (writes 123 to
 * Firecracker's boot timer at 0xd0000000).
 *
 * Freestanding: no libc, no SSE, no interrupts; only port I/O and memory.
 */
#include "virtio.h"

#define COM1 0x3f8
#define AP_TRAMPOLINE 0x10000UL
#define LAPIC 0xfee00000UL

extern void halt(void) __attribute__((noreturn));
extern u8 ap_trampoline[], ap_trampoline_end[];
extern const u32 ap_count_offset, ap_slots_offset;
extern u64 entry_cr0;

/* ---- basics -------------------------------------------------------------- */

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

void *memset(void *d, int c, size_t n)
{
	u8 *dp = d;
	while (n--)
		*dp++ = (u8)c;
	return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

static inline u64 rdmsr(u32 msr)
{
	u32 lo, hi;
	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
	return ((u64)hi << 32) | lo;
}

#define READ_CR(n)                                                   \
	static inline u64 read_cr##n(void)                           \
	{                                                            \
		u64 v;                                               \
		__asm__ volatile("mov %%cr" #n ", %0" : "=r"(v)); \
		return v;                                            \
	}
READ_CR(0)
READ_CR(3)
READ_CR(4)

static void putc_serial(char c)
{
	while (!(inb(COM1 + 5) & 0x20)) /* transmitter holding register empty */
		;
	outb(COM1, (u8)c);
}

static void puts_serial(const char *s)
{
	while (*s)
		putc_serial(*s++);
}

static void put_hex(u64 v)
{
	char buf[17];
	int i = 16;
	buf[i] = 0;
	do {
		buf[--i] = "0123456789abcdef"[v & 0xf];
		v >>= 4;
	} while (v);
	puts_serial(&buf[i]);
}

/* A tiny printf: %x (u64 hex), %s, %c. */
void say(const char *fmt, ...)
{
	__builtin_va_list ap;
	__builtin_va_start(ap, fmt);
	for (; *fmt; fmt++) {
		if (*fmt != '%') {
			putc_serial(*fmt);
			continue;
		}
		switch (*++fmt) {
		case 'x': put_hex(__builtin_va_arg(ap, u64)); break;
		case 's': puts_serial(__builtin_va_arg(ap, const char *)); break;
		case 'c': putc_serial((char)__builtin_va_arg(ap, int)); break;
		default: putc_serial('?'); break;
		}
	}
	__builtin_va_end(ap);
}

static void reset(void) __attribute__((noreturn));
static void reset(void)
{
	/* The keyboard controller's reset command, as Linux does with reboot=k. */
	while (inb(0x64) & 0x02)
		;
	outb(0x64, 0xfe);
	halt();
}

static u8 rd8(u64 a) { return *(volatile u8 *)a; }
static u16 rd16(u64 a) { return *(volatile u16 *)a; }
static u32 rd32(u64 a) { return *(volatile u32 *)a; }
static u64 rd64(u64 a) { return *(volatile u64 *)a; }
static void wr32(u64 a, u32 v) { *(volatile u32 *)a = v; }

static int starts_with(const char *s, const char *p)
{
	while (*p)
		if (*s++ != *p++)
			return 0;
	return 1;
}

/* ---- boot info ----------------------------------------------------------- */

struct boot {
	int pvh;
	u64 cmdline;
	u64 initrd, initrd_size;
};

static void report_zero_page(u64 zp, struct boot *b)
{
	u32 n = rd8(zp + 0x1e8);
	say("BOOT zeropage at=%x boot_flag=%x header=%x version=%x loader=%x code32_start=%x\n", zp,
	    (u64)rd16(zp + 0x1fe), (u64)rd32(zp + 0x202), (u64)rd16(zp + 0x206), (u64)rd8(zp + 0x210),
	    (u64)rd32(zp + 0x214));
	for (u32 i = 0; i < n && i < 128; i++) {
		u64 e = zp + 0x2d0 + 20 * i;
		say("E820 %x %x %x\n", rd64(e), rd64(e + 8), (u64)rd32(e + 16));
	}
	b->cmdline = rd32(zp + 0x228) | ((u64)rd32(zp + 0xc8) << 32);
	b->initrd = rd32(zp + 0x218) | ((u64)rd32(zp + 0xc0) << 32);
	b->initrd_size = rd32(zp + 0x21c) | ((u64)rd32(zp + 0xc4) << 32);
}

static void report_pvh(u64 si, struct boot *b)
{
	u32 n = rd32(si + 48);
	u64 map = rd64(si + 40);
	say("BOOT pvh at=%x magic=%x version=%x\n", si, (u64)rd32(si), (u64)rd32(si + 4));
	for (u32 i = 0; i < n && i < 128; i++) {
		u64 e = map + 24 * i;
		say("E820 %x %x %x\n", rd64(e), rd64(e + 8), (u64)rd32(e + 16));
	}
	b->cmdline = rd64(si + 24);
	if (rd32(si + 12) > 0) {
		u64 mod = rd64(si + 16);
		b->initrd = rd64(mod);
		b->initrd_size = rd64(mod + 8);
	}
}

/* FNV-1a over guest memory, to compare the initrd with the host's file. */
static u64 fnv1a(u64 addr, u64 len)
{
	u64 h = 0xcbf29ce484222325ULL;
	for (u64 i = 0; i < len; i++) {
		h ^= rd8(addr + i);
		h *= 0x100000001b3ULL;
	}
	return h;
}

/* ---- paging -------------------------------------------------------------- */

/* Translates through the live page tables (4-level, 2 MiB or 1 GiB leaves). */
static int translate(u64 virt, u64 *phys)
{
	u64 t = read_cr3() & ~0xfffULL;
	u64 mask = 0x000ffffffffff000ULL;
	u64 e = rd64(t + ((virt >> 39) & 0x1ff) * 8);
	if (!(e & 1))
		return 0;
	e = rd64((e & mask) + ((virt >> 30) & 0x1ff) * 8);
	if (!(e & 1))
		return 0;
	if (e & 0x80) {
		*phys = (e & 0x000fffffc0000000ULL) | (virt & 0x3fffffff);
		return 1;
	}
	e = rd64((e & mask) + ((virt >> 21) & 0x1ff) * 8);
	if (!(e & 1))
		return 0;
	if (e & 0x80) {
		*phys = (e & 0x000fffffffe00000ULL) | (virt & 0x1fffff);
		return 1;
	}
	e = rd64((e & mask) + ((virt >> 12) & 0x1ff) * 8);
	if (!(e & 1))
		return 0;
	*phys = (e & mask) | (virt & 0xfff);
	return 1;
}

static void report_paging(struct boot *b)
{
	u64 probes[] = {0x7000, b->cmdline, (u64)(uintptr_t)&report_paging, LAPIC, 0xbfe00000};
	int ok = 1;
	for (unsigned i = 0; i < sizeof(probes) / sizeof(probes[0]); i++) {
		u64 p = 0;
		if (!translate(probes[i], &p) || p != probes[i]) {
			ok = 0;
			say("PAGING bad %x -> %x\n", probes[i], p);
		}
	}
	say("CPU entry_cr0=%x cr0=%x cr4=%x efer=%x\n", entry_cr0, read_cr0(), read_cr4(), rdmsr(0xc0000080));
	say("PAGING identity=%s\n", ok ? "ok" : "bad");
}

/* Maps guest-physical [4 GiB, 5 GiB) at the same virtual addresses, if the
 * VMM's tables leave PDPT entry 4 free, and tests that RAM there holds data. */
static u64 high_pd[512] __attribute__((aligned(4096)));

static void probe_high_memory(u64 top)
{
	u64 pml4 = read_cr3() & ~0xfffULL;
	u64 pdpt = rd64(pml4) & 0x000ffffffffff000ULL;
	for (int i = 0; i < 512; i++)
		high_pd[i] = (0x100000000ULL + ((u64)i << 21)) | 0x83;
	*(volatile u64 *)(pdpt + 4 * 8) = (u64)(uintptr_t)high_pd | 3;
	__asm__ volatile("mov %0, %%cr3" ::"r"(read_cr3()) : "memory");
	u64 end = top < 0x140000000ULL ? top : 0x140000000ULL;
	u64 addrs[] = {0x100000000ULL, end - 8};
	int ok = 1;
	for (int i = 0; i < 2; i++) {
		volatile u64 *p = (volatile u64 *)addrs[i];
		*p = 0x5a5a0000ULL + i;
		if (*p != 0x5a5a0000ULL + (u64)i)
			ok = 0;
	}
	say("HIGHMEM %s %x-%x\n", ok ? "ok" : "bad", addrs[0], end);
}

/* ---- CPUID --------------------------------------------------------------- */

static void report_cpuid(void)
{
	u32 r[4];
	cpuid(1, 0, r);
	u32 hv = r[2] >> 31;
	say("CPUID leaf1 apic=%x count=%x htt=%x hypervisor=%x ecx=%x edx=%x\n", (u64)(r[1] >> 24),
	    (u64)((r[1] >> 16) & 0xff), (u64)((r[3] >> 28) & 1), (u64)hv, (u64)r[2], (u64)r[3]);
	cpuid(0, 0, r);
	if (r[0] >= 0xb) {
		u32 smt[4], core[4];
		cpuid(0xb, 0, smt);
		cpuid(0xb, 1, core);
		say("CPUID leafb x2apic=%x smt_count=%x core_count=%x core_shift=%x\n", (u64)smt[3],
		    (u64)(smt[1] & 0xffff), (u64)(core[1] & 0xffff), (u64)(core[0] & 0x1f));
	}
	cpuid(0x40000000, 0, r);
	char sig[13];
	memcpy(sig, &r[1], 4);
	memcpy(sig + 4, &r[2], 4);
	memcpy(sig + 8, &r[3], 4);
	sig[12] = 0;
	u32 max = r[0];
	cpuid(0x40000001, 0, r);
	say("CPUID kvm sig=%s max=%x features=%x\n", sig, (u64)max, (u64)r[0]);
}

/* ---- MP table ------------------------------------------------------------ */

static u8 sum(u64 a, u64 n)
{
	u8 s = 0;
	for (u64 i = 0; i < n; i++)
		s += rd8(a + i);
	return s;
}

/* Finds and checks the MP table as Linux does; returns the CPUs' APIC IDs. */
static int mp_table(u8 *apic_ids, int max)
{
	u64 mpf = 0;
	u64 areas[][2] = {{0x9fc00, 0xa0000}, {0xf0000, 0x100000}, {0, 0x400}};
	for (int a = 0; a < 3 && !mpf; a++)
		for (u64 p = areas[a][0]; p < areas[a][1]; p += 16)
			if (rd32(p) == 0x5f504d5f /* "_MP_" */ && rd8(p + 8) == 1 && sum(p, 16) == 0) {
				mpf = p;
				break;
			}
	if (!mpf) {
		say("MPTABLE missing\n");
		return 0;
	}
	u64 t = rd32(mpf + 4);
	u16 len = rd16(t + 4);
	if (rd32(t) != 0x504d4350 /* "PCMP" */ || sum(t, len) != 0) {
		say("MPTABLE bad-header-or-checksum at=%x\n", t);
		return 0;
	}
	u16 count = rd16(t + 34);
	u64 e = t + 44;
	int cpus = 0, bsp = 0, ioapics = 0, irqs = 0, lints = 0;
	u64 ioapic_addr = 0;
	for (u16 i = 0; i < count && e < t + len; i++) {
		switch (rd8(e)) {
		case 0:
			if (rd8(e + 3) & 1 && cpus < max)
				apic_ids[cpus++] = rd8(e + 1);
			bsp += (rd8(e + 3) & 2) != 0;
			e += 20;
			break;
		case 2:
			ioapics++;
			ioapic_addr = rd32(e + 4);
			e += 8;
			break;
		case 3: irqs++; e += 8; break;
		case 4: lints++; e += 8; break;
		case 1: e += 8; break;
		default:
			say("MPTABLE bad-entry type=%x\n", (u64)rd8(e));
			return 0;
		}
	}
	say("MPTABLE ok at=%x lapic=%x cpus=%x bsp=%x ioapics=%x ioapic_addr=%x irqs=%x lints=%x\n", mpf,
	    (u64)rd32(t + 36), (u64)cpus, (u64)bsp, (u64)ioapics, ioapic_addr, (u64)irqs, (u64)lints);
	return cpus;
}

/* ---- secondary vCPUs ------------------------------------------------------ */

static void lapic_icr(u32 dest, u32 low)
{
	wr32(LAPIC + 0x310, dest << 24);
	wr32(LAPIC + 0x300, low);
	for (int i = 0; i < 1000 && (rd32(LAPIC + 0x300) & (1 << 12)); i++) /* delivery pending */
		;
}

static void start_aps(const u8 *apic_ids, int cpus)
{
	u32 bsp = rd32(LAPIC + 0x20) >> 24;
	memcpy((void *)AP_TRAMPOLINE, ap_trampoline, (size_t)(ap_trampoline_end - ap_trampoline));
	volatile u16 *count = (volatile u16 *)(AP_TRAMPOLINE + ap_count_offset);
	volatile u8 *slots = (volatile u8 *)(AP_TRAMPOLINE + ap_slots_offset);
	wr32(LAPIC + 0xf0, 0x1ff); /* software-enable the local APIC */
	int started = 0;
	for (int i = 0; i < cpus; i++) {
		if (apic_ids[i] == bsp)
			continue;
		lapic_icr(apic_ids[i], 0x4500); /* INIT */
		lapic_icr(apic_ids[i], 0x4600 | (AP_TRAMPOLINE >> 12)); /* SIPI */
		lapic_icr(apic_ids[i], 0x4600 | (AP_TRAMPOLINE >> 12)); /* second SIPI, as the MP spec says */
		started++;
	}
	for (u64 spin = 0; spin < 20000000 && *count < started; spin++)
		__asm__ volatile("pause");
	say("SMP bsp=%x started=%x checked_in=%x\n", (u64)bsp, (u64)started, (u64)*count);
	for (int id = 0; id < 32; id++)
		if (slots[id * 4])
			say("AP apic=%x leaf1_apic=%x x2apic=%x count=%x\n", (u64)id, (u64)slots[id * 4 + 1],
			    (u64)slots[id * 4 + 2], (u64)slots[id * 4 + 3]);
}

/* ---- tests --------------------------------------------------------------- */

static void echo_input(void)
{
	/* Reads lines from COM1 and answers each one, until a line "end". */
	char line[128];
	say("ECHO ready\n");
	for (;;) {
		unsigned n = 0;
		for (;;) {
			while (!(inb(COM1 + 5) & 1)) /* data ready */
				;
			char c = (char)inb(COM1);
			if (c == '\r' || c == '\n')
				break;
			if (n < sizeof(line) - 1)
				line[n++] = c;
		}
		line[n] = 0;
		if (n == 0)
			continue;
		say("ECHO got=%s len=%x\n", line, (u64)n);
		if (starts_with(line, "end"))
			return;
	}
}

static const char *cmdline_value(const char *cmdline, const char *key)
{
	for (const char *p = cmdline; *p; p++)
		if ((p == cmdline || p[-1] == ' ') && starts_with(p, key))
			return p + __builtin_strlen(key);
	return 0;
}

void guest_main(u64 boot_info, u64 kind)
{
	struct boot b = {0};
	b.pvh = kind == 1;
	say("LIGERA-TEST-GUEST up\n");
	if (b.pvh)
		report_pvh(boot_info, &b);
	else
		report_zero_page(boot_info, &b);

	const char *cmdline = (const char *)(uintptr_t)b.cmdline;
	say("CMDLINE %s\n", cmdline ? cmdline : "(none)");
	const char *test = cmdline ? cmdline_value(cmdline, "test=") : 0;
	if (!test)
		test = "report";

	if (starts_with(test, "echo")) {
		echo_input();
	} else if (starts_with(test, "panic")) {
		say("PVPANIC caps=%x\n", (u64)inb(0x505));
		outb(0x505, 1);
		halt();
	} else if (starts_with(test, "triplefault")) {
		/* An empty IDT makes any exception a triple fault. */
		struct __attribute__((packed)) { u16 limit; u64 base; } idt = {0, 0};
		__asm__ volatile("lidt %0; ud2" ::"m"(idt)); /* #UD with no IDT: triple fault */
	} else if (starts_with(test, "badfetch")) {
		/* Run code from the MMIO hole, where there is no memory: KVM cannot
		 * fetch the instruction and stops with an internal error. */
		((void (*)(void))0xd0000000UL)();
	} else if (starts_with(test, "virtio")) {
		struct vdev devs[8];
		int n = virtio_find(cmdline, devs, 8);
		for (int i = 0; i < n; i++) {
			switch (devs[i].id) {
			case VIRTIO_ID_RNG: virtio_test_rng(&devs[i]); break;
			case VIRTIO_ID_VSOCK: virtio_test_vsock(&devs[i]); break;
			case VIRTIO_ID_BLOCK: virtio_test_block(&devs[i]); break;
			case VIRTIO_ID_NET: virtio_test_net(&devs[i]); break;
			default: say("VIRTIO untested id=%x\n", (u64)devs[i].id); break;
			}
		}
	} else if (starts_with(test, "hostile")) {
		struct vdev dev;
		if (virtio_find(cmdline, &dev, 1) == 1)
			virtio_test_hostile(&dev);
	} else if (starts_with(test, "touch")) {
		/* Writes one byte in every page of N MiB from 16 MiB up. */
		const char *mib = cmdline_value(cmdline, "touch_mib=");
		u64 n = 0;
		while (mib && *mib >= '0' && *mib <= '9')
			n = n * 10 + (u64)(*mib++ - '0');
		for (u64 a = 16ULL << 20; a < (16ULL + n) << 20; a += 4096)
			*(volatile u8 *)a = 1;
		say("TOUCHED mib=%x\n", n);
	} else if (starts_with(test, "busydisk")) {
		struct vdev devs[2];
		if (virtio_find(cmdline, devs, 2) == 2)
			virtio_busydisk(&devs[0], &devs[1]);
	} else if (starts_with(test, "blkflush")) {
		struct vdev dev;
		if (virtio_find(cmdline, &dev, 1) == 1)
			virtio_blkflush(&dev);
	} else if (starts_with(test, "count")) {
		/* Counts for ever, one line every few milliseconds, and reports
		 * each byte the keyboard controller hands over. */
		for (u64 n = 0;; n++) {
			say("COUNT %x\n", n);
			for (int i = 0; i < 2000; i++) {
				__asm__ volatile("pause");
				if (inb(0x64) & 1)
					say("KBD %x\n", (u64)inb(0x60));
			}
		}
	} else if (starts_with(test, "boottimer")) {
		/* Firecracker's boot timer: "booted" is 123 written to its window. */
		*(volatile u8 *)0xd0000000UL = 123;
		say("BOOTTIMER written\n");
	} else if (starts_with(test, "hang")) {
		say("HANG\n");
		for (;;)
			__asm__ volatile("pause");
	} else {
		if (b.initrd_size)
			say("INITRD addr=%x size=%x fnv=%x\n", b.initrd, b.initrd_size, fnv1a(b.initrd, b.initrd_size));
		else
			say("INITRD none\n");
		report_paging(&b);
		report_cpuid();
		/* Nothing is at COM2 or in the MMIO hole: reads float high. */
		say("UNEMULATED port=%x mmio=%x\n", (u64)inb(0x2f8), (u64)rd32(0xd0000000UL));
		u64 top = 0;
		if (!b.pvh) {
			u32 n = rd8(boot_info + 0x1e8);
			for (u32 i = 0; i < n; i++) {
				u64 e = boot_info + 0x2d0 + 20 * i;
				if (rd64(e) >= 0x100000000ULL)
					top = rd64(e) + rd64(e + 8);
			}
		}
		if (top)
			probe_high_memory(top);
		u8 ids[32];
		int cpus = mp_table(ids, 32);
		if (cpus > 1)
			start_aps(ids, cpus);
	}
	say("DONE\n");
	reset();
}
