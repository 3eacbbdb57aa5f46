"""Space comes back: free pages released to the filesystem, backed again before reuse, compaction,
and a file that shrinks when no other handle has it open (issue 12).

Released pages are holes (fallocate PUNCH_HOLE); the checker's hole audit (FIEMAP) proves that no
hole lies under anything but the inner pages of a free block flagged as released.  Where the
filesystem cannot report holes (tmpfs has no FIEMAP) the tests that need it skip.
"""
import ctypes
import os
import random
import subprocess
import sys
import textwrap
import time

import pytest

import mmkv
from mmkv.engine import layout, mapping, opening
from mmkv.engine.shim import lib
from test_diskfull import mount  # noqa: F401 (the fixture: a small mounted file system)

PAGE = os.sysconf("SC_PAGE_SIZE")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def disk_bytes(path) -> int:
    return os.stat(path).st_blocks * 512


def needs_fiemap(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if mapping.unbacked_ranges(fd, os.fstat(fd).st_size) is None:
            pytest.skip("this filesystem cannot report holes (no FIEMAP)")
    finally:
        os.close(fd)


def churn(db, n, rounds, rng):
    """The benchmark's churn: load n keys of 10..2000 B, then rounds of overwrite-all and
    delete-half.  Returns the model."""
    model = {}
    for i in range(n):
        model[b"k%d" % i] = rng.randbytes(rng.randint(10, 2000))
    db.update(model)
    for _ in range(rounds):
        for i in range(n):
            v = rng.randbytes(rng.randint(10, 2000))
            db[b"k%d" % i] = v
            model[b"k%d" % i] = v
        for k in rng.sample(sorted(model), len(model) // 2):
            del db[k]
            del model[k]
    return model


def logical(model) -> int:
    return sum(len(k) + len(v) for k, v in model.items())


# ---------------------------------------------------------------- release and backing

def test_a_large_free_region_gives_its_pages_back_and_gets_them_again(path):
    with mmkv.open(path, "n") as db:
        for i in range(2000):
            db[b"k%d" % i] = bytes([i % 251]) * 20000
        needs_fiemap(path)
        full = disk_bytes(path)
        for i in range(1000):                  # the first half of the heap, contiguous
            del db[b"k%d" % i]
        assert disk_bytes(path) < full - 15_000_000, (full, disk_bytes(path))
        db.check()                             # the hole audit: every hole is in released free space
        holes = mapping.unbacked_ranges(db._engine.fd, db._engine.fm.size)
        assert holes and sum(e - s for s, e in holes) > 15_000_000
        for i in range(1000):                  # reuse: backed again before it is written
            db[b"n%d" % i] = bytes([i % 249]) * 20000
        db.check()
        assert all(db[b"n%d" % i] == bytes([i % 249]) * 20000 for i in range(1000))
        assert all(db[b"k%d" % i] == bytes([i % 251]) * 20000 for i in range(1000, 2000))
    with mmkv.open(path) as db:
        db.check()
        assert len(db) == 2000


def test_scattered_frees_release_nothing_small(path):
    """Blocks below RELEASE_MIN keep their pages: a free costs no system call."""
    with mmkv.open(path, "n") as db:
        for i in range(3000):
            db[b"k%d" % i] = b"v" * 3000
        needs_fiemap(path)
        for i in range(0, 3000, 2):            # every other record: free blocks of ~3 KB
            del db[b"k%d" % i]
        assert mapping.unbacked_ranges(db._engine.fd, db._engine.fm.size) == []
        db.check()


def test_a_version_1_file_is_never_given_holes(tmp_path, monkeypatch):
    made = opening.new_identity
    monkeypatch.setattr(opening, "new_identity",
                        lambda page: layout.Identity(*made(page)[:4], 1))
    p = str(tmp_path / "v1.mmkv")
    with mmkv.open(p, "n") as db:
        monkeypatch.setattr(opening, "new_identity", made)
        for i in range(500):
            db[b"k%d" % i] = b"x" * 20000
        needs_fiemap(p)
        for i in range(500):
            del db[b"k%d" % i]
        assert mapping.unbacked_ranges(db._engine.fd, db._engine.fm.size) == []


def test_reusing_released_space_on_a_full_disk_is_a_clean_disk_full_error(mount, capsys):
    disk = mount("ext4", 24)
    db = disk.open()
    for i in range(600):
        db[b"k%d" % i] = bytes([i % 251]) * 20000
    for i in range(600):
        del db[b"k%d" % i]                      # about 12 MB released
    released = db.stats()
    disk.fill()                                 # nothing left to back them with
    model = {}
    with pytest.raises(mmkv.DiskFullError):
        for i in range(600):
            db[b"n%d" % i] = b"y" * 20000
            model[b"n%d" % i] = b"y" * 20000
    db.check()
    assert dict(db.items()) == model            # the failed put changed nothing
    disk.release(4 << 20)
    db[b"after"] = b"z" * 20000                 # works again once the disk has room
    db.check()
    assert released["file_size"] == db.stats()["file_size"]


def _punch(path, off, length):
    fd = os.open(path, os.O_RDWR)
    try:
        if _libc.fallocate(fd, 3, off, length):  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            pytest.skip(f"fallocate PUNCH_HOLE: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(fd)


def test_the_checker_fires_on_a_hole_under_a_live_record(tmp_path):
    p = str(tmp_path / "hole.bad")
    with mmkv.open(p, "n") as db:
        db[b"big"] = b"v" * 50000
        with db.lock():
            assert lib.mmkv_find(db._view, b"big", 3) == 0
            off = db._view.val_off
        needs_fiemap(p)
        start = (off + PAGE) // PAGE * PAGE
        _punch(p, start, PAGE)
        with pytest.raises(mmkv.CorruptionError) as exc:
            db.check()
        assert any("hole" in problem for problem in exc.value.report.problems)


def test_the_checker_fires_on_a_released_range_outside_its_block(path):
    with mmkv.open(path, "n") as db:
        for i in range(200):
            db[b"k%d" % i] = b"x" * 20000
        for i in range(200):
            del db[b"k%d" % i]
        w = db._engine.words
        flagged = [b for b, size, used in db._engine.alloc.blocks()
                   if not used and w[b >> 3] & layout.BLOCK_HOLES]
        assert flagged, "a 4 MB free block was not released"
        b = flagged[0]
        saved = w[(b + layout.FREE_HOLES_AT) >> 3]
        w[(b + layout.FREE_HOLES_AT) >> 3] = b + 8          # inside its own header page
        with pytest.raises(mmkv.CorruptionError) as exc:
            db.check()
        assert any("released pages" in problem for problem in exc.value.report.problems)
        w[(b + layout.FREE_HOLES_AT) >> 3] = saved
        db.check()


# ---------------------------------------------------------------- compaction

def test_compact_moves_records_down_and_shrinks_the_file(path):
    rng = random.Random(12)
    with mmkv.open(path, "n") as db:
        model = churn(db, 8000, 3, rng)
        before = os.path.getsize(path)
        result = db.compact()
        assert result["shrunk"] and result["moved_records"] > 0
        after = os.path.getsize(path)
        assert after == result["file_size_after"] < before
        assert after <= 1.25 * logical(model) + 512 * 1024, (after, logical(model))
        db.check()
        assert dict(db.items()) == model
        db[b"new"] = b"n" * 5000                 # keeps working: grows again
        model[b"new"] = b"n" * 5000
    with mmkv.open(path) as db:
        db.check()
        assert dict(db.items()) == model


@pytest.mark.parametrize("keys", [0, 1, 50])
def test_compacting_a_small_store_never_grows_it(path, tmp_path, keys):
    """A fresh store's index is its last block and nothing below it can take it: moving it
    grew the file (a one-key store's backup was 282,624 bytes beside a 262,144-byte store)."""
    with mmkv.open(path, "n") as db:
        db.update((b"k%d" % i, b"v" * i) for i in range(keys))
        before = os.path.getsize(path)
        result = db.compact()
        assert result["file_size_after"] == os.path.getsize(path) <= before, result
        assert result["shrunk"] == (os.path.getsize(path) < before)
        db.check()
        db.backup(str(tmp_path / "copy.mmkv"))
        assert os.path.getsize(tmp_path / "copy.mmkv") <= os.path.getsize(path)
    with mmkv.open(str(tmp_path / "copy.mmkv"), "r") as copy:
        assert len(copy) == keys
        copy.check()


def test_compact_with_another_handle_open_releases_instead_of_shrinking(path):
    rng = random.Random(13)
    with mmkv.open(path, "n") as db, mmkv.open(path) as other:
        model = churn(db, 6000, 3, rng)
        size = os.path.getsize(path)
        result = db.compact()
        assert not result["shrunk"] and os.path.getsize(path) == size
        assert result["disk_bytes_after"] < result["disk_bytes_before"]
        assert dict(other.items()) == model      # the other handle reads through it all
        other.check()


def test_compact_refuses_inside_lock_or_a_transaction(db):
    db[b"a"] = b"1"
    with db.lock():
        with pytest.raises(mmkv.Error, match="inside"):
            db.compact()
    with db.transaction():
        with pytest.raises(mmkv.Error, match="inside"):
            db.compact()
    assert db[b"a"] == b"1"


def test_compact_on_a_read_only_handle_is_refused(path):
    mmkv.open(path, "n").close()
    with mmkv.open(path, "r") as db:
        with pytest.raises(mmkv.ReadOnlyError):
            db.compact()


_WORKER = textwrap.dedent("""
    import os, sys, time, mmkv
    path, role, stop = sys.argv[1], sys.argv[2], sys.argv[3]
    db = mmkv.open(path)
    print("open", flush=True)
    n, worst, deadline = 0, 0.0, time.time() + 60
    while not (n % 64 == 0 and (os.path.exists(stop) or time.time() > deadline)):
        i = n % 500
        t = time.perf_counter()
        if role == "writer":
            db[b"w%d" % i] = b"%d:" % n + bytes(n % 1500)
        else:
            v = db.get(b"r%d" % i)
            if v != (b"r%d" % i) * 20:
                print("BAD", i, v[:40] if v else v)
                sys.exit(1)
        worst = max(worst, time.perf_counter() - t)
        n += 1
    print("OK", n, worst)
    db.close()
""")


def test_compaction_with_a_reader_and_a_writer_in_other_processes(path, tmp_path):
    """Another process reading keys that compaction moves, another writing its own keys: every
    read is right, every write lands, and the file keeps its size (they have it open)."""
    rng = random.Random(14)
    with mmkv.open(path, "n") as db:
        for i in range(500):
            db[b"r%d" % i] = (b"r%d" % i) * 20          # what the reader checks
        model = churn(db, 4000, 2, rng)
        script, stop = str(tmp_path / "worker.py"), str(tmp_path / "stop")
        with open(script, "w") as f:
            f.write(_WORKER)
        kids = [subprocess.Popen([sys.executable, script, path, role, stop], stdout=subprocess.PIPE, text=True)
                for role in ("reader", "writer")]
        for kid in kids:                                  # both have the store open
            assert kid.stdout.readline().strip() == "open"
        time.sleep(0.2)                                   # and are running their loops
        result = db.compact()
        open(stop, "w").close()
        outs = [kid.communicate(timeout=60)[0] for kid in kids]
        assert all(out.startswith("OK") for out in outs), outs
        assert result["moved_records"] > 0 and not result["shrunk"]
        db.check()
        assert all(db[k] == v for k, v in model.items())
        assert all(db[b"r%d" % i] == (b"r%d" % i) * 20 for i in range(500))
        assert all(b"w%d" % i in db for i in range(500))


def test_the_compact_command_and_stats(path, capsys):
    from mmkv import cli
    rng = random.Random(15)
    with mmkv.open(path, "n") as db:
        model = churn(db, 3000, 2, rng)
        st = db.stats()
        assert st["disk_bytes"] == disk_bytes(path)
        assert 0 < st["reclaimable_bytes"] <= st["disk_bytes"]
    assert cli.main(["compact", path, "--progress-from", "0"]) == 0
    out, err = capsys.readouterr()
    assert "file shrunk" in out and "walked" in err         # progress on stderr
    with mmkv.open(path) as db:
        assert dict(db.items()) == model
        assert db.stats()["reclaimable_bytes"] < st["reclaimable_bytes"] / 4
    assert cli.main(["compact", path + ".missing"]) == 2


# ---------------------------------------------------------------- no release during a compaction

def _set_compacting(db, pid):
    with db.lock():
        db._engine.words[layout.STATE_WORD["compacting_pid"]] = pid


def test_frees_release_nothing_while_a_live_process_compacts_and_do_after_it_died(path):
    """While the state names a live compacting process, a free that would release does not (the
    compaction fills that space); a dead process's pid counts as none."""
    with mmkv.open(path, "n") as db:
        for i in range(3000):
            db[b"k%d" % i] = bytes([i % 251]) * 20000
        needs_fiemap(path)
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            _set_compacting(db, other.pid)
            full = disk_bytes(path)
            for i in range(1000):
                del db[b"k%d" % i]
            assert disk_bytes(path) >= full, "released while another process was compacting"
            db.check()
        finally:
            other.kill()
            other.wait()
        # the named process is gone: frees release again (in a run of their own: the block the
        # first run left is as large as growth space, which frees next to it never release; the
        # compaction that suppressed its release would have released it at its end)
        for i in range(1500, 3000):
            del db[b"k%d" % i]
        assert disk_bytes(path) < full - 15_000_000, (full, disk_bytes(path))
        db.check()


def test_compact_names_itself_while_it_runs_and_clears_the_name(path, monkeypatch):
    from mmkv.engine import compaction
    seen = []
    real = compaction._release_free_space

    def spy(eng, hold, walk):
        seen.append(eng.words[layout.STATE_WORD["compacting_pid"]])
        return real(eng, hold, walk)
    monkeypatch.setattr(compaction, "_release_free_space", spy)
    with mmkv.open(path, "n") as db:
        for i in range(200):
            db[b"k%d" % i] = b"v" * 5000
        for i in range(0, 200, 2):
            del db[b"k%d" % i]
        db.compact()
        assert seen == [os.getpid()]
        assert db._engine.words[layout.STATE_WORD["compacting_pid"]] == 0
        db.check()


def test_recovery_forgets_a_compaction_that_was_running(path):
    with mmkv.open(path, "n") as db:
        db[b"a"] = b"1"
        _set_compacting(db, os.getpid())
        db.recover()
        assert db._engine.words[layout.STATE_WORD["compacting_pid"]] == 0
        assert db[b"a"] == b"1"
        db.check()
