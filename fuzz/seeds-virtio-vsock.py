#!/usr/bin/env python3
"""Writes well-formed seed inputs for the virtio_vsock fuzz target into
corpus/virtio_vsock/: TX chains with a REQUEST, RW data, credit packets and
SHUTDOWN/RST, laid out as the target reads its input (see
fuzz_targets/virtio_vsock.rs): a flags byte, 16 descriptors, the avail index
and ring, then guest data (placed at 0x3000 and 0x20000) and host bytes."""
import os
import struct

QSIZE = 16
A_DATA = 0x3000
CID = 3


def hdr(op, src_port=1024, dst_port=52, length=0, flags=0, buf_alloc=65536, fwd_cnt=0, typ=1, src_cid=CID):
    return struct.pack("<QQIIIHHIII", src_cid, 2, src_port, dst_port, length, typ, op, flags, buf_alloc, fwd_cnt)


def seed(flags, packets, host=b"host bytes " * 8):
    """packets: list of (header, payload); each becomes a 1- or 2-descriptor chain."""
    descs = []
    heads = []
    data = b""
    for h, p in packets:
        heads.append(len(descs))
        addr = A_DATA + len(data)
        data += h
        if p:
            descs.append((addr, len(h), 1, len(descs) + 1))  # NEXT
            descs.append((A_DATA + len(data), len(p), 0, 0))
            data += p
        else:
            descs.append((addr, len(h), 0, 0))
        data += b"\0" * (-len(data) % 8)
    assert len(descs) <= QSIZE
    table = b"".join(struct.pack("<QIHH", *d) for d in descs).ljust(16 * QSIZE, b"\0")
    ring = struct.pack("<H", len(heads)) + b"".join(struct.pack("<H", h) for h in heads).ljust(2 * QSIZE, b"\0")
    # The target gives the last quarter of the payload to the host side:
    # make the guest part exactly three times the host part.
    guest = data + b"\0" * (-len(data) % 3)
    if len(guest) < 3 * len(host):
        guest += b"\0" * (3 * len(host) - len(guest))
    host = (host * (len(guest) // len(host) + 1))[: len(guest) // 3]
    return bytes([flags]) + table + ring + guest + host


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "virtio_vsock")
    os.makedirs(out, exist_ok=True)
    seeds = {
        "connect-rw-close": seed(0, [
            (hdr(1), b""), (hdr(5, length=5), b"hello"), (hdr(6), b""),
            (hdr(7), b""), (hdr(4, flags=3), b"")]),
        "connect-shutdown-send": seed(2, [
            (hdr(1), b""), (hdr(5, length=3), b"abc"), (hdr(4, flags=2), b"")]),
        "two-connections-rst": seed(4, [
            (hdr(1), b""), (hdr(1, src_port=1025), b""), (hdr(5, length=2), b"hi"),
            (hdr(3, src_port=1025), b""), (hdr(5, src_port=1025, length=1), b"x")]),
        "refused-port": seed(0x30, [(hdr(1, dst_port=3), b""), (hdr(5, dst_port=3, length=1), b"z")]),
        "small-credit": seed(1, [(hdr(1, buf_alloc=10), b""), (hdr(6, buf_alloc=20, fwd_cnt=10), b"")]),
        "bad-packets": seed(8, [
            (hdr(1, typ=2), b""), (hdr(42), b""), (hdr(5, length=70000), b""),
            (hdr(1, src_cid=9), b""), (hdr(2), b""), (hdr(1), b""), (hdr(1), b"")]),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
