"""Damaged files: every word read from the file is input.

One test per finding of the damage fuzzer (``mmkv torture fuzz``; the module is
mmkv/fuzz.py), each failing on the code before the fix: a free-list link into a
live record, a free-list cycle met by a put of 64 KiB or more, a 0xFF state
sector, a meta seq of 2^64 - 1, a page size of 0.  Then the audit shown to fire
on each allocator damage, and a small fixed-seed fuzz run.  Files damaged on
purpose end in ``.bad`` (tests/conftest.py audits only ``*.mmkv``) unless the
test repairs them.
"""
import errno
import os
import select
import signal
import traceback

import pytest

import mmkv
from mmkv.crashkit import fuzz
from mmkv.engine import index
from mmkv.engine.shim import lib
from mmkv.engine.allocator import size_class
from mmkv.engine.layout import (FREE_NEXT, FREE_PREV, HEADER_SIZE, MASK64, OFF_IDENTITY, OFF_META, OFF_STATE, RECORD_HEADER,
                         SEGMENT_HEADER, SEGMENT_SLOTS, STATE_WORD, build_meta, parse_identity, parse_meta, siphash,
                         struct_fields)

HEADS = STATE_WORD["free_heads"]
BITMAP = STATE_WORD["free_bitmap"]
_ID = {name: off for name, off, _ in struct_fields("mmkv_identity")}


def block_of(db, key):
    """Offset of the block holding key's record."""
    with db.lock():
        assert lib.mmkv_find(db._view, key, len(key)) == 0
        return db._view.rec_off - 8


def block_size(db, b):
    with db.lock():
        return db.engine.alloc.block_size(b)


def in_child(fn, timeout=30.0) -> str:
    """Run fn() in a forked child; its result as text ("ok", a traceback), or "hang" after timeout s."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                                           # pragma: no cover - the child
        os.close(rfd)
        try:
            fn()
            out = "ok"
        except BaseException:                               # noqa: BLE001 - reported to the parent
            out = traceback.format_exc()
        os.write(wfd, out.encode()[-4000:])
        os._exit(0)
    os.close(wfd)
    ready, _, _ = select.select([rfd], [], [], timeout)
    out = os.read(rfd, 1 << 16).decode() if ready else "hang"
    if not ready:
        os.kill(pid, signal.SIGKILL)
    os.close(rfd)
    os.waitpid(pid, 0)
    return out


def damage_word(path, off, value):
    with open(path, "r+b") as f:
        f.seek(off)
        f.write((value & MASK64).to_bytes(8, "little"))


# ---------------------------------------------------------------- findings, one test each
def test_a_free_list_link_into_a_live_record_is_not_written_through(path):
    """Unlinking a free block used to write its neighbour's back link without looking: a next
    link pointing at a live record overwrote that record's key hash, and the key vanished."""
    value = {i: bytes([i]) * 100 for i in range(10)}
    with mmkv.open(path) as db:
        for i in range(10):
            db[b"a%d" % i] = value[i]
        hole, victim = block_of(db, b"a3"), block_of(db, b"a7")
        del db[b"a3"]
        with db.lock():
            w = db.engine.words
            assert w[HEADS + size_class(db.engine.alloc.block_size(hole))] == hole   # it heads its list
            w[(hole + FREE_NEXT) >> 3] = victim
        try:
            db[b"a3"] = value[3]                      # takes the hole, whose next link is damaged
        except mmkv.CorruptionError:
            pass                                      # detected: recovery rebuilt the lists
        assert db[b"a7"] == value[7]
        assert all(db[b"a%d" % i] == value[i] for i in range(10) if i != 3)
        db[b"a3"] = value[3]
        db.check()


def test_a_free_list_cycle_met_by_a_large_put_ends_in_recovery(path):
    """A put of 64 KiB or more scans the lists below the sure-fit classes until it has seen
    every block: a self-loop kept it looping for ever in C, holding the store lock."""
    with mmkv.open(path) as db:
        for i in range(5):
            db[b"k%d" % i] = b"x" * 100
        db[b"big0"] = b"0" * 65600
        db[b"big1"] = b"1" * 65600                    # keeps big0's block from joining the tail
        hole = block_of(db, b"big0")
        del db[b"big0"]
        with db.lock():
            c = size_class(db.engine.alloc.block_size(hole))
            w = db.engine.words
            assert w[HEADS + c] == hole and db.engine.alloc.block_size(hole) < 70_000
            w[(hole + FREE_NEXT) >> 3] = hole         # a self-loop
            w[BITMAP] = 1 << c                        # only this list looks non-empty (a stale cache)

    def put_large():
        with mmkv.open(path) as db:
            try:
                db[b"big"] = b"2" * 70_000
            except mmkv.CorruptionError:
                pass
            assert db[b"big1"] == b"1" * 65600 and db[b"k4"] == b"x" * 100
            db.check()

    assert in_child(put_large, timeout=60) == "ok"


