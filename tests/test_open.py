"""Opening and closing: the dbm flags, validation of damaged files, closed and forked handles.

Files damaged on purpose are named ``*.bad`` so the conftest audit leaves them alone.
"""
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

import mmkv
from mmkv.engine import layout

FORK = multiprocessing.get_context("fork")
JOIN = 30


def _fds():
    return len(os.listdir("/proc/self/fd"))


def _flip(p, *offsets):
    with open(p, "r+b") as f:
        for off in offsets:
            f.seek(off)
            b = f.read(1)
            f.seek(off)
            f.write(bytes([b[0] ^ 0xFF]))


def _patch(p, off, data):
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(data)


@pytest.fixture
def good(tmp_path):
    """A sound store with a few keys, closed (the audit checks it after the test)."""
    p = str(tmp_path / "good.mmkv")
    with mmkv.open(p) as db:
        for i in range(50):
            db[b"k%d" % i] = b"v%d" % i * (i + 1)
        db.incr(b"counter", 7)
    return p


@pytest.fixture
def bad(tmp_path, good):
    """A copy of the good store, to damage."""
    p = str(tmp_path / "copy.bad")
    shutil.copyfile(good, p)
    return p


# ---------------------------------------------------------------- create, close, reopen

def test_create_close_reopen_keeps_data(path):
    assert not os.path.exists(path)
    db = mmkv.open(path)
    assert os.path.exists(path)
    assert len(db) == 0
    db[b"a"] = b"1"
    db["b"] = "two"
    db.incr(b"n", 5)
    db.close()
    with mmkv.open(path) as db:
        assert db[b"a"] == b"1" and db[b"b"] == b"two"
        assert db.incr(b"n") == 6
        assert sorted(db) == [b"a", b"b", b"n"]
    with mmkv.open(path, "r") as db:
        assert db[b"n"] == (6).to_bytes(8, "little", signed=True)
        assert len(db) == 3


def test_reopen_many_times(path):
    for i in range(20):
        with mmkv.open(path) as db:
            assert len(db) == i
            db[b"k%d" % i] = b"%d" % i
    with mmkv.open(path, "r") as db:
        assert {k: v for k, v in db.items()} == {b"k%d" % i: b"%d" % i for i in range(20)}


def test_open_accepts_pathlike(tmp_path):
    p = tmp_path / "pl.mmkv"
    with mmkv.open(p) as db:
        db[b"x"] = b"y"
    with mmkv.open(p, "r") as db:
        assert db[b"x"] == b"y"


def test_open_creates_the_store_and_nothing_else(path, tmp_path):
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
        assert os.listdir(tmp_path) == ["test.mmkv"]      # the protocol's locks live in the file itself
    # only the store remains: no sidecar, no temporary files left behind
    assert os.listdir(tmp_path) == ["test.mmkv"]


# ---------------------------------------------------------------- flags

def test_flag_r_missing_file(path):
    with pytest.raises(FileNotFoundError):
        mmkv.open(path, "r")
    assert not os.path.exists(path)


def test_flag_r_reads_but_refuses_writes(path):
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
        db[b"b"] = b"2"
        db.incr(b"c")
    with mmkv.open(path, "r") as db:
        assert db[b"a"] == b"1" and db.get(b"b") == b"2" and db.get(b"zz") is None
        assert b"a" in db and len(db) == 3
        assert sorted(db.keys()) == [b"a", b"b", b"c"]
        assert dict(db.items())[b"b"] == b"2"
        assert db.stats()["keys"] == 3
        attempts = {
            "set": lambda: db.__setitem__(b"a", b"x"),
            "set new": lambda: db.__setitem__(b"new", b"x"),
            "del": lambda: db.__delitem__(b"a"),
            "incr": lambda: db.incr(b"c"),
            "pop": lambda: db.pop(b"a"),
            "update": lambda: db.update({b"a": b"x"}),
            "clear": db.clear,
            "setdefault new": lambda: db.setdefault(b"new", b"x"),
        }
        for what, call in attempts.items():
            with pytest.raises(mmkv.ReadOnlyError):
                call()
                pytest.fail(f"{what} succeeded on a read-only handle")
        assert isinstance(mmkv.ReadOnlyError("x"), mmkv.Error)
        # nothing changed
        assert dict(db.items()) == {b"a": b"1", b"b": b"2", b"c": (1).to_bytes(8, "little")}
    with mmkv.open(path, "r") as db:
        assert len(db) == 3 and db[b"a"] == b"1"


