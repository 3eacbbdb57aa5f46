"""Batch reads (issue 14): db.get_many(keys, default=None) -> list.

The values come in the keys' order, default for an absent key, all as of one moment: no other
process's write lands between two of them (the test below has a writer keep two keys equal in
each of its transactions, and readers that must never see them differ).  Both bindings
(test_binding runs this file on the other one), lockless handles, transactions and lock()."""
import multiprocessing as mp
import os
import time

import pytest

import mmkv
from test_lockless import collect


def test_values_in_order_with_defaults(db):
    db.update((b"k%d" % i, b"v%d" % i * (i % 40)) for i in range(3000))
    keys = [b"k%d" % i for i in range(0, 3500, 3)] + [b"k1", b"k1", b"nope"]
    assert db.get_many(keys) == [db.get(k) for k in keys]
    assert db.get_many(keys, b"D") == [db.get(k, b"D") for k in keys]
    assert db.get_many(keys, default=0) == [db.get(k, 0) for k in keys]
    assert db.get_many([]) == []
    assert db.get_many(iter([b"k2", "k3"])) == [db[b"k2"], db[b"k3"]]          # any iterable; str is UTF-8
    assert db.get_many((bytearray(b"k4"), memoryview(b"k5"))) == [db[b"k4"], db[b"k5"]]
    assert db.get_many([b"k0"]) == [b""]                                          # empty value, not absent
    db.check()


def test_values_larger_than_the_first_buffer(db):
    big = {b"b%d" % i: os.urandom(50_000 + i) for i in range(8)}                  # 400 kB in one batch
    db.update(big)
    keys = list(big) + [b"absent"]
    assert db.get_many(keys) == list(big.values()) + [None]


@pytest.mark.parametrize("bad", [1, None, 1.5, [b"a"]])
def test_bad_keys_raise_type_error(db, bad):
    db[b"a"] = b"1"
    with pytest.raises(TypeError):
        db.get_many([b"a", bad])
    with pytest.raises(TypeError):
        db.get_many(5)


def test_inside_a_transaction_and_a_lock_block(db):
    db.update({b"a": b"1", b"b": b"2"})
    with db.transaction():
        db[b"a"] = b"new"
        del db[b"b"]
        db[b"c"] = b"3"
        assert db.get_many([b"a", b"b", b"c"]) == [b"new", None, b"3"]
    with db.lock():
        assert db.get_many([b"a", b"b", b"c"], b"-") == [b"new", b"-", b"3"]


def test_lockless_read_only_and_closed_handles(path):
    with mmkv.open(path) as db:
        db.update({b"a": b"1", b"b": b"2"})
    for kwargs in ({}, {"lockless": True}):
        with mmkv.open(path, "r", **kwargs) as ro:
            assert ro.get_many([b"a", b"x", b"b"]) == [b"1", None, b"2"]
    db = mmkv.open(path)
    db.close()
    with pytest.raises(mmkv.ClosedError):
        db.get_many([b"a"])


def test_a_damaged_value_raises_rather_than_being_returned(path):
    with mmkv.open(path) as db:
        db.update({b"a": b"1" * 100, b"b": b"2" * 100})
    with open(path, "rb") as f:
        at = f.read().find(b"2" * 100)
    assert at > 0
    with open(path, "r+b") as f:
        f.seek(at + 50)
        f.write(b"X")
    with mmkv.open(path) as db:             # the open's recovery checks what a crash could leave only
        with pytest.raises(mmkv.CorruptionError):
            db.get_many([b"a", b"b"])
        db.recover()
        assert db.get_many([b"a", b"b"]) == [b"1" * 100, None]     # recovery dropped the damaged record


def _pair_writer(path, seconds, done):
    with mmkv.open(path) as db:
        deadline, i = time.monotonic() + seconds, 0
        while time.monotonic() < deadline:
            with db.transaction():                  # the two keys always change together
                db[b"left"] = b"%d" % i
                db[b"right"] = b"%d" % i
                for j in range(20):                 # and the index grows and splits meanwhile
                    db[b"fill%d-%d" % (i, j)] = b"x" * (i % 300)
            i += 1
            time.sleep(0.0005)      # a service pauses; a writer that never does starves lockless reads
    done.value = 1


def _pair_reader(path, lockless, done, out):
    seen = torn = 0
    with mmkv.open(path, "r", lockless=lockless) as db:
        while not done.value:
            left, right = db.get_many([b"left", b"right"])
            seen += 1
            torn += left != right
    out.put((seen, torn))


@pytest.mark.parametrize("lockless", [False, True], ids=["locking", "lockless"])
def test_one_consistent_moment_beside_a_writer_in_another_process(path, lockless):
    with mmkv.open(path) as db:
        db.update({b"left": b"start", b"right": b"start"})
    ctx = mp.get_context("spawn")
    done, out = ctx.Value("i", 0), ctx.Queue()
    readers = [ctx.Process(target=_pair_reader, args=(path, lockless, done, out)) for _ in range(2)]
    for r in readers:
        r.start()
    writer = ctx.Process(target=_pair_writer, args=(path, 3.0, done))
    writer.start()
    writer.join(120)
    assert writer.exitcode == 0
    results = collect(out, readers, 60)
    assert all(seen > 100 for seen, _ in results), results
    assert all(torn == 0 for _, torn in results), results
    with mmkv.open(path) as db:
        assert db.stats()["index_segments"] > 1, "the index should have split under the readers"
        db.check()
