"""The public contract of mmkv.Store, method by method (see DESIGN.md, "Public contract")."""
import os
import random
import threading
from collections.abc import MutableMapping

import pytest

import mmkv
from mmkv.engine import index
from mmkv.engine.layout import SEGMENT_SLOTS

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
BAD_TYPES = [1, None, 1.5, [b"a"], (b"a",), {b"a": 1}, object()]


def le64(n):
    return n.to_bytes(8, "little", signed=True)


# ---------------------------------------------------------------- open
def test_open_returns_a_mutable_mapping(path):
    with mmkv.open(path) as db:
        assert isinstance(db, mmkv.Store) and isinstance(db, MutableMapping)
        assert len(db) == 0 and list(db) == []
    assert os.path.exists(path)


def test_open_flags(path):
    with pytest.raises(FileNotFoundError):
        mmkv.open(path, "r")
    with pytest.raises(FileNotFoundError):
        mmkv.open(path, "w")
    with mmkv.open(path, "c") as db:
        db[b"a"] = b"1"
    with mmkv.open(path, "w") as db:
        assert db[b"a"] == b"1"
        db[b"b"] = b"2"
    with mmkv.open(path, "r") as db:
        assert dict(db.items()) == {b"a": b"1", b"b": b"2"}
        assert db.get(b"a") == b"1" and b"b" in db and len(db) == 2
        for write in (lambda: db.__setitem__(b"c", b"3"), lambda: db.__delitem__(b"a"),
                      lambda: db.incr(b"n"), lambda: db.pop(b"a"), lambda: db.update({b"c": b"3"}),
                      db.clear, lambda: db.setdefault(b"new", b"x")):
            with pytest.raises(mmkv.ReadOnlyError):
                write()
        assert db.setdefault(b"a", b"x") == b"1"       # a present key: only a read
        assert dict(db.items()) == {b"a": b"1", b"b": b"2"}
    with mmkv.open(path, "n") as db:
        assert len(db) == 0
    with pytest.raises(ValueError):
        mmkv.open(path, "x")
    with pytest.raises(ValueError):
        mmkv.open(path, sync="sometimes")


# ---------------------------------------------------------------- get / set / delete
def test_getitem_setitem_bytes_and_str(db):
    db[b"k"] = b"v"
    assert db[b"k"] == b"v" and type(db[b"k"]) is bytes
    db["s"] = "text"
    assert db[b"s"] == b"text" and db["s"] == b"text"
    db["ключ"] = "значение ✓"
    assert db["ключ".encode("utf-8")] == "значение ✓".encode("utf-8")
    assert db["ключ"] == "значение ✓".encode("utf-8")
    db[b"k"] = b"v2"                       # overwrite
    assert db[b"k"] == b"v2" and len(db) == 3


def test_getitem_missing_raises_keyerror(db):
    db[b"present"] = b"1"
    with pytest.raises(KeyError) as exc:
        db[b"absent"]
    assert exc.value.args[0] == b"absent"
    with pytest.raises(KeyError):
        db["absent"]


def test_get_with_default(db):
    db[b"a"] = b"1"
    assert db.get(b"a") == b"1"
    assert db.get("a", b"zz") == b"1"
    assert db.get(b"b") is None
    sentinel = object()
    assert db.get(b"b", sentinel) is sentinel
    assert db.get(b"b", default=b"d") == b"d"


def test_delitem(db):
    db[b"a"] = b"1"
    db[b"b"] = b"2"
    del db[b"a"]
    assert b"a" not in db and db.get(b"a") is None and len(db) == 1
    with pytest.raises(KeyError):
        del db[b"a"]
    del db["b"]
    assert len(db) == 0
    with pytest.raises(KeyError):
        del db["never"]


def test_contains_and_len(db):
    assert b"a" not in db and len(db) == 0
    for i in range(100):
        db[b"k%d" % i] = b"v"
        assert len(db) == i + 1
    assert b"k5" in db and "k5" in db and b"k100" not in db
    db[b"k5"] = b"other"                   # overwrite does not change len
    assert len(db) == 100


