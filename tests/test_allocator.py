"""Allocator properties, exercised on real stores.

Direct allocator calls (``db.engine.alloc.alloc/free``) run under ``db.lock()``, as the
engine's own callers do.  Every block a test allocates by hand is freed before
the test ends, so the conftest audit (check() on every ``*.mmkv`` left under
tmp_path) still passes.
"""
import itertools
import os
import random
import shutil
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mmkv
from mmkv.engine import index
from mmkv.engine.allocator import block_size_for, size_class
from mmkv.engine.shim import ffi
from mmkv.engine.layout import (BLOCK_ALLOC, BLOCK_FLAGS, BLOCK_MIN, BLOCK_PREV_ALLOC, EPILOGUE_BYTES, FREE_NEXT, FREE_PREV,
                         HEAP_START, MASK64, NCLASSES, RECORD_HEADER, REC_KEY_LEN_AT, SEGMENT_BYTES, SEGMENT_SLOTS, STATE_WORD, pad8)
from mmkv.engine.tunables import LARGE_BLOCK, MAX_LOAD

PAGE = os.sysconf("SC_PAGE_SIZE")
REC_VAL_LEN_AT = ffi.offsetof("struct mmkv_record", "val_len")


# ---------------------------------------------------------------- helpers
def heap(db):
    """[(offset, size, in_use)] of every block, read under the lock."""
    with db.lock():
        return list(db.engine.alloc.blocks())


def audit(db):
    with db.lock():
        return db.engine.alloc.audit()


def heap_end(db):
    with db.lock():
        return db.engine.alloc.end


def index_blocks(db):
    """[(offset, size)] of the index's blocks (the directory and every segment), sorted by offset.

    Each size is checked against the heap's own header for that block."""
    with db.lock():
        out = sorted(index.blocks(db.engine))
        for b, size in out:
            assert db.engine.alloc.block_size(b) == size, f"index block {b}: blocks() and the heap disagree on its size"
        return out


def directory_block(db):
    """(offset, size) of the block that holds the index directory."""
    with db.lock():
        b = db._view.dir_off - 8
        return b, db.engine.alloc.block_size(b)


def handed_out(payload):
    """The sizes a block allocated for payload bytes may have: the allocator's size for it (whole pages
    from LARGE_BLOCK on), or up to BLOCK_MIN - 16 bytes more when the free block it was cut from had
    less than BLOCK_MIN left over (too small to be a block of its own, so it goes with the allocation).
    Which case happens depends on where earlier blocks landed, hence on the file's random hash key
    (the order of index splits), so a test must accept both."""
    size = block_size_for(payload)
    if size >= LARGE_BLOCK:
        size = (size + PAGE - 1) // PAGE * PAGE
    return range(size, size + BLOCK_MIN, 16)


def assert_index_blocks_hold_the_index(db, blocks):
    """The directory block holds 2^dir_bits entries, each segment block a whole segment (page-aligned:
    a segment is a large allocation), and there are stats()["index_segments"] of them."""
    st_ = db.stats()
    db_, dsize = directory_block(db)
    assert (db_, dsize) in blocks
    assert dsize in handed_out(8 << st_["index_depth"])
    segs = [(b, s) for b, s in blocks if b != db_]
    assert len(segs) == st_["index_segments"] and st_["index_slots"] == len(segs) * SEGMENT_SLOTS
    assert len(blocks) == len(segs) + 1
    for b, s in segs:
        assert (b + 8) % PAGE == 0, f"segment block {b} is not page-aligned"
        assert s in handed_out(SEGMENT_BYTES)


def record_blocks(db):
    """[(block offset, block size, key_len, val_len)] for every record the index points at."""
    out = []
    with db.lock():
        w = db.engine.words
        for _, _, rec in index.entries(db._view):
            b = rec - 8
            klen = w[(rec + REC_KEY_LEN_AT) >> 3] & 0xFFFFFFFF
            vlen = w[(rec + REC_VAL_LEN_AT) >> 3]
            out.append((b, db.engine.alloc.block_size(b), klen, vlen))
    return out