def test_a_state_sector_of_0xff_leaves_the_store_usable(tmp_path):
    """The state is a cache: a sector of maximum values in it (seq, generation, counters, heads)
    raised ValueError at open (a state word set to 2^64), making an intact store unopenable."""
    path = str(tmp_path / "state.bad")     # damaged on purpose: conftest skips it
    with mmkv.open(path) as db:
        for i in range(50):
            db[b"k%d" % i] = b"v%d" % i
    with open(path, "r+b") as f:
        f.seek(OFF_STATE)
        f.write(b"\xff" * 512)
    with mmkv.open(path) as db:
        assert all(db[b"k%d" % i] == b"v%d" % i for i in range(50))
        db[b"new"] = b"x" * 100_000
        db.check()


def _meta_seq_at_the_limit(path):
    with mmkv.open(path) as db:
        for i in range(50):
            db[b"k%d" % i] = b"v%d" % i
    with open(path, "r+b") as f:
        page = f.read(HEADER_SIZE)
        ident = parse_identity(page, os.path.getsize(path))
        meta, which = parse_meta(page, ident, os.path.getsize(path))
        f.seek(OFF_META[which])
        f.write(build_meta(meta._replace(seq=MASK64), ident))     # resealed: it passes its checksum


def test_a_meta_seq_of_2_to_the_64_minus_1_wraps(tmp_path):
    """A meta write made seq + 1 = 2^64, which no 8-byte field holds (OverflowError).  seq now
    counts modulo 2^64, and of two copies the one 1 to 2^63 - 1 steps ahead is in force."""
    path = str(tmp_path / "seq.mmkv")
    _meta_seq_at_the_limit(path)
    with mmkv.open(path) as db:
        db[b"big"] = b"x" * 600_000                   # the file grows: a meta write, seq wraps to 0
        db.clear()                                    # a new index: another meta write
        db[b"after"] = b"1"
    with mmkv.open(path) as db:                       # the wrapped copy is the one in force
        assert dict(db.items()) == {b"after": b"1"}
        db.check()


def test_a_transaction_commits_with_meta_seq_at_the_limit(tmp_path):
    path = str(tmp_path / "seq-txn.bad")
    _meta_seq_at_the_limit(path)
    with mmkv.open(path) as db:
        with db.transaction():
            db[b"a"] = b"1"
            del db[b"k1"]
        assert db[b"a"] == b"1" and b"k1" not in db
        db.check()


def test_a_page_size_of_0_is_a_corrupt_header(tmp_path):
    """page_size is checked before anything divides by it (ZeroDivisionError before)."""
    for bad in (0, 1, 4095, 3 * 4096, 1 << 31, (1 << 32) - 1):
        path = str(tmp_path / "page.bad")
        with mmkv.open(path, "n") as db:
            db[b"k"] = b"v"
        with open(path, "r+b") as f:
            ident = bytearray(f.read(HEADER_SIZE)[:_ID["checksum"]])
            ident[_ID["page_size"]:_ID["page_size"] + 4] = bad.to_bytes(4, "little")
            f.seek(OFF_IDENTITY)
            f.write(bytes(ident) + siphash(0, 0, bytes(ident)).to_bytes(8, "little"))   # resealed
        with pytest.raises(mmkv.CorruptionError, match="page size"):
            mmkv.open(path, "w")


def test_stats_ends_a_free_list_cycle_at_its_second_step(path):
    """stats() walks the highest free list for the largest block: a self-loop made it step
    2^20 times (seconds per call) and report a wrong size."""
    with mmkv.open(path) as db:
        db[b"a"] = b"x" * 1000
        with db.lock():
            w = db.engine.words
            c = w[BITMAP].bit_length() - 1
            tail = w[HEADS + c]
            w[(tail + FREE_NEXT) >> 3] = tail
        with pytest.raises(mmkv.CorruptionError, match="cycle"):
            db.stats()
        db.recover()
        assert db.stats()["largest_free_block"] > 0
        db.check()


