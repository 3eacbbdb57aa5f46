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

from . import failpoints
from .shim import error_for, ffi, lib
from ..errors import DiskFullError
from .tunables import GROW_STEP_MAX, GROW_STEP_MIN


class FileMap:
    """The file mapped MAP_SHARED: ``mm`` (the mmap), ``base`` (its address for the shim),
    ``words`` (64-bit words), ``size``.  ``writable`` false maps it PROT_READ (a lockless
    handle: any store into it would be a fault, and Python's views of it refuse writes)."""

    def __init__(self, fd: int, size: int, writable: bool = True):
        self.fd = fd
        self.writable = writable
        self.mm = None
        self._retired = []
        self._releasers = []       # threads dropping retired mappings' pages
        self.sync_hook = None      # tests: called as sync_hook(off, length) after each barrier
        self._map(size)

    def _map(self, size: int) -> None:
        prot = mmap.PROT_READ | mmap.PROT_WRITE if self.writable else mmap.PROT_READ
        mm = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED, prot=prot)
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
        import threading       # here, not at the top: growth is rare, and it costs 4 ms of import mmkv
        old_base, old_size = self.base, self.size
        self._retired.append((self.mm, self.words, self._cbuf))
        self._map(size)
        t = threading.Thread(target=lib.mmkv_madvise, name="mmkv-release-old-mapping", daemon=True,
                             args=(old_base, old_size, 0, old_size, lib.MMKV_ADV_DONTNEED))
        t.start()
        self._releasers.append(t)

    def mapped_ranges(self):
        """(base pointer, bytes) of every mapping this FileMap holds: the current one and the
        retired ones a late reader thread may still be using."""
        for mm, _, cbuf in self._retired + [(self.mm, self.words, self._cbuf)]:
            yield ffi.cast("uint8_t *", cbuf), len(mm)

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
            raise error_for(rc, "msync")
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


