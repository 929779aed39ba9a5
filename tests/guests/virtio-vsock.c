/* virtio-vsock in the test guest: a polling driver that speaks the packet
 * protocol (virtio 1.2 §5.10) itself, with credit-based flow control.
 *
 * (a) Guest to host: REQUEST to host port VS_OUT_PORT (ligera connects to
 *     PATH_<port>, where the test echoes), RW with a known pattern, read the
 *     echo back, SHUTDOWN, wait for the RST.
 * (b) Host to guest: after printing "VIRTIO-VSOCK listening", serve
 *     REQUESTs: RESPONSE for VS_LISTEN_PORT, RST for anything else; echo
 *     every byte back until the host shuts its side, then SHUTDOWN and wait
 *     for the RST.
 *
 * The guest advertises a small receive buffer (VS_BUF), so the device must
 * split what it sends and wait for our CREDIT_UPDATEs; the guest counts any
 * byte the device sends beyond the credit it was given. */
#include "virtio.h"

#define VS_OUT_PORT 5001
#define VS_LISTEN_PORT 6000
#define VS_GUEST_PORT 1234
#define VS_HOST_CID 2
#define VS_BUF 512          /* our buf_alloc */
#define VS_OUT_LEN 3000     /* bytes sent in (a) */
#define VS_IN_MAX 8192      /* most bytes accepted in (b) */

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7

#define RX_QSIZE 64 /* vq_submit takes 4 descriptors per chain: 16 chains */
#define RX_BUFS 8
#define RX_LEN (44 + 100) /* room for 100 payload bytes: many small packets */

struct vs_hdr {
	u64 src_cid;
	u64 dst_cid;
	u32 src_port;
	u32 dst_port;
	u32 len;
	u16 type;
	u16 op;
	u32 flags;
	u32 buf_alloc;
	u32 fwd_cnt;
} __attribute__((packed));

/* One connection's state, as a driver keeps it. */
struct vs_conn {
	u32 local_port; /* ours (the guest's) */
	u32 peer_port;  /* the host's */
	/* What we received and consumed; what we last told the device. */
	u32 rx_cnt;
	u32 fwd_cnt;
	u32 told_fwd_cnt;
	/* What we sent, and the device's credit. */
	u32 tx_cnt;
	u32 peer_buf_alloc;
	u32 peer_fwd_cnt;
};

static u64 vs_cid;
static u8 rx_bufs[RX_BUFS][RX_LEN] __attribute__((aligned(64)));
static struct vs_hdr tx_hdr;
static u8 tx_data[1024];
static u8 out_echo[VS_OUT_LEN];
static u8 in_data[VS_IN_MAX];
static u64 credit_updates, credit_violations;
/* Called while waiting for packets (test=busydisk keeps a disk busy). */
static void (*vs_idle)(void);

static void rx_post(struct vdev *d, u8 *buf)
{
	struct vbuf b = {buf, RX_LEN, 1};
	vq_submit(d, &d->queues[0], &b, 1);
}

/* Sends one packet; returns 0 once the device has taken it. */
static int vs_send(struct vdev *d, struct vs_conn *c, u16 op, u32 flags, const u8 *data, u32 len)
{
	memset(&tx_hdr, 0, sizeof(tx_hdr));
	tx_hdr.src_cid = vs_cid;
	tx_hdr.dst_cid = VS_HOST_CID;
	tx_hdr.src_port = c->local_port;
	tx_hdr.dst_port = c->peer_port;
	tx_hdr.len = len;
	tx_hdr.type = 1;
	tx_hdr.op = op;
	tx_hdr.flags = flags;
	tx_hdr.buf_alloc = VS_BUF;
	tx_hdr.fwd_cnt = c->fwd_cnt;
	c->told_fwd_cnt = c->fwd_cnt;
	if (len > sizeof(tx_data))
		return -1;
	if (len)
		memcpy(tx_data, data, len);
	struct vbuf b[2] = {{&tx_hdr, sizeof(tx_hdr), 0}, {tx_data, len, 0}};
	long r = vq_roundtrip(d, &d->queues[1], b, len ? 2 : 1);
	if (op == OP_RW && r >= 0)
		c->tx_cnt += len;
	return r < 0 ? -1 : 0;
}

/* Waits for the next packet: its header in *h and up to `max` payload
 * bytes in `data`. Returns 1, or 0 on timeout. The RX buffer goes back. */