def test_a_header_claiming_its_neighbour_costs_recovery_nothing(tmp_path):
    """A record's block header that claims the next record's block too: recovery used to keep
    the first and drop the second as an overlap; it now trims the first to what it holds.
    And a free that knows what the block was allocated for refuses to free both."""
    path = str(tmp_path / "swallow.mmkv")
    with mmkv.open(path) as db:
        for i in range(6):
            db[b"k%d" % i] = bytes([i]) * 100
        first, second = block_of(db, b"k2"), block_of(db, b"k3")

        def swallow():
            with db.lock():
                assert first + db.engine.alloc.block_size(first) == second
                db.engine.words[first >> 3] += db.engine.alloc.block_size(second)   # k2's block now covers k3's

        swallow()
        result = db.recover()
        assert result.overlaps == 0 and result.records == 6 and result.resized == 1
        assert all(db[b"k%d" % i] == bytes([i]) * 100 for i in range(6))
        swallow()
        with db.lock():
            payload = 32 + 8 + 100                                   # record header, key, value
            assert db.engine.alloc.most(first, payload) < db.engine.alloc.block_size(first)
            with pytest.raises(mmkv.CorruptionError):
                db.engine.alloc.free_block(first, payload)
        db.recover()
        del db[b"k2"]
        assert db[b"k3"] == bytes([3]) * 100
        db.check()


def _second_slot_for(db, key, value):
    """Give key a second slot (an empty one a scan meets before key's own, which lookups never
    reach) pointing at a record of key with value, in a block of its own.  Returns that slot."""
    with db.lock():
        v, w = db._view, db.engine.words
        assert lib.mmkv_find(v, key, len(key)) == 0
        seg, h = v.seg, v.hash
        slots = ((seg + SEGMENT_HEADER) >> 3)
        home = h & (SEGMENT_SLOTS - 1)
        if v.slot != home or home < 2 or w[slots + home - 1]:
            return None                                   # this key does not fit the test's layout
        b = db.engine.alloc.alloc_block(RECORD_HEADER + 8 + len(value))
        assert lib.mmkv_record_write(v, b + 8, db.engine.alloc.block_size(b) - 8, h, key, len(key), value,
                                     len(value), 0) == 0
        w[slots + home - 1] = index.slot_word(h, b + 8)   # before the home slot: lookups never see it
        return home - 1


def _key_in_two_slots(db):
    """20 keys, then a 21st whose second slot holds a stale record of it; returns that key."""
    for i in range(20):
        db[b"k%d" % i] = b"v%d" % i
    for n in range(1000):                                 # a key whose home slot suits the test
        key = b"key%d" % n
        db[key] = b"new"
        if _second_slot_for(db, key, b"stale") is not None:
            return key
        del db[key]
    pytest.fail("no key found whose home slot has a free slot before it")


def test_recovery_keeps_the_slot_of_a_key_that_lookups_find(path):
    """A slot holding a stale record of a key another slot holds (as a freed record whose block
    was merged into a free one still reads as one): recovery kept the first slot it scanned, and
    with it the stale value; it now keeps the one lookups find, the value gets and writes used."""
    with mmkv.open(path) as db:
        key = _key_in_two_slots(db)
        result = db.recover()
        assert db[key] == b"new" and result.duplicates == 1 and len(db) == 21
        db.check()


def test_a_key_in_two_slots_stops_iteration(path):
    """Iteration listed such a key twice, once with the stale value."""
    with mmkv.open(path) as db:
        _key_in_two_slots(db)
        with pytest.raises(mmkv.CorruptionError, match="another slot holds"):
            list(db)
        db.recover()
        db.check()


def test_a_slot_with_another_tag_stops_iteration(path):
    with mmkv.open(path) as db:
        for i in range(20):
            db[b"k%d" % i] = b"v%d" % i
        with db.lock():
            v, w = db._view, db.engine.words
            assert lib.mmkv_find(v, b"k7", 2) == 0
            at = ((v.seg + SEGMENT_HEADER) >> 3) + v.slot
            w[at] ^= 1 << 60                              # lookups of k7 now skip its slot
            with pytest.raises(mmkv.CorruptionError, match="tag"):
                list(db.items())
        assert db.get(b"k7") is None                      # what a lookup makes of it
        result = db.recover()                             # a slot whose tag is not its record's is
        assert result.dropped == 1 and len(db) == 19      # damage: random offsets fail it that way
        db.check()