def test_flag_r_setdefault_of_existing_key_is_a_read(path):
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
    with mmkv.open(path, "r") as db:
        assert db.setdefault(b"a", b"other") == b"1"
        with pytest.raises(mmkv.ReadOnlyError):
            db.setdefault(b"missing", b"x")


def test_flag_r_handle_sees_writes_of_a_writer(path):
    with mmkv.open(path) as w, mmkv.open(path, "r") as r:
        w[b"k"] = b"1"
        assert r[b"k"] == b"1"
        w[b"k"] = b"2"
        assert r[b"k"] == b"2"


def test_flag_w_missing_file(path):
    with pytest.raises(FileNotFoundError):
        mmkv.open(path, "w")
    assert not os.path.exists(path)


def test_flag_w_opens_existing_read_write(path):
    with mmkv.open(path, "c") as db:
        db[b"a"] = b"1"
    with mmkv.open(path, "w") as db:
        assert db[b"a"] == b"1"
        db[b"b"] = b"2"
        del db[b"a"]
    with mmkv.open(path, "r") as db:
        assert dict(db.items()) == {b"b": b"2"}


def test_flag_c_creates_and_keeps(path):
    with mmkv.open(path, "c") as db:
        assert len(db) == 0
        db[b"a"] = b"1"
    with mmkv.open(path, "c") as db:
        assert db[b"a"] == b"1" and len(db) == 1


def test_default_flag_is_c(path):
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
    with mmkv.open(path) as db:
        assert db[b"a"] == b"1"


def test_flag_n_empties_existing(path):
    with mmkv.open(path) as db:
        for i in range(100):
            db[b"k%d" % i] = b"v"
    with mmkv.open(path, "n") as db:
        assert len(db) == 0 and list(db) == [] and db.get(b"k1") is None
        db[b"fresh"] = b"1"
    with mmkv.open(path, "r") as db:
        assert dict(db.items()) == {b"fresh": b"1"}


def test_flag_n_creates_missing(path):
    with mmkv.open(path, "n") as db:
        assert len(db) == 0
        db[b"a"] = b"1"
    with mmkv.open(path, "w") as db:
        assert db[b"a"] == b"1"


def test_flag_n_while_another_handle_is_open(path):
    first = mmkv.open(path)
    try:
        for i in range(50):
            first[b"k%d" % i] = b"v%d" % i
        first.incr(b"ctr", 3)
        second = mmkv.open(path, "n")
        try:
            assert len(second) == 0 and list(second) == []
            # the other handle sees the same, empty store
            assert len(first) == 0
            assert first.get(b"k1") is None and b"ctr" not in first
            assert list(first) == []
            # and both keep working on the one store
            first[b"x"] = b"1"
            assert second[b"x"] == b"1"
            second[b"y"] = b"2"
            assert first[b"y"] == b"2"
            assert first.incr(b"ctr") == 1, "the old counter must be gone"
        finally:
            second.close()
    finally:
        first.close()
    with mmkv.open(path, "r") as db:
        assert sorted(db) == [b"ctr", b"x", b"y"]


@pytest.mark.parametrize("flag", ["r", "w", "c", "n"])
def test_missing_parent_directory(tmp_path, flag):
    p = str(tmp_path / "missing" / "sub" / "x.mmkv")
    with pytest.raises(FileNotFoundError):
        mmkv.open(p, flag).close()
    assert not os.path.exists(tmp_path / "missing"), "a failed open created directories"