@pytest.mark.parametrize("bad", BAD_TYPES, ids=lambda b: type(b).__name__)
def test_other_key_and_value_types_raise_typeerror(db, bad):
    db[b"ok"] = b"1"
    with pytest.raises(TypeError):
        db[bad] = b"v"
    with pytest.raises(TypeError):
        db[b"k"] = bad
    with pytest.raises(TypeError):
        db[bad]
    with pytest.raises(TypeError):
        del db[bad]
    with pytest.raises(TypeError):
        bad in db
    with pytest.raises(TypeError):
        db.incr(bad)
    with pytest.raises(TypeError):
        db.update({b"k": bad})
    assert dict(db.items()) == {b"ok": b"1"}


def test_bytearray_and_memoryview_are_accepted(db):
    db[bytearray(b"ba")] = bytearray(b"value1")
    db[memoryview(b"mv")] = memoryview(b"value2")
    db[b"slice"] = memoryview(b"0123456789")[2:5]
    assert db[b"ba"] == b"value1" and db[bytearray(b"ba")] == b"value1"
    assert db[b"mv"] == b"value2" and db[memoryview(b"mv")] == b"value2"
    assert db[b"slice"] == b"234"
    assert bytearray(b"ba") in db
    del db[bytearray(b"ba")]
    assert b"ba" not in db
    assert all(type(k) is bytes for k in db)


def test_empty_key_and_empty_value(db):
    db[b""] = b""
    assert db[b""] == b"" and b"" in db and len(db) == 1
    db[b"e"] = b""
    assert db[b"e"] == b""
    db[b""] = b"not empty"
    assert db[b""] == b"not empty"
    assert sorted(db) == [b"", b"e"]
    del db[b""]
    assert b"" not in db


def test_key_size_limit(db):
    assert mmkv.MAX_KEY_SIZE == 64 * 1024
    big = b"k" * mmkv.MAX_KEY_SIZE
    db[big] = b"v"
    assert db[big] == b"v" and big in db
    assert db.incr(b"c" * mmkv.MAX_KEY_SIZE) == 1
    too_big = big + b"k"
    for call in (lambda: db.__setitem__(too_big, b"v"), lambda: db.incr(too_big),
                 lambda: db.update([(too_big, b"v")]), lambda: db.setdefault(too_big, b"v")):
        with pytest.raises(mmkv.LimitError) as exc:
            call()
        assert isinstance(exc.value, ValueError) and isinstance(exc.value, mmkv.Error)
    assert too_big not in db
    del db[big]
    assert len(db) == 1


def test_64mib_value_round_trips_and_survives_reopen(path):
    value = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    value = value[:-1] + b"!"
    with mmkv.open(path) as db:
        db[b"big"] = value
        db[b"small"] = b"s"
        assert db[b"big"] == value
        assert db.stats()["live_bytes"] == len(value) + 3 + 6
    with mmkv.open(path) as db:
        assert db[b"big"] == value and db[b"small"] == b"s"
        db.check()
        del db[b"big"]
        assert db.stats()["live_bytes"] == 6


# ---------------------------------------------------------------- iteration
def test_iteration_keys_values_items(db):
    model = {b"k%03d" % i: b"v%d" % (i * i) for i in range(300)}
    for k, v in model.items():
        db[k] = v
    db["text"] = "t"
    model[b"text"] = b"t"
    keys = list(db)
    assert all(type(k) is bytes for k in keys)
    assert sorted(keys) == sorted(model)
    assert sorted(db.keys()) == sorted(model)
    assert sorted(db.values()) == sorted(model.values())
    assert dict(db.items()) == model
    assert len(db.keys()) == len(db.items()) == len(db.values()) == len(model)
    assert (b"k007", b"v49") in db.items() and (b"k007", b"x") not in db.items()
    assert b"v49" in db.values()
    # items of one snapshot: consistent pairs even if the store changes during iteration
    it = iter(db.items())
    first = next(it)
    db.clear()
    rest = list(it)
    assert dict([first] + rest) == model


