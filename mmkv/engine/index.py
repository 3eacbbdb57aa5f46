"""The hash index: extendible hashing over fixed-size segments (layout in native/mmkv_layout.h).

The shim probes, inserts, deletes and splits inside segments; this module
decides when and does the structural steps, each crash-safe the same way:
build the new pieces in free space, make them durable, switch the meta (one
checksummed header write), then free the old pieces.  A crash before the
switch leaves the old index in force (the new blocks are leaked until the next
recovery frees them); a crash after it leaves the new one.

A split touches one segment (at most MMKV_SEGMENT_SLOTS entries) and the
directory (8 bytes per entry, 2^dir_bits entries), so the index grows without
the pause of rehashing everything: a put never waits for more than one split.
Callers hold the store lock.  Every function is handed the engine (mmkv.engine.core) or a
view, never the Store; blocks are payload offsets from ``engine.allocate``.
"""
import errno
from itertools import chain, repeat

from .shim import ffi, lib, raise_for
from ..errors import CorruptionError, LimitError
from . import failpoints
from .allocator import block_size_for
from .layout import SEGMENT_BYTES, SEGMENT_HEADER, SEGMENT_SLOTS, SLOT_OFF_MASK, hash_tag, slot_tag
from .layout import slot_word  # noqa: F401 (callers build slot words as index.slot_word)


def create(allocate, view, words, free=None, depth: int = 0) -> tuple:
    """A new empty index: a directory of 2^depth entries, each naming a segment of its own
    (depth 0: one entry, one segment).  Returns (dir_off, dir_bits).

    ``allocate(payload)`` returns a payload offset; ``view()`` and ``words()`` must
    describe the mapping after the allocations (allocate may grow the file).
    ``free(offset, payload)``, when given, returns the blocks already taken if an allocation
    raises (DiskFullError), so a failed create leaves no block behind.
    """
    taken = []
    try:
        for _ in range(1 << depth):
            taken.append((allocate(SEGMENT_BYTES), SEGMENT_BYTES))
        taken.append((allocate(8 << depth), 8 << depth))
    except BaseException:
        for off, payload in taken:
            if free and off:
                free(off, payload)
        raise
    if not all(off for off, _ in taken):
        raise CorruptionError("no room for a new index in a fresh heap")
    d = taken[-1][0]
    for prefix, (seg, _) in enumerate(taken[:-1]):
        raise_for(lib.mmkv_segment_init(view(), seg, depth, prefix), "segment init")
        words()[(d >> 3) + prefix] = seg
    return d, depth


def segment_depth(words, seg: int) -> int:
    return words[seg >> 3]


def split(eng, view, seg: int, publish: bool = True) -> None:
    """Split the full segment seg of the index that view describes (commit order: the
    "index split" row of the README's "Commit orders" table).

    With publish the new directory goes through a durable meta switch (the live
    index); without, view is a private index under construction (recovery).
    Until the switch the new blocks are private: an error before it (DiskFullError
    from one of the three allocations, say) frees the ones already taken, so the
    index and the heap are as they were.
    :raises LimitError: the segment holds keys whose hashes agree on 32 bits.
    :raises DiskFullError: the file cannot grow for the new blocks; nothing changed.
    """
    taken = []                                  # (offset, payload) of this split, freed on an error before the switch
    try:
        taken.append((eng.allocate(SEGMENT_BYTES), SEGMENT_BYTES))     # may grow and remap the file...
        taken.append((eng.allocate(SEGMENT_BYTES), SEGMENT_BYTES))
        (a, _), (b, _) = taken
        eng.follow(view)                                                # ...so follow it
        rc = lib.mmkv_segment_split(view, seg, a, b)
        if rc == errno.E2BIG:
            raise LimitError("an index segment cannot split further: more than "
                             f"{view.max_count} keys share 32 hash bits")
        raise_for(rc, "segment split")
        bits = view.dir_bits + 1 if segment_depth(eng.words, seg) == view.dir_bits else view.dir_bits
        taken.append((eng.allocate(8 << bits), 8 << bits))
        d = taken[2][0]
        eng.follow(view)
        raise_for(lib.mmkv_dir_build(view, d, bits, seg, a, b), "directory build")
        if publish:
            eng.make_durable(*taken)             # the new pieces are durable before the meta names them
            if failpoints.armed:
                failpoints.hit(b"split.before_meta")
    except BaseException:
        eng.follow(view)
        for off, payload in taken:
            eng.free(off, payload)
        raise
    old_dir, old_bits = view.dir_off, view.dir_bits
    if publish:
        eng.write_meta(dir_off=d, dir_bits=bits)
        if failpoints.armed:
            failpoints.hit(b"split.after_meta")
    else:
        view.dir_off, view.dir_bits = d, bits
    eng.free(seg, SEGMENT_BYTES)               # a size the header claims beyond these is damage:
    eng.free(old_dir, 8 << old_bits)           # refused, never freeing the blocks after it