@pytest.mark.parametrize("flag", ["", "rw", "x", "a", "C", "R", None, 1])
def test_invalid_flag(path, flag):
    with pytest.raises(ValueError):
        mmkv.open(path, flag)
    assert not os.path.exists(path)


@pytest.mark.parametrize("sync", ["", "always", "FULL", "fsync", None, 0])
def test_invalid_sync(path, sync):
    with pytest.raises(ValueError):
        mmkv.open(path, sync=sync)
    assert not os.path.exists(path)


@pytest.mark.parametrize("sync", ["none", "full"])
def test_valid_sync_modes(path, sync):
    with mmkv.open(path, sync=sync) as db:
        db[b"a"] = b"1"
        assert db.stats()["sync"] == sync
    with mmkv.open(path, "r", sync=sync) as db:
        assert db[b"a"] == b"1"


# ---------------------------------------------------------------- damaged files

def _open_fails(p, exc_type, pattern, flags="rwc"):
    """Every flag that keeps the file raises exc_type with a message matching pattern,
    leaves the file byte for byte as it was, and leaks no descriptor."""
    with open(p, "rb") as f:
        before = f.read()
    for flag in flags:
        fds = _fds()
        with pytest.raises(exc_type) as info:
            mmkv.open(p, flag)
        assert isinstance(info.value, mmkv.CorruptionError)
        assert isinstance(info.value, mmkv.Error)
        assert re.search(pattern, str(info.value), re.I), f"flag {flag!r}: unclear message {info.value!s}"
        assert _fds() == fds, f"flag {flag!r}: a failed open leaked a file descriptor"
    with open(p, "rb") as f:
        assert f.read() == before, "a failed open must not modify the file"
    return info.value


def test_error_hierarchy():
    for cls in (mmkv.NotMmkvFileError, mmkv.VersionError, mmkv.ChecksumError, mmkv.TruncatedError):
        assert issubclass(cls, mmkv.CorruptionError)
    assert issubclass(mmkv.CorruptionError, mmkv.Error)
    assert issubclass(mmkv.ClosedError, mmkv.Error) and issubclass(mmkv.ForkedHandleError, mmkv.Error)
    assert issubclass(mmkv.LockTimeoutError, mmkv.Error)


def test_random_bytes_is_not_mmkv(tmp_path):
    p = str(tmp_path / "random.bad")
    data = bytearray(random.Random(7).randbytes(3 * 4096))
    data[0] = 0x42                      # make sure the magic cannot match by chance
    with open(p, "wb") as f:
        f.write(data)
    _open_fails(p, mmkv.NotMmkvFileError, r"not an mmkv file|magic")


@pytest.mark.parametrize("size", [4096 * 3, 4096, 200])
def test_text_file_is_not_mmkv(tmp_path, size):
    p = str(tmp_path / "notes.bad")
    text = ("The quick brown fox jumps over the lazy dog.\n" * 1000)[:size]
    with open(p, "w") as f:
        f.write(text)
    _open_fails(p, mmkv.NotMmkvFileError, r"not an mmkv file|magic")


@pytest.mark.parametrize("text", ["hi\n", "x", "hello!\n"])
def test_tiny_text_file_is_not_mmkv(tmp_path, text):
    """Shorter than the magic, but not a prefix of it: not an mmkv file (rather than truncated)."""
    p = str(tmp_path / "tiny.bad")
    with open(p, "w") as f:
        f.write(text)
    _open_fails(p, mmkv.NotMmkvFileError, r"not an mmkv file|magic")


@pytest.mark.parametrize("n", [1, 5, 8, 4095])
def test_prefix_of_a_store_is_truncated(good, tmp_path, n):
    """The first n bytes of a real store: truncated, not foreign."""
    p = str(tmp_path / "prefix.bad")
    with open(good, "rb") as f:
        head = f.read(n)
    with open(p, "wb") as f:
        f.write(head)
    _open_fails(p, mmkv.TruncatedError, r"short|truncat")


