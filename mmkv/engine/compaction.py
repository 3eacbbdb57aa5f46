"""compact(): live records slide toward the start of the heap in short steps, then the free tail
goes back to the filesystem: the file shrinks when no other handle has it open, else the pages of
every large free block are released (punched) and the size stays.

The walk.  Blocks are visited in address order.  Free blocks seen are remembered as *holes*; a
record met after a hole that can hold it is moved into the lowest such hole (``mmkv_move_record``:
the copy is written, made durable in sync="full", the key's slot is switched to it, the old block
is freed: the commit order of a put).  The freed block merges with its free neighbours into a new
hole, so free space bubbles up and the live records settle at the bottom.  Blocks that are not
records (index segments and directories, the main index's and the namespaces', and the catalog)
are stepped over; at the end, while one of them is the last block in use, it is moved into the
lowest hole that takes it.

Steps.  The store lock is held for one step at a time: at most ``STEP_SECONDS`` of work (a few
moves), then released so other processes' writes proceed.  Between steps other processes may
allocate and free.  Every hole is checked again when used (``mmkv_alloc_at`` refuses a block that
is no longer a free block of its list); every record is checked again when moved
(``mmkv_move_record`` refuses one no slot names).  The walk resumes at the end of the block it
placed last, checked to still be that live record; if it is not, the walk starts over from the
heap's start (rare: another process deleted or replaced exactly that key).

Shrink.  Truncating a file that another process has mapped would give it SIGBUS on its next touch
of the lost pages, so the file shrinks only when no other handle has it open: under the open/close
protocol lock (no handle can open meanwhile) and with the attached byte taken exclusively (see
engine/opening.py).  The store lock is then taken, the free last block is cut at a page boundary
(``mmkv_heap_shrink``), the meta names the smaller size (durably), this process's mappings lose
their tail to private zero pages (a thread of this process reading lock-free through a slot it read
earlier finds zeros, whose checksum fails, and retries: never SIGBUS), then the file is truncated.
A crash between the meta and the truncate leaves a file longer than its header says: opening uses
it as it is.

Callers hold nothing; ``hold`` is the handle's lock context and ``alone(fn)`` runs fn under the
protocol lock and the store lock when no other handle has the file open (returns True if it ran).
"""
import errno
import time
from bisect import bisect_left, insort

from ..errors import CorruptionError
from . import failpoints, mapping
from .layout import BLOCK_ALLOC, BLOCK_HEADER, BLOCK_MIN, EPILOGUE_BYTES, HEAP_START, MASK64, STATE_WORD
from .shim import ENEEDBACK, ffi, lib, raise_for

#: Seconds of work per lock hold.
STEP_SECONDS = 0.002
#: Bytes punched per call when compaction releases free space (one call takes ~2 ms per MiB on ext4).
RELEASE_CHUNK = 512 << 10
#: Live bytes moved (or twice that walked) between two write-backs of what the walk dirtied,
#: each waited for outside the lock (see _write_back).
WRITE_BACK_BYTES = 1 << 20
#: Holes remembered at most (the lowest are kept): bounds the walk's memory.
MAX_HOLES = 4096
_SIZE_MASK = ~15
_COMPACTING = STATE_WORD["compacting_pid"]