# ---------------------------------------------------------------- MutableMapping methods
def test_setdefault(db):
    assert db.setdefault(b"a", b"1") == b"1"
    assert db[b"a"] == b"1"
    assert db.setdefault(b"a", b"2") == b"1"
    assert db[b"a"] == b"1"
    assert db.setdefault(b"empty") == b""
    assert db[b"empty"] == b""
    assert db.setdefault("s", "str") == b"str" and db[b"s"] == b"str"
    with pytest.raises(TypeError):
        db.setdefault(b"n", 5)
    assert b"n" not in db and len(db) == 3


def test_pop(db):
    db[b"a"] = b"1"
    db[b"b"] = b"2"
    assert db.pop(b"a") == b"1"
    assert b"a" not in db and len(db) == 1
    with pytest.raises(KeyError):
        db.pop(b"a")
    assert db.pop(b"a", b"dflt") == b"dflt"
    assert db.pop(b"a", None) is None
    assert db.pop("b", None) == b"2"
    assert len(db) == 0


def test_popitem(db):
    db[b"a"] = b"1"
    assert db.popitem() == (b"a", b"1")
    with pytest.raises(KeyError):
        db.popitem()


def test_update_mapping_pairs_kwargs(db):
    db.update({b"a": b"1", "b": "2"})
    db.update([(b"c", b"3"), ("d", b"4")])
    db.update(e=b"5", f="6")
    db.update({b"g": b"7"}, h=b"8")
    db.update(((bytes([i]), bytes([i])) for i in range(3)))    # any iterable of pairs
    db.update({b"a": b"one"})                                   # overwrite
    assert dict(db.items()) == {b"a": b"one", b"b": b"2", b"c": b"3", b"d": b"4", b"e": b"5", b"f": b"6",
                                b"g": b"7", b"h": b"8", b"\x00": b"\x00", b"\x01": b"\x01", b"\x02": b"\x02"}
    db.update()
    db.update({})
    assert len(db) == 11


def _index_block_count(db):
    with db.lock():
        return len(index.blocks(db.engine))


def test_clear(db):
    for i in range(30000):          # splits the index several times
        db[b"k%d" % i] = b"v" * (i % 50)
    st_ = db.stats()
    assert st_["index_segments"] >= 3 and st_["index_depth"] >= 2
    db.clear()
    assert len(db) == 0 and list(db) == [] and b"k1" not in db
    st_ = db.stats()
    assert st_["keys"] == 0 and st_["live_bytes"] == 0 and st_["index_slots"] == SEGMENT_SLOTS
    assert st_["index_segments"] == 1 and st_["index_depth"] == 0
    assert _index_block_count(db) == 2             # a fresh index: one directory entry, one segment
    db[b"k1"] = b"again"
    assert dict(db.items()) == {b"k1": b"again"}
    db.clear()
    db.clear()
    assert len(db) == 0


# ---------------------------------------------------------------- counters
def test_incr_basics(db):
    assert db.incr(b"n") == 1
    assert db[b"n"] == le64(1)
    assert db.incr(b"n") == 2
    assert db.incr(b"n", 10) == 12
    assert db.incr(b"n", -20) == -8
    assert db[b"n"] == le64(-8)
    r = db.incr(b"n", 0)
    assert r == -8 and type(r) is int
    assert db.incr("s", -3) == -3 and db[b"s"] == le64(-3)
    assert db.incr(b"zero", 0) == 0 and db[b"zero"] == le64(0)     # missing counts from 0
    assert db.incr(b"n", delta=5) == -3
    assert len(db) == 3


def test_incr_on_existing_8_byte_value(db):
    db[b"c"] = le64(41)
    assert db.incr(b"c") == 42
    db[b"c"] = (1).to_bytes(8, "little")
    assert db.incr(b"c", 2) == 3
    db[b"neg"] = b"\xff" * 8            # -1 as signed little-endian
    assert db.incr(b"neg") == 0
    assert db[b"neg"] == bytes(8)


@pytest.mark.parametrize("value", [b"abc", b"", b"1234567", b"123456789"])
def test_incr_not_a_counter(db, value):
    db[b"x"] = value
    with pytest.raises(mmkv.NotACounterError) as exc:
        db.incr(b"x")
    assert isinstance(exc.value, mmkv.Error)
    assert db[b"x"] == value


