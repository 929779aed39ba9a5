/* A small polling virtio-mmio driver for the test guest, and the tests of
 * the transport and the entropy device. No interrupts: the guest polls the
 * used ring, and checks that InterruptStatus says a buffer was used. */
#include "virtio.h"

/* Queue memory: three pages per queue (descriptors, avail, used). */
static u8 queue_pages[16][3][4096] __attribute__((aligned(4096)));
static int queue_pages_used;

u32 vread32(struct vdev *d, u32 off) { return *(volatile u32 *)(d->base + off); }
void vwrite32(struct vdev *d, u32 off, u32 v) { *(volatile u32 *)(d->base + off) = v; }

static u64 parse_hex(const char **p)
{
	u64 v = 0;
	if ((*p)[0] == '0' && ((*p)[1] == 'x' || (*p)[1] == 'X'))
		*p += 2;
	for (;; (*p)++) {
		char c = **p;
		if (c >= '0' && c <= '9')
			v = v * 16 + (u64)(c - '0');
		else if (c >= 'a' && c <= 'f')
			v = v * 16 + (u64)(c - 'a' + 10);
		else
			return v;
	}
}

static u64 parse_dec(const char **p)
{
	u64 v = 0;
	while (**p >= '0' && **p <= '9')
		v = v * 10 + (u64)(*(*p)++ - '0');
	return v;
}

int virtio_find(const char *cmdline, struct vdev *devs, int max)
{
	static const char key[] = "virtio_mmio.device=";
	int n = 0;
	for (const char *p = cmdline; *p && n < max; p++) {
		int match = p == cmdline || p[-1] == ' ';
		for (int i = 0; match && key[i]; i++)
			match = p[i] == key[i];
		if (!match)
			continue;
		p += sizeof(key) - 1;
		while (*p && *p != '@') /* size, e.g. 4K */
			p++;
		if (*p != '@')
			break;
		p++;
		u64 base = parse_hex(&p);
		if (*p != ':')
			break;
		p++;
		memset(&devs[n], 0, sizeof(devs[n]));
		devs[n].base = base;
		devs[n].irq = (u32)parse_dec(&p);
		devs[n].id = vread32(&devs[n], VMMIO_DEVICE_ID);
		say("VIRTIO dev base=%x irq=%x magic=%x version=%x id=%x\n", base, (u64)devs[n].irq,
		    (u64)vread32(&devs[n], VMMIO_MAGIC), (u64)vread32(&devs[n], VMMIO_VERSION),
		    (u64)devs[n].id);
		n++;
	}
	return n;
}

