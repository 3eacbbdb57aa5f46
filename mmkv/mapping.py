"""The file and its shared mapping: map, remap after growth, grow, msync.

A FileMap owns one ``MAP_SHARED`` mapping of the whole file and the three ways
the engine reaches it: ``mm`` (the mmap object), ``words`` (a bounds-checked
memoryview of little-endian u64 words, word i at byte 8*i) and ``base`` (a C
pointer for the shim).  The Store serialises its use under the store lock.

A mapping replaced by ``remap`` stays mapped until ``close``: a reader thread
that read the old base just before another thread remapped must still find
the mutex there (it is the same shared page), never an unmapped address.
Growth is geometric, so the retired mappings add up to less than the current one
(address space only: the pages are the file's, shared).
"""
import errno
import mmap
import os
import threading

from . import failpoints
from ._shim import ffi, lib
from .errors import DiskFullError, Error
from .tunables import GROW_STEP_MAX, GROW_STEP_MIN


class FileMap:
    def __init__(self, fd: int, size: int):
        self.fd = fd
        self.mm = None
        self._retired = []
        self._releasers = []       # threads dropping retired mappings' pages
        self.sync_hook = None      # tests: called as sync_hook(off, length) after each barrier
        self._map(size)

    def _map(self, size: int) -> None:
        mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            mm.madvise(mmap.MADV_RANDOM)  # readahead makes a cold open of a big file crawl
        except (AttributeError, OSError):  # pragma: no cover - platform without madvise
            pass
        self.mm = mm
        self.size = size
        self._cbuf = ffi.from_buffer("uint8_t[]", mm)
        self.base = ffi.cast("uint8_t *", self._cbuf)
        self.words = memoryview(mm).cast("Q")

    @staticmethod
    def _unmap(mm, words, cbuf) -> None:
        words.release()
        ffi.release(cbuf)
        mm.close()

    def remap(self, size: int) -> None:
        """Map ``size`` bytes afresh (the file has grown); the old mapping is retired.

        Its pages are dropped from this process (MADV_DONTNEED on a shared file
        mapping only unmaps them: a late reader faults them back in from the page
        cache), so the file is not counted twice in the process's RSS.  That takes
        time in proportion to the pages mapped (27 ms for 800 MB measured), so a
        background thread does it (the shim's call releases the GIL): growth does
        not pause the writer.  ``close`` waits for it before unmapping.
        """
        old_base, old_size = self.base, self.size
        self._retired.append((self.mm, self.words, self._cbuf))
        self._map(size)
        t = threading.Thread(target=lib.mmkv_madvise, name="mmkv-release-old-mapping", daemon=True,
                             args=(old_base, old_size, 0, old_size, lib.MMKV_ADV_DONTNEED))
        t.start()
        self._releasers.append(t)

    def close(self) -> None:
        if self.mm is None:
            return
        for t in self._releasers:
            t.join()
        self._releasers = []
        for old in self._retired + [(self.mm, self.words, self._cbuf)]:
            self._unmap(*old)
        self._retired = []
        self.mm = self.words = self._cbuf = self.base = None

    def sync(self, off: int = 0, length: int | None = None) -> None:
        """msync(MS_SYNC) the byte range (default: all of it)."""
        if length is None:
            length = self.size - off
        if failpoints.armed:
            failpoints.hit(b"sync.before")
        rc = lib.mmkv_msync(self.base, self.size, off, length, lib.MMKV_SYNC_SYNC)
        if rc:
            raise Error(f"msync failed: {os.strerror(rc)} (errno {rc})")
        if self.sync_hook:
            self.sync_hook(off, length)
        if failpoints.armed:
            failpoints.hit(b"sync.after")

    def sync_file(self) -> None:
        """fdatasync: every dirty page of the file is on disk (one barrier, however many ranges)."""
        if failpoints.armed:
            failpoints.hit(b"sync.before")
        os.fdatasync(self.fd)
        if self.sync_hook:
            self.sync_hook(0, self.size)
        if failpoints.armed:
            failpoints.hit(b"sync.after")


def grow_file(fd: int, new_size: int) -> None:
    """Extend the file to new_size with real blocks (posix_fallocate), never sparse.

    A sparse file would turn a full disk into SIGBUS on first touch of a page.
    :raises DiskFullError: no space; the file keeps its old size.
    """
    old = os.fstat(fd).st_size
    if new_size <= old:
        return
    rc = lib.mmkv_fallocate(fd, old, new_size - old)
    if rc:
        try:
            os.ftruncate(fd, old)  # drop whatever part fallocate managed
        except OSError:
            pass
        if rc in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFullError(rc, f"cannot grow the store to {new_size} bytes: {os.strerror(rc)}; "
                                    "free disk space and retry (the store is unchanged)")
        raise Error(f"posix_fallocate failed: {os.strerror(rc)} (errno {rc})")


def next_size(current: int, needed: int, page: int) -> int:
    """Geometric growth: at least needed bytes, by a quarter (at least GROW_STEP_MIN, at most
    GROW_STEP_MAX) per step.  Growth is cheap (fallocate and a new mapping, no copy), so a
    small factor keeps the unused tail of the file small."""
    step = min(max(current // 4, GROW_STEP_MIN), GROW_STEP_MAX)
    size = max(current + step, needed)
    return (size + page - 1) // page * page
