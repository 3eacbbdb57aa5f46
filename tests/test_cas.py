"""Compare-and-swap (issue 14): db.cas(key, expected, new) -> bool.

expected None: only if the key is absent; new None: delete.  Atomic across processes, inside
and outside transactions and lock() blocks, on both bindings (test_binding runs this file on the
other one), and covered by the kill harness (a "cas" operation in its mix: test_crash)."""
import subprocess
import sys
import textwrap

import pytest

import mmkv

BAD_TYPES = [1, 1.5, [b"a"], object()]


def test_cas_swaps_only_when_the_value_is_the_expected_one(db):
    assert db.cas(b"k", None, b"1") is True              # absent, expected absent: created
    assert db[b"k"] == b"1"
    assert db.cas(b"k", None, b"2") is False             # present: not "absent"
    assert db.cas(b"k", b"0", b"2") is False             # another value
    assert db.cas(b"k", b"11", b"2") is False            # a longer one with the same start
    assert db.cas(b"k", b"", b"2") is False              # the empty value is not absence
    assert db[b"k"] == b"1"
    assert db.cas(b"k", b"1", b"2") is True
    assert db[b"k"] == b"2"
    assert db.cas(b"k", b"2", None) is True              # delete
    assert b"k" not in db and len(db) == 0
    assert db.cas(b"k", b"2", None) is False             # already gone: the expected value is not there
    assert db.cas(b"k", None, None) is True              # absent and expected absent: nothing to delete
    assert b"k" not in db
    db.check()


def test_cas_with_empty_str_and_large_values(db):
    assert db.cas("t", None, "") is True and db[b"t"] == b""
    assert db.cas(b"t", b"", "é") is True and db[b"t"] == "é".encode()
    big = bytes(range(256)) * 1000                       # larger than the fast path's first buffer
    assert db.cas(b"t", "é", big) is True
    assert db.cas(b"t", big[:-1] + b"x", b"no") is False
    assert db.cas(bytearray(b"t"), memoryview(big), b"small") is True
    assert db[b"t"] == b"small"
    db.check()


def test_cas_on_a_counter_compares_its_eight_bytes(db):
    db.incr(b"n", 41)
    now = db[b"n"]
    assert db.cas(b"n", (40).to_bytes(8, "little"), b"x") is False
    assert db.cas(b"n", now, (100).to_bytes(8, "little", signed=True)) is True
    assert db.incr(b"n") == 101
    db.check()


@pytest.mark.parametrize("bad", BAD_TYPES)
def test_cas_rejects_bad_types_and_changes_nothing(db, bad):
    db[b"k"] = b"v"
    with pytest.raises(TypeError):
        db.cas(bad, b"v", b"w")
    with pytest.raises(TypeError):
        db.cas(b"k", bad, b"w")
    with pytest.raises(TypeError):
        db.cas(b"k", b"v", bad)
    assert dict(db.items()) == {b"k": b"v"}


def test_cas_refuses_a_key_over_the_limit_and_changes_nothing(db):
    db[b"k"] = b"v"
    big = b"k" * (mmkv.MAX_KEY_SIZE + 1)
    with pytest.raises(mmkv.LimitError):
        db.cas(big, None, b"w")
    assert dict(db.items()) == {b"k": b"v"}


def test_cas_on_read_only_and_closed_handles(path):
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
    for kwargs in ({}, {"lockless": True}):
        with mmkv.open(path, "r", **kwargs) as ro:
            with pytest.raises(mmkv.ReadOnlyError):
                ro.cas(b"k", b"v", b"w")
            with pytest.raises(mmkv.ReadOnlyError):
                ro.cas(b"k", b"other", b"w")           # refused whatever the comparison would say
    db = mmkv.open(path)
    db.close()
    with pytest.raises(mmkv.ClosedError):
        db.cas(b"k", b"v", b"w")
    with mmkv.open(path, "r") as ro:
        assert ro[b"k"] == b"v"