static int vs_recv(struct vdev *d, struct vs_hdr *h, u8 *data, u32 max, u64 spins)
{
	struct vq *q = &d->queues[0];
	volatile u16 *used_idx = (volatile u16 *)(q->used + 2);
	for (u64 i = 0; i < spins; i++) {
		if (*used_idx == q->last_used) {
			if (vs_idle)
				vs_idle();
			__asm__ volatile("pause");
			continue;
		}
		volatile u32 *elem = (volatile u32 *)(q->used + 4 + 8 * (q->last_used % q->size));
		u32 id = elem[0], len = elem[1];
		q->last_used++;
		u8 *buf = (u8 *)(uintptr_t)q->desc[id % q->size].addr;
		memset(h, 0, sizeof(*h));
		if (len >= sizeof(*h)) {
			memcpy(h, buf, sizeof(*h));
			u32 n = len - (u32)sizeof(*h);
			if (n > h->len)
				n = h->len;
			if (n > max)
				n = max;
			if (data)
				memcpy(data, buf + sizeof(*h), n);
		}
		rx_post(d, buf);
		return 1;
	}
	return 0;
}

/* Takes the device's credit from a header for connection c. */
static void vs_credit(struct vs_conn *c, const struct vs_hdr *h)
{
	c->peer_buf_alloc = h->buf_alloc;
	c->peer_fwd_cnt = h->fwd_cnt;
}