class _Walk:
    """The state of one compaction: where the walk is, the holes below it, what was done."""

    def __init__(self, eng):
        self.eng = eng
        self.pos = HEAP_START
        self.anchors = []           # (block, size) of the last live records the walk passed
        self.holes = _Holes()       # free blocks below pos
        self.moved = self.moved_bytes = self.restarts = 0
        self._index_key = self._index = None
        self._views = []
        self.written = (MASK64, 0)        # the span the moves wrote into since the last write-back
        self.written_back_to = HEAP_START  # the walk's position at the last write-back
        self.moved_at_write_back = 0

    def write_back(self, fd: int) -> None:
        """Write back and wait for (holding no lock) the pages the walk dirtied since the last call:
        the span its moves wrote into, and the heap it walked (the old copies it freed, and
        whatever was already dirty there: a store just written has its every page dirty)."""
        lo, hi = self.written
        if lo < hi:
            lib.mmkv_writeback_wait(fd, lo, hi - lo)        # pacing: the barriers after the walk check
        lib.mmkv_writeback_wait(fd, self.written_back_to, max(0, self.pos - self.written_back_to))
        self.written, self.written_back_to, self.moved_at_write_back = (MASK64, 0), self.pos, self.moved_bytes

    def write_back_due(self) -> bool:
        return (self.moved_bytes - self.moved_at_write_back >= WRITE_BACK_BYTES
                or self.pos - self.written_back_to >= 2 * WRITE_BACK_BYTES)

    def index_blocks(self) -> set:
        """The blocks of the live index (lock held), computed again only after the meta changed
        (every split, rebuild or relocation writes it): a walk of the directory costs ~0.4 ms."""
        eng = self.eng
        key = (eng.meta.seq, eng.view.dir_off, eng.view.dir_bits)
        if key != self._index_key:
            from . import index, namespaces
            blocks = {blk for blk, _ in index.blocks(eng)}
            blocks |= {eng.alloc.placement(off) for off, _ in namespaces.structure_blocks(eng)}
            # records of a namespace are moved through its own index's view
            self._views = [eng.view] + [ieng.view for _, ieng, entry in namespaces.all_indexes(eng)[1:]
                                        if not entry.dropped]
            self._index, self._index_key = blocks, key
        return self._index

    def views(self) -> list:
        """The views of every live index (the main one first), as of the last index_blocks()."""
        self.index_blocks()
        return self._views

    # -------------------------------------------------------------- resuming
    def resume(self) -> None:
        """Make sure the walk's position is a block boundary (lock held): a listed free block, a
        live record or a block of the index starts there.  If not (another process merged or
        carved the blocks around it), the walk goes back to the end of the newest record it
        passed that is still live, or to the heap's start when none is."""
        w, v = self.eng.words, self.eng.view
        pos = self.pos
        if pos == HEAP_START or pos >= v.heap_end or self._boundary(pos):
            return
        self.restarts += 1
        while self.anchors:
            b, size = self.anchors.pop()
            if b + size <= v.heap_end and w[b >> 3] & BLOCK_ALLOC and w[b >> 3] & _SIZE_MASK == size \
                    and self._record_here(b):
                self.pos = b + size               # the end of a block in use: a boundary
                return
        self.pos, self.holes = HEAP_START, _Holes()

    def _boundary(self, b: int) -> bool:
        """A block starts at b: a listed free block, a live record, or a block of the index."""
        if not self.eng.words[b >> 3] & BLOCK_ALLOC:
            return lib.mmkv_is_free_block(self.eng.view, b) == 0
        return self._record_here(b) or b in self.index_blocks()

    def _record_here(self, b: int) -> bool:
        rec = b + BLOCK_HEADER
        return lib.mmkv_record_verify(self.eng.view, rec) == 0 and self._live(rec)

    def _live(self, rec: int) -> bool:
        """A slot names the record at rec (its key's lookup finds it there)."""
        key = bytes(self.eng.record_key(rec))
        return any(lib.mmkv_find(v, key, len(key)) == 0 and v.rec_off == rec for v in self.views())

    # -------------------------------------------------------------- one step
    def step(self, deadline: float) -> bool:
        """Walk and move until the deadline; False when the walk reached the heap's end."""
        eng, v = self.eng, self.eng.view
        w = eng.words
        structure = self.index_blocks()
        while self.pos < v.heap_end:
            if time.monotonic() >= deadline:
                return True
            b = self.pos
            head = w[b >> 3]
            size = head & _SIZE_MASK
            if size < BLOCK_MIN or b + size > v.heap_end:
                raise CorruptionError(f"{eng.path}: heap block at {b} has an impossible size {size}")
            if not head & BLOCK_ALLOC:
                self._add_hole(b)
                self.pos = b + size
                continue
            rec = b + BLOCK_HEADER
            if b in structure or lib.mmkv_record_verify(v, rec) != 0:
                self.pos = b + size          # the index, or a block no slot can name: stays
                continue
            self._anchor(b, size)
            # where the free block that will cover b ends: read now, while b + size is a block
            # start for sure (after the move the words inside the merged block are stale, or holes)
            nxt = b + size
            nhead = w[nxt >> 3]
            end = nxt + (nhead & _SIZE_MASK if not nhead & BLOCK_ALLOC else 0)
            dest = self._place(rec, b, size)
            if dest is None:
                self.pos = nxt
                continue
            self.anchors.pop()                # b is free now
            self._add_hole(end - w[(end - 8) >> 3])   # its footer (in its last page: never a hole)
            self.pos = end
        return False

    def _anchor(self, b: int, size: int) -> None:
        """Remember the live record at b (size bytes) the walk passes: a boundary to go back to."""
        self.anchors.append((b, size))
        if len(self.anchors) > 64:
            del self.anchors[:32]
        return False

    def _add_hole(self, b: int) -> None:
        self.holes.add(b, self.eng.words[b >> 3] & _SIZE_MASK)

    def _place(self, rec: int, b: int, size: int):
        """Move the live record at rec (block b of size bytes) into the lowest hole below it that
        takes it; the new payload offset, or None when it stays."""
        v = self.eng.view
        if lib.mmkv_record_verify(v, rec) != 0:
            return None
        need = v.val_off + v.val_len - rec          # header, key and padding, value
        dest_b = self.holes.take(self.eng, need, b)
        if dest_b is None:
            return None
        dest = dest_b + BLOCK_HEADER
        for view in self.views():                 # the index whose slot names it (ENOENT: not this one)
            rc = lib.mmkv_move_record(view, rec, dest)
            if rc != errno.ENOENT:
                break
        if rc:
            self.eng.free(dest, need)             # not moved: the new block goes back
            if rc == errno.ENOENT:
                return None
            raise_for(rc, "compaction move")
        self.moved += 1
        self.moved_bytes += size - BLOCK_HEADER
        lo, hi = self.written
        self.written = (min(lo, dest), max(hi, dest + need))
        return dest


