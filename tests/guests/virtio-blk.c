/* The test guest's virtio-blk driver: reads, writes, flushes, GET_ID,
 * discard / write zeroes, and requests the device must refuse, each
 * reported as a status for the host test to check against the image. */
#include "virtio.h"

#define VIRTIO_BLK_F_SEG_MAX (1ULL << 2)
#define VIRTIO_BLK_F_RO (1ULL << 5)
#define VIRTIO_BLK_F_BLK_SIZE (1ULL << 6)
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define VIRTIO_BLK_F_DISCARD (1ULL << 13)
#define VIRTIO_BLK_F_WRITE_ZEROES (1ULL << 14)

#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_T_DISCARD 11
#define BLK_T_WRITE_ZEROES 13

struct blk_hdr {
	u32 type;
	u32 reserved;
	u64 sector;
} __attribute__((packed));

struct blk_seg {
	u64 sector;
	u32 sectors;
	u32 flags;
} __attribute__((packed));

static struct blk_hdr hdr;
static volatile u8 status;
static u8 blk_buf[4096];
static u8 blk_buf2[4096];
static struct blk_seg seg;

static u64 blk_fnv(const u8 *p, u64 n)
{
	u64 h = 0xcbf29ce484222325ULL;
	for (u64 i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

/* The pattern the guest writes: byte i of the 4 KiB block. */
static u8 blk_pattern(u32 i) { return (u8)(i * 13 + 0x5a); }

/* One request: header, optional data buffers, status. Returns the status
 * byte, 0xee if the device wrote none, or 0xdd on timeout. */
static u32 blk_request(struct vdev *d, u32 type, u64 sector, const struct vbuf *data, int n, u32 *used)
{
	struct vbuf bufs[6];
	int k = 0;
	hdr.type = type;
	hdr.reserved = 0;
	hdr.sector = sector;
	status = 0xee;
	bufs[k++] = (struct vbuf){&hdr, sizeof(hdr), 0};
	for (int i = 0; i < n && k < 5; i++)
		bufs[k++] = data[i];
	bufs[k++] = (struct vbuf){(void *)&status, 1, 1};
	long len = vq_roundtrip(d, &d->queues[0], bufs, k);
	if (used)
		*used = (u32)len;
	return len < 0 ? 0xdd : status;
}

static u32 blk_rw(struct vdev *d, u32 type, u64 sector, void *buf, u32 len)
{
	struct vbuf b = {buf, len, type == BLK_T_IN};
	return blk_request(d, type, sector, &b, 1, 0);
}

static int blk_setup(struct vdev *d)
{
	u64 want = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_RO | VIRTIO_BLK_F_BLK_SIZE |
		   VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_DISCARD | VIRTIO_BLK_F_WRITE_ZEROES;
	if (virtio_negotiate(d, want) || virtio_queue(d, 0, 16))
		return -1;
	virtio_ready(d);
	return 0;
}

void virtio_test_block(struct vdev *d)
{
	if (blk_setup(d)) {
		say("VIRTIO-BLK setup=failed dev=%x\n", d->base);
		return;
	}
	u64 capacity = vread32(d, VMMIO_CONFIG) | (u64)vread32(d, VMMIO_CONFIG + 4) << 32;
	u32 seg_max = vread32(d, VMMIO_CONFIG + 12);
	u32 blk_size = vread32(d, VMMIO_CONFIG + 20);
	int ro = (d->features & VIRTIO_BLK_F_RO) != 0;

	/* GET_ID: 20 bytes, NUL-padded. */
	static char id[21];
	memset(id, 0, sizeof(id));
	struct vbuf idb = {id, 20, 1};
	u32 id_used = 0;
	u32 id_status = blk_request(d, BLK_T_GET_ID, 0, &idb, 1, &id_used);
	say("VIRTIO-BLK config dev=%x capacity=%x ro=%x seg_max=%x blk_size=%x features=%x id=%s id_status=%x "
	    "id_used=%x\n",
	    d->base, capacity, (u64)ro, (u64)seg_max, (u64)blk_size, d->features, id, (u64)id_status, (u64)id_used);

	/* Sectors 0-7, whole and scattered over three buffers of odd sizes. */
	u32 read_used = 0;
	struct vbuf whole = {blk_buf, 4096, 1};
	u32 read_status = blk_request(d, BLK_T_IN, 0, &whole, 1, &read_used);
	u64 read_fnv = blk_fnv(blk_buf, 4096);
	memset(blk_buf2, 0, sizeof(blk_buf2));
	struct vbuf parts[3] = {{blk_buf2, 1000, 1}, {blk_buf2 + 1000, 2000, 1}, {blk_buf2 + 3000, 1096, 1}};
	u32 scatter_status = blk_request(d, BLK_T_IN, 0, parts, 3, 0);
	int scatter = scatter_status == 0 && blk_fnv(blk_buf2, 4096) == read_fnv;

	/* Write sectors 8-15 (refused on a read-only disk), flush, read back. */
	for (u32 i = 0; i < 4096; i++)
		blk_buf[i] = blk_pattern(i);
	u32 write_status = blk_rw(d, BLK_T_OUT, 8, blk_buf, 4096);
	u32 flush_status = blk_request(d, BLK_T_FLUSH, 0, 0, 0, 0);
	memset(blk_buf2, 0, sizeof(blk_buf2));
	blk_rw(d, BLK_T_IN, 8, blk_buf2, 4096);
	int readback = blk_fnv(blk_buf2, 4096) == blk_fnv(blk_buf, 4096);

	/* Write zeroes on sectors 16-17, discard 24-31 (writable disks only). */
	u32 wz_status = 0xff, discard_status = 0xff;
	if (d->features & VIRTIO_BLK_F_WRITE_ZEROES) {
		seg = (struct blk_seg){16, 2, 0};
		struct vbuf s = {&seg, sizeof(seg), 0};
		wz_status = blk_request(d, BLK_T_WRITE_ZEROES, 0, &s, 1, 0);
	}
	if (d->features & VIRTIO_BLK_F_DISCARD) {
		seg = (struct blk_seg){24, 8, 0};
		struct vbuf s = {&seg, sizeof(seg), 0};
		discard_status = blk_request(d, BLK_T_DISCARD, 0, &s, 1, 0);
	}

	/* What the device must refuse: reads across and past the end, an
	 * unknown type, data outside guest memory, a chain without status. */
	u32 oob_status = blk_rw(d, BLK_T_IN, capacity - 1, blk_buf2, 1024);
	u32 oob_end_status = blk_rw(d, BLK_T_IN, capacity, blk_buf2, 512);
	u32 oob_write_status = blk_rw(d, BLK_T_OUT, capacity, blk_buf, 512);
	u32 unsupp_status = blk_rw(d, 0x55, 0, blk_buf2, 512);
	u32 outside_status = blk_rw(d, BLK_T_IN, 0, (void *)0x7fff00000000UL, 512);
	hdr = (struct blk_hdr){BLK_T_IN, 0, 0};
	struct vbuf only = {&hdr, sizeof(hdr), 0};
	long nostatus_len = vq_roundtrip(d, &d->queues[0], &only, 1);
	/* Still working afterwards. */
	u32 after_status = blk_rw(d, BLK_T_IN, 0, blk_buf2, 512);

	u32 isr = vread32(d, VMMIO_INTERRUPT_STATUS);
	vwrite32(d, VMMIO_INTERRUPT_ACK, isr);
	say("VIRTIO-BLK io dev=%x read_status=%x read_used=%x read_fnv=%x scatter=%x write_status=%x flush_status=%x "
	    "readback=%x wz_status=%x discard_status=%x oob_status=%x oob_end_status=%x oob_write_status=%x "
	    "unsupp_status=%x outside_status=%x nostatus_len=%x after_status=%x isr=%x status=%x\n",
	    d->base, (u64)read_status, (u64)read_used, read_fnv, (u64)scatter, (u64)write_status, (u64)flush_status,
	    (u64)readback, (u64)wz_status, (u64)discard_status, (u64)oob_status, (u64)oob_end_status,
	    (u64)oob_write_status, (u64)unsupp_status, (u64)outside_status, (u64)nostatus_len, (u64)after_status,
	    (u64)isr, (u64)vread32(d, VMMIO_STATUS));
}

/* test=blkflush: write sectors 0-7, flush, say so once both are
 * acknowledged, then hang until the host kills the VMM. */
void virtio_blkflush(struct vdev *d)
{
	if (blk_setup(d))
		say("BLKFLUSH setup=failed\n");
	static const char text[] = "LIGERA-FLUSHED-DATA ";
	for (u32 i = 0; i < 4096; i++)
		blk_buf[i] = (u8)text[i % (sizeof(text) - 1)];
	u32 write_status = blk_rw(d, BLK_T_OUT, 0, blk_buf, 4096);
	u32 flush_status = blk_request(d, BLK_T_FLUSH, 0, 0, 0, 0);
	say("BLKFLUSH acked write_status=%x flush_status=%x\n", (u64)write_status, (u64)flush_status);
	say("BLKFLUSH hanging\n"); /* the line above is complete */
	for (;;)
		__asm__ volatile("pause");
}

/* ---- test=busydisk ------------------------------------------------------------ */

/* Writes of BUSY_LEN bytes go to the disk in batches of BUSY_INFLIGHT, a new
 * batch as soon as the last one is done; without VIRTIO_BLK_F_FLUSH each
 * write is synced before it completes, so the host's block I/O has long
 * stretches of work for as long as the vsock echo runs. */
#define BUSY_INFLIGHT 16 /* vq_submit takes 4 descriptors a chain: 64 entries */
#define BUSY_LEN (1024 * 1024)
#define BUSY_SLOTS 4000 /* the image holds this many writes */

static u8 busy_data[BUSY_LEN] __attribute__((aligned(4096)));
static struct blk_hdr busy_hdr[BUSY_INFLIGHT];
static volatile u8 busy_status[BUSY_INFLIGHT];
static struct vdev *busy_blk;
static u64 busy_submitted, busy_done, busy_errors;

static void busy_refill(void)
{
	struct vq *q = &busy_blk->queues[0];
	while (busy_done < busy_submitted && vq_wait(q, 0, 1)) {
		if (busy_status[busy_done % BUSY_INFLIGHT] != 0)
			busy_errors++;
		busy_done++;
	}
	if (busy_done < busy_submitted)
		return; /* the batch is still being written */
	while (busy_submitted - busy_done < BUSY_INFLIGHT) {
		u32 i = (u32)(busy_submitted % BUSY_INFLIGHT);
		busy_hdr[i].type = BLK_T_OUT;
		busy_hdr[i].reserved = 0;
		/* Fresh blocks each time (the image is sparse): allocation makes
		 * every synced write cost the host more. */
		busy_hdr[i].sector = (busy_submitted % BUSY_SLOTS) * (BUSY_LEN / 512);
		busy_status[i] = 0xee;
		struct vbuf bufs[3] = {{&busy_hdr[i], sizeof(busy_hdr[i]), 0},
				       {busy_data, BUSY_LEN, 0},
				       {(void *)&busy_status[i], 1, 1}};
		vq_submit(busy_blk, q, bufs, 3);
		busy_submitted++;
	}
}

void virtio_busydisk(struct vdev *blk, struct vdev *vs)
{
	if (blk->id != VIRTIO_ID_BLOCK || vs->id != VIRTIO_ID_VSOCK ||
	    virtio_negotiate(blk, VIRTIO_F_VERSION_1) || virtio_queue(blk, 0, 64)) {
		say("BUSY setup=failed\n");
		return;
	}
	virtio_ready(blk);
	for (u32 i = 0; i < BUSY_LEN; i++)
		busy_data[i] = blk_pattern(i);
	busy_blk = blk;
	/* The disk is working before vsock starts. */
	while (busy_done < 2 * BUSY_INFLIGHT)
		busy_refill();
	u64 before = busy_done;
	say("BUSY running blk_done=%x\n", before);
	virtio_vsock_echo(vs, busy_refill);
	say("BUSY-DONE blk_done=%x blk_errors=%x\n", busy_done - before, busy_errors);
}