def insert(eng, view, word: int, publish: bool = True) -> None:
    """Insert a slot word into the index view describes, splitting the full segment it falls
    in (and retrying) as often as needed.  ``publish``: view is the live index (each split is
    a durable meta switch); else a private index under construction.
    :raises DiskFullError: a split found no room (the index is as before that split).
    :raises LimitError: the segment cannot split further.  :raises CorruptionError: damage."""
    while True:
        eng.follow(view)
        rc = lib.mmkv_index_insert(view, word)
        if rc != errno.EAGAIN:
            break
        split(eng, view, view.seg, publish=publish)
    raise_for(rc, "index insert")


def reserve(eng, hashes, segments) -> None:
    """Split, now, every segment of the live index that inserting keys with these ``hashes``
    (absent from the index; ``segments``: the segments they fall in) would take above
    ``max_count``, so that the inserts themselves will need no new block.

    A transaction calls it before its commit point: once the journal is named, applying it
    must not depend on free space.  A segment of depth d and prefix p holds the hashes
    whose top d bits are p, so the keys bound for it are counted by bisecting the sorted
    hashes; after a split, each half is checked again.  Each split is a whole, crash-safe
    index change that keeps the content.
    :raises DiskFullError, LimitError: from a split; the splits done stay (content unchanged).
    """
    from bisect import bisect_left      # here: only a transaction's commit needs it, import mmkv does not
    v = eng.view
    hashes = sorted(hashes)
    todo = list(segments)
    while todo:
        seg = todo.pop()
        head = ffi.cast("struct mmkv_segment *", eng.fm.base + seg)
        lo, hi = head.prefix << (64 - head.depth), (head.prefix + 1) << (64 - head.depth)
        if head.count + bisect_left(hashes, hi) - bisect_left(hashes, lo) <= v.max_count:
            continue
        split(eng, v, seg)
        w, first = eng.words, v.dir_off >> 3
        for half in (lo, (lo + hi) >> 1):              # the two new segments, by the hashes they hold
            todo.append(w[first + (half >> (64 - v.dir_bits))])


def pieces(eng, view=None) -> list:
    """[(payload offset, payload bytes)] of the directory and every segment, each once, every
    offset checked to lie in the heap (the directory's before its entries are read).
    :raises CorruptionError: the directory points outside the heap.
    """
    v = view or eng.view
    w, alloc = eng.words, eng.alloc

    def piece(payload_off, need):
        if alloc.placement(payload_off) is None or payload_off + need > alloc.end:
            raise CorruptionError(f"index block at {payload_off} lies outside the heap")
        return payload_off, need

    out = [piece(v.dir_off, 8 << v.dir_bits)]
    prev = None
    for i in range(1 << v.dir_bits):
        seg = w[(v.dir_off >> 3) + i]
        if seg != prev:
            out.append(piece(seg, SEGMENT_BYTES))
            prev = seg
    return out