class _Holes:
    """The free blocks a walk has seen (at most MAX_HOLES), by size class (bit length), each
    class in address order; sizes as seen, checked again when a hole is used."""

    def __init__(self):
        self.size = {}
        self.by_class = {}
        self._out = ffi.new("uint64_t *")

    def __iter__(self):
        return iter(sorted(self.size))

    def add(self, b: int, size: int) -> None:
        self.discard(b)
        if len(self.size) < MAX_HOLES and size >= BLOCK_MIN:
            insort(self.by_class.setdefault(size.bit_length(), []), b)
            self.size[b] = size

    def discard(self, b: int) -> None:
        size = self.size.pop(b, None)
        if size is not None:
            lst = self.by_class[size.bit_length()]
            del lst[bisect_left(lst, b)]

    def _lowest(self, need: int, below: int):
        """The lowest hole below ``below`` recorded as holding need payload bytes, or None."""
        want = need + BLOCK_HEADER
        best = None
        for c, lst in self.by_class.items():
            if not lst or (1 << c) <= want or (best is not None and lst[0] >= best):
                continue
            for b in lst[:16]:                    # the class of want itself: a bounded first fit
                if b >= below or (best is not None and b >= best):
                    break
                if self.size[b] >= want:
                    best = b
                    break
        return best

    def take(self, eng, need: int, below: int):
        """Allocate need payload bytes from the start of the lowest hole below ``below`` that
        holds them (mmkv_alloc_at); the block offset, or None.  The rest of the hole stays one."""
        v, w = eng.view, eng.words
        for _ in range(4 * MAX_HOLES):
            b = self._lowest(need, below)
            if b is None:
                return None
            rc = lib.mmkv_alloc_at(v, b, need, self._out)
            if rc == ENEEDBACK:
                eng.alloc.back(v.holes_block, need)
                continue
            self.discard(b)
            if rc in (errno.ENOSPC, errno.ENOENT):
                if rc == errno.ENOSPC and not w[b >> 3] & BLOCK_ALLOC:
                    self.add(b, w[b >> 3] & _SIZE_MASK)   # smaller than recorded: keep its real size
                    if self.size.get(b, 0) >= need + BLOCK_HEADER:
                        self.discard(b)               # damage would loop here: give the hole up
                continue
            raise_for(rc, "compaction allocation")
            rest = b + (w[b >> 3] & _SIZE_MASK)
            if rest < below and not w[rest >> 3] & BLOCK_ALLOC:
                self.add(rest, w[rest >> 3] & _SIZE_MASK)
            return b
        return None


def compact(eng, hold, alone, progress=None) -> dict:
    """Compact the store (see the module's docstring); returns what was done: records and bytes
    moved, file size and disk bytes before and after, whether it shrank, the longest lock hold.

    Blocks other processes' writes for at most about STEP_SECONDS at a time (longer in
    sync="full", where each move waits for two msyncs).  Readers never wait.
    :raises DiskFullError: backing released space for a move failed; the store is consistent
        (records moved so far stay moved).
    :raises CorruptionError: a damaged heap or index (run recover()).
    """
    import os
    t0 = time.monotonic()
    holds = {}                                  # phase -> longest lock hold, seconds
    hold = _timed(hold, holds)
    with hold("start"):
        size_before = eng.fm.size
        _announce(eng, os.getpid())
    try:
        return _compact(eng, hold, holds, alone, progress, t0, size_before)
    finally:
        with hold("end"):
            if eng.words[_COMPACTING] == os.getpid():
                _announce(eng, 0)


