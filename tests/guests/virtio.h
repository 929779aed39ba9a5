/* A small polling virtio-mmio (version 2) driver for the test guest. */
#ifndef LIGERA_GUEST_VIRTIO_H
#define LIGERA_GUEST_VIRTIO_H

#include <stdint.h>
#include <stddef.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

/* From guest.c. */
void say(const char *fmt, ...);
void *memcpy(void *d, const void *s, size_t n);
void *memset(void *d, int c, size_t n);

#define VIRTIO_ID_NET 1
#define VIRTIO_ID_BLOCK 2
#define VIRTIO_ID_RNG 4
#define VIRTIO_ID_VSOCK 19

#define VIRTIO_F_VERSION_1 (1ULL << 32)
#define VIRTIO_F_EVENT_IDX (1ULL << 29)

#define VIRTIO_STATUS_ACK 1
#define VIRTIO_STATUS_DRIVER 2
#define VIRTIO_STATUS_DRIVER_OK 4
#define VIRTIO_STATUS_FEATURES_OK 8
#define VIRTIO_STATUS_NEEDS_RESET 64

/* virtio-mmio registers. */
#define VMMIO_MAGIC 0x000
#define VMMIO_VERSION 0x004
#define VMMIO_DEVICE_ID 0x008
#define VMMIO_DEVICE_FEATURES 0x010
#define VMMIO_DEVICE_FEATURES_SEL 0x014
#define VMMIO_DRIVER_FEATURES 0x020
#define VMMIO_DRIVER_FEATURES_SEL 0x024
#define VMMIO_QUEUE_SEL 0x030
#define VMMIO_QUEUE_NUM_MAX 0x034
#define VMMIO_QUEUE_NUM 0x038
#define VMMIO_QUEUE_READY 0x044
#define VMMIO_QUEUE_NOTIFY 0x050
#define VMMIO_INTERRUPT_STATUS 0x060
#define VMMIO_INTERRUPT_ACK 0x064
#define VMMIO_STATUS 0x070
#define VMMIO_QUEUE_DESC_LOW 0x080
#define VMMIO_QUEUE_DESC_HIGH 0x084
#define VMMIO_QUEUE_DRIVER_LOW 0x090
#define VMMIO_QUEUE_DRIVER_HIGH 0x094
#define VMMIO_QUEUE_DEVICE_LOW 0x0a0
#define VMMIO_QUEUE_DEVICE_HIGH 0x0a4
#define VMMIO_CONFIG 0x100

#define VQ_DESC_F_NEXT 1
#define VQ_DESC_F_WRITE 2

#define VQ_MAX 64 /* the most descriptors a test queue has */

struct vq_desc {
	u64 addr;
	u32 len;
	u16 flags;
	u16 next;
} __attribute__((packed));

struct vq {
	u32 index;
	u16 size;
	u16 next_avail;
	u16 last_used;
	struct vq_desc *desc;
	volatile u16 *avail; /* flags, idx, ring[size], used_event */
	volatile u8 *used;   /* flags, idx, ring[size] of {id, len}, avail_event */
};

struct vdev {
	u64 base;
	u32 irq;
	u32 id;
	u64 features; /* agreed */
	struct vq queues[3];
};

/* One buffer of a request: guest address, length, device-writable or not. */
struct vbuf {
	void *addr;
	u32 len;
	int write;
};

u32 vread32(struct vdev *d, u32 off);
void vwrite32(struct vdev *d, u32 off, u32 v);

/* Finds the devices announced on the command line; returns how many. */
int virtio_find(const char *cmdline, struct vdev *devs, int max);
/* Resets, acknowledges and negotiates `want` (intersected with the offer). */
int virtio_negotiate(struct vdev *d, u64 want);
/* Sets up queue `index` with `size` entries (returns 0 on success). */
int virtio_queue(struct vdev *d, u32 index, u16 size);
/* Sets DRIVER_OK; returns the status read back. */
u32 virtio_ready(struct vdev *d);
/* Puts a chain in the queue and notifies the device. */
void vq_submit(struct vdev *d, struct vq *q, const struct vbuf *bufs, int n);
/* Waits for the next used element; returns 0 on timeout, else 1 with its length. */
int vq_wait(struct vq *q, u32 *len, u64 spins);
/* Submits a chain and waits for it: the used length, or -1 on timeout. */
long vq_roundtrip(struct vdev *d, struct vq *q, const struct vbuf *bufs, int n);

/* Device tests, one per device type; each prints VIRTIO-<TYPE> lines. */
void virtio_test_rng(struct vdev *d);
void virtio_test_hostile(struct vdev *d);
void virtio_test_vsock(struct vdev *d);
void virtio_test_block(struct vdev *d);
/* test=blkflush: write, flush, report the acknowledgement, hang. */
void virtio_blkflush(struct vdev *d) __attribute__((noreturn));
void virtio_test_net(struct vdev *d);
/* Serves host-to-guest vsock echo only, calling `idle` while waiting. */
void virtio_vsock_echo(struct vdev *d, void (*idle)(void));
/* test=busydisk: the disk `blk` kept busy while vsock `vs` echoes. */
void virtio_busydisk(struct vdev *blk, struct vdev *vs);

#endif
