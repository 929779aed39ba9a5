#!/usr/bin/env python3
"""Writes a few well-formed requests as seed inputs for the virtio_block
fuzz target (see fuzz_targets/virtio_block.rs for the input layout)."""
import os
import struct
import sys

out = sys.argv[1] if len(sys.argv) > 1 else "corpus/virtio_block"
os.makedirs(out, exist_ok=True)

NEXT, WRITE, INDIRECT = 1, 2, 4


def desc(addr, length, flags, nxt):
    return struct.pack("<QIHH", addr, length, flags, nxt)


def seed(name, flags, descs, heads, memory):
    table = b"".join(descs).ljust(256, b"\0")
    ring = b"".join(struct.pack("<H", h) for h in heads).ljust(32, b"\0")
    data = flags.to_bytes(1, "little") + table + struct.pack("<H", len(heads)) + ring + memory
    with open(os.path.join(out, name), "wb") as f:
        f.write(data)


def header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


# Guest memory from 0x1000: header at 0x1000, segments at 0x1100, data at 0x2000.
def mem(kind, sector, segs=b""):
    m = bytearray(0x2000)
    m[0:16] = header(kind, sector)
    m[0x100:0x100 + len(segs)] = segs
    return bytes(m)


three = lambda dflags: [desc(0x1000, 16, NEXT, 1), desc(0x2000, 1024, dflags | NEXT, 2), desc(0x3000, 1, WRITE, 0)]
seed("read", 4, three(WRITE), [0], mem(0, 2))
seed("write", 4, three(0), [0], mem(1, 3))
seed("flush", 4, [desc(0x1000, 16, NEXT, 1), desc(0x3000, 1, WRITE, 0)], [0], mem(4, 0))
seed("get_id", 0, [desc(0x1000, 16, NEXT, 1), desc(0x2000, 20, WRITE | NEXT, 2), desc(0x3000, 1, WRITE, 0)], [0], mem(8, 0))
segs = struct.pack("<QII", 4, 8, 0) + struct.pack("<QII", 20, 2, 1)
seed("write_zeroes", 6, [desc(0x1000, 16, NEXT, 1), desc(0x1100, 32, NEXT, 2), desc(0x3000, 1, WRITE, 0)], [0], mem(13, 0, segs))
seed("discard", 6, [desc(0x1000, 16, NEXT, 1), desc(0x1100, 16, NEXT, 2), desc(0x3000, 1, WRITE, 0)], [0], mem(11, 0, segs[:16]))
# An indirect table at 0x1800 holding a read.
table = desc(0x1000, 16, NEXT, 1) + desc(0x7f00, 512, WRITE | NEXT, 2) + desc(0x3000, 1, WRITE, 0)
m = bytearray(mem(0, 1))
m[0x800:0x800 + len(table)] = table
seed("indirect", 12, [desc(0x1800, 48, INDIRECT, 0)], [0], bytes(m))
# Two requests in a row.
seed("two", 4, three(WRITE) + [desc(0x1000, 16, NEXT, 4), desc(0x3000, 1, WRITE, 0)], [0, 3], mem(0, 0))
print(f"seeds in {out}")
