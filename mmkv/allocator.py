"""Free-list allocator for the heap inside the file, after the classic malloc design.

Blocks tile the heap from ``HEAP_START`` to the epilogue word in the file's last
8 bytes.  Every block starts with a header word ``size | flags`` (size a multiple
of 16, at least 32; ``ALLOC`` when in use, ``PREV_ALLOC`` when the block before it
is in use).  A free block also holds, in its own payload, the links of a doubly
linked free list (next at +8, prev at +16) and a footer copy of its size in its
last word, so that a block being freed can find and merge a free neighbour on
either side (boundary tags).

Free lists are segregated by size class: exact classes of 16-byte steps up to
512 bytes, then one class per power of two.  Requests of ``LARGE_BLOCK`` bytes or
more take a separate path that returns a block whose payload is page-aligned.

The lists and the counters in the state sector are a cache: ``rebuild()`` makes
them again from the set of live blocks (recovery uses it), and ``audit()`` checks
every block and list.  Callers hold the store lock; nothing here is atomic
against a crash, which is why recovery rebuilds instead of trusting the lists.
"""
from .errors import CorruptionError
from .layout import (BLOCK_ALLOC, BLOCK_FLAGS, BLOCK_MIN, BLOCK_PREV_ALLOC, HEAP_START, NCLASSES,
                     STATE_WORD)
from .tunables import LARGE_BLOCK

#: How many blocks a first-fit scan of one list may inspect before moving up a class.
FIT_SCAN_LIMIT = 32
#: Size classes: 0..30 hold exactly 32, 48, ..., 512 bytes; 31.. one power of two each.
EXACT_CLASSES = 31
EXACT_MAX = 512

_HEADS = STATE_WORD["free_heads"]
_BITMAP = STATE_WORD["free_bitmap"]
_USED = STATE_WORD["used_bytes"]
_FREE = STATE_WORD["free_bytes"]
_SIZE_MASK = ~BLOCK_FLAGS


def size_class(size: int) -> int:
    """The free-list class that holds blocks of this size."""
    if size <= EXACT_MAX:
        return (size - BLOCK_MIN) >> 4
    c = EXACT_CLASSES + (size - 1).bit_length() - 10
    return c if c < NCLASSES else NCLASSES - 1


def block_size_for(payload: int) -> int:
    """Block size (header included, 16-aligned, at least the minimum) for a payload."""
    n = (payload + 8 + 15) & ~15
    return n if n >= BLOCK_MIN else BLOCK_MIN


