/* The test guest's virtio-net driver: reads the MAC address from the
 * configuration space, sets up the receive and transmit queues, posts
 * receive buffers, sends a known broadcast frame, waits for a frame from the
 * host (tests/virtio_net.rs injects one on the tap) and echoes its payload
 * back. Frames of other EtherTypes (whatever the host stack sends on the
 * tap) are counted and skipped. */
#include "virtio.h"

#define VIRTIO_NET_F_MAC (1ULL << 5)
#define VIRTIO_NET_F_MRG_RXBUF (1ULL << 15)

#define NET_HDR 12
#define ETHERTYPE_TEST 0x88b5 /* IEEE "local experimental" */
#define RX_BUFS 3
#define RX_BUF_SIZE 1526 /* header and a 1514-byte frame */
/* Polls of the used ring while waiting for the host (each a few emulated
 * instructions: tens of seconds here, far less on real hardware). */
#define RX_SPINS 40000000ULL

static u8 rx_bufs[RX_BUFS][RX_BUF_SIZE] __attribute__((aligned(64)));
static u8 tx_buf[RX_BUF_SIZE] __attribute__((aligned(64)));

static const char hex_digits[] = "0123456789abcdef";

static void mac_text(const u8 *mac, char *out)
{
	for (int i = 0; i < 6; i++) {
		out[3 * i] = hex_digits[mac[i] >> 4];
		out[3 * i + 1] = hex_digits[mac[i] & 15];
		out[3 * i + 2] = i < 5 ? ':' : 0;
	}
}

static u64 fnv(const u8 *p, u32 n)
{
	u64 h = 0xcbf29ce484222325ULL;
	for (u32 i = 0; i < n; i++)
		h = (h ^ p[i]) * 0x100000001b3ULL;
	return h;
}

/* Builds a test frame in tx_buf: virtio-net header (no offloads), `dst`,
 * our MAC, the test EtherType, then `payload`; returns its length. */
static u32 build_frame(const u8 *dst, const u8 *src, const u8 *payload, u32 len)
{
	memset(tx_buf, 0, NET_HDR);
	u8 *eth = tx_buf + NET_HDR;
	memcpy(eth, dst, 6);
	memcpy(eth + 6, src, 6);
	eth[12] = ETHERTYPE_TEST >> 8;
	eth[13] = ETHERTYPE_TEST & 0xff;
	memcpy(eth + 14, payload, len);
	u32 total = NET_HDR + 14 + len;
	if (total < NET_HDR + 60) { /* pad to the Ethernet minimum */
		memset(tx_buf + total, 0, NET_HDR + 60 - total);
		total = NET_HDR + 60;
	}
	return total;
}

static void post_rx(struct vdev *d, int i)
{
	struct vbuf b = {rx_bufs[i], RX_BUF_SIZE, 1};
	vq_submit(d, &d->queues[0], &b, 1);
}

void virtio_test_net(struct vdev *d)
{
	if (virtio_negotiate(d, VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF) ||
	    virtio_queue(d, 0, 16) || virtio_queue(d, 1, 16)) {
		say("VIRTIO-NET setup=failed\n");
		return;
	}
	u8 mac[6];
	for (int i = 0; i < 6; i++)
		mac[i] = *(volatile u8 *)(d->base + VMMIO_CONFIG + i);
	char mac_str[18];
	mac_text(mac, mac_str);
	say("VIRTIO-NET ready mac=%s status=%x\n", mac_str, (u64)virtio_ready(d));

	/* Buffers go in one chain of 4 descriptor slots each (see vq_submit);
	 * 16 entries hold all three. */
	for (int i = 0; i < RX_BUFS; i++)
		post_rx(d, i);

	static const u8 broadcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	static const u8 hello[] = "LGRA-G2H hello from the ligera test guest";
	u32 len = build_frame(broadcast, mac, hello, sizeof(hello) - 1);
	struct vbuf tx = {tx_buf, len, 0};
	long sent = vq_roundtrip(d, &d->queues[1], &tx, 1);
	say("VIRTIO-NET sent len=%x used=%x\n", (u64)len, (u64)sent);

	/* Wait for the host's frame, skipping others (IPv6 and the like). */
	struct vq *rq = &d->queues[0];
	u32 got = 0, skipped = 0;
	int slot = -1;
	for (;;) {
		u32 ulen = 0;
		if (!vq_wait(rq, &ulen, RX_SPINS))
			break;
		/* Used in the order posted: one buffer per used element. */
		int i = (int)((rq->last_used - 1) % RX_BUFS);
		u8 *eth = rx_bufs[i] + NET_HDR;
		if (ulen >= NET_HDR + 14 && eth[12] == (ETHERTYPE_TEST >> 8) && eth[13] == (ETHERTYPE_TEST & 0xff)) {
			got = ulen;
			slot = i;
			break;
		}
		skipped++;
		post_rx(d, i);
	}
	if (slot < 0) {
		say("VIRTIO-NET rx=timeout skipped=%x\n", (u64)skipped);
		return;
	}
	u8 *hdr = rx_bufs[slot];
	u8 *eth = hdr + NET_HDR;
	u16 num_buffers = (u16)(hdr[10] | (hdr[11] << 8));
	char dst[18], src[18];
	mac_text(eth, dst);
	mac_text(eth + 6, src);
	char payload[9];
	memcpy(payload, eth + 14, 8);
	payload[8] = 0;
	say("VIRTIO-NET received len=%x num_buffers=%x flags=%x gso=%x dst=%s src=%s payload=%s fnv=%x "
	    "skipped=%x\n",
	    (u64)got, (u64)num_buffers, (u64)hdr[0], (u64)hdr[1], dst, src, payload,
	    fnv(eth, got - NET_HDR), (u64)skipped);

	/* Echo: the host's payload back to its sender, marked as an echo. */
	static u8 echo[RX_BUF_SIZE];
	u32 plen = got - NET_HDR - 14;
	if (plen < 8)
		return;
	memcpy(echo, "LGRA-ECH", 8);
	memcpy(echo + 8, eth + 14 + 8, plen - 8);
	u8 sender[6];
	memcpy(sender, eth + 6, 6);
	len = build_frame(sender, mac, echo, plen);
	struct vbuf etx = {tx_buf, len, 0};
	long echoed = vq_roundtrip(d, &d->queues[1], &etx, 1);
	u32 isr = vread32(d, VMMIO_INTERRUPT_STATUS);
	vwrite32(d, VMMIO_INTERRUPT_ACK, isr);
	say("VIRTIO-NET echoed len=%x used=%x isr=%x\n", (u64)len, (u64)echoed, (u64)isr);
}