def test_other_version(bad):
    _patch(bad, 8, (layout.VERSION + 1).to_bytes(4, "little"))
    e = _open_fails(bad, mmkv.VersionError, r"version")
    assert str(layout.VERSION + 1) in str(e)


def test_other_version_zero(bad):
    _patch(bad, 8, (0).to_bytes(4, "little"))
    _open_fails(bad, mmkv.VersionError, r"version")


@pytest.mark.parametrize("offset", [16, 23, 24, 12, 40])
def test_header_checksum(bad, offset):
    """A flipped byte in the identity (seeds, page size, reserved) fails the header checksum."""
    _flip(bad, offset)
    _open_fails(bad, mmkv.ChecksumError, r"checksum")


def test_identity_checksum_field_damaged(bad):
    _flip(bad, layout._ID_SUM_AT + 3)
    _open_fails(bad, mmkv.ChecksumError, r"checksum")


def test_both_meta_copies_damaged(bad):
    _flip(bad, layout.OFF_META[0] + 8, layout.OFF_META[1] + 8)
    _open_fails(bad, mmkv.ChecksumError, r"meta.*checksum|checksum.*meta")


def test_both_meta_copies_valid_then_damaged(tmp_path):
    """After growth both meta copies hold valid data; damaging both still fails cleanly."""
    good = str(tmp_path / "grown.mmkv")
    with mmkv.open(good) as db:
        db.update({b"k%d" % i: b"x" * 1000 for i in range(300)})
    p = str(tmp_path / "grown.bad")
    shutil.copyfile(good, p)
    with open(p, "rb") as f:
        page = f.read(layout.HEADER_SIZE)
    seqs = [int.from_bytes(page[o:o + 8], "little") for o in layout.OFF_META]
    assert min(seqs) >= 1, "the test needs both meta copies in use"
    _flip(p, layout.OFF_META[0] + 8, layout.OFF_META[1] + 8)
    _open_fails(p, mmkv.ChecksumError, r"meta.*checksum|checksum.*meta")


def test_truncated_to_100_bytes(bad):
    os.truncate(bad, 100)
    _open_fails(bad, mmkv.TruncatedError, r"short|truncat|100 bytes")


