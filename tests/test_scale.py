"""Scale: many small keys, and index growth seen live from another process.

Measured on the 2-core test machine: 1,000,000 keys (insert, read back, check,
reopen, delete, check) take 13-25 s, well under the ~60 s threshold for the
slow mark, so both sizes run by default.
"""
import multiprocessing
import os
import queue
import random
import time
import traceback

import pytest

import mmkv
from mmkv.engine import index
from mmkv.engine.layout import SEGMENT_SLOTS
from mmkv.engine.tunables import MAX_LOAD

#: Keys one index segment holds before an insert splits it.
SEGMENT_MAX = int(SEGMENT_SLOTS * MAX_LOAD)


def _value(i):
    return b"v%d" % i


@pytest.mark.parametrize("n", [200_000, pytest.param(1_000_000, marks=pytest.mark.slow)], ids=["200k", "1M"])
def test_many_small_keys(path, n):
    with mmkv.open(path) as db:
        for i in range(n):
            db[b"key%08d" % i] = _value(i)
        assert len(db) == n
        st_ = db.stats()
        assert st_["keys"] == n and st_["load_factor"] <= 0.75
        assert st_["index_slots"] >= n / 0.75
        # no segment holds more than SEGMENT_MAX keys, and a directory of 2^depth entries names them all
        assert st_["index_segments"] >= n / SEGMENT_MAX and 2 ** st_["index_depth"] >= st_["index_segments"]
        assert st_["index_slots"] == st_["index_segments"] * SEGMENT_SLOTS
        for i in range(n):
            assert db[b"key%08d" % i] == _value(i)
        assert b"key%08d" % n not in db
        report = db.check()
        assert report.ok and report.keys == n
    with mmkv.open(path) as db:                 # everything survives a reopen
        assert len(db) == n
        rng = random.Random(n)
        for i in rng.sample(range(n), 2000):
            assert db[b"key%08d" % i] == _value(i)
        for i in range(n):
            del db[b"key%08d" % i]
        assert len(db) == 0
        report = db.check()
        assert report.ok and report.keys == 0
        st_ = db.stats()
        assert st_["keys"] == 0 and st_["live_bytes"] == 0
        # every record's space is free again: only the index (directory and segments) is in use
        with db.lock():
            index_bytes = sum(size for _, size in index.blocks(db.engine))
            in_use = sum(size for _, size, used in db.engine.alloc.blocks() if used)
        assert st_["used_bytes"] == in_use == index_bytes
        assert list(db) == []


# ---------------------------------------------------------------- index growth under a live reader
WRITER_KEYS = 300_000
BATCH = 1_000
PROGRESS = b"__progress"


def _growth_key(i):
    return b"g%07d" % i


def _growth_value(i):
    return b"value-%d-" % i + b"x" * (i % 23)


def _shape(db):
    st_ = db.stats()
    return st_["index_segments"], st_["index_depth"], st_["index_slots"]


def _writer(path, ready, results):
    try:
        if not ready.wait(60):
            raise RuntimeError("reader never became ready")
        with mmkv.open(path) as db:
            for start in range(0, WRITER_KEYS, BATCH):
                db.update((_growth_key(i), _growth_value(i)) for i in range(start, start + BATCH))
                db.incr(PROGRESS, BATCH)            # acknowledge the batch: it is now visible
            results.put(("writer", "ok", _shape(db)))
    except BaseException:
        results.put(("writer", "error", traceback.format_exc()))


def _reader(path, ready, results):
    try:
        with mmkv.open(path) as db:
            first_shape = _shape(db)
            ready.set()
            rng = random.Random(os.getpid())
            checked = 0           # keys [0, checked) have each been read at least once
            progress_seen = set()
            segments_seen = []    # the index's segment count, sampled between reads while the writer runs
            deadline = time.monotonic() + 120
            while True:
                raw = db.get(PROGRESS)
                acked = 0 if raw is None else int.from_bytes(raw, "little", signed=True)
                assert 0 <= acked <= WRITER_KEYS and acked % BATCH == 0, f"bad progress {acked}"
                progress_seen.add(acked)
                # every key acknowledged since the last round, then a random sample of older ones
                for i in range(checked, acked):
                    got = db[_growth_key(i)]         # KeyError here: an acknowledged key went missing
                    assert got == _growth_value(i), f"key {i}: {got!r}"
                    if i % 2000 == 0:
                        segments_seen.append(db.stats()["index_segments"])
                checked = acked
                for _ in range(200 if acked else 0):
                    i = rng.randrange(acked)
                    got = db.get(_growth_key(i))
                    assert got == _growth_value(i), f"acknowledged key {i} read as {got!r}"
                if acked == WRITER_KEYS:
                    break
                segments_seen.append(db.stats()["index_segments"])
                assert time.monotonic() < deadline, f"writer stalled at {acked}"
            for i in range(WRITER_KEYS):                # a last full pass
                assert db[_growth_key(i)] == _growth_value(i)
            assert len(db) == WRITER_KEYS + 1
            during = sorted(p for p in progress_seen if 0 < p < WRITER_KEYS)
            results.put(("reader", "ok", (first_shape, _shape(db), during, segments_seen)))
    except BaseException:
        ready.set()
        results.put(("reader", "error", traceback.format_exc()))


def test_index_growth_is_invisible_to_a_reader_in_another_process(path):
    with mmkv.open(path) as db:
        assert _shape(db) == (1, 0, SEGMENT_SLOTS)
    ctx = multiprocessing.get_context("fork")
    ready, results = ctx.Event(), ctx.Queue()
    reader = ctx.Process(target=_reader, args=(path, ready, results), name="mmkv-reader")
    writer = ctx.Process(target=_writer, args=(path, ready, results), name="mmkv-writer")
    reader.start()
    writer.start()
    got = {}
    deadline = time.monotonic() + 180
    try:
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                who, status, detail = results.get(timeout=1)
            except queue.Empty:
                if not reader.is_alive() and not writer.is_alive() and results.empty():
                    break                       # one of them died without a word
                continue
            got[who] = (status, detail)
    finally:
        for p in (writer, reader):
            p.join(30)
            if p.is_alive():
                p.kill()
                p.join(5)
    assert set(got) == {"reader", "writer"}, (got, reader.exitcode, writer.exitcode)
    assert got["writer"][0] == "ok", got["writer"][1]
    assert got["reader"][0] == "ok", got["reader"][1]
    assert writer.exitcode == 0 and reader.exitcode == 0
    final = got["writer"][1]
    segments, depth, slots = final
    # the index split many times while the reader was attached: from one segment to at least 25
    assert segments >= WRITER_KEYS / SEGMENT_MAX and depth >= 5 and slots >= WRITER_KEYS / 0.75
    first_shape, last_shape, during, segments_seen = got["reader"][1]
    assert first_shape == (1, 0, SEGMENT_SLOTS) and last_shape == final
    assert len(during) >= 3, f"the reader only saw progress {during} while the writer ran"
    # the reader read through the growth: it saw the index at several sizes, never shrinking
    assert segments_seen == sorted(segments_seen)
    assert len(set(segments_seen)) >= 3, f"the reader saw the index only at {sorted(set(segments_seen))} segments"
    with mmkv.open(path) as db:
        assert len(db) == WRITER_KEYS + 1
        assert db[PROGRESS] == WRITER_KEYS.to_bytes(8, "little", signed=True)
        db.check()