# ---------------------------------------------------------------- the audit fires
def _free_block_pair(db):
    """Two free blocks of the same list (first the head), and a live block."""
    for i in range(12):
        db[b"k%02d" % i] = bytes([i]) * 200
    first, second = block_of(db, b"k03"), block_of(db, b"k07")
    del db[b"k07"], db[b"k03"]
    with db.lock():
        c = size_class(db.engine.alloc.block_size(first))
        assert db.engine.words[HEADS + c] == first and db.engine.words[(first + FREE_NEXT) >> 3] == second
    return first, second, block_of(db, b"k05")


@pytest.mark.parametrize("damage, finding", [
    ("link into a live record", "is not a free block"),
    ("cycle", "listed twice (or a cycle)"),
    ("self-loop", "listed twice (or a cycle)"),
    ("footer", "footer does not match header"),
])
def test_the_audit_fires_on_each_allocator_damage(path, damage, finding):
    with mmkv.open(path) as db:
        first, second, live = _free_block_pair(db)
        with db.lock():
            w = db.engine.words
            if damage == "link into a live record":
                w[(second + FREE_NEXT) >> 3] = live
            elif damage == "cycle":
                w[(second + FREE_NEXT) >> 3] = first
                w[(first + FREE_PREV) >> 3] = second
            elif damage == "self-loop":
                w[(first + FREE_NEXT) >> 3] = first
            else:
                size = db.engine.alloc.block_size(second)
                w[(second + size - 8) >> 3] = size + 16
        with pytest.raises(mmkv.CorruptionError) as exc:
            db.check()
        assert any(finding in p for p in exc.value.report.problems), exc.value.report.problems
        db.recover()                                  # the lists are a cache: rebuilt from the index
        db.check()
        assert db[b"k05"] == bytes([5]) * 200 and len(db) == 10


# ---------------------------------------------------------------- a small fuzz run
#: Findings the fuzzer still reports whose fix lies outside the files of this work (each one is
#: reported to the lead with its fix; delete its entry when the fix lands).
PENDING = {
    "unverified read": "gets do not verify the record checksum (mmkv_get): damaged value bytes are returned",
    "memoryview: invalid value for format 'Q'": "store._attach: the lock-sequence word must wrap modulo 2^64",
}


def _pending(result) -> bool:
    text = result.get("detail", "") + result.get("traceback", "")
    return any(sig in text for sig in PENDING)


def test_a_small_fuzz_run_finds_nothing(tmp_path):
    """200 damaged files (fixed seed): every outcome is ok or an mmkv.Error; no other exception,
    no signal, no hang, no silent wrong answer."""
    summary = fuzz.run(str(tmp_path / "fuzz"), cases=200, seed=20, timeout=30, save=False)
    assert summary.cases == 200
    assert summary.outcomes["signal"] == summary.outcomes["hang"] == 0, summary.table()
    unexplained = [(n, o, d, r) for n, o, d, r, _ in summary.findings if not _pending(r)]
    assert not unexplained, "\n".join(f"case {n}: {o}: {r.get('detail')} [{d}]\n{r.get('traceback', '')}"
                                      for n, o, d, r in unexplained)


@pytest.mark.slow
def test_a_long_fuzz_run_finds_nothing(tmp_path):
    summary = fuzz.run(str(tmp_path / "fuzz"), cases=5000, seed=21, timeout=30, save=False)
    unexplained = [(n, o, d, r) for n, o, d, r, _ in summary.findings if not _pending(r)]
    assert not unexplained, summary.table()