def test_incr_overflow(db):
    db[b"max"] = le64(INT64_MAX)
    with pytest.raises(OverflowError):
        db.incr(b"max")
    assert db[b"max"] == le64(INT64_MAX)
    assert db.incr(b"max", -1) == INT64_MAX - 1
    assert db.incr(b"max", 1) == INT64_MAX
    db[b"min"] = le64(INT64_MIN)
    with pytest.raises(OverflowError):
        db.incr(b"min", -1)
    assert db[b"min"] == le64(INT64_MIN)
    with pytest.raises(OverflowError):
        db.incr(b"fresh", 1 << 63)
    assert b"fresh" not in db
    assert db.incr(b"fresh", INT64_MIN) == INT64_MIN
    assert db.incr(b"fresh", INT64_MAX) == -1


@pytest.mark.parametrize("delta", [1.0, 1.5, "1", b"1", None, [1]], ids=repr)
def test_incr_non_int_delta(db, delta):
    db.incr(b"c")
    with pytest.raises(TypeError):
        db.incr(b"c", delta)
    assert db[b"c"] == le64(1)


def test_incr_many_times_is_in_place(db):
    db.incr(b"c")
    size = db.stats()["file_size"]
    used = db.stats()["used_bytes"]
    for _ in range(5000):
        db.incr(b"c")
    assert db[b"c"] == le64(5001)
    assert db.stats()["file_size"] == size and db.stats()["used_bytes"] == used


# ---------------------------------------------------------------- durability and lifecycle
def test_sync_keeps_data(path):
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
        assert db.sync() is None
        db[b"b"] = b"2"
        db.sync()
        assert dict(db.items()) == {b"a": b"1", b"b": b"2"}
    with mmkv.open(path) as db:
        assert dict(db.items()) == {b"a": b"1", b"b": b"2"}


def test_close_is_idempotent_and_closed_handle_refuses(path):
    db = mmkv.open(path)
    db[b"a"] = b"1"
    db.close()
    db.close()
    for call in (lambda: db[b"a"], lambda: db.get(b"a"), lambda: b"a" in db, lambda: len(db), lambda: list(db),
                 lambda: db.__setitem__(b"a", b"2"), lambda: db.__delitem__(b"a"), lambda: db.incr(b"a"),
                 db.sync, db.stats, db.check, db.clear):
        with pytest.raises(mmkv.ClosedError) as exc:
            call()
        assert isinstance(exc.value, ValueError)
    with mmkv.open(path) as db2:
        assert db2[b"a"] == b"1"


def test_context_manager(path):
    with mmkv.open(path) as db:
        assert isinstance(db, mmkv.Store)
        db[b"a"] = b"1"
    with pytest.raises(mmkv.ClosedError):
        db[b"a"]
    with pytest.raises(RuntimeError):
        with mmkv.open(path) as db:
            db[b"b"] = b"2"
            raise RuntimeError("boom")
    with pytest.raises(mmkv.ClosedError):
        len(db)
    with mmkv.open(path, "r") as db:
        assert dict(db.items()) == {b"a": b"1", b"b": b"2"}


def test_reopen_after_many_operations(path):
    rng = random.Random(99)
    model = {}
    with mmkv.open(path) as db:
        for i in range(20000):
            k = b"key%d" % rng.randrange(3000)
            r = rng.random()
            if r < 0.2 and k in model:
                del db[k]
                del model[k]
            elif r < 0.3:
                if k in model and len(model[k]) != 8:
                    continue
                n = db.incr(k, rng.randrange(-5, 6))
                model[k] = le64(n)
            else:
                v = rng.randbytes(rng.choice([0, 5, 50, 500, 3000]))
                db[k] = v
                model[k] = v
        assert dict(db.items()) == model
    for flag in ("r", "w", "c"):
        with mmkv.open(path, flag) as db:
            assert len(db) == len(model)
            assert dict(db.items()) == model
            assert all(db[k] == v for k, v in model.items())
            db.check()