class Allocator:
    """Allocates and frees blocks in a FileMap's heap; ``end`` is the epilogue's offset."""

    def __init__(self, fm, page_size: int, end: int):
        self.fm = fm
        self.page = page_size
        self.end = end

    # ------------------------------------------------------------ checks on file data
    def _bad(self, what: str):
        return CorruptionError(f"allocator: {what}; run 'mmkv check' on the file")

    def _check_block(self, b: int) -> None:
        if b < HEAP_START or b >= self.end or (b - HEAP_START) & 15:
            raise self._bad(f"block offset {b} outside the heap or misaligned")

    def _check_link(self, b: int) -> None:
        if b and (b < HEAP_START or b >= self.end or (b - HEAP_START) & 15):
            raise self._bad(f"free-list link {b} outside the heap or misaligned")

    def _check_size(self, b: int, size: int) -> None:
        if size < BLOCK_MIN or size & 15 or b + size > self.end:
            raise self._bad(f"block at {b} has impossible size {size}")

    # ------------------------------------------------------------ free lists
    def _push(self, w, b: int, size: int) -> None:
        c = size_class(size)
        head = w[_HEADS + c]
        w[(b + 8) >> 3] = head
        w[(b + 16) >> 3] = 0
        if head:
            self._check_link(head)
            w[(head + 16) >> 3] = b
        w[_HEADS + c] = b
        w[_BITMAP] |= 1 << c

    def _unlink(self, w, b: int, size: int) -> None:
        c = size_class(size)
        nxt = w[(b + 8) >> 3]
        prv = w[(b + 16) >> 3]
        self._check_link(nxt)
        self._check_link(prv)
        if prv:
            w[(prv + 8) >> 3] = nxt
        elif w[_HEADS + c] == b:
            w[_HEADS + c] = nxt
        else:
            raise self._bad(f"free block {b} has no predecessor but is not its list's head")
        if nxt:
            w[(nxt + 16) >> 3] = prv
        if not w[_HEADS + c]:
            w[_BITMAP] &= ~(1 << c)

    def _make_free(self, w, b: int, size: int, prev_alloc: int) -> None:
        """Write header and footer of a free block and put it on its list."""
        w[b >> 3] = size | prev_alloc
        w[(b + size - 8) >> 3] = size
        self._push(w, b, size)

    # ------------------------------------------------------------ allocate
    def alloc(self, payload: int) -> int:
        """Offset of a new block with at least ``payload`` bytes after its header, or 0 when
        nothing fits (the caller grows the file with ``extend`` and retries)."""
        size = block_size_for(payload)
        if size >= LARGE_BLOCK:
            return self._alloc_large(size)
        w = self.fm.words
        c = size_class(size)
        bitmap = w[_BITMAP]
        b = 0
        if bitmap >> c & 1:
            b = w[_HEADS + c]
            if c >= EXACT_CLASSES:  # a range class: first fit within the list
                scanned = 0
                while b and (w[b >> 3] & _SIZE_MASK) < size and scanned < FIT_SCAN_LIMIT:
                    b = w[(b + 8) >> 3]
                    self._check_link(b)
                    scanned += 1
                if b and (w[b >> 3] & _SIZE_MASK) < size:
                    b = 0
        if not b:
            higher = bitmap >> (c + 1)
            if not higher:
                return 0
            c += 1 + ((higher & -higher).bit_length() - 1)
            b = w[_HEADS + c]
        self._check_block(b)
        head = w[b >> 3]
        bsize = head & _SIZE_MASK
        if head & BLOCK_ALLOC:
            raise self._bad(f"block {b} on a free list is marked in use")
        self._check_size(b, bsize)
        self._unlink(w, b, bsize)
        self._carve(w, b, bsize, size, head & BLOCK_PREV_ALLOC)
        return b

    def _carve(self, w, b: int, bsize: int, size: int, prev_alloc: int) -> None:
        """Mark [b, b+size) in use out of the free block [b, b+bsize) (already unlinked)."""
        rest = bsize - size
        if rest >= BLOCK_MIN:
            w[b >> 3] = size | BLOCK_ALLOC | prev_alloc
            self._make_free(w, b + size, rest, BLOCK_PREV_ALLOC)
        else:
            size = bsize
            w[b >> 3] = size | BLOCK_ALLOC | prev_alloc
            w[(b + size) >> 3] |= BLOCK_PREV_ALLOC
        w[_USED] += size
        w[_FREE] -= size

    def _alloc_large(self, size: int) -> int:
        """First fit of a block whose payload starts on a page boundary."""
        page = self.page
        size = (size + page - 1) // page * page
        w = self.fm.words
        bitmap = w[_BITMAP]
        scanned = 0
        for c in range(size_class(size), NCLASSES):
            if not bitmap >> c & 1:
                continue
            b = w[_HEADS + c]
            while b and scanned < FIT_SCAN_LIMIT * 4:
                self._check_block(b)
                head = w[b >> 3]
                bsize = head & _SIZE_MASK
                self._check_size(b, bsize)
                start = (b + 8 + page - 1) // page * page - 8   # block start with aligned payload
                if 0 < start - b < BLOCK_MIN:
                    start += page
                tail = b + bsize - (start + size)
                if tail >= 0:
                    self._unlink(w, b, bsize)
                    lead = start - b
                    prev_alloc = head & BLOCK_PREV_ALLOC
                    if lead:
                        self._make_free(w, b, lead, prev_alloc)
                        prev_alloc = 0
                    self._carve(w, start, bsize - lead, size, prev_alloc)
                    return start
                b = w[(b + 8) >> 3]
                scanned += 1
        return 0

    # ------------------------------------------------------------ free
    def free(self, b: int) -> None:
        """Return the block at b to the free lists, merging free neighbours.

        :raises CorruptionError: b is not an allocated block (double free, bad offset).
        """
        w = self.fm.words
        self._check_block(b)
        head = w[b >> 3]
        size = head & _SIZE_MASK
        if not head & BLOCK_ALLOC:
            raise self._bad(f"double free of block {b}")
        self._check_size(b, size)
        w[_USED] -= size
        w[_FREE] += size
        nxt = b + size
        nhead = w[nxt >> 3]
        if not nhead & BLOCK_ALLOC:
            nsize = nhead & _SIZE_MASK
            self._check_size(nxt, nsize)
            self._unlink(w, nxt, nsize)
            size += nsize
        prev_alloc = head & BLOCK_PREV_ALLOC
        if not prev_alloc:
            psize = w[(b - 8) >> 3]
            p = b - psize
            self._check_block(p)
            phead = w[p >> 3]
            if phead & BLOCK_ALLOC or phead & _SIZE_MASK != psize:
                raise self._bad(f"footer before block {b} does not match its block")
            self._unlink(w, p, psize)
            b, size, prev_alloc = p, size + psize, phead & BLOCK_PREV_ALLOC
        self._make_free(w, b, size, prev_alloc)
        w[(b + size) >> 3] &= ~BLOCK_PREV_ALLOC

    def block_size(self, b: int) -> int:
        self._check_block(b)
        return self.fm.words[b >> 3] & _SIZE_MASK

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
        w[_USED] += size
        self.end = new_end
        self.free(old)

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

        ``live`` is a list of (offset, size) of the blocks in use, sorted, not
        overlapping, each inside the heap.  Every gap between them becomes one
        free block; a gap too small to be a block is added to the block before it.
        """
        w = self.fm.words
        for c in range(NCLASSES):
            w[_HEADS + c] = 0
        w[_BITMAP] = 0
        used = free = 0
        pos, prev_alloc = HEAP_START, BLOCK_PREV_ALLOC
        last_live = None
        for b, size in list(live) + [(self.end, 0)]:
            gap = b - pos
            if 0 < gap < BLOCK_MIN and last_live is not None:
                lb, ls = last_live
                ls += gap
                w[lb >> 3] = ls | BLOCK_ALLOC | (w[lb >> 3] & BLOCK_PREV_ALLOC)
                used += gap
                gap, prev_alloc = 0, BLOCK_PREV_ALLOC
            if gap:
                if gap < BLOCK_MIN:
                    raise self._bad(f"gap of {gap} bytes at {pos} cannot hold a block")
                self._make_free(w, pos, gap, prev_alloc)
                free += gap
                prev_alloc = 0
            if b == self.end:
                w[b >> 3] = BLOCK_ALLOC | prev_alloc
                break
            w[b >> 3] = size | BLOCK_ALLOC | prev_alloc
            used += size
            last_live = (b, size)
            pos, prev_alloc = b + size, BLOCK_PREV_ALLOC
        w[_USED] = used
        w[_FREE] = free

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
            else:
                if prev_free:
                    problems.append(f"block at {pos}: two free blocks side by side (not coalesced)")
                if w[(pos + size - 8) >> 3] != size:
                    problems.append(f"free block at {pos}: footer does not match header")
                free_blocks[pos] = size
                free += size
                prev_free = True
            pos += size
        if pos != self.end:
            problems.append(f"blocks end at {pos}, not at the epilogue {self.end}")
        elif not w[pos >> 3] & BLOCK_ALLOC or bool(w[pos >> 3] & BLOCK_PREV_ALLOC) == prev_free:
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
                if w[(b + 16) >> 3] != prev:
                    problems.append(f"free list {c}: block {b} has a wrong back link")
                prev, b = b, w[(b + 8) >> 3]
        missing = set(free_blocks) - seen
        if missing:
            problems.append(f"{len(missing)} free block(s) on no free list, e.g. {min(missing)}")
        if w[_USED] != used or w[_FREE] != free:
            problems.append(f"counters say used={w[_USED]} free={w[_FREE]}, blocks say used={used} free={free}")
        return problems

    def blocks(self):
        """Yield (offset, size, in_use) for every block, in address order."""
        w = self.fm.words
        pos = HEAP_START
        while pos < self.end:
            head = w[pos >> 3]
            size = head & _SIZE_MASK
            self._check_size(pos, size)
            yield pos, size, bool(head & BLOCK_ALLOC)
            pos += size