def test_cas_inside_a_transaction_sees_its_writes_and_rolls_back_with_it(db):
    db[b"a"] = b"1"
    with db.transaction():
        db[b"a"] = b"2"
        assert db.cas(b"a", b"1", b"x") is False        # the transaction's own value is 2
        assert db.cas(b"a", b"2", b"3") is True
        assert db.cas(b"b", None, b"new") is True
        assert db[b"a"] == b"3" and db[b"b"] == b"new"
        assert db.cas(b"b", b"new", None) is True
        assert b"b" not in db
    assert db[b"a"] == b"3" and b"b" not in db
    with pytest.raises(ZeroDivisionError):
        with db.transaction():
            assert db.cas(b"a", b"3", b"4") is True
            1 / 0
    assert db[b"a"] == b"3"                              # rolled back with the transaction
    with db.lock():
        assert db.cas(b"a", b"3", b"5") is True
    assert db[b"a"] == b"5"
    db.check()


def test_cas_grows_the_file_and_splits_the_index_when_it_must(db):
    for i in range(20_000):                              # splits and growth happen inside cas
        assert db.cas(b"k%d" % i, None, b"v" * (i % 300)) is True
    assert len(db) == 20_000
    assert all(db.cas(b"k%d" % i, b"v" * (i % 300), None) for i in range(0, 20_000, 2))
    assert len(db) == 10_000
    db.check()


CAS_INCREMENTER = textwrap.dedent("""
    import sys
    import mmkv
    path, n = sys.argv[1], int(sys.argv[2])
    mine, failed = [], 0
    with mmkv.open(path) as db:
        while len(mine) < n:
            old = db.get(b"counter")
            value = int.from_bytes(old, "little") + 1 if old is not None else 1
            if db.cas(b"counter", old, value.to_bytes(8, "little")):
                mine.append(value)
            else:
                failed += 1
    print(" ".join(map(str, mine)))
    print(failed)
""")


def test_read_then_cas_from_four_processes_loses_and_repeats_nothing(path):
    """Four processes increment one counter by read-then-cas: every value 1..N is taken by
    exactly one of them (a lost update would repeat a value, a torn one skip it)."""
    mmkv.open(path).close()
    n, procs = 2000, 4
    children = [subprocess.Popen([sys.executable, "-c", CAS_INCREMENTER, path, str(n)], stdout=subprocess.PIPE,
                                 text=True) for _ in range(procs)]
    taken, failures = [], 0
    for c in children:
        out, _ = c.communicate(timeout=120)
        assert c.returncode == 0
        values, failed = out.split("\n")[:2]
        taken += [int(x) for x in values.split()]
        failures += int(failed)
    assert sorted(taken) == list(range(1, n * procs + 1))
    with mmkv.open(path) as db:
        assert int.from_bytes(db[b"counter"], "little") == n * procs
        db.check()


def test_cas_of_a_counter_updates_it_in_place_and_keeps_it_a_counter(db):
    """A counter record (made by incr) swapped to another 8-byte value is written in place, as
    incr writes it: no block allocated or freed, the record stays a counter."""
    from mmkv.engine.layout import REC_COUNTER
    db.incr(b"n", 5)
    used = db.stats()["used_bytes"]
    assert db.cas(b"n", (5).to_bytes(8, "little"), (6).to_bytes(8, "little"))
    assert not db.cas(b"n", (5).to_bytes(8, "little"), (7).to_bytes(8, "little"))
    assert db.stats()["used_bytes"] == used and db.incr(b"n") == 7
    with db.lock():
        assert db._lookup(b"n") is not None and db._view.rec_flags & REC_COUNTER
    assert db.cas(b"n", (7).to_bytes(8, "little"), b"not a counter")   # another length: a plain record
    with db.lock():
        assert db._lookup(b"n") == b"not a counter" and not db._view.rec_flags & REC_COUNTER
    db.check()