def blocks(eng, view=None) -> list:
    """[(block, block size)] of pieces(), as the allocator places them (opaque pairs for
    recovery, the checker and durability).

    Sizes come from the block headers when they are plausible, else from what the
    structure needs (a torn header must not shrink what recovery keeps).
    :raises CorruptionError: the directory points outside the heap.
    """
    alloc = eng.alloc
    out = []
    for off, need in pieces(eng, view):
        b = alloc.placement(off)
        out.append((b, alloc.claimed(b, block_size_for(need))))
    return out


def needs(view) -> list:
    """Payload bytes of each block blocks() lists, in its order: the directory, then segments."""
    return chain([8 << view.dir_bits], repeat(SEGMENT_BYTES))


def entries(view):
    """Yield (segment, slot, record offset) for every slot in use, each segment once."""
    found, seg, word = ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
    cursor = 0
    while True:
        rc = lib.mmkv_slot_next(view, cursor, found, seg, word)
        if rc == errno.ENOENT:
            return
        raise_for(rc, "index scan")
        yield seg[0], found[0] % SEGMENT_SLOTS, word[0] & SLOT_OFF_MASK
        cursor = found[0] + 1


def verified_records(eng):
    """Yield (record offset, key) for every slot in use of the live index, each checked first:
    the record (its block, lengths, checksum and key hash; ``eng.view.hash``/``val_off``/
    ``val_len`` describe it when yielded), the slot's tag, which must be its record's, and the
    key, which no other slot may hold.  Both are damage lookups do not see (they stop at the
    first slot of a key, and skip other tags), so a put of such a key leaves the stale record in
    the other slot, where iteration would find it.  Caller holds the lock; keeps every key seen.
    :raises CorruptionError: a slot points at a bad record, carries another tag, or holds a key a
        slot before it holds (recover() drops such slots, keeping the one lookups find).
    """
    view, words, seen = eng.view, eng.words, set()
    for seg, slot, rec in entries(view):
        raise_for(lib.mmkv_record_verify(view, rec), f"record at {rec}")
        key = eng.record_key(rec)
        if slot_tag(words[((seg + SEGMENT_HEADER) >> 3) + slot]) != hash_tag(view.hash):
            raise CorruptionError(f"{eng.path}: index slot {slot} of segment {seg} does not belong to its record: "
                                  "its tag is another key's (damage); db.recover() repairs the index")
        if key in seen:
            raise CorruptionError(f"{eng.path}: index slot {slot} of segment {seg} does not belong to its record: "
                                  "it holds a key another slot holds (damage); db.recover() repairs the index")
        seen.add(key)
        yield rec, key


def shape(eng) -> dict:
    """Directory depth, segment count and total slots of the live index."""
    v = eng.view
    segments = len(blocks(eng)) - 1
    return {"index_depth": v.dir_bits, "index_segments": segments, "index_slots": segments * SEGMENT_SLOTS}


def rebuild(eng, words: list, depth: int = 0) -> None:
    """Replace the live index with a new one holding exactly ``words`` (slot words), starting
    from 2^depth segments (see create); commit order: the "index rebuild" row of the README's
    "Commit orders" table.

    Built privately, made durable, then switched in by one meta write; the old
    index's blocks are freed after the switch.  An error before the switch
    (DiskFullError while allocating the new index, say) frees every block of the
    new index: the live index and the heap are as they were.
    :raises DiskFullError: the file cannot grow for the new index; nothing changed.
    """
    live = eng.view
    old = pieces(eng)
    view = ffi.new("struct mmkv_view *")
    view[0] = live[0]
    view.dir_off, view.dir_bits = create(eng.allocate, lambda: eng.view, lambda: eng.words, eng.free, depth)
    try:
        for i, word in enumerate(words):
            if failpoints.armed and i == len(words) // 2:
                failpoints.hit(b"recover.mid_rebuild")
            insert(eng, view, word, publish=False)
        eng.follow(view)
        eng.make_durable(*pieces(eng, view))
        if failpoints.armed:
            failpoints.hit(b"rebuild.before_meta")
    except BaseException:
        eng.follow(view)
        for off, need in pieces(eng, view):
            eng.free(off, need)
        raise
    eng.write_meta(dir_off=view.dir_off, dir_bits=view.dir_bits)
    # every entry moved: the expiry sweep's pass in progress may have missed some (see "The sweep"
    # in native/mmkv_fused.c), so its end must not tighten ttl_min
    eng.poison_sweep()
    if failpoints.armed:
        failpoints.hit(b"rebuild.after_meta")
    for off, need in old:
        eng.free(off, need)