int virtio_negotiate(struct vdev *d, u64 want)
{
	vwrite32(d, VMMIO_STATUS, 0);
	vwrite32(d, VMMIO_STATUS, VIRTIO_STATUS_ACK);
	vwrite32(d, VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);
	vwrite32(d, VMMIO_DEVICE_FEATURES_SEL, 0);
	u64 offered = vread32(d, VMMIO_DEVICE_FEATURES);
	vwrite32(d, VMMIO_DEVICE_FEATURES_SEL, 1);
	offered |= (u64)vread32(d, VMMIO_DEVICE_FEATURES) << 32;
	d->features = offered & want;
	vwrite32(d, VMMIO_DRIVER_FEATURES_SEL, 0);
	vwrite32(d, VMMIO_DRIVER_FEATURES, (u32)d->features);
	vwrite32(d, VMMIO_DRIVER_FEATURES_SEL, 1);
	vwrite32(d, VMMIO_DRIVER_FEATURES, (u32)(d->features >> 32));
	vwrite32(d, VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
	u32 status = vread32(d, VMMIO_STATUS);
	say("VIRTIO negotiate id=%x offered=%x agreed=%x status=%x\n", (u64)d->id, offered, d->features,
	    (u64)status);
	return (status & VIRTIO_STATUS_FEATURES_OK) ? 0 : -1;
}

int virtio_queue(struct vdev *d, u32 index, u16 size)
{
	if (index >= 3 || size > VQ_MAX || queue_pages_used >= 16)
		return -1;
	struct vq *q = &d->queues[index];
	u8 (*pages)[4096] = queue_pages[queue_pages_used++];
	memset(pages, 0, 3 * 4096);
	q->index = index;
	q->size = size;
	q->next_avail = 0;
	q->last_used = 0;
	q->desc = (struct vq_desc *)pages[0];
	q->avail = (volatile u16 *)pages[1];
	q->used = pages[2];
	vwrite32(d, VMMIO_QUEUE_SEL, index);
	if (vread32(d, VMMIO_QUEUE_NUM_MAX) < size)
		return -1;
	vwrite32(d, VMMIO_QUEUE_NUM, size);
	vwrite32(d, VMMIO_QUEUE_DESC_LOW, (u32)(uintptr_t)pages[0]);
	vwrite32(d, VMMIO_QUEUE_DESC_HIGH, 0);
	vwrite32(d, VMMIO_QUEUE_DRIVER_LOW, (u32)(uintptr_t)pages[1]);
	vwrite32(d, VMMIO_QUEUE_DRIVER_HIGH, 0);
	vwrite32(d, VMMIO_QUEUE_DEVICE_LOW, (u32)(uintptr_t)pages[2]);
	vwrite32(d, VMMIO_QUEUE_DEVICE_HIGH, 0);
	vwrite32(d, VMMIO_QUEUE_READY, 1);
	return 0;
}

u32 virtio_ready(struct vdev *d)
{
	vwrite32(d, VMMIO_STATUS,
		 VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
	return vread32(d, VMMIO_STATUS);
}

void vq_submit(struct vdev *d, struct vq *q, const struct vbuf *bufs, int n)
{
	/* Descriptors are used in order, as a ring: chains never overlap a
	 * chain that is still in flight in these tests. */
	u16 head = (u16)(q->next_avail * 4 % q->size);
	for (int i = 0; i < n; i++) {
		u16 slot = (u16)((head + i) % q->size);
		q->desc[slot].addr = (u64)(uintptr_t)bufs[i].addr;
		q->desc[slot].len = bufs[i].len;
		q->desc[slot].flags = (u16)((bufs[i].write ? VQ_DESC_F_WRITE : 0) | (i + 1 < n ? VQ_DESC_F_NEXT : 0));
		q->desc[slot].next = (u16)((slot + 1) % q->size);
	}
	u16 idx = q->avail[1];
	q->avail[2 + idx % q->size] = head;
	__asm__ volatile("" ::: "memory");
	q->avail[1] = (u16)(idx + 1);
	q->next_avail++;
	__asm__ volatile("mfence" ::: "memory");
	vwrite32(d, VMMIO_QUEUE_NOTIFY, q->index);
}

int vq_wait(struct vq *q, u32 *len, u64 spins)
{
	volatile u16 *used_idx = (volatile u16 *)(q->used + 2);
	for (u64 i = 0; i < spins; i++) {
		if (*used_idx != q->last_used) {
			volatile u32 *elem = (volatile u32 *)(q->used + 4 + 8 * (q->last_used % q->size));
			if (len)
				*len = elem[1];
			q->last_used++;
			return 1;
		}
		__asm__ volatile("pause");
	}
	return 0;
}

long vq_roundtrip(struct vdev *d, struct vq *q, const struct vbuf *bufs, int n)
{
	u32 len = 0;
	vq_submit(d, q, bufs, n);
	if (!vq_wait(q, &len, 5000000))
		return -1;
	return len;
}

/* ---- entropy ---------------------------------------------------------------- */

static u8 rng_buf[4096];

void virtio_test_rng(struct vdev *d)
{
	if (virtio_negotiate(d, VIRTIO_F_VERSION_1) || virtio_queue(d, 0, 16)) {
		say("VIRTIO-RNG setup=failed\n");
		return;
	}
	say("VIRTIO-RNG ready status=%x\n", (u64)virtio_ready(d));
	int distinct = 0;
	long total = 0;
	for (int round = 0; round < 2; round++) {
		memset(rng_buf, 0, sizeof(rng_buf));
		struct vbuf b = {rng_buf, 256, 1};
		long got = vq_roundtrip(d, &d->queues[0], &b, 1);
		int nonzero = 0;
		for (int i = 0; i < 256; i++)
			nonzero += rng_buf[i] != 0;
		total += got;
		distinct += nonzero > 200; /* random bytes: ~255 of 256 are non-zero */
	}
	u32 isr = vread32(d, VMMIO_INTERRUPT_STATUS);
	vwrite32(d, VMMIO_INTERRUPT_ACK, isr);
	say("VIRTIO-RNG result bytes=%x random_rounds=%x isr=%x\n", (u64)total, (u64)distinct, (u64)isr);
}

/* ---- what a hostile driver does ---------------------------------------------- */

void virtio_test_hostile(struct vdev *d)
{
	/* 1. A queue size that is not a power of two: the device refuses to
	 * start (DEVICE_NEEDS_RESET) instead of guessing. */
	virtio_negotiate(d, VIRTIO_F_VERSION_1);
	virtio_queue(d, 0, 16);
	vwrite32(d, VMMIO_QUEUE_SEL, 0);
	u32 ready = vread32(d, VMMIO_QUEUE_READY);
	vwrite32(d, VMMIO_QUEUE_READY, 0);
	vwrite32(d, VMMIO_QUEUE_NUM, 12);
	vwrite32(d, VMMIO_QUEUE_READY, 1);
	u32 status = virtio_ready(d);
	say("HOSTILE badsize ready=%x status=%x\n", (u64)ready, (u64)status);

	/* 2. Features the device did not offer: FEATURES_OK is refused. */
	vwrite32(d, VMMIO_STATUS, 0);
	vwrite32(d, VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER);
	vwrite32(d, VMMIO_DRIVER_FEATURES_SEL, 1);
	vwrite32(d, VMMIO_DRIVER_FEATURES, 0xffffffff);
	vwrite32(d, VMMIO_STATUS, VIRTIO_STATUS_ACK | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
	say("HOSTILE features status=%x\n", (u64)vread32(d, VMMIO_STATUS));

	/* 3. A notification before DRIVER_OK, then buffers outside guest
	 * memory and a looping chain: the device answers each with 0 bytes
	 * and keeps working. */
	virtio_negotiate(d, VIRTIO_F_VERSION_1);
	virtio_queue(d, 0, 16);
	vwrite32(d, VMMIO_QUEUE_NOTIFY, 0);
	virtio_ready(d);
	struct vq *q = &d->queues[0];
	struct vbuf outside = {(void *)0x7fffff000000UL, 64, 1};
	long a = vq_roundtrip(d, q, &outside, 1);
	/* A loop: descriptor 4k+1 points back to itself. */
	u16 head = (u16)(q->next_avail * 4 % q->size);
	q->desc[head].addr = (u64)(uintptr_t)rng_buf;
	q->desc[head].len = 16;
	q->desc[head].flags = VQ_DESC_F_WRITE | VQ_DESC_F_NEXT;
	q->desc[head].next = head;
	u16 idx = q->avail[1];
	q->avail[2 + idx % q->size] = head;
	q->avail[1] = (u16)(idx + 1);
	q->next_avail++;
	__asm__ volatile("mfence" ::: "memory");
	vwrite32(d, VMMIO_QUEUE_NOTIFY, 0);
	u32 looplen = 0;
	int looped = vq_wait(q, &looplen, 5000000);
	/* An avail index far ahead of the ring. */
	q->avail[1] = (u16)(q->avail[1] + 1000);
	vwrite32(d, VMMIO_QUEUE_NOTIFY, 0);
	q->avail[1] = (u16)(q->avail[1] - 1000);
	/* Writes past the config space and to read-only registers. */
	vwrite32(d, VMMIO_CONFIG + 0xe00, 0xdeadbeef);
	vwrite32(d, VMMIO_MAGIC, 0);
	/* Still alive: a good request works. */
	struct vbuf good = {rng_buf, 32, 1};
	long b = vq_roundtrip(d, q, &good, 1);
	say("HOSTILE run outside=%x loop=%x/%x after=%x status=%x magic=%x\n", (u64)a, (u64)looped, (u64)looplen,
	    (u64)b, (u64)vread32(d, VMMIO_STATUS), (u64)vread32(d, VMMIO_MAGIC));
}