# ---------------------------------------------------------------- no growth without end
class _AlwaysNoRoom:
    """The shim, except that every put and allocation reports "nothing fits" (ENOSPC), as a
    free-list cache that lies would."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def mmkv_put(self, *args):
        return errno.ENOSPC

    def mmkv_alloc(self, *args):
        return errno.ENOSPC

    def mmkv_put_many(self, *args):
        return errno.ENOSPC                 # at the pair *done (left as it is)


@pytest.mark.parametrize("op", ["put", "update", "transaction"])
def test_a_lying_allocator_grows_the_file_once_then_reports_damage(path, monkeypatch, op):
    from mmkv import cffi_binding, store as store_module
    from mmkv.engine import allocator as allocator_module, shim
    db = mmkv.open(path)
    # the CPython binding calls the core through its own table: its put must lie too
    no_room = shim.ffi.callback("int(struct mmkv_view *, const uint8_t *, uint64_t, const uint8_t *, uint64_t, "
                                "uint32_t, int)", lambda *args: errno.ENOSPC)
    try:
        db[b"before"] = b"1"
        size = db.stats()["file_size"]
        fake = _AlwaysNoRoom(store_module.lib)
        for module in (store_module, cffi_binding, allocator_module):
            monkeypatch.setattr(module, "lib", fake)
        shim.init_fast(mmkv_put=int(shim.ffi.cast("uintptr_t", no_room)))
        with pytest.raises(mmkv.CorruptionError, match="free lists are damaged"):
            if op == "put":
                db[b"k"] = b"v" * 1000
            elif op == "update":
                db.update({b"k%d" % i: b"v" * 1000 for i in range(10)})
            else:
                with db.transaction():
                    db[b"k"] = b"v" * 1000
        monkeypatch.undo()
        shim.init_fast()
        assert db.stats()["file_size"] <= 2 * size          # one growth step, not a runaway
        assert dict(db.items()) == {b"before": b"1"}
        db.check()
    finally:
        monkeypatch.undo()
        shim.init_fast()
        db.close()


@pytest.mark.parametrize("header", [0, 0x30 | 0xB, (1 << 64) - 1, 0x10 | 1])
def test_recovery_keeps_an_intact_record_whose_block_header_is_damaged(tmp_path, header):
    """A block header is allocator state, rewritten by recovery; the record's own checksum
    decides whether it lives (found by the fuzzer: a shrunken header cost an intact counter)."""
    path = str(tmp_path / "hdr.bad")
    with mmkv.open(path) as db:
        for i in range(20):
            db.incr(b"counter:%d" % i, i + 1)
        with db.lock():
            v = db._view
            assert mmkv.store.lib.mmkv_find(v, b"counter:17", 10) == 0
            block = v.rec_off - 8
        db.engine.words[block >> 3] = header                   # damage one word: the block's header
        db.recover()
        assert {k: db[k] for k in db} == {b"counter:%d" % i: (i + 1).to_bytes(8, "little") for i in range(20)}
        db.check()
        db.incr(b"counter:17")
        db[b"after"] = b"x" * 3000
        db.check()


def test_items_refuses_a_slot_that_is_not_its_records(path):
    """A damaged empty slot pointing at a live record (found by the fuzzer, case 49037: after
    writes, items() listed a stale value through it): iteration raises, recovery repairs."""
    from mmkv.engine import index
    from mmkv.engine.layout import SEGMENT_HEADER
    db = mmkv.open(path)
    try:
        for i in range(10):
            db[b"s%d" % i] = b"v%d" % i
        with db.lock():
            v, w = db._view, db.engine.words
            assert mmkv.store.lib.mmkv_find(v, b"s2", 2) == 0
            seg, rec, home = v.seg, v.rec_off, v.slot
            base = (seg + SEGMENT_HEADER) >> 3
            empty = next(s for s in range(home + 1, home + 5000) if w[base + s % 16384] == 0) % 16384
            w[base + empty] = index.slot_word(v.hash ^ (1 << 20), rec)     # a foreign tag, a live record
        with pytest.raises(mmkv.CorruptionError, match="does not belong"):
            dict(db.items())
        db.recover()
        assert dict(db.items()) == {b"s%d" % i: b"v%d" % i for i in range(10)}
        db.check()
    finally:
        db.close()


def test_a_file_longer_than_its_header_by_an_odd_length_grows_in_whole_pages(path):
    """A file extended past its header's size by a length that is not a page multiple (found by
    the fuzzer, case 50254 of seed 200) used to be taken as it was by the next growth: the header
    then said 1,310,712 bytes and check() failed.  Growth uses the longer file up to its last
    whole page."""
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
        size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size + (1 << 20) - 8)           # 8 bytes short of a page multiple
    with mmkv.open(path) as db:
        for i in range(40):                        # enough to grow the file past its header's size
            db[b"big%d" % i] = bytes([i]) * 30000
        assert db.stats()["file_size"] > size + (1 << 20)           # it grew past the odd length
        assert db.stats()["file_size"] % db.engine.ident.page_size == 0
        db.check()
        assert db[b"a"] == b"1" and db[b"big39"] == bytes([39]) * 30000


@pytest.mark.parametrize("replace", ["transaction", "split"])
def test_a_block_header_claiming_its_neighbour_is_not_freed_with_it(path, replace):
    """A record's block header grown to swallow the next record (found by the fuzzer, cases
    13992 and 19266 of seed 200): a transaction that replaced the record freed the whole claimed
    size, the next record's counter value became a free-block footer, and reads returned it
    without an error.  Every free now says what the block was allocated for, and a header
    claiming more is refused (CorruptionError; recovery repairs)."""
    with mmkv.open(path) as db:
        for i in range(6):
            db.incr(b"counter:%d" % i, -(i + 1))
        b, after = block_of(db, b"counter:2"), block_of(db, b"counter:3")
        size = block_size(db, b)
        assert after == b + size                         # neighbours: the damage reaches counter:3
        with db.lock():
            db.engine.words[b >> 3] += size                    # the header claims counter:3's block too
        try:
            if replace == "transaction":
                with db.transaction():
                    db[b"counter:2"] = b"x" * 300
                    db[b"other"] = b"y"
            else:
                for i in range(300):                     # enough new keys to split the segment...
                    db[b"k%d" % i] = b"v"
                with db.transaction():                   # ...and a replacement of the damaged record
                    db[b"counter:2"] = b"x" * 300
                    db[b"other"] = b"y"
        except mmkv.CorruptionError:
            pass                                         # refused: the next lock holder recovers
        for i in range(6):
            if i != 2:
                assert db.get(b"counter:%d" % i) == (-(i + 1)).to_bytes(8, "little", signed=True)
        db.recover()
        db.check()
        assert db.incr(b"counter:3") == -3


# ---------------------------------------------------------------- a resealed identity
def test_an_identity_resealed_with_another_seed_is_refused_at_open(tmp_path):
    """Found by `mmkv torture fuzz --seed 2301` (cases 1299, 1375; the build before expiry too):
    identity.seed1 rewritten and the identity's and metas' checksums recomputed.  Every key then
    hashes to another hash than its record carries: lookups miss, a put adds a second record of a
    key, iteration yielded both (a value no write left).  The first opener now finds that none of
    the records it looks at matches the seed, and refuses the file."""
    from mmkv.engine.layout import parse_identity
    path = str(tmp_path / "seed.mmkv")
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"v%d" % i for i in range(50)})
    img = bytearray(open(path, "rb").read())
    ident = parse_identity(bytes(img[:HEADER_SIZE]), len(img))
    seed = fuzz.Seed("seed", bytes(img), {}, set())
    seed.anatomy = fuzz.Anatomy(bytes(img))
    dmg = fuzz.Damage(__import__("random").Random(1), seed, img)
    dmg.put64(OFF_IDENTITY + 24, ident.seed1 ^ 0xc0000)      # struct mmkv_identity: seed1 at 24
    dmg.reseal_identity()
    dmg.reseal_meta(0)
    dmg.reseal_meta(1)
    bad = str(tmp_path / "seed.mmkv.bad")
    with open(bad, "wb") as f:
        f.write(img)
    with pytest.raises(mmkv.CorruptionError, match="hash seed"):
        mmkv.open(bad)
    with mmkv.open(path) as db:                # the sound file opens (the check passes on it)
        assert len(db) == 50 and db[b"k7"] == b"v7"


@pytest.mark.parametrize("case, damage", [
    (1132, "seed namespaces; block.header.other block 327832 header 0x63 -> 0x40063"),
    (2505, "seed namespaces; randword word at 195888 = 0x600"),
])
def test_namespace_damage_the_fuzzer_found_ends_in_an_mmkv_error_or_ok(tmp_path, case, damage):
    """Found by `mmkv torture fuzz --seed 2805`: a namespace record's block header claiming more than
    its block made the store's clear() hand overlapping blocks to the allocator's rebuild
    (ValueError); and a recovery whose namespace index rebuild grew the file wrote the counters
    through the mapping from before the growth (IndexError).  Replayed here (the damage is checked
    to be the one found: a change of the fuzzer's streams would replay another)."""
    result = fuzz.replay(str(tmp_path), 2805, case)
    assert result["damage"] == damage, "the fuzzer's streams changed: find the case again"
    assert result["outcome"] in ("ok", "mmkv error"), result