def test_overwriting_one_key_does_not_grow_the_file(db):
    rng = random.Random(3)
    db[b"other"] = b"x" * 100
    for _ in range(200):
        db[b"k"] = rng.randbytes(rng.randint(0, 3000))
    size = db.stats()["file_size"]
    for _ in range(20000):
        db[b"k"] = rng.randbytes(rng.randint(0, 3000))
    st_ = db.stats()
    assert st_["file_size"] == size
    assert st_["keys"] == 2
    # in use: the index (directory and segment) and the two records (block + record header + padding
    # <= 93 bytes each)
    with db.lock():
        index_bytes = sum(size for _, size in index.blocks(db.engine))
    assert st_["index_segments"] == 1
    assert st_["used_bytes"] <= index_bytes + (1 + 3000 + 93) + (5 + 100 + 93)


def test_two_handles_see_each_other(path):
    with mmkv.open(path) as a, mmkv.open(path) as b:
        a[b"x"] = b"1"
        assert b[b"x"] == b"1"
        for i in range(20000):        # a grows file and index; b remaps on its next call
            a[b"k%d" % i] = b"v%d" % i
        assert b[b"k19999"] == b"v19999"          # b's first call after the growth is a plain read
        assert all(b[b"k%d" % i] == b"v%d" % i for i in range(0, 20000, 7))
        assert len(b) == 20001
        assert b.stats()["index_segments"] == a.stats()["index_segments"] > 1   # the index did split
        a.clear()                                 # a new index again: b must not read the old one
        with pytest.raises(KeyError):
            b[b"k5"]
        a[b"x"] = b"1"
        assert b.incr(b"ctr") == 1 and a.incr(b"ctr") == 2
        del b[b"x"]
        assert b"x" not in a


def test_threads_share_one_handle(db):
    """Calls on one handle from several threads are serialised: no lost increment, no torn value."""
    big = {i: bytes([i]) * (100_000 + i) for i in range(4)}      # larger than the per-call get buffer
    errors = []

    def worker(i):
        try:
            for n in range(300):
                db.incr(b"ctr")
                db[b"t%d" % i] = big[i]
                db[b"small%d" % i] = b"%d" % n
                for j in range(4):
                    v = db.get(b"t%d" % j)
                    assert v is None or v == big[j], f"torn or wrong value for t{j}"
                assert db[b"small%d" % i] == b"%d" % n
        except BaseException as exc:       # report in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    assert db[b"ctr"] == le64(1200)
    assert all(db[b"t%d" % i] == big[i] for i in range(4))


# ---------------------------------------------------------------- stats, check, lock
STATS_KEYS = {"keys", "live_bytes", "used_bytes", "free_bytes", "largest_free_block", "file_size", "index_slots",
              "index_segments", "index_depth", "load_factor", "fragmentation"}


def test_stats(db, path):
    st_ = db.stats()
    assert STATS_KEYS <= set(st_)
    assert st_["keys"] == 0 and st_["live_bytes"] == 0
    db[b"ab"] = b"cde"
    db[b"x"] = b""
    st_ = db.stats()
    assert st_["keys"] == 2
    assert st_["live_bytes"] == 2 + 3 + 1
    assert st_["file_size"] == os.path.getsize(path)
    assert st_["used_bytes"] + st_["free_bytes"] < st_["file_size"]
    assert 0 < st_["largest_free_block"] <= st_["free_bytes"]
    # a new store's index: one segment, named by a one-entry directory
    assert st_["index_slots"] == SEGMENT_SLOTS and st_["index_segments"] == 1 and st_["index_depth"] == 0
    assert st_["load_factor"] == 2 / st_["index_slots"]
    assert 0.0 <= st_["fragmentation"] < 1.0
    assert st_["fragmentation"] == pytest.approx(1 - st_["largest_free_block"] / st_["free_bytes"])
    for i in range(3000):
        db[b"k%d" % i] = b"v" * 30
    st_ = db.stats()
    assert st_["keys"] == 3002 and st_["live_bytes"] == 6 + sum(len(b"k%d" % i) + 30 for i in range(3000))
    assert st_["load_factor"] <= 0.75 and st_["file_size"] == os.path.getsize(path)
    assert st_["index_slots"] == st_["index_segments"] * SEGMENT_SLOTS
    assert st_["load_factor"] == 3002 / st_["index_slots"]