def _announce(eng, pid: int) -> None:
    """Name this process in the state as running a compaction (0: none), lock held: while it
    lives, no process's free releases pages (see compaction_running in native/mmkv_alloc.c)."""
    eng.words[_COMPACTING] = pid


def _compact(eng, hold, holds, alone, progress, t0, size_before) -> dict:
    disk_before = mapping.disk_bytes(eng.fd)
    walk = _Walk(eng)
    more = True
    while more:
        with hold("walk"):
            walk.resume()
            more = walk.step(time.monotonic() + STEP_SECONDS)
            done, total = walk.pos, eng.view.heap_end
        if progress is not None:
            progress(done - HEAP_START, total - HEAP_START)
        if walk.write_back_due():
            walk.write_back(eng.fd)
        _let_others_in()
    _write_back(eng)
    index_moves = _lower_the_index(eng, hold, walk)
    released = _release_free_space(eng, hold, walk)
    _write_back(eng)
    started = time.monotonic()
    shrunk = alone(lambda: _shrink(eng))
    holds["shrink"] = time.monotonic() - started
    with hold("end"):
        size_after = eng.fm.size
    return {"moved_records": walk.moved, "moved_bytes": walk.moved_bytes, "walk_restarts": walk.restarts,
            "index_blocks_moved": index_moves, "released_bytes": released, "shrunk": bool(shrunk),
            "file_size_before": size_before, "file_size_after": size_after,
            "disk_bytes_before": disk_before, "disk_bytes_after": mapping.disk_bytes(eng.fd),
            "longest_step_seconds": max(holds.values()), "longest_hold_by_phase": holds,
            "seconds": time.monotonic() - t0}


def _write_back(eng) -> None:
    """fdatasync the file, holding no lock.

    The moves dirty the pages they write.  Left to the kernel's flusher, hundreds of MB of them
    queue ahead of the next durable barrier, and a barrier taken under the lock (an index
    relocation, the shrink's meta, a split in another process) waits for all of them: one
    relocation held the lock for 2.1 s after a 500 MB walk.  Written back here, between holds, the
    barriers under the lock find little to write.  During the walk, every WRITE_BACK_BYTES moved
    or twice that walked, the ranges it dirtied are written back and waited for (sync_file_range,
    no lock held): not the whole file (a store written just before has all its pages dirty, and
    starting them all at once makes one huge burst), and never more than a few MB queued: a page
    fault of another process that meets a page under write-back waits for the writes queued ahead
    of it (measured with a reader in another process: 64 MB bursts, gets of up to 325 ms; 4 MB,
    45 ms).  The walk so goes no faster than the disk writes, which it outruns only on small
    records."""
    eng.fm.sync_file()


def _let_others_in() -> None:
    """Pause between two lock holds.  A mutex is not fair: released and taken again at once, it
    stays with this thread while the process that was woken to take it is still being scheduled
    (measured: gets of a reader in another process waited up to 75 ms behind 2 ms steps).  A pause
    of an eighth of a step lets every waiter in."""
    time.sleep(STEP_SECONDS / 8)


def _tail_start(eng) -> int:
    out = ffi.new("uint64_t *")
    raise_for(lib.mmkv_heap_tail(eng.view, out), "heap tail")
    return out[0]


def _lower_the_index(eng, hold, walk) -> int:
    """While the last block in use is a block of an index (the main one's or a live namespace's
    directory or segment) or the catalog, move it into the lowest hole that takes it, one block
    per lock hold, so that the free tail grows down past it: an index block by index.relocate
    (a durable copy, one commit of its roots: the meta, or for a namespace a catalog commit), the
    catalog by namespaces.move_catalog.  A namespace's relocation writes a new catalog copy,
    which may then be the last block (moved down in the next hold).  A block with no free space
    below it stays (moving it would only grow the file: a fresh store's index is its last
    block), and so does a dropped namespace's (being freed).  Bounded: at most three moves per
    block the indexes and the catalog hold.  Returns the blocks moved.
    :raises CorruptionError: the catalog is unreadable (as the walk before it does)."""
    from . import index, namespaces
    moved, budget = 0, None
    while True:
        with hold("index"):
            tail = _tail_start(eng)
            placed = [(ieng, off) for _, ieng, entry in namespaces.all_indexes(eng)
                      if entry is None or not entry.dropped for off, _ in index.pieces(ieng)]
            placed += [(None, off) for off, _ in namespaces.catalog_blocks(eng)]
            if budget is None:
                budget = 3 * len(placed) + 3
            last = [(ieng, off) for ieng, off in placed if eng.alloc.placement(off) is not None
                    and off - BLOCK_HEADER + eng.alloc.block_size(off - BLOCK_HEADER) == tail]
            if not last or budget <= 0:
                return moved
            budget -= 1
            ieng, off = last[0]
            lower = _LowerAllocator(eng, walk, below=off)
            try:
                if ieng is None:
                    namespaces.move_catalog(eng, lower)
                    relocated = True
                else:
                    relocated = index.relocate(ieng, off, lower)
            except _NoRoomBelow:
                return moved
            moved += relocated
            if not relocated:
                return moved
        _let_others_in()