static u32 vs_peer_free(const struct vs_conn *c)
{
	u32 in_flight = c->tx_cnt - c->peer_fwd_cnt;
	return in_flight > c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

/* Accounts `len` received bytes, consumed at once; tells the device when
 * half our buffer has been freed since it last heard. */
static void vs_consumed(struct vdev *d, struct vs_conn *c, u32 len)
{
	c->rx_cnt += len;
	if (c->rx_cnt - c->told_fwd_cnt > VS_BUF)
		credit_violations++;
	c->fwd_cnt += len;
	if (c->fwd_cnt - c->told_fwd_cnt >= VS_BUF / 2) {
		vs_send(d, c, OP_CREDIT_UPDATE, 0, 0, 0);
		credit_updates++;
	}
}

static int is_ours(const struct vs_hdr *h, const struct vs_conn *c)
{
	return h->dst_cid == vs_cid && h->dst_port == c->local_port && h->src_port == c->peer_port;
}

/* Waits for a RST for c (other packets are ignored): 1 if it came. */
static int vs_wait_rst(struct vdev *d, struct vs_conn *c)
{
	struct vs_hdr h;
	while (vs_recv(d, &h, 0, 0, 3000000))
		if (is_ours(&h, c) && h.op == OP_RST)
			return 1;
	return 0;
}

static void vs_guest_to_host(struct vdev *d)
{
	struct vs_conn c = {.local_port = VS_GUEST_PORT, .peer_port = VS_OUT_PORT};
	struct vs_hdr h;
	static u8 pattern[VS_OUT_LEN], chunk[100];
	for (u32 i = 0; i < VS_OUT_LEN; i++)
		pattern[i] = (u8)(i * 7 + 3);

	vs_send(d, &c, OP_REQUEST, 0, 0, 0);
	int connected = 0;
	while (vs_recv(d, &h, 0, 0, 3000000)) {
		if (!is_ours(&h, &c))
			continue;
		vs_credit(&c, &h);
		connected = h.op == OP_RESPONSE;
		break;
	}
	if (!connected) {
		say("VIRTIO-VSOCK out connected=0 op=%x\n", (u64)h.op);
		return;
	}
	u32 sent = 0, echoed = 0;
	int rst_early = 0, idle = 0;
	while (echoed < VS_OUT_LEN && !rst_early && idle < 2) {
		u32 room = vs_peer_free(&c);
		u32 n = VS_OUT_LEN - sent;
		if (n > 700)
			n = 700;
		if (n > room)
			n = room;
		if (n) {
			vs_send(d, &c, OP_RW, 0, pattern + sent, n);
			sent += n;
		}
		if (!vs_recv(d, &h, chunk, sizeof(chunk), n ? 20000 : 3000000)) {
			idle += !n; /* nothing to send and nothing came */
			continue;
		}
		idle = 0;
		if (!is_ours(&h, &c))
			continue;
		vs_credit(&c, &h);
		if (h.op == OP_RW) {
			u32 len = h.len;
			if (echoed + len > VS_OUT_LEN)
				len = VS_OUT_LEN - echoed;
			memcpy(out_echo + echoed, chunk, len);
			echoed += len;
			vs_consumed(d, &c, h.len);
		} else if (h.op == OP_RST) {
			rst_early = 1;
		} else if (h.op == OP_CREDIT_REQUEST) {
			vs_send(d, &c, OP_CREDIT_UPDATE, 0, 0, 0);
		}
	}
	int same = echoed == VS_OUT_LEN;
	for (u32 i = 0; same && i < VS_OUT_LEN; i++)
		same = out_echo[i] == pattern[i];
	vs_send(d, &c, OP_SHUTDOWN, 3, 0, 0);
	int rst = vs_wait_rst(d, &c);
	say("VIRTIO-VSOCK out connected=1 sent=%x echoed=%x out_echo=%s rst=%x\n", (u64)sent, (u64)echoed,
	    same ? "ok" : "bad", (u64)rst);
}

static void vs_host_to_guest(struct vdev *d)
{
	struct vs_conn c = {0};
	struct vs_hdr h;
	static u8 chunk[100];
	u64 refused = 0, accepted = 0;
	u32 got = 0, echoed = 0;
	int host_done = 0, rst_early = 0;
	say("VIRTIO-VSOCK listening port=%x\n", (u64)VS_LISTEN_PORT);
	while (!host_done && !rst_early && vs_recv(d, &h, chunk, sizeof(chunk), 6000000)) {
		if (h.dst_cid != vs_cid || h.src_cid != VS_HOST_CID)
			continue;
		if (h.op == OP_REQUEST) {
			struct vs_conn peer = {.local_port = h.dst_port, .peer_port = h.src_port};
			if (h.dst_port != VS_LISTEN_PORT || accepted) {
				/* Nobody listens there: refuse. */
				vs_send(d, &peer, OP_RST, 0, 0, 0);
				refused++;
				continue;
			}
			c = peer;
			vs_credit(&c, &h);
			vs_send(d, &c, OP_RESPONSE, 0, 0, 0);
			accepted = 1;
			continue;
		}
		if (!accepted || !is_ours(&h, &c))
			continue;
		vs_credit(&c, &h);
		if (h.op == OP_RW) {
			u32 len = h.len;
			if (got + len > VS_IN_MAX)
				len = VS_IN_MAX - got;
			memcpy(in_data + got, chunk, len);
			got += len;
			vs_consumed(d, &c, h.len);
		} else if (h.op == OP_SHUTDOWN) {
			host_done = 1;
		} else if (h.op == OP_RST) {
			rst_early = 1;
		} else if (h.op == OP_CREDIT_REQUEST) {
			vs_send(d, &c, OP_CREDIT_UPDATE, 0, 0, 0);
		}
		/* Echo what we have, as the device's credit allows. */
		while (echoed < got && vs_peer_free(&c)) {
			u32 n = got - echoed, room = vs_peer_free(&c);
			if (n > sizeof(tx_data))
				n = sizeof(tx_data);
			if (n > room)
				n = room;
			vs_send(d, &c, OP_RW, 0, in_data + echoed, n);
			echoed += n;
		}
	}
	u64 fnv = 0xcbf29ce484222325ULL;
	for (u32 i = 0; i < got; i++)
		fnv = (fnv ^ in_data[i]) * 0x100000001b3ULL;
	int rst = 0;
	if (accepted && !rst_early) {
		vs_send(d, &c, OP_SHUTDOWN, 3, 0, 0);
		rst = vs_wait_rst(d, &c);
	}
	say("VIRTIO-VSOCK in refused=%x accepted=%x in_bytes=%x in_fnv=%x echoed=%x host_done=%x rst=%x\n", refused,
	    accepted, (u64)got, fnv, (u64)echoed, (u64)host_done, (u64)rst);
}

/* Negotiates, sets up the three queues, reads our CID and posts the RX
 * buffers; returns 0 on success (DRIVER_OK is left to the caller). */
static int vs_setup(struct vdev *d)
{
	if (virtio_negotiate(d, VIRTIO_F_VERSION_1) || virtio_queue(d, 0, RX_QSIZE) || virtio_queue(d, 1, 16) ||
	    virtio_queue(d, 2, 16)) {
		say("VIRTIO-VSOCK setup=failed\n");
		return -1;
	}
	vs_cid = (u64)vread32(d, VMMIO_CONFIG) | ((u64)vread32(d, VMMIO_CONFIG + 4) << 32);
	for (int i = 0; i < RX_BUFS; i++)
		rx_post(d, rx_bufs[i]);
	return 0;
}

/* Sets the device up and serves (b) only, calling `idle` while waiting. */
void virtio_vsock_echo(struct vdev *d, void (*idle)(void))
{
	if (vs_setup(d))
		return;
	virtio_ready(d);
	vs_idle = idle;
	vs_host_to_guest(d);
	vs_idle = 0;
}

void virtio_test_vsock(struct vdev *d)
{
	if (vs_setup(d))
		return;
	say("VIRTIO-VSOCK ready status=%x cid=%x\n", (u64)virtio_ready(d), vs_cid);
	vs_guest_to_host(d);
	vs_host_to_guest(d);
	say("VIRTIO-VSOCK credit updates=%x violations=%x\n", credit_updates, credit_violations);
}