def relocate(eng, old: int, allocate) -> bool:
    """Move one block of the live index (the directory, or a segment: ``old`` is its payload
    offset) into a block from ``allocate(payload)`` (compaction passes one that takes the lowest
    free space); commit order: the "index relocation" row of the README's "Commit orders" table,
    that of a split: the copy and a new directory are made durable, the meta names them, the old
    blocks are freed.  Lock-free readers that still hold the old directory or segment find it
    intact until the free, and the lock's sequence word makes them retry after.  Caller holds the
    lock.  Returns False when ``old`` is not a block of the index (nothing changed).
    :raises DiskFullError: no room for the copy; nothing changed.
    """
    v, w, mm = eng.view, eng.words, eng.fm.mm
    dir_bytes = 8 << v.dir_bits
    entries = [w[(v.dir_off >> 3) + i] for i in range(1 << v.dir_bits)]
    if old != v.dir_off and old not in entries:
        return False
    taken = []
    try:
        if old != v.dir_off:
            taken.append((allocate(SEGMENT_BYTES), SEGMENT_BYTES))
            eng.follow(v)
            mm = eng.fm.mm
            new_seg = taken[0][0]
            mm[new_seg:new_seg + SEGMENT_BYTES] = mm[old:old + SEGMENT_BYTES]
            entries = [new_seg if e == old else e for e in entries]
        taken.append((allocate(dir_bytes), dir_bytes))
        new_dir = taken[-1][0]
        w = eng.words
        for i, e in enumerate(entries):
            w[(new_dir >> 3) + i] = e
        eng.make_durable(*taken)
        if failpoints.armed:
            failpoints.hit(b"relocate.before_meta")
    except BaseException:
        for off, payload in taken:
            eng.free(off, payload)
        raise
    old_dir = v.dir_off
    eng.write_meta(dir_off=new_dir)
    if failpoints.armed:
        failpoints.hit(b"relocate.after_meta")
    if old != old_dir:
        eng.free(old, SEGMENT_BYTES)
    eng.free(old_dir, dir_bytes)
    return True


def presize_depth(eng, total_keys: int):
    """The depth presize would rebuild the index at for total_keys, or None when the live index
    has enough segments (the new index takes 2^depth * SEGMENT_BYTES and a directory)."""
    need = max(1, -(-(total_keys * 5 // 4) // max(1, eng.view.max_count)))     # segments, rounded up
    depth = (need - 1).bit_length()
    return None if (1 << depth) <= len(pieces(eng)) - 1 else depth


def presize(eng, total_keys: int) -> bool:
    """Make the live index hold total_keys without a split, in one structural step, when that
    takes more segments than it has: a rebuild (see rebuild: built privately, made durable,
    one meta switch) into 2^d segments, d the least depth at which they hold total_keys at
    the split threshold with a quarter to spare for uneven hashing, keeping every entry.

    For a batch of writes (update) into a small index: one step instead of the splits that
    inserting the keys one by one would make, each its own durable meta switch.  O(keys now in
    the index); the caller holds the lock.  Returns True when it rebuilt.
    :raises DiskFullError: no room for the new index; nothing changed.
    """
    depth = presize_depth(eng, total_keys)
    if depth is None:
        return False
    v, w = eng.view, eng.words
    words = [w[((seg + SEGMENT_HEADER) >> 3) + slot] for seg, slot, _ in entries(v)]
    rebuild(eng, words, depth)
    return True


def audit(view) -> tuple:
    """(directory entry, slot) of the first fault, or None when the index is sound."""
    entry, slot = ffi.new("uint64_t *"), ffi.new("uint64_t *")
    if lib.mmkv_index_audit(view, entry, slot):
        return entry[0], slot[0]
    return None