def grow_file(fd: int, new_size: int, minimum: int | None = None, page: int = 1) -> int:
    """Extend the file to new_size with real blocks (posix_fallocate), never sparse; returns
    the size reached.

    A file already longer than new_size (a crash after fallocate, before the header said so)
    is used as it is, up to its last whole page: the size returned is always a multiple of
    ``page`` (a damaged file can have any length).

    A sparse file would turn a full disk into SIGBUS on first touch of a page.
    With ``minimum`` (a size that still serves the caller), a full disk is not the end:
    the step (new_size - current size) is halved, page-rounded, and tried again, down to
    ``minimum``; DiskFullError only when not even ``minimum`` bytes can be had.  See
    ``next_size`` for the whole policy.  Each failed attempt leaves the file at its old size.
    :raises DiskFullError: no space (for ``minimum`` when given); the file keeps its old size.
    """
    old = os.fstat(fd).st_size
    for size in _fallback_sizes(old, new_size, new_size if minimum is None else minimum, page):
        rc = _fallocate_to(fd, old, size)
        if rc == 0:
            return max(size, old // page * page)
        if rc not in _DISK_FULL:
            raise error_for(rc, "posix_fallocate")
    want = new_size if minimum is None else max(old, minimum)
    raise DiskFullError(rc, f"cannot grow the store to {want} bytes: {os.strerror(rc)}; "
                            "free disk space and retry (the store is unchanged)")


_ZEROS = bytes(1 << 20)


def prefill(fd: int, start: int, end: int) -> None:
    """Write zeros over [start, min(end, start + PREFILL_BYTES)): new space the fallocate of
    ``grow_file`` already reserved, that no process has mapped or uses yet (the caller holds
    the store lock and has not yet published the new size).  A speed hint only: the pages the
    allocator hands out next are put in the page cache in one call instead of one fault each.
    An error (EIO, say) is ignored: fallocate already guaranteed the blocks.
    """
    from .tunables import PREFILL_BYTES
    end = min(end, start + PREFILL_BYTES)
    try:
        while start < end:
            start += os.pwrite(fd, _ZEROS[:min(len(_ZEROS), end - start)], start)
    except OSError:
        pass


#: fallocate results that mean "no space" (disk full, quota, file size limit).
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _fallocate_to(fd: int, old: int, size: int) -> int:
    """Extend the file from old to size bytes: 0, or the errno (the file is back at old bytes)."""
    if size <= old:
        return 0
    rc = lib.mmkv_fallocate(fd, old, size - old)
    if rc:
        try:
            os.ftruncate(fd, old)  # drop whatever part fallocate managed
        except OSError:
            pass
    return rc


def _fallback_sizes(current: int, target: int, minimum: int, page: int):
    """Sizes to try, largest first: target, then the step halved (page-rounded) down to minimum."""
    minimum = min(target, (max(minimum, current) + page - 1) // page * page)
    size = target
    while True:
        yield size
        if size <= minimum:
            return
        half = (current + (size - current) // 2 + page - 1) // page * page
        size = max(minimum, half) if half < size else minimum


def next_size(current: int, needed: int, page: int) -> int:
    """The size the file grows to when it must hold at least ``needed`` bytes.

    Policy: geometric growth, by a quarter of the file per step (at least GROW_STEP_MIN, at
    most GROW_STEP_MAX bytes), and never less than ``needed``; page-rounded.  Growth is cheap
    (fallocate and a new mapping, no copy), so a small factor keeps the unused tail of the
    file small.  On a full disk the store does not give up at this size: ``grow_file`` (given
    ``minimum=needed``) halves the step and retries, down to ``needed`` itself, so an
    operation fails with DiskFullError only when the disk cannot hold what it needs.
    """
    step = min(max(current // 4, GROW_STEP_MIN), GROW_STEP_MAX)
    size = max(current + step, needed)
    return (size + page - 1) // page * page


_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_HEADER = 32            # struct fiemap: start, length, flags, mapped, count, reserved
_FIEMAP_EXTENT = 56            # struct fiemap_extent: logical, physical, length, 2 reserved, flags, 3 reserved
_FIEMAP_EXTENT_LAST = 1


def disk_bytes(fd: int) -> int:
    """Bytes the file has allocated on disk (st_blocks counts 512-byte units whatever the
    filesystem's block size): less than its size where pages were released."""
    return os.fstat(fd).st_blocks * 512


def unbacked_ranges(fd: int, size: int, batch: int = 256):
    """The ranges [start, end) of the file's first ``size`` bytes that no disk block backs (holes;
    fallocated but unwritten space counts as backed), from the FIEMAP ioctl; None where the
    filesystem cannot tell (tmpfs, say).  Delayed-allocation extents count as backed.
    Read-only; costs one ioctl per ``batch`` extents."""
    import fcntl
    import struct
    holes, pos = [], 0
    while pos < size:
        buf = bytearray(_FIEMAP_HEADER + batch * _FIEMAP_EXTENT)
        struct.pack_into("<QQIIII", buf, 0, pos, size - pos, 0, 0, batch, 0)
        try:
            fcntl.ioctl(fd, _FS_IOC_FIEMAP, buf)
        except OSError:
            return None
        mapped = struct.unpack_from("<I", buf, 20)[0]
        if not mapped:
            break
        last = False
        for i in range(mapped):
            logical, _, length = struct.unpack_from("<QQQ", buf, _FIEMAP_HEADER + i * _FIEMAP_EXTENT)
            flags = struct.unpack_from("<I", buf, _FIEMAP_HEADER + i * _FIEMAP_EXTENT + 40)[0]
            if logical > pos:
                holes.append((pos, min(logical, size)))
            pos = max(pos, logical + length)
            last = last or bool(flags & _FIEMAP_EXTENT_LAST)
        if last:
            break
    if pos < size:
        holes.append((pos, size))
    return holes