def test_truncated_to_half(bad):
    size = os.path.getsize(bad)
    os.truncate(bad, size // 2)
    _open_fails(bad, mmkv.TruncatedError, r"short|truncat|cut")


def test_truncated_by_one_page(bad):
    os.truncate(bad, os.path.getsize(bad) - 4096)
    _open_fails(bad, mmkv.TruncatedError, r"short|truncat|cut")


def test_empty_file_with_flag_w(tmp_path):
    p = str(tmp_path / "empty.bad")
    open(p, "wb").close()
    fds = _fds()
    with pytest.raises(mmkv.CorruptionError) as info:
        mmkv.open(p, "w")
    assert re.search(r"0 bytes|empty|short|truncat", str(info.value), re.I), str(info.value)
    assert _fds() == fds
    assert os.path.getsize(p) == 0, "flag 'w' must not turn an empty file into a store"
    with pytest.raises(mmkv.CorruptionError):
        mmkv.open(p, "r")


def test_damaged_files_do_not_stop_good_ones(good, bad):
    _flip(bad, 16)
    with pytest.raises(mmkv.ChecksumError):
        mmkv.open(bad)
    with mmkv.open(good, "r") as db:
        assert db[b"k3"] == b"v3" * 4


def test_good_copy_opens(good, tmp_path):
    """Control for the damage tests: the undamaged copy opens and holds everything."""
    p = str(tmp_path / "copy2.mmkv")
    shutil.copyfile(good, p)
    with mmkv.open(p, "w") as db:
        assert len(db) == 51 and db[b"k49"] == b"v49" * 50
        assert db.incr(b"counter") == 8


_FUZZ = textwrap.dedent(r"""
    import os, random, shutil, sys, collections
    import mmkv
    src, work, seed, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    dirty_at = int(sys.argv[5])      # > 0: mark the file as not closed cleanly, so opening runs recovery
    size = os.path.getsize(src)
    rng = random.Random(seed)
    seen = collections.Counter()
    for _ in range(rounds):
        shutil.copyfile(src, work)
        with open(work, "r+b") as f:
            data = bytearray(f.read())
            lo = rng.choice([0, 4096, 4096])
            for _ in range(rng.choice([1, 1, 3, 16])):
                data[rng.randrange(lo, size)] = rng.randrange(256)
            if dirty_at:
                data[dirty_at:dirty_at + 8] = (1).to_bytes(8, "little")
            f.seek(0)
            f.write(data)
        try:
            with mmkv.open(work, "w") as db:
                for k in list(db):
                    db.get(k)
                for i in range(60):
                    db.get(b"k%d" % i)
                db[b"new"] = b"n" * 300
                for i in range(0, 60, 7):
                    db.pop(b"k%d" % i, None)
                db.incr(b"counter")
                db.check()
            seen["ok"] += 1
        except mmkv.Error as e:
            seen[type(e).__name__] += 1
        except Exception as e:
            print("UNEXPECTED", type(e).__name__, e, flush=True)
            sys.exit(3)
    print(dict(seen), flush=True)
""")


@pytest.mark.parametrize("unclean", [False, True])
def test_random_damage_never_crashes(good, tmp_path, unclean):
    """Random byte damage anywhere: open, read, write and check either work or raise
    mmkv.Error; never a crash (run in a child so a SIGSEGV/SIGBUS is seen as such).
    unclean: the file is also marked as not closed cleanly, so the open runs recovery on it."""
    work = str(tmp_path / "fuzz.bad")
    dirty_at = layout.STATE_WORD["dirty"] * 8 if unclean else 0
    r = subprocess.run([sys.executable, "-c", _FUZZ, good, work, str(2024 + unclean), "200", str(dirty_at)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stdout[-2000:]} {r.stderr[-2000:]}"
    assert "UNEXPECTED" not in r.stdout
    assert "{" in r.stdout


# ---------------------------------------------------------------- closed handles

def test_closed_handle_raises(path):
    db = mmkv.open(path)
    db[b"a"] = b"1"
    db.close()
    calls = {
        "getitem": lambda: db[b"a"],
        "get": lambda: db.get(b"a"),
        "get missing": lambda: db.get(b"zz", b"default"),
        "set": lambda: db.__setitem__(b"a", b"2"),
        "len": lambda: len(db),
        "contains": lambda: b"a" in db,
        "del": lambda: db.__delitem__(b"a"),
        "iter": lambda: list(db),
        "items": lambda: list(db.items()),
        "incr": lambda: db.incr(b"n"),
        "stats": db.stats,
        "sync": db.sync,
        "check": db.check,
    }
    for what, call in calls.items():
        with pytest.raises(mmkv.ClosedError):
            call()
            pytest.fail(f"{what} worked on a closed handle")
    assert "closed" in repr(db)
    with mmkv.open(path, "r") as again:
        assert again[b"a"] == b"1"


def test_close_twice(path):
    db = mmkv.open(path)
    db[b"a"] = b"1"
    db.close()
    db.close()
    with pytest.raises(mmkv.ClosedError):
        len(db)


def test_context_manager_closes(path):
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
        assert len(db) == 1
    with pytest.raises(mmkv.ClosedError):
        db[b"a"]
    with pytest.raises(RuntimeError):
        with mmkv.open(path) as db2:
            raise RuntimeError("boom")
    with pytest.raises(mmkv.ClosedError):
        len(db2)


def test_close_marks_file_clean_only_when_last(path):
    dirty_at = layout.STATE_WORD["dirty"] * 8

    def dirty():
        with open(path, "rb") as f:
            f.seek(dirty_at)
            return int.from_bytes(f.read(8), "little")

    a = mmkv.open(path)
    b = mmkv.open(path)
    assert dirty() != layout.CLEAN_MARK
    a.close()
    assert dirty() != layout.CLEAN_MARK, "the file was marked clean while another handle has it open"
    b[b"x"] = b"1"
    b.close()
    assert dirty() == layout.CLEAN_MARK


def test_open_leaks_no_descriptors(path):
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
    before = _fds()
    for _ in range(10):
        with mmkv.open(path) as db:
            db[b"a"]
    assert _fds() == before


# ---------------------------------------------------------------- fork

def _forked_child(db, path):
    """Runs in the forked child; the exit code says which check failed (0: all good)."""
    for code, op in enumerate([lambda: db[b"a"], lambda: db.get(b"a"), lambda: db.__setitem__(b"z", b"1"),
                               lambda: len(db), lambda: b"a" in db, lambda: list(db), lambda: db.incr(b"n"),
                               lambda: db.stats()], start=10):
        try:
            op()
        except mmkv.ForkedHandleError:
            continue
        except BaseException:
            os._exit(code + 20)
        os._exit(code)
    try:
        db.close()                            # drops the child's copy only
    except BaseException:
        os._exit(40)
    try:
        with mmkv.open(path) as mine:
            if mine[b"a"] != b"1" or mine[b"n"] != (5).to_bytes(8, "little"):
                os._exit(41)
            mine[b"child"] = b"hello"
            mine.incr(b"n")
    except BaseException:
        os._exit(42)
    os._exit(0)


def test_forked_handle_refused_parent_keeps_working(path):
    db = mmkv.open(path)
    try:
        db[b"a"] = b"1"
        db.incr(b"n", 5)
        p = FORK.Process(target=_forked_child, args=(db, path))
        p.start()
        p.join(JOIN)
        if p.is_alive():
            p.kill()
            p.join(5)
            pytest.fail("forked child hung")
        assert p.exitcode == 0, f"forked child failed check {p.exitcode}"
        # the parent's handle is untouched and sees what the child wrote through its own handle
        assert db[b"a"] == b"1"
        assert db[b"child"] == b"hello"
        assert db.incr(b"n") == 7
        db[b"after"] = b"fork"
        assert len(db) == 4
    finally:
        db.close()
    with mmkv.open(path, "r") as again:
        assert again[b"after"] == b"fork" and again[b"child"] == b"hello"


def _drop_inherited_handle(db):
    db.__del__()                              # what garbage collection of the child's copy does
    os._exit(0)


def test_fork_with_handle_open_leaves_file_consistent(path):
    """The child exiting (with its copy of the handle) must not mark the file clean or close it."""
    db = mmkv.open(path)
    try:
        db[b"a"] = b"1"
        p = FORK.Process(target=_drop_inherited_handle, args=(db,))
        p.start()
        p.join(JOIN)
        assert p.exitcode == 0
        with open(path, "rb") as f:
            f.seek(layout.STATE_WORD["dirty"] * 8)
            assert int.from_bytes(f.read(8), "little") != layout.CLEAN_MARK
        db[b"b"] = b"2"
        assert dict(db.items()) == {b"a": b"1", b"b": b"2"}
    finally:
        db.close()


@pytest.mark.parametrize("timeout", [float("inf"), 1e10, 0, 0.5])
def test_lock_timeout_accepts_any_non_negative_number(path, timeout):
    with mmkv.open(path, lock_timeout=timeout) as db:
        db[b"a"] = b"1"
        assert db[b"a"] == b"1"


@pytest.mark.parametrize("timeout, exc", [(-1, ValueError), (float("nan"), ValueError), ("5", TypeError)])
def test_bad_lock_timeout_is_refused_before_anything_is_created(path, timeout, exc):
    with pytest.raises(exc, match="lock_timeout"):
        mmkv.open(path, lock_timeout=timeout)
    assert not os.path.exists(path)
