"""Free-list allocator for the heap inside the file, after the classic malloc design.

Blocks tile the heap from ``HEAP_START`` to the epilogue word in the file's last
8 bytes.  Every block starts with a header word ``size | flags`` (size a multiple
of 16, at least 32; ``ALLOC`` when in use, ``PREV_ALLOC`` when the block before it
is in use).  A free block also holds, in its own payload, the links of a doubly
linked free list (next at +8, prev at +16) and a footer copy of its size in its
last word, so that a block being freed can find and merge a free neighbour on
either side (boundary tags).

Free lists are segregated by size class: exact classes of 16-byte steps up to
512 bytes, then one class per power of two; a range class is searched first-fit
(``FIT_SCAN`` blocks at most) before taking the head of a larger class.  Requests
of ``LARGE_BLOCK`` bytes or more take a separate path that returns a block whose
payload starts on a page boundary, sized in whole pages.

Callers see payload offsets, as with malloc: ``alloc`` returns the offset of the
payload (the byte after the block's header) and ``free`` takes it back, with the
payload size it was allocated for.  Block offsets and the header, link and footer
words are this module's business alone (and the shim's allocator); the few callers
that reason about whole blocks (recovery's overlap pass, the checker) get them from
``claimed``/``blocks`` as opaque (offset, size) pairs.

``alloc`` and ``free`` run in the native shim (``mmkv_alloc``/``mmkv_free``):
a measurement showed them at 60% of a put's time in Python.  This module keeps
the rare paths: laying out a new heap, growing it, rebuilding every header and
list from the live blocks alone (recovery: the lists are a cache), and the audit.
Callers hold the store lock; nothing here is atomic against a crash, which is
why recovery rebuilds instead of trusting the lists.
"""
import errno

from .shim import ENEEDBACK, ffi, lib, raise_for
from ..errors import CorruptionError, DiskFullError
from .layout import (BLOCK_ALLOC, BLOCK_FLAGS, BLOCK_HEADER, BLOCK_HOLES, BLOCK_MIN, BLOCK_PREV_ALLOC, FREE_HOLES_AT,
                     FREE_HOLES_HEAD, FREE_NEXT,
                     FREE_PREV, HEAP_START, MASK64,
                     NCLASSES, STATE_WORD)

_HEADS = STATE_WORD["free_heads"]
_BITMAP = STATE_WORD["free_bitmap"]
_USED = STATE_WORD["used_bytes"]
_FREE = STATE_WORD["free_bytes"]
_SIZE_MASK = ~BLOCK_FLAGS


def size_class(size: int) -> int:
    """The free-list class that holds blocks of this size (the shim's definition)."""
    out = ffi.new("uint32_t *")
    if lib.mmkv_size_class(size, out):
        raise ValueError(f"{size} is not a block size")
    return out[0]


def block_size_for(payload: int) -> int:
    """Block size (header included, 16-aligned, at least the minimum) for a payload."""
    return max(BLOCK_MIN, (payload + BLOCK_HEADER + 15) & ~15)


def payload_of(b: int) -> int:
    """The payload offset of the block at b."""
    return b + BLOCK_HEADER


def block_of(off: int) -> int:
    """The block offset of the payload at off."""
    return off - BLOCK_HEADER


def footer_of(b: int, size: int) -> int:
    """Offset of the footer word (a copy of the size) of the free block at b of this size."""
    return b + size - BLOCK_HEADER


def span(off: int, payload: int) -> tuple:
    """(start, length) of the bytes a payload of this size at off and its header occupy:
    what must be durable before anything names the block."""
    return off - BLOCK_HEADER, payload + BLOCK_HEADER


