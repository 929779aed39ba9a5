#!/usr/bin/env python3
"""Writes seed inputs for the virtio_net fuzz target into corpus/virtio_net/:
well-formed queues (transmit chains, receive buffers, an indirect table, a
buffer across two memory regions, mergeable buffers) for libFuzzer to mutate.
The layout is described at the top of fuzz_targets/virtio_net.rs."""
import os
import struct

DATA = 0x1000
WRITE, NEXT, INDIRECT = 2, 1, 4


def desc(addr, length, flags=0, nxt=0):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def queue(descs, heads):
    table = b"".join(descs).ljust(256, b"\0")
    ring = b"".join(struct.pack("<H", h) for h in heads).ljust(32, b"\0")
    return table + struct.pack("<H", len(heads)) + ring


def frame(length, gso=0, flags=0):
    hdr = bytes([flags, gso]) + struct.pack("<HHHHH", 54 if gso else 0, 1448 if gso else 0, 34, 16, 0)
    body = bytes([0xff] * 6 + [2, 0, 0, 0, 0, 1, 0x08, 0x00])
    body += bytes((i * 7) & 0xff for i in range(length - len(hdr) - len(body)))
    return hdr + body


def seed(flags, frames, frame_len, rx, tx, memory):
    return bytes([flags, frames]) + struct.pack("<H", frame_len) + rx + tx + memory


def main():
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus", "virtio_net")
    os.makedirs(out, exist_ok=True)
    mem = frame(200).ljust(0x800, b"\0") + frame(200, gso=1, flags=1).ljust(0x800, b"\0")
    rx2 = queue([desc(0x3000, 1526, WRITE), desc(0x4000, 1526, WRITE)], [0, 1])
    seeds = {
        "tx-rx": seed(0, 2, 100, rx2, queue([desc(DATA, 200)], [0]), mem),
        "tx-split": seed(0, 1, 60,
                         queue([desc(0x3000, 12, WRITE | NEXT, 1), desc(0x3100, 1514, WRITE)], [0]),
                         queue([desc(DATA, 10, NEXT, 1), desc(DATA + 10, 190)], [0]), mem),
        "tso-mrg": seed(0x0f, 3, 3000,
                        queue([desc(0x3000 + 0x400 * i, 1024, WRITE) for i in range(6)], list(range(6))),
                        queue([desc(DATA + 0x800, 200)], [0]), mem),
        "indirect": seed(0x02, 0, 0, queue([], []),
                         queue([desc(0x6000, 32, INDIRECT)], [0]),
                         mem.ljust(0x5000, b"\0") + desc(DATA, 100, NEXT, 1) + desc(DATA + 100, 100)),
        "straddle": seed(0x10, 2, 1000,
                         queue([desc(0x7e00, 1526, WRITE)], [0]),
                         queue([desc(0x7f80, 200)], [0]), mem.ljust(0x8000, b"\x11")),
        "large-rx": seed(0x25, 2, 65000,
                         queue([desc(0x2_0000, 0x8000, WRITE), desc(0x3000, 0x4000, WRITE),
                                desc(0x8000, 0x8000, WRITE)], [0, 1, 2]),
                         queue([], []), mem),
    }
    for name, data in seeds.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    print(f"{len(seeds)} seeds in {out}")


if __name__ == "__main__":
    main()