def assert_tiles(db, blocks):
    """Blocks are contiguous from HEAP_START to the epilogue, each of a legal size."""
    pos = HEAP_START
    for off, size, _ in blocks:
        assert off == pos, f"gap or overlap at {pos}: next block starts at {off}"
        assert size >= BLOCK_MIN and size % 16 == 0
        pos += size
    assert pos == heap_end(db)
    assert heap_end(db) == db.stats()["file_size"] - EPILOGUE_BYTES


def assert_disjoint(intervals):
    """[(start, size)] do not overlap."""
    last_end = -1
    for start, size in sorted(intervals):
        assert start >= last_end, f"block at {start} overlaps the one ending at {last_end}"
        last_end = start + size


def assert_accounting(db):
    st_ = db.stats()
    blocks = heap(db)
    used = sum(s for _, s, u in blocks if u)
    free = sum(s for _, s, u in blocks if not u)
    assert st_["used_bytes"] == used
    assert st_["free_bytes"] == free
    assert used + free + HEAP_START + EPILOGUE_BYTES == st_["file_size"]
    assert st_["largest_free_block"] == max((s for _, s, u in blocks if not u), default=0)


def alloc(db, payload):
    """Allocate a block for payload bytes (growing the file when nothing fits); caller holds the lock."""
    b = db.engine.alloc.alloc_block(payload)
    if not b:
        db.engine.grow(payload)
        b = db.engine.alloc.alloc_block(payload)
    assert b, f"no block for {payload} bytes even after growing the file"
    return b


def fill(db, b, n, tag):
    db.engine.fm.mm[b + 8:b + 8 + n] = bytes([tag & 0xFF]) * n


def intact(db, b, n, tag):
    return db.engine.fm.mm[b + 8:b + 8 + n] == bytes([tag & 0xFF]) * n


def random_value(rng, lo, hi):
    return rng.randbytes(rng.randint(lo, hi))


# ---------------------------------------------------------------- layout of a fresh heap
def _fresh_layout(db):
    """The heap of a new store: the one-entry directory at the start of the heap, the free rest of the
    page below the (page-aligned) segment, the segment, and one free block to the end."""
    (dir_b, dir_s), (seg_b, seg_s) = index_blocks(db)
    end = heap_end(db)
    return [(HEAP_START, dir_s, True), (HEAP_START + dir_s, seg_b - HEAP_START - dir_s, False),
            (seg_b, seg_s, True), (seg_b + seg_s, end - seg_b - seg_s, False)]