def test_check_returns_ok_report(db):
    report = db.check()
    assert report.ok is True and report.problems == [] and report.keys == 0
    for i in range(500):
        db[b"k%d" % i] = b"v" * i
    db.incr(b"ctr")
    report = db.check()
    assert report.ok and report.keys == 501
    assert report.file_size == db.stats()["file_size"]
    assert "OK" in str(report)


def test_lock_allows_several_calls_and_excludes_others(path):
    with mmkv.open(path) as db, mmkv.open(path, lock_timeout=0.2) as other:
        outcome = []

        def try_other():
            try:
                other[b"a"] = b"from other"
                outcome.append("wrote")
            except mmkv.LockTimeoutError:
                outcome.append("timeout")

        with db.lock() as held:
            assert held is db
            db[b"a"] = b"1"
            assert db[b"a"] == b"1"
            assert db.incr(b"n") == 1
            with db.lock():                 # re-entrant in the owning thread
                db[b"b"] = db[b"a"] + b"2"
                assert len(db) == 3 and b"b" in db
            assert dict(db.items()) == {b"a": b"1", b"b": b"12", b"n": le64(1)}
            t = threading.Thread(target=try_other)
            t.start()
            t.join(10)
            assert outcome == ["timeout"]
            assert db[b"a"] == b"1"
        other[b"a"] = b"from other"         # lock released: the other handle gets in
        assert db[b"a"] == b"from other"


def test_lock_released_on_exception(path):
    with mmkv.open(path) as db, mmkv.open(path, lock_timeout=1.0) as other:
        with pytest.raises(RuntimeError):
            with db.lock():
                db[b"a"] = b"1"
                raise RuntimeError
        other[b"b"] = b"2"                  # would time out if the lock leaked
        assert dict(db.items()) == {b"a": b"1", b"b": b"2"}


# ---------------------------------------------------------------- sync="full"
def test_sync_full_mode(path):
    model = {}
    with mmkv.open(path, sync="full") as db:
        assert db.stats()["sync"] == "full"
        for i in range(300):
            db[b"k%d" % i] = b"v%d" % i
            model[b"k%d" % i] = b"v%d" % i
        for i in range(0, 300, 3):
            del db[b"k%d" % i]
            del model[b"k%d" % i]
        assert db.incr(b"ctr") == 1 and db.incr(b"ctr", 9) == 10
        model[b"ctr"] = le64(10)
        db["s"] = "str"
        model[b"s"] = b"str"
        assert db.setdefault(b"sd", b"x") == b"x"
        model[b"sd"] = b"x"
        assert db.pop(b"k1") == b"v1"
        del model[b"k1"]
        db.update({b"u": b"1"}, w=b"2")
        model.update({b"u": b"1", b"w": b"2"})
        db[b"big"] = b"B" * 200_000
        model[b"big"] = b"B" * 200_000
        with pytest.raises(KeyError):
            db[b"k0"]
        db.sync()
        assert dict(db.items()) == model and len(db) == len(model)
        db.check()
    with mmkv.open(path, sync="full") as db:
        assert dict(db.items()) == model
        db.clear()
        assert len(db) == 0
        db[b"after"] = b"clear"
    with mmkv.open(path) as db:
        assert dict(db.items()) == {b"after": b"clear"}


# ---------------------------------------------------------------- errors
def test_error_hierarchy():
    for cls in (mmkv.CorruptionError, mmkv.LimitError, mmkv.NotACounterError, mmkv.LockTimeoutError,
                mmkv.ClosedError, mmkv.ReadOnlyError, mmkv.DiskFullError):
        assert issubclass(cls, mmkv.Error)
    assert issubclass(mmkv.LimitError, ValueError)
    assert issubclass(mmkv.NotACounterError, TypeError)


def test_not_an_mmkv_file(tmp_path):
    p = tmp_path / "junk.bad"
    p.write_bytes(b"this is not a store" * 1000)
    with pytest.raises(mmkv.CorruptionError):
        mmkv.open(str(p), "w")