class Allocator:
    """Allocates and frees blocks in the heap of the mapping that ``view`` describes.

    ``end`` (the epilogue's offset) lives in ``view.heap_end``, where the shim reads it.
    """

    def __init__(self, fm, view):
        self.fm = fm
        self.view = view
        self._out = ffi.new("uint64_t *")

    @property
    def end(self) -> int:
        return self.view.heap_end

    @end.setter
    def end(self, value: int) -> None:
        self.view.heap_end = value

    def _bad(self, what: str):
        return CorruptionError(f"allocator: {what}; run 'mmkv check' on the file")

    def alloc(self, payload: int) -> int:
        """Payload offset of a new block of at least ``payload`` bytes, or 0 when nothing
        fits (the caller grows the file with ``extend`` and retries).

        :raises CorruptionError: the free lists hold an impossible offset or size.
        """
        b = self.alloc_block(payload)
        return b + BLOCK_HEADER if b else 0

    def alloc_block(self, payload: int) -> int:
        """``alloc`` at the block level: the block's offset (its header), or 0.  For this
        module and the allocator's own tests; the engine deals in payload offsets."""
        for _ in range(64):          # each backing moves a block's holes up: a bound, not a retry count
            rc = lib.mmkv_alloc(self.view, payload, self._out)
            if rc == 0:
                return self._out[0]
            if rc == errno.ENOSPC:
                return 0
            if rc != ENEEDBACK:
                break
            self.back(self.view.holes_block, payload)
        raise self._bad(f"allocating {payload} bytes failed ({errno.errorcode.get(rc, rc)})")

    # ------------------------------------------------------------ released space
    def back(self, b: int, payload: int) -> None:
        """Back with disk blocks (posix_fallocate) the released pages at the start of the free
        block b, enough for an allocation of payload bytes from it and at least BACK_CHUNK bytes,
        then move its holes_at past them (mmkv_layout.h, "Released space").  Caller holds the lock.

        :raises DiskFullError: the disk cannot back them; nothing changed (the block keeps its
            holes, so no write can reach an unbacked page).
        :raises CorruptionError: b is not a free block with holes.
        """
        from .tunables import BACK_CHUNK
        at, end = ffi.new("uint64_t *"), ffi.new("uint64_t *")
        rc = lib.mmkv_holes_span(self.view, b, at, end)
        if rc:
            raise self._bad(f"block {b} was named for backing but has no released pages ({errno.errorcode.get(rc, rc)})")
        page = self.view.page_size
        want = b + block_size_for(payload) + 2 * page + 2 * BLOCK_MIN     # a large block's alignment, the rest's header
        to = min(end[0], max(at[0] + BACK_CHUNK, (want + page - 1) // page * page))
        rc = lib.mmkv_fallocate(self.fm.fd, at[0], to - at[0])
        if rc:
            from .mapping import _DISK_FULL
            if rc in _DISK_FULL:
                raise DiskFullError(rc, f"cannot back {to - at[0]} bytes of released space for a new block: "
                                        f"{errno.errorcode.get(rc, rc)}; free disk space and retry (the store is unchanged)")
            raise_for(rc, "posix_fallocate of released space")
        raise_for(lib.mmkv_holes_backed(self.view, b, to), "backing released space")

    def release(self, b: int, start: int = 0, length: int = MASK64) -> int:
        """Give the pages inside the free block b that lie in [start, start + length) back to the
        filesystem; returns the bytes punched (0 on a filesystem that cannot punch holes).  Caller
        holds the lock.  :raises CorruptionError: b is not a free block (any more)."""
        rc = lib.mmkv_release_block(self.view, b, start, length, self._out)
        if rc == errno.EBADMSG:
            raise self._bad(f"releasing block {b}: not a free block")
        return self._out[0]

    def _quiet(self):
        """A context in which frees release nothing (growth, rebuild)."""
        return _NoRelease(self.view)

    def free(self, off: int, payload: int) -> None:
        """Return the block whose payload is at off, allocated for ``payload`` bytes, to the
        free lists, merging free neighbours.

        A header claiming more room than a block for that payload can have is refused:
        freeing it would free the blocks after it.
        :raises CorruptionError: off is not an allocated block (double free, bad offset, a
            damaged size).
        """
        if self.placement(off) is None:
            raise self._bad(f"freeing payload {off}: not a block offset in the heap")
        self.free_block(off - BLOCK_HEADER, payload)

    def free_block(self, b: int, payload: int | None = None) -> None:
        """``free`` at the block level (payload None: whatever the header says); see alloc_block."""
        rc = lib.mmkv_free(self.view, b) if payload is None else lib.mmkv_free_fitting(self.view, b, payload)
        if rc:
            raise self._bad(f"freeing block {b} failed ({errno.errorcode.get(rc, rc)}): double free or damage")

    def capacity(self, off: int) -> int:
        """Payload bytes the allocated block at off can hold (its size less the header)."""
        return self.block_size(off - BLOCK_HEADER) - BLOCK_HEADER

    def most(self, b: int, payload: int) -> int:
        """The largest size a block at b allocated for payload bytes can have (see free)."""
        raise_for(lib.mmkv_alloc_bound(self.view, b, payload, self._out), "allocation bound")
        return self._out[0]

    def most_for_size(self, b: int, least: int) -> int:
        """``most`` for a block known only by the least size its contents fill."""
        return self.most(b, least - BLOCK_HEADER)

    def block_size(self, b: int) -> int:
        """Size of the block at b, from its header.  :raises CorruptionError: b is no block offset."""
        if b < HEAP_START or b >= self.end or (b - HEAP_START) & 15:
            raise self._bad(f"block offset {b} outside the heap or misaligned")
        return self.fm.words[b >> 3] & _SIZE_MASK

    def placement(self, off: int):
        """The block offset of a payload at off when that is a possible block offset (in the
        heap, aligned), else None.  Nothing is read: the offset may come from damage."""
        b = off - BLOCK_HEADER
        return b if HEAP_START <= b < self.end and not (b - HEAP_START) & 15 else None

    def claimed(self, b: int, least: int) -> int:
        """The size of the block at b as its header claims it, when that is plausible for a
        live block of at least ``least`` bytes (in use, 16-aligned, within the heap); else
        ``least`` (a torn or damaged header must not shrink or grow what recovery keeps)."""
        head = self.fm.words[b >> 3]
        size = head & _SIZE_MASK
        if not head & BLOCK_ALLOC or size < least or size & 15 or b + size > self.end:
            return least
        return size

    def free_blocks_of(self, least: int) -> list:
        """[(block, size)] of every listed free block of at least ``least`` bytes, from the lists
        of the classes that can hold one (the large classes: few blocks).  Each link is checked
        as in largest_free; a damaged list ends its walk (the audit reports it).  Lock held."""
        w = self.fm.words
        bitmap, out = w[_BITMAP], []
        limit = (self.end - HEAP_START) // BLOCK_MIN + 1
        for c in range(size_class(max(BLOCK_MIN, least & ~15)), NCLASSES):
            if not bitmap >> c & 1:
                continue
            b, prev = w[_HEADS + c], 0
            for _ in range(limit):
                if not b or self.placement(b + BLOCK_HEADER) is None or w[(b + FREE_PREV) >> 3] != prev:
                    break
                size = w[b >> 3] & _SIZE_MASK
                if size >= least and not w[b >> 3] & BLOCK_ALLOC:
                    out.append((b, size))
                prev, b = b, w[(b + FREE_NEXT) >> 3]
        return out

    def largest_free(self) -> int:
        """Size of the largest free block: the biggest in the highest non-empty class.

        Walks that one list only (blocks in a higher class are always larger), checking each
        link: in the heap, and the back link naming the block it came from, which ends a cycle
        at its second step.
        :raises CorruptionError: the list is damaged.
        """
        w = self.fm.words
        bitmap = w[_BITMAP]
        if not bitmap:
            return 0
        c = bitmap.bit_length() - 1
        b, prev, best = w[_HEADS + c], 0, 0
        for _ in range((self.end - HEAP_START) // BLOCK_MIN + 1):   # more steps than blocks: a cycle
            if not b:
                return best
            best = max(best, self.block_size(b))    # bounds check of the link
            if w[(b + FREE_PREV) >> 3] != prev:
                break
            prev, b = b, w[(b + FREE_NEXT) >> 3]
        raise self._bad(f"free list {c} is damaged at block {b} (a wrong back link or a cycle)")

    # ------------------------------------------------------------ growth
    def extend(self, new_end: int) -> None:
        """Add [end, new_end) to the heap (the file already grew) and move the epilogue."""
        w = self.fm.words
        old = self.end
        size = new_end - old
        if size <= 0:
            return
        prev_alloc = w[old >> 3] & BLOCK_PREV_ALLOC   # the old epilogue knows its predecessor
        w[new_end >> 3] = BLOCK_ALLOC | BLOCK_PREV_ALLOC
        w[old >> 3] = size | BLOCK_ALLOC | prev_alloc
        w[_USED] = (w[_USED] + size) & MASK64         # a cache: a damaged count must not raise
        self.end = new_end
        with self._quiet():                          # the new space is about to be used: keep it backed
            self.free_block(old)                     # merges with a free last block

    def format(self, end: int) -> None:
        """Lay out an empty heap ending at ``end``: one free block and the epilogue."""
        w = self.fm.words
        for c in range(NCLASSES):
            w[_HEADS + c] = 0
        w[_BITMAP] = w[_USED] = w[_FREE] = 0
        w[(HEAP_START - 8) >> 3] = 0
        w[HEAP_START >> 3] = BLOCK_ALLOC | BLOCK_PREV_ALLOC   # an epilogue at the heap start...
        self.end = HEAP_START
        self.extend(end)                                      # ...that extend turns into free space

    # ------------------------------------------------------------ recovery and audit
    def rebuild(self, live: list) -> None:
        """Rewrite every block header and the free lists from the live blocks alone.

        ``live`` lists (offset, size) of the blocks in use, in any order, not
        overlapping, each inside the heap.  Every gap between them becomes one
        free block (written as in use, then freed through the one free path); a
        gap too small to be a block is added to the block before it.
        """
        w = self.fm.words
        for c in range(NCLASSES):
            w[_HEADS + c] = 0
        w[_BITMAP] = w[_FREE] = 0
        blocks, pos = [], HEAP_START
        for b, size in sorted(live):
            gap = b - pos
            if 0 < gap < BLOCK_MIN:
                if not blocks:
                    raise self._bad(f"gap of {gap} bytes at {pos} cannot hold a block")
                lb, ls, lfree = blocks.pop()
                blocks.append((lb, ls + gap, lfree))
            elif gap:
                blocks.append((pos, gap, True))
            blocks.append((b, size, False))
            pos = b + size
        if self.end - pos:
            if self.end - pos < BLOCK_MIN:
                if not blocks:
                    raise self._bad(f"a heap of {self.end - pos} bytes cannot hold a block")
                lb, ls, lfree = blocks.pop()
                blocks.append((lb, ls + self.end - pos, lfree))
            else:
                blocks.append((pos, self.end - pos, True))
        for b, size, _ in blocks:                      # every header in use, PREV_ALLOC set...
            w[b >> 3] = size | BLOCK_ALLOC | BLOCK_PREV_ALLOC
        w[self.end >> 3] = BLOCK_ALLOC | BLOCK_PREV_ALLOC
        w[_USED] = self.end - HEAP_START
        with self._quiet():
            for b, _, gap in blocks:                   # ...then each gap freed: lists and bits follow
                if gap:
                    self.free_block(b)
                    # what was released before is unknown: any page inside may be a hole
                    raise_for(lib.mmkv_holes_mark(self.view, b), "marking a rebuilt free block")

    def audit(self) -> list:
        """Every problem found in the heap and the free lists (empty when sound).

        Walks all blocks (sizes, boundary tags, PREV_ALLOC bits, no two free
        neighbours), then every list (links both ways, right class, no cycle,
        no block twice), then the bitmap and the byte counters.
        """
        w = self.fm.words
        problems = []
        free_blocks = {}
        pos, prev_free, used, free = HEAP_START, False, 0, 0
        while pos < self.end:
            head = w[pos >> 3]
            size = head & _SIZE_MASK
            if size < BLOCK_MIN or size & 15 or pos + size > self.end:
                problems.append(f"block at {pos}: impossible size {size}")
                return problems
            if bool(head & BLOCK_PREV_ALLOC) == prev_free:
                problems.append(f"block at {pos}: PREV_ALLOC bit does not match the block before it")
            if head & BLOCK_ALLOC:
                used += size
                prev_free = False
                if head & BLOCK_HOLES:
                    problems.append(f"block at {pos}: in use but flagged as holding released pages")
            else:
                if head & BLOCK_HOLES:
                    problems.extend(self._holes_problems(pos, size))
                if prev_free:
                    problems.append(f"block at {pos}: two free blocks side by side (not coalesced)")
                if w[(pos + size - 8) >> 3] != size:
                    problems.append(f"free block at {pos}: footer does not match header")
                free_blocks[pos] = size
                free += size
                prev_free = True
            pos += size
        # the walk ends exactly at the epilogue: a block running past it is an impossible size
        if not w[pos >> 3] & BLOCK_ALLOC or bool(w[pos >> 3] & BLOCK_PREV_ALLOC) == prev_free:
            problems.append("epilogue word is wrong")
        seen = set()
        bitmap = w[_BITMAP]
        for c in range(NCLASSES):
            b, prev = w[_HEADS + c], 0
            if bool(b) != bool(bitmap >> c & 1):
                problems.append(f"free list {c}: bitmap bit does not match the list")
            while b:
                if b not in free_blocks:
                    problems.append(f"free list {c}: entry {b} is not a free block")
                    break
                if b in seen:
                    problems.append(f"free list {c}: block {b} listed twice (or a cycle)")
                    break
                seen.add(b)
                if size_class(free_blocks[b]) != c:
                    problems.append(f"free list {c}: block {b} of size {free_blocks[b]} is in the wrong class")
                if w[(b + FREE_PREV) >> 3] != prev:
                    problems.append(f"free list {c}: block {b} has a wrong back link")
                prev, b = b, w[(b + FREE_NEXT) >> 3]
        missing = set(free_blocks) - seen
        if missing:
            problems.append(f"{len(missing)} free block(s) on no free list, e.g. {min(missing)}")
        if w[_USED] != used or w[_FREE] != free:
            problems.append(f"counters say used={w[_USED]} free={w[_FREE]}, blocks say used={used} free={free}")
        return problems

    def _holes_problems(self, b: int, size: int) -> list:
        """What is wrong with the holes_at word of the free block [b, b + size) flagged BLOCK_HOLES."""
        page = self.view.page_size
        lo = (b + FREE_HOLES_HEAD + page - 1) // page * page
        hi = (b + size - 8) // page * page
        at = self.fm.words[(b + FREE_HOLES_AT) >> 3]
        if at % page or not lo <= at < hi:
            return [f"free block at {b}: released pages from {at}, outside its inner pages [{lo}, {hi})"]
        return []

    def released_ranges(self) -> list:
        """[(holes_at, end)] of every free block flagged BLOCK_HOLES, in address order: the only
        places where the file may have holes.  :raises CorruptionError: an impossible size."""
        w, page, out = self.fm.words, self.view.page_size, []
        for b, size, in_use in self.blocks():
            if not in_use and w[b >> 3] & BLOCK_HOLES:
                out.append((w[(b + FREE_HOLES_AT) >> 3], (b + size - 8) // page * page))
        return out

    def blocks(self):
        """Yield (offset, size, in_use) for every block, in address order.

        :raises CorruptionError: a header holds an impossible size.
        """
        w = self.fm.words
        pos = HEAP_START
        while pos < self.end:
            head = w[pos >> 3]
            size = head & _SIZE_MASK
            if size < BLOCK_MIN or size & 15 or pos + size > self.end:
                raise self._bad(f"block at {pos} has impossible size {size}")
            yield pos, size, bool(head & BLOCK_ALLOC)
            pos += size


class _NoRelease:
    """``with``: frees through this view release no pages (release_min 0) until the block ends."""
    __slots__ = ("view", "saved")

    def __init__(self, view):
        self.view = view

    def __enter__(self):
        self.saved, self.view.release_min = self.view.release_min, 0

    def __exit__(self, *exc):
        self.view.release_min = self.saved
        return False