def test_fresh_store_heap_is_index_then_free_space(db):
    blocks = heap(db)
    assert_tiles(db, blocks)
    idx = index_blocks(db)
    assert len(idx) == 2                                   # a one-entry directory and one segment
    assert_index_blocks_hold_the_index(db, idx)
    (dir_b, dir_s), (seg_b, seg_s) = idx
    assert directory_block(db) == (dir_b, dir_s) == (HEAP_START, block_size_for(8))
    assert seg_b + 8 == PAGE * ((HEAP_START + dir_s + 8 + PAGE - 1) // PAGE)   # the first page boundary past the directory
    assert blocks == _fresh_layout(db)
    assert audit(db) == []
    assert_accounting(db)
    st_ = db.stats()
    assert st_["used_bytes"] == dir_s + seg_s
    tail = blocks[-1][1]
    assert st_["largest_free_block"] == tail and st_["free_bytes"] == tail + blocks[1][1]
    assert st_["fragmentation"] == pytest.approx(1 - tail / st_["free_bytes"])


def test_block_size_and_size_classes():
    assert block_size_for(0) == BLOCK_MIN
    assert block_size_for(24) == BLOCK_MIN
    assert block_size_for(25) == 48
    for n in range(0, 5000, 7):
        s = block_size_for(n)
        assert s % 16 == 0 and s >= n + 8 and s - (n + 8) < 16 + BLOCK_MIN
    # exact classes hold one size each, range classes are ordered and never go down
    sizes = list(range(BLOCK_MIN, 1 << 22, 16))
    classes = [size_class(s) for s in sizes]
    assert classes == sorted(classes)
    assert len({size_class(s) for s in range(BLOCK_MIN, 513, 16)}) == (512 - BLOCK_MIN) // 16 + 1


# ---------------------------------------------------------------- no overlaps
def test_live_blocks_never_overlap(db):
    rng = random.Random(1234)
    model = {}
    for i in range(3000):
        k = b"k%d" % rng.randrange(800)
        r = rng.random()
        if r < 0.25 and k in model:
            del db[k]
            del model[k]
        else:
            v = random_value(rng, 0, 3000) if r < 0.98 else random_value(rng, LARGE_BLOCK, 3 * LARGE_BLOCK)
            db[k] = v
            model[k] = v
    blocks = heap(db)
    assert_tiles(db, blocks)
    in_use = {off: size for off, size, used in blocks if used}
    recs = record_blocks(db)
    assert len(recs) == len(model) == len(db)
    idx = index_blocks(db)
    # every record and every index block (directory, segments) are blocks in use, and nothing else is
    assert {b for b, *_ in recs} | {b for b, _ in idx} == set(in_use)
    for b, size, klen, vlen in recs:
        assert in_use[b] == size
        assert RECORD_HEADER + pad8(klen) + vlen <= size - 8, "record does not fit its block"
    for b, size in idx:
        assert in_use[b] == size
    assert_index_blocks_hold_the_index(db, idx)
    assert_disjoint([(b, s) for b, s, *_ in recs] + idx)
    assert audit(db) == []
    assert_accounting(db)
    assert dict(db.items()) == model


# ---------------------------------------------------------------- freeing everything
def _free_blocks(db):
    return [(off, size) for off, size, used in heap(db) if not used]


def test_deleting_everything_without_index_growth_restores_the_fresh_layout(db):
    # as many keys as one segment takes without splitting: the index stays where it was created
    # (directory at the start of the heap, the segment on the first page boundary after it)
    rng = random.Random(5)
    fresh_index = index_blocks(db)
    n = int(SEGMENT_SLOTS * MAX_LOAD)
    keys = [b"key%d" % i for i in range(n)]
    for k in keys:
        db[k] = random_value(rng, 0, 2500)
    for k in keys[::3]:
        db[k] = random_value(rng, 0, 2500)     # overwrites move records around
    st_ = db.stats()
    assert st_["index_slots"] == SEGMENT_SLOTS and st_["index_segments"] == 1 and st_["index_depth"] == 0
    assert index_blocks(db) == fresh_index
    rng.shuffle(keys)
    for k in keys:
        del db[k]
    assert index_blocks(db) == fresh_index
    blocks = heap(db)
    end = heap_end(db)
    # every record's block merged back: the free space below the segment and one free block after it
    assert blocks == _fresh_layout(db)
    (_, dsize), (_, ssize) = fresh_index
    tail = blocks[-1][1]
    st_ = db.stats()
    assert st_["keys"] == 0 and st_["live_bytes"] == 0
    assert st_["used_bytes"] == dsize + ssize
    assert st_["free_bytes"] == end - HEAP_START - dsize - ssize == blocks[1][1] + tail
    assert st_["largest_free_block"] == tail
    assert st_["fragmentation"] == pytest.approx(1 - tail / st_["free_bytes"])
    assert audit(db) == []


def _assert_only_index_left(db):
    """The index's blocks (directory and segments) are the only blocks in use; free space is exactly
    one block in each gap around them (before the first, between two, after the last)."""
    idx = index_blocks(db)
    assert_index_blocks_hold_the_index(db, idx)
    end = heap_end(db)
    blocks = heap(db)
    assert [(o, s) for o, s, u in blocks if u] == idx
    expected, pos = [], HEAP_START
    for b, size in idx + [(end, 0)]:
        if b > pos:
            expected.append((pos, b - pos))
        pos = b + size
    assert _free_blocks(db) == expected
    assert len(expected) <= len(idx) + 1
    used = sum(s for _, s in idx)
    st_ = db.stats()
    assert st_["used_bytes"] == used
    assert st_["free_bytes"] == end - HEAP_START - used
    assert st_["largest_free_block"] == max(s for _, s in expected)
    if len(expected) == 1:
        assert st_["largest_free_block"] == st_["free_bytes"]
    assert audit(db) == []


def test_deleting_everything_after_index_growth_leaves_only_the_index(db):
    rng = random.Random(6)
    keys = [b"key%d" % i for i in range(40000)]
    for k in keys:
        db[k] = random_value(rng, 1, 600)
    st_ = db.stats()
    assert st_["index_segments"] >= 3 and st_["index_depth"] >= 2    # several splits: the index moved
    rng.shuffle(keys)
    for k in keys:
        del db[k]
    assert len(db) == 0
    assert db.stats()["index_segments"] == st_["index_segments"]     # deletes never merge segments
    _assert_only_index_left(db)


def test_clear_leaves_only_a_fresh_index(db):
    rng = random.Random(7)
    for i in range(30000):
        db[b"k%d" % i] = random_value(rng, 0, 1500)
    st_ = db.stats()
    assert st_["index_segments"] > 1 and st_["index_depth"] > 0
    db.clear()
    st_ = db.stats()
    assert len(db) == 0
    assert st_["index_slots"] == SEGMENT_SLOTS and st_["index_segments"] == 1 and st_["index_depth"] == 0
    assert len(index_blocks(db)) == 2                  # one directory entry, one segment
    _assert_only_index_left(db)
    db[b"again"] = b"1"
    assert dict(db.items()) == {b"again": b"1"}


# ---------------------------------------------------------------- coalescing
def _three_adjacent(db, payload=200):
    """A, B, C adjacent blocks and a guard block D after C, all in use; caller holds the lock."""
    a = db.engine.alloc
    A, B, C, D = (alloc(db, payload) for _ in range(4))
    s = a.block_size(A)
    assert a.block_size(B) == a.block_size(C) == s
    assert B == A + s and C == B + s and D == C + s, "fresh blocks should be carved one after the other"
    return A, B, C, D, s


def _word(db, off):
    return db.engine.words[off >> 3]


@pytest.mark.parametrize("order", list(itertools.permutations("ABC")), ids="".join)
def test_free_coalesces_in_any_order(db, order):
    with db.lock():
        A, B, C, D, s = _three_adjacent(db)
        blk = dict(A=A, B=B, C=C)
        for name in order:
            db.engine.alloc.free_block(blk[name])
            assert db.engine.alloc.audit() == []
        blocks = list(db.engine.alloc.blocks())
        assert (A, 3 * s, False) in blocks
        assert not any(A < off < D for off, _, _ in blocks)
        # boundary tags: header (PREV_ALLOC kept from the block before A), footer, and D knows
        assert _word(db, A) & ~BLOCK_FLAGS == 3 * s and not _word(db, A) & BLOCK_ALLOC
        assert _word(db, A) & BLOCK_PREV_ALLOC
        assert _word(db, A + 3 * s - 8) == 3 * s
        assert not _word(db, D) & BLOCK_PREV_ALLOC and _word(db, D) & BLOCK_ALLOC
        db.engine.alloc.free_block(D)
        assert db.engine.alloc.audit() == []


def test_free_middle_block_merges_both_neighbours(db):
    with db.lock():
        A, B, C, D, s = _three_adjacent(db, payload=1000)
        a = db.engine.alloc
        free_before = db.engine.words[STATE_WORD["free_bytes"]]
        a.free_block(A)
        a.free_block(C)
        assert a.audit() == []
        blocks = list(a.blocks())
        assert (A, s, False) in blocks and (B, s, True) in blocks and (C, s, False) in blocks
        assert _word(db, A + s - 8) == s and _word(db, C + s - 8) == s          # footers
        assert not _word(db, B) & BLOCK_PREV_ALLOC and not _word(db, D) & BLOCK_PREV_ALLOC
        n_free = sum(1 for *_, u in blocks if not u)
        a.free_block(B)
        blocks = list(a.blocks())
        assert (A, 3 * s, False) in blocks
        assert sum(1 for *_, u in blocks if not u) == n_free - 1     # A and C became one block
        assert a.audit() == []
        assert db.engine.words[STATE_WORD["free_bytes"]] == free_before + 3 * s
        # the merged block is reusable as a whole
        big = a.alloc_block(3 * s - 8)
        assert big == A and a.block_size(big) == 3 * s
        a.free_block(big)
        a.free_block(D)
        assert a.audit() == []


def test_free_merges_left_only_and_right_only(db):
    with db.lock():
        before = list(db.engine.alloc.blocks())
        A, B, C, D, s = _three_adjacent(db)
        a = db.engine.alloc
        a.free_block(A)
        a.free_block(B)          # merges with the free block on its left
        assert (A, 2 * s, False) in list(a.blocks()) and a.audit() == []
        # D was carved from the front of a free block; what is left of it lies right after D
        nxt = min([o for o, _, u in a.blocks() if u and o > D] + [a.end])
        assert (D + s, nxt - D - s, False) in list(a.blocks())
        a.free_block(D)          # merges with the free block on its right (up to the next block in use)
        assert a.audit() == []
        blocks = list(a.blocks())
        assert (D, nxt - D, False) in blocks
        assert not any(D < o < nxt for o, _, _ in blocks)
        a.free_block(C)          # both sides free: the heap is as it was before the four allocations
        assert a.audit() == []
        assert list(a.blocks()) == before
    _assert_only_index_left(db)


def test_double_free_of_a_lone_block_is_refused(db):
    with db.lock():
        A, B, C, D, s = _three_adjacent(db)
        a = db.engine.alloc
        a.free_block(B)
        with pytest.raises(mmkv.CorruptionError):
            a.free_block(B)
        assert a.audit() == []
        for b in (A, C, D):
            a.free_block(b)
        assert a.audit() == []


def test_detected_double_free_leaves_the_heap_unchanged(db):
    # Regression (found in 0e8830b): free() moved the used/free counters before it validated
    # the left neighbour, so a double free it caught still corrupted them.
    with db.lock():
        A, B, C, D, s = _three_adjacent(db)
        a = db.engine.alloc
        a.free_block(A)
        a.free_block(B)                 # coalesced into A; B's stale header still says "in use"
        assert a.audit() == []
        with pytest.raises(mmkv.CorruptionError):
            a.free_block(B)             # caught: its left footer does not match
        assert a.audit() == []
        assert (A, 2 * s, False) in list(a.blocks())
        for b in (C, D):
            a.free_block(b)
        assert a.audit() == []


# ---------------------------------------------------------------- large blocks
@pytest.mark.parametrize("payload", [LARGE_BLOCK - 8, LARGE_BLOCK, LARGE_BLOCK + 1, 100_000, 1 << 20, 3 * PAGE + 5])
def test_large_allocations_have_page_aligned_payloads(db, payload):
    with db.lock():
        small = [alloc(db, n) for n in (24, 100, 1000, 40)]   # make the heap's free space start unaligned
        bs = [alloc(db, payload) for _ in range(3)]
        for b in bs:
            size = db.engine.alloc.block_size(b)
            assert size - 8 >= payload
            if block_size_for(payload) >= LARGE_BLOCK:
                assert (b + 8) % PAGE == 0, f"payload of large block {b} is not page-aligned"
        assert_disjoint([(b, db.engine.alloc.block_size(b)) for b in bs + small])
        assert db.engine.alloc.audit() == []
        for b in small + bs:
            db.engine.alloc.free_block(b)
        assert db.engine.alloc.audit() == []


def test_large_values_sit_on_page_boundaries(db):
    for i, n in enumerate([LARGE_BLOCK, LARGE_BLOCK + 123, 200_000, 5]):
        db[b"x" * (i + 1)] = bytes([i]) * n
    recs = record_blocks(db)
    large = [(b, vlen) for b, _, klen, vlen in recs if block_size_for(RECORD_HEADER + pad8(klen) + vlen) >= LARGE_BLOCK]
    assert len(large) == 3
    for b, _ in large:
        assert (b + 8) % PAGE == 0
    assert audit(db) == []


def test_large_allocation_is_found_behind_many_too_small_free_blocks(db):
    # Regression (found in 0e8830b): the large-block path gave up after scanning 128 blocks
    # that were too small, never reached the big free block even after growing the file, and
    # the put failed with mmkv.Error("allocator found no block ...").
    # 300 contiguous large records; deleting every other one leaves 150 free blocks of 17 pages,
    # all in the size class a 25-page request starts scanning from.
    for i in range(300):
        db[b"big%d" % i] = b"x" * 65_900
    for i in range(0, 300, 2):
        del db[b"big%d" % i]
    db[b"huge"] = b"z" * 100_000
    assert db[b"huge"] == b"z" * 100_000


# ---------------------------------------------------------------- property: random alloc/free
_payloads = st.one_of(
    st.integers(0, 600),
    st.integers(600, 6000),
    st.integers(LARGE_BLOCK - 64, 3 * LARGE_BLOCK),
)
_ops = st.lists(st.one_of(st.tuples(st.just("alloc"), _payloads),
                          st.tuples(st.just("free"), st.integers(0, 1 << 30))), max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_random_alloc_free_keeps_heap_sound(ops):
    d = tempfile.mkdtemp(prefix="mmkv-alloc-")
    try:
        with mmkv.open(os.path.join(d, "h.mmkv")) as db:
            live = {}                 # block -> (payload, tag)
            with db.lock():
                a = db.engine.alloc
                for i, (op, arg) in enumerate(ops):
                    if op == "alloc":
                        b = alloc(db, arg)
                        assert b not in live
                        size = a.block_size(b)
                        assert size >= arg + 8 and size % 16 == 0
                        if block_size_for(arg) >= LARGE_BLOCK:
                            assert (b + 8) % PAGE == 0
                        fill(db, b, arg, i)
                        live[b] = (arg, i)
                    elif live:
                        b = sorted(live)[arg % len(live)]
                        n, tag = live.pop(b)
                        assert intact(db, b, n, tag), f"payload of block {b} was overwritten"
                        a.free_block(b)
                    assert a.audit() == []
                    in_use = {off: s for off, s, u in a.blocks() if u}
                    for b, (n, _) in live.items():
                        assert b in in_use
                    assert_disjoint([(b, in_use[b]) for b in live])
                for b, (n, tag) in live.items():
                    assert intact(db, b, n, tag), f"payload of block {b} was overwritten"
                for b in list(live):
                    a.free_block(b)
                assert a.audit() == []
            db.check()
            _assert_only_index_left(db)
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- space after churn
#: Slack allowed on top of 2 x live bytes after the churn (5,000 keys): per-record overhead
#: (block header 8 + record header 32 + key padding + 16-byte rounding, <= 93 bytes a record,
#: doubled by the geometric growth), the index (directory and one 128 KiB segment) and the
#: live-size swing between rounds.
CHURN_SLACK = 1 << 20


def test_churn_keeps_file_within_twice_live_bytes(db):
    rng = random.Random(2024)
    keys = [b"k%05d" % i for i in range(5000)]
    model = {}
    ratios = []
    for _ in range(5):
        for k in keys:
            if rng.random() < 0.2:
                if k in model:
                    del db[k]
                    del model[k]
            else:
                v = rng.randbytes(rng.randint(10, 2000))
                db[k] = v
                model[k] = v
        live = sum(len(k) + len(v) for k, v in model.items())
        st_ = db.stats()
        assert st_["live_bytes"] == live
        ratios.append(st_["file_size"] / live)
        assert st_["file_size"] <= 2 * live + CHURN_SLACK, (st_, live)
        # nothing leaks: in-use bytes are the records (<= 93 bytes of overhead each) and the index
        assert st_["used_bytes"] <= live + 93 * len(model) + sum(s for _, s in index_blocks(db))
        assert audit(db) == []
    assert dict(db.items()) == model
    print("churn file/live ratios:", [round(r, 3) for r in ratios])


# ---------------------------------------------------------------- every audit finding fires
# Allocator.audit (mmkv/engine/allocator.py; pure Python, no native audit behind it) can report:
#   "impossible size"                         test_audit_finds_an_impossible_block_size
#   "PREV_ALLOC bit does not match"           test_audit_finds_a_wrong_prev_alloc_bit
#   "two free blocks side by side"            test_audit_finds_two_free_neighbours
#   "footer does not match header"            tests/test_damage.py::test_the_audit_fires_on_each_allocator_damage[footer]
#   "epilogue word is wrong"                  test_audit_finds_a_wrong_epilogue_word
#   "bitmap bit does not match the list"      test_audit_finds_a_bitmap_bit_that_disagrees_with_its_list
#   "is not a free block"                     tests/test_damage.py::...[link into a live record]
#   "listed twice (or a cycle)"               tests/test_damage.py::...[cycle] and [self-loop]
#   "is in the wrong class"                   test_audit_finds_a_free_block_in_the_wrong_class
#   "has a wrong back link"                   test_audit_finds_a_wrong_back_link
#   "on no free list"                         test_audit_finds_a_free_block_on_no_list
#   "counters say"                            test_audit_finds_counters_that_disagree_with_the_blocks
# Each test damages a heap for one finding through the mapping (under db.lock()), asserts that check()
# raises CorruptionError naming it, then repairs the file with recover() (the headers, lists, bitmap and
# counters are rebuilt from the index), so the teardown audit sees a sound store.  The layout used (a
# dozen records, no index split) does not depend on the file's hash key; each test asserts it first.
_HEADS, _BITMAP = STATE_WORD["free_heads"], STATE_WORD["free_bitmap"]
_USED, _FREE = STATE_WORD["used_bytes"], STATE_WORD["free_bytes"]


def _record_block(db, key):
    with db.lock():
        for _, _, rec in index.entries(db._view):
            if db.engine.record_key(rec) == key:
                return rec - 8
    raise AssertionError(f"no record of {key!r}")


def _two_free_blocks(db):
    """Records k00..k11 (200 bytes each), then k03 and k07 deleted: two free blocks of one class,
    each between two blocks in use, listed first (the head) then second.  Returns (first, second,
    class, values)."""
    values = {b"k%02d" % i: bytes([i]) * 200 for i in range(12)}
    for k, v in values.items():
        db[k] = v
    first, second = _record_block(db, b"k03"), _record_block(db, b"k07")
    del db[b"k07"], db[b"k03"]
    del values[b"k07"], values[b"k03"]
    with db.lock():
        a, w = db.engine.alloc, db.engine.words
        by_off = {off: (size, used) for off, size, used in a.blocks()}
        for b in (first, second):
            size, used = by_off[b]
            assert not used and by_off[b + size][1], "the freed block merged with its right neighbour"
            assert w[b >> 3] & BLOCK_PREV_ALLOC, "the freed block merged with its left neighbour"
        c = size_class(by_off[first][0])
        assert size_class(by_off[second][0]) == c
        assert w[_HEADS + c] == first and w[(first + FREE_NEXT) >> 3] == second
        assert w[(second + FREE_PREV) >> 3] == first and w[(second + FREE_NEXT) >> 3] == 0
        assert a.audit() == []
    return first, second, c, values


def _assert_finding_then_recover(db, finding, values):
    """check() fails naming finding (in the report and in the message); recover() repairs it all."""
    with pytest.raises(mmkv.CorruptionError) as exc:
        db.check()
    problems = exc.value.report.problems
    assert any(finding in p for p in problems), problems
    assert finding in str(exc.value)
    db.recover()
    db.check()
    assert dict(db.items()) == values


def test_audit_finds_an_impossible_block_size(db):
    _, _, _, values = _two_free_blocks(db)
    live = _record_block(db, b"k05")
    with db.lock():
        w = db.engine.words
        w[live >> 3] = (w[live >> 3] & BLOCK_FLAGS) | 16          # below BLOCK_MIN (the flags take the low 4 bits)
    _assert_finding_then_recover(db, f"block at {live}: impossible size 16", values)


def test_audit_finds_a_wrong_prev_alloc_bit(db):
    _, _, _, values = _two_free_blocks(db)
    live = _record_block(db, b"k05")                              # k04 before it is in use
    with db.lock():
        w = db.engine.words
        assert w[live >> 3] & BLOCK_PREV_ALLOC
        w[live >> 3] &= ~BLOCK_PREV_ALLOC & MASK64
    _assert_finding_then_recover(db, "PREV_ALLOC bit does not match the block before it", values)


def test_audit_finds_two_free_neighbours(db):
    """B is freed by hand as free() would free it, except that it is not merged with the free A
    before it: a consistent heap but for the missed coalescing."""
    values = {b"k": b"v"}
    db.update(values)
    with db.lock():
        a, w = db.engine.alloc, db.engine.words
        A, B, C, D, s = _three_adjacent(db)
        a.free_block(A)
        assert not w[B >> 3] & BLOCK_PREV_ALLOC                   # free() told B that A is free
        c = size_class(s)
        head = w[_HEADS + c]
        w[B >> 3] = s                                             # free, its predecessor free too
        w[(B + s - 8) >> 3] = s                                   # footer
        w[(B + FREE_NEXT) >> 3], w[(B + FREE_PREV) >> 3] = head, 0
        if head:
            w[(head + FREE_PREV) >> 3] = B
        w[_HEADS + c] = B
        w[_BITMAP] |= 1 << c
        w[C >> 3] &= ~BLOCK_PREV_ALLOC & MASK64
        w[_USED] -= s
        w[_FREE] += s
        problems = a.audit()
        assert len(problems) == 1, problems                        # nothing but the missed merge
    # recovery frees A..D (nothing refers to them): they merge with the free space after D
    _assert_finding_then_recover(db, f"block at {B}: two free blocks side by side (not coalesced)", values)


def test_audit_finds_a_wrong_epilogue_word(db):
    _, _, _, values = _two_free_blocks(db)
    with db.lock():
        w, end = db.engine.words, db.engine.alloc.end
        assert w[end >> 3] & BLOCK_ALLOC
        w[end >> 3] &= ~BLOCK_ALLOC & MASK64                      # the epilogue no longer reads as in use
    _assert_finding_then_recover(db, "epilogue word is wrong", values)


def test_audit_finds_a_bitmap_bit_that_disagrees_with_its_list(db):
    _, _, c, values = _two_free_blocks(db)
    with db.lock():
        db.engine.words[_BITMAP] &= ~(1 << c) & MASK64                  # the list is not empty, its bit says it is
    _assert_finding_then_recover(db, f"free list {c}: bitmap bit does not match the list", values)


def test_audit_finds_a_free_block_in_the_wrong_class(db):
    first, second, c, values = _two_free_blocks(db)
    with db.lock():
        w = db.engine.words
        other = next(k for k in range(NCLASSES) if k != c and not w[_HEADS + k])
        w[(first + FREE_NEXT) >> 3] = 0                           # second leaves list c...
        w[(second + FREE_PREV) >> 3] = 0
        w[_HEADS + other] = second                                # ...and heads a list of another class
        w[_BITMAP] |= 1 << other
    _assert_finding_then_recover(db, f"free list {other}: block {second} of size", values)


def test_audit_finds_a_wrong_back_link(db):
    first, second, c, values = _two_free_blocks(db)
    with db.lock():
        db.engine.words[(second + FREE_PREV) >> 3] = second             # should be first
    _assert_finding_then_recover(db, f"free list {c}: block {second} has a wrong back link", values)


def test_audit_finds_a_free_block_on_no_list(db):
    first, second, _, values = _two_free_blocks(db)
    with db.lock():
        db.engine.words[(first + FREE_NEXT) >> 3] = 0                   # the list ends before second
    _assert_finding_then_recover(db, f"1 free block(s) on no free list, e.g. {second}", values)


def test_audit_finds_counters_that_disagree_with_the_blocks(db):
    _, _, _, values = _two_free_blocks(db)
    with db.lock():
        w = db.engine.words
        w[_USED] += 16                                            # the sum still matches the file size:
        w[_FREE] -= 16                                            # only the split between them is wrong
    _assert_finding_then_recover(db, "counters say used=", values)
