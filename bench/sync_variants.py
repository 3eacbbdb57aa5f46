"""Measure ways to make a small write durable on this machine's filesystem.

Each variant does what one sync="full" put does: write ~150 bytes at a fresh
place (the record), make it durable, then write 8 bytes elsewhere (the slot)
and make that durable.  Run: python bench/sync_variants.py [DIR] [N]
"""
import mmap
import os
import sys
import tempfile
import time

from mmkv.engine.shim import ffi, lib

SIZE = 64 << 20


def run(name, fn, n):
    t = time.perf_counter()
    for i in range(n):
        fn(i)
    dt = (time.perf_counter() - t) / n
    print(f"{name:34s} {dt * 1e6:8.1f} us/put  {1 / dt:8.0f} puts/s")
    return dt


def main():
    folder = sys.argv[1] if len(sys.argv) > 1 else tempfile.gettempdir()
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    path = os.path.join(folder, "sync-variants.tmp")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    lib.mmkv_fallocate(fd, 0, SIZE)
    os.fsync(fd)
    mm = mmap.mmap(fd, SIZE)
    base = ffi.cast("uint8_t *", ffi.from_buffer(mm))
    rec = os.urandom(152)
    slot_area = 1 << 20

    def rec_off(i):
        return (2 << 20) + i * 4096 % (SIZE - (4 << 20))

    def mmap_msync(i):
        o = rec_off(i)
        mm[o:o + len(rec)] = rec
        lib.mmkv_msync(base, SIZE, o, len(rec), lib.MMKV_SYNC_SYNC)
        s = slot_area + (i * 8) % 65536
        mm[s:s + 8] = b"12345678"
        lib.mmkv_msync(base, SIZE, s, 8, lib.MMKV_SYNC_SYNC)

    def pwrite_fdatasync(i):
        o = rec_off(i)
        os.pwrite(fd, rec, o)
        os.fdatasync(fd)
        os.pwrite(fd, b"12345678", slot_area + (i * 8) % 65536)
        os.fdatasync(fd)

    def pwrite_msync(i):
        o = rec_off(i)
        os.pwrite(fd, rec, o)
        lib.mmkv_msync(base, SIZE, o, len(rec), lib.MMKV_SYNC_SYNC)
        s = slot_area + (i * 8) % 65536
        os.pwrite(fd, b"12345678", s)
        lib.mmkv_msync(base, SIZE, s, 8, lib.MMKV_SYNC_SYNC)

    def mmap_fdatasync(i):
        o = rec_off(i)
        mm[o:o + len(rec)] = rec
        os.fdatasync(fd)
        s = slot_area + (i * 8) % 65536
        mm[s:s + 8] = b"12345678"
        os.fdatasync(fd)

    print(f"{n} durable puts (2 barriers each) in {folder}")
    for name, fn in [("mmap write + msync(range)", mmap_msync), ("pwrite + fdatasync", pwrite_fdatasync),
                     ("pwrite + msync(range)", pwrite_msync), ("mmap write + fdatasync", mmap_fdatasync)]:
        run(name, fn, n)
    mm.close()
    os.close(fd)
    os.unlink(path)


if __name__ == "__main__":
    main()
