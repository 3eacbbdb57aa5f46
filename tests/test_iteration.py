"""Streaming iteration (issue 13): iter(db), keys(), values(), items() in hash order, in batches
read under short lock holds, with bounded memory; snapshot() for one consistent moment."""
import subprocess
import sys
import textwrap
import time
import tracemalloc

import pytest

import mmkv
from mmkv.engine import scanning


def fill(db, n, size=20, prefix=b"k"):
    db.update({prefix + b"%d" % i: b"v%d-" % i + b"x" * size for i in range(n)})


def test_every_key_once_across_segments_in_both_batch_builders(path, monkeypatch):
    with mmkv.open(path, "n") as db:
        fill(db, 60_000)                               # several index segments
        assert db.stats()["index_segments"] >= 4
        want = {b"k%d" % i: b"v%d-" % i + b"x" * 20 for i in range(60_000)}
        for builder in ("c", "python"):
            if builder == "python":
                monkeypatch.setattr(scanning, "fast", None)
            keys = list(db)
            assert len(keys) == len(set(keys)) == 60_000 and set(keys) == set(want)
            assert dict(db.items()) == want
            assert sorted(db.values()) == sorted(want.values())
            assert list(db.keys()) == keys                 # one order: the hash order
        assert db.snapshot() == want
        db.check()


def test_small_batches_keep_equal_hashes_together_and_cover_everything(path, monkeypatch):
    monkeypatch.setattr(scanning, "BATCH_BYTES", 64)       # a few keys per batch
    with mmkv.open(path, "n") as db:
        fill(db, 5000, size=100)
        calls = []
        real = scanning.Cursor.batch

        def counting(self, *args):
            out = real(self, *args)
            calls.append(len(out))
            return out
        monkeypatch.setattr(scanning.Cursor, "batch", counting)
        items = list(db.items())
        assert len(items) == 5000 and len(dict(items)) == 5000
        assert len(calls) > 1000 and max(calls) <= 2       # cut at hash boundaries, never empty
        assert min(calls) >= 1
        db.check()


def test_empty_store_and_a_key_of_every_size(path):
    with mmkv.open(path, "n") as db:
        assert list(db) == [] and list(db.items()) == [] and db.snapshot() == {}
        db[b""] = b""
        db[b"big"] = b"v" * 5_000_000
        assert dict(db.items()) == {b"": b"", b"big": b"v" * 5_000_000}


def test_iteration_inside_a_transaction_sees_its_writes(path):
    with mmkv.open(path, "n") as db:
        fill(db, 100)
        with db.transaction():
            db[b"new"] = b"1"
            del db[b"k5"]
            got = dict(db.items())
            assert got[b"new"] == b"1" and b"k5" not in got and len(got) == 100
            assert set(db) == set(got)


def test_a_handle_closed_mid_iteration_raises(path):
    db = mmkv.open(path, "n")
    fill(db, 60_000)
    it = iter(db)
    next(it)
    db.close()
    with pytest.raises(mmkv.ClosedError):
        for _ in it:
            pass


def test_memory_stays_bounded_whatever_the_store_size(path):
    """The peak of Python allocations while streaming 100k items is one batch, not the store:
    the snapshot of the same store takes many times more (the test would fail on it)."""
    with mmkv.open(path, "n") as db:
        fill(db, 100_000, size=200)
        tracemalloc.start()
        try:
            n = 0
            for k, v in db.items():
                n += 1
            _, streamed = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            snap = db.snapshot()
            _, whole = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert n == len(snap) == 100_000
        assert streamed < 8_000_000, streamed          # one segment's keys and values at most
        assert whole > 4 * streamed, (whole, streamed)


_CHURN = textwrap.dedent("""
    import os, random, sys, time, mmkv
    path, role, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    rng = random.Random(os.getpid())
    with mmkv.open(path) as db:
        n = 0
        while not os.path.exists(stop):
            if role == "writer":                       # churn keys: inserts (splits, growth), deletes
                k = b"c%d" % rng.randrange(200_000)
                if rng.random() < 0.6:
                    db[k] = b"y" * rng.randrange(0, 300)
                else:
                    db.pop(k, None)
            else:
                db.compact()                           # records move while the iteration runs
                time.sleep(0.01)
            n += 1
    print(n)
""")


def test_with_writers_and_a_compaction_in_other_processes_each_stable_key_exactly_once(path, tmp_path, monkeypatch):
    """Keys present for the whole iteration come exactly once, none twice, while two other
    processes insert and delete (splitting the index and growing the file) and a third compacts."""
    monkeypatch.setattr(scanning, "BATCH_BYTES", 2048)      # many batches: many chances to interleave
    stable = {b"s%d" % i for i in range(10_000)}
    with mmkv.open(path, "n") as db:
        db.update({k: b"stable" for k in stable})
        fill(db, 5_000, prefix=b"c")
        script = tmp_path / "churn.py"
        script.write_text(_CHURN)
        stop = tmp_path / "stop"
        kids = [subprocess.Popen([sys.executable, str(script), path, role, str(stop)], stdout=subprocess.PIPE,
                                 text=True) for role in ("writer", "writer", "compactor")]
        try:
            time.sleep(0.5)
            segments_before = db.stats()["index_segments"]
            rounds = 0
            deadline = time.monotonic() + 3
            # three seconds at least, and on (up to a minute more) until the writers have split the
            # index: on a loaded machine, or on the slower binding, they may take longer to get there
            while (time.monotonic() < deadline or rounds < 2 or
                   (db.stats()["index_segments"] <= segments_before and time.monotonic() < deadline + 60)):
                seen = list(db)
                assert len(seen) == len(set(seen)), "a key was yielded twice"
                assert stable <= set(seen), "a stable key was missed"
                got = {k: v for k, v in db.items() if k in stable}
                assert len(got) == len(stable) and set(got.values()) == {b"stable"}
                rounds += 1
            segments_after = db.stats()["index_segments"]
        finally:
            stop.write_text("")
            outs = [int(kid.communicate(timeout=120)[0] or 0) for kid in kids]
        assert all(kid.returncode == 0 for kid in kids)
        assert outs[0] > 1000 and outs[2] >= 1, outs        # they really ran alongside
        assert segments_after > segments_before, "the writers never split the index meanwhile"
        db.check()