class _NoRoomBelow(Exception):
    """No free space below the block being moved (index.relocate frees what it took)."""


class _LowerAllocator:
    """allocate(payload) from the lowest hole the walk knows below ``below``, else from the
    free lists if they give a block below ``below`` (never by growing the file); else
    _NoRoomBelow (index.relocate frees what it took for the move)."""

    def __init__(self, eng, walk, below):
        self.eng, self.walk, self.below = eng, walk, below

    def __call__(self, payload):
        b = self.walk.holes.take(self.eng, payload, self.below)
        if b is not None:
            return b + BLOCK_HEADER
        off = self.eng.alloc.alloc(payload)      # 0: none fits (never grows the file)
        if off and off < self.below:
            return off
        if off:
            self.eng.free(off, payload)
        raise _NoRoomBelow()


def _release_free_space(eng, hold, walk) -> int:
    """Punch the pages inside every hole the walk knows and the free tail, a few per lock hold;
    bytes released."""
    released = 0
    with hold("release"):
        page = eng.ident.page_size
        listed = {b for b, _ in eng.alloc.free_blocks_of(3 * page)}   # any with a whole inner page
        candidates = sorted(listed | set(walk.holes) | {_tail_start(eng)}, reverse=True)
    start = 0
    while candidates:
        _let_others_in()
        with hold("release"):
            deadline = time.monotonic() + STEP_SECONDS
            while candidates and time.monotonic() < deadline:
                b = candidates[-1]
                try:
                    if b >= eng.view.heap_end:
                        raise CorruptionError("past the end")
                    size = eng.alloc.block_size(b)
                    start = max(start, b)
                    released += eng.alloc.release(b, start, RELEASE_CHUNK)
                    start += RELEASE_CHUNK
                    if start < b + size:
                        continue              # the rest of this block in the next piece
                except CorruptionError:
                    pass                      # no longer a free block: someone allocated from it
                candidates.pop()
                start = 0
    return released


class _timed:
    """hold(phase): the lock context, timed: the longest hold of each phase goes to ``holds``."""

    def __init__(self, hold, holds):
        self.hold, self.holds = hold, holds

    def __call__(self, phase):
        return _TimedHold(self, phase)


class _TimedHold:
    def __init__(self, timed, phase):
        self.timed, self.phase = timed, phase

    def __enter__(self):
        self.block = self.timed.hold()
        self.block.__enter__()
        self.started = time.monotonic()

    def __exit__(self, *exc):
        took = time.monotonic() - self.started
        holds = self.timed.holds
        holds[self.phase] = max(holds.get(self.phase, 0.0), took)
        return self.block.__exit__(*exc)


def _shrink(eng) -> bool:
    """Cut the file after its last block in use (the caller holds the protocol lock and the store
    lock, and no other handle has the file open).  True when the file got smaller."""
    import os
    fm, v = eng.fm, eng.view
    page = eng.ident.page_size
    tail = _tail_start(eng)
    new_size = max((tail + BLOCK_MIN + EPILOGUE_BYTES + page - 1) // page * page, 2 * page)
    if new_size >= fm.size:
        return False
    old_size = fm.size
    # the new footer and epilogue go in the last page kept: back it if it was released
    rc = lib.mmkv_fallocate(eng.fd, new_size - page, page)
    if rc:
        raise_for(rc, "posix_fallocate of the last page kept")
    raise_for(lib.mmkv_heap_shrink(v, new_size - EPILOGUE_BYTES), "heap shrink")
    if failpoints.armed:
        failpoints.hit(b"shrink.before_meta")
    eng.write_meta(durable=True, file_size=new_size)        # remaps to the smaller size
    for base, size in fm.mapped_ranges():
        if size > new_size:
            raise_for(lib.mmkv_map_zero(base, size, new_size, size - new_size), "unmapping the cut tail")
    if failpoints.armed:
        failpoints.hit(b"shrink.before_truncate")
    os.ftruncate(eng.fd, new_size)
    return new_size < old_size
