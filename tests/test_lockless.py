"""Read-only opens that need only read permission: lockless handles.

A process that may read a store but not write it (another user's file, a read-only directory,
a read-only mount) opens it with flag "r" as a lockless handle: the file is mapped read-only,
the lock is never taken, every read is validated by the sequence word.  These tests run such
handles on a real read-only bind mount and as user ``nobody``, beside writers in other
processes, and show that a lockless handle never changes a byte of the file.
"""
import hashlib
import multiprocessing as mp
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

import mmkv
from test_lockfree_reads import KEYS, make_value, valid

STABLE = 3000        # keys no writer touches: iteration must yield each exactly once


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fill_stable(path: str) -> None:
    with mmkv.open(path) as db:
        db.update((b"stable%05d" % i, make_value(b"stable%05d" % i, 0, 24 + i % 300)) for i in range(STABLE))
        db.update((b"key%d" % i, make_value(b"key%d" % i, 0, 100)) for i in range(KEYS))


def timed_writer(path, seconds, done, writing, passes):
    """Rewrite KEYS keys (sizes changing, some deleted) and add others (growth, index splits)
    for a number of seconds, and on (up to a minute) until the index has split twice, the file
    has grown past 1 MiB and each reader has run 3 whole passes while this writer wrote (a
    loaded machine gets through fewer rounds, and fewer reads, in the same time).  ``writing``
    is set once the writer runs; ``passes`` counts each reader's passes run wholly after it."""
    with mmkv.open(path) as db:
        start, v = time.monotonic(), 0
        writing.value = 1
        while True:
            elapsed = time.monotonic() - start
            if elapsed >= seconds and (elapsed >= 60 or v % 16 == 0 and grown_and_split(db.stats())
                                       and min(passes[:]) >= 3):
                break
            for i in range(KEYS):
                key = b"key%d" % i
                db[key] = make_value(key, v, 24 + (v * 7919 + i * 104729) % 20000)
                if (v + i) % 11 == 0:
                    del db[key]
            db[b"fill%d" % v] = bytes(3000)
            db.update((b"small%d-%d" % (v, j), b"") for j in range(20))
            v += 1
            time.sleep(0.001)    # a service pauses; a writer that never does starves lockless iteration
    done.value = 1


def grown_and_split(stats) -> bool:
    return stats["index_segments"] >= 3 and stats["file_size"] > 1 << 20


def lockless_reader_any(path, ready, done, out, writing, passes, me):
    lockless_reader(path, ready, done, out, writing, passes, me, lockless=True)


def lockless_reader(path, ready, done, out, writing, passes, me, lockless=False):
    """Gets and whole iterations through a lockless handle until done; (seen, bad, passes, newest
    version seen, passes run wholly while the writer wrote).  passes[me] counts the last."""
    import faulthandler
    faulthandler.enable()                                  # a fatal signal shows where, in the test's stderr
    faulthandler.dump_traceback_later(100, exit=True)     # and so does a hang
    seen = bad = rounds = newest = 0
    with mmkv.open(path, "r", lockless=lockless) as db:
        assert db.lockless, "the path is on a read-only mount: the open must be lockless"
        ready.release()
        while not done.value:
            began_writing = writing.value
            for i in range(KEYS):
                value = db.get(b"key%d" % i)
                if value is not None:
                    seen += 1
                    bad += not valid(b"key%d" % i, value)
                    newest = max(newest, int.from_bytes(value[:8], "little"))
            stable = [k for k in db if k.startswith(b"stable")]
            if len(stable) != STABLE or len(set(stable)) != STABLE:
                bad += 1
            rounds += 1
            if began_writing and not done.value:
                passes[me] += 1
        db.check()
    out.put((seen, bad, rounds, newest, passes[me]))


@pytest.fixture
def ro_mount(tmp_path):
    """(read-write folder, the same folder bind-mounted read-only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a read-only bind mount")
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(rw), str(ro)], capture_output=True).returncode:
        pytest.skip("the environment refuses bind mounts")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], capture_output=True).returncode:
            pytest.skip("the environment refuses a read-only remount")
        yield rw, ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], capture_output=True)


def collect(out, processes, timeout):
    """One result from each of processes (through out); a process that ends without putting
    one fails the test at once, with its exit code (a signal shows as its negative)."""
    import queue
    results, deadline = [], time.monotonic() + timeout
    while len(results) < len(processes):
        try:
            results.append(out.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        ended = [p.exitcode for p in processes if p.exitcode is not None]
        if len(ended) > len(results) + out.qsize():
            time.sleep(1)                 # a result put just before the exit may still be in the pipe
            if len(ended) > len(results) + out.qsize():
                raise AssertionError(f"a reader ended without its result: exit codes {ended}")
        assert time.monotonic() < deadline, f"no result after {timeout}s: exit codes {[p.exitcode for p in processes]}"
    for p in processes:
        p.join(30)
        assert p.exitcode == 0, [q.exitcode for q in processes]
    return results


def run_readers_beside_a_writer(write_path: str, read_path: str, reader) -> None:
    """Two lockless readers (through read_path) and a writer (through write_path) in other
    processes: gets and whole iterations stay exact while the writer rewrites values (sizes
    changing, blocks freed and reused), grows the file and splits the index."""
    path = write_path
    fill_stable(path)
    ctx = mp.get_context("spawn")
    done, out, ready = ctx.Value("i", 0), ctx.Queue(), ctx.Semaphore(0)
    writing, passes = ctx.Value("i", 0), ctx.Array("i", 2)
    readers = [ctx.Process(target=reader, args=(read_path, ready, done, out, writing, passes, me)) for me in range(2)]
    for r in readers:
        r.start()
    for r in readers:
        assert ready.acquire(timeout=60)
    w = ctx.Process(target=timed_writer, args=(path, 4.0, done, writing, passes))
    w.start()
    w.join(240)
    assert w.exitcode == 0
    results = collect(out, readers, 120)
    # each reader ran whole passes while the writer wrote (a lockless iteration starved by the
    # writer for its whole run would show here), and in them saw the writer's versions
    assert all(seen > 500 and during >= 3 for seen, _, _, _, during in results), results
    assert all(newest > 10 for _, _, _, newest, _ in results), ("the readers should see the writer's versions", results)
    assert all(bad == 0 for _, bad, *_ in results), results
    with mmkv.open(path) as db:
        assert grown_and_split(db.stats()), ("the index should have split and the file grown under the readers",
                                             db.stats())


def churning_writer(path, seconds):
    """Rewrite 200 keys with random values of very different sizes, deleting some: freed blocks
    are reused at once, so a record a lockless reader has just found is soon overwritten by the
    middle of another's random value."""
    import random
    rng = random.Random(1)
    with mmkv.open(path) as db:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for i in range(200):
                if rng.random() < 0.2:
                    db.pop(b"k%d" % i, None)
                else:
                    db[b"k%d" % i] = os.urandom(rng.choice((8, 40, 200, 1000, 3000)))


def tight_reader(path, seconds, lockless, out):
    import faulthandler
    faulthandler.enable()
    gets = scans = 0
    with mmkv.open(path, "r", lockless=lockless) as db:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for i in range(200):
                db.get(b"k%d" % i)
            gets += 200
            if gets % 10_000 == 0:
                scans += sum(1 for _ in db) >= 0
                len(db), b"k1" in db, list(db.items())
    out.put((gets, scans))


@pytest.mark.parametrize("lockless", [True, False], ids=["lockless", "locking"])
@pytest.mark.parametrize("binding", ["cpython", "cffi"])
def test_lock_free_reads_racing_block_reuse_never_crash(tmp_path, monkeypatch, binding, lockless):
    """A lock-free read (every handle's get tries one first; a lockless handle's reads are all
    lock-free) checks a record's lengths against the mapping and then uses them: it read each
    length from the file again to use it, and a writer reusing the block in between made it
    hash or copy far past the mapping (SIGSEGV in 3 of 3 runs of 5 s, with either kind of
    handle).  Every length a lock-free read uses is now the one it checked (struct rec_head in
    the C core)."""
    monkeypatch.setenv("MMKV_BINDING", binding)        # the children's binding
    path = str(tmp_path / "s.mmkv")
    with mmkv.open(path) as db:
        db.update((b"k%d" % i, b"x") for i in range(200))
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    readers = [ctx.Process(target=tight_reader, args=(path, 2.5, lockless, out)) for _ in range(2)]
    writer = ctx.Process(target=churning_writer, args=(path, 2.5))
    for p in readers + [writer]:
        p.start()
    results = collect(out, readers, 120)
    writer.join(60)
    assert writer.exitcode == 0
    assert all(gets >= 10_000 and scans >= 1 for gets, scans in results), results
    with mmkv.open(path) as db:
        db.check()


def test_lockless_readers_beside_a_writer_in_another_process(tmp_path):
    run_readers_beside_a_writer(str(tmp_path / "s.mmkv"), str(tmp_path / "s.mmkv"), lockless_reader_any)


def test_readers_on_a_read_only_mount_beside_a_writer_through_another_mount(ro_mount):
    rw, ro = ro_mount
    run_readers_beside_a_writer(str(rw / "s.mmkv"), str(ro / "s.mmkv"), lockless_reader)


def test_a_read_only_mount_refuses_writing_flags_clearly(ro_mount):
    rw, ro = ro_mount
    with mmkv.open(str(rw / "s.mmkv")) as db:
        db[b"k"] = b"v"
    for flag in ("w", "c"):
        with pytest.raises(OSError, match="flag 'r' opens a store on a read-only filesystem"):
            mmkv.open(str(ro / "s.mmkv"), flag)
    with mmkv.open(str(ro / "s.mmkv"), "r") as db:
        assert db.lockless and db[b"k"] == b"v" and len(db) == 1 and list(db.items()) == [(b"k", b"v")]
        db.check()
        assert db.stats()["keys"] == 1
        with pytest.raises(mmkv.ReadOnlyError):
            db[b"k"] = b"w"
        with pytest.raises(mmkv.ReadOnlyError, match="lockless"):
            with db.lock():
                pass
        with pytest.raises(mmkv.ReadOnlyError):
            with db.transaction():
                pass
        db.sync()          # nothing to make durable: no error


@pytest.fixture
def open_folder():
    """A folder outside pytest's (which only root may enter) that every user may enter."""
    top = tempfile.mkdtemp(prefix="mmkv-lockless-", dir="/tmp")
    os.chmod(top, 0o755)
    try:
        yield pathlib.Path(top)
    finally:
        for root, dirs, _ in os.walk(top):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o755)
        shutil.rmtree(top)


def test_another_users_store_in_a_folder_it_cannot_write(open_folder):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a step as user nobody")
    folder = open_folder / "data"
    folder.mkdir()
    path = str(folder / "s.mmkv")
    with mmkv.open(path, mode=0o644) as db:
        db.update((b"k%d" % i, b"v%d" % i) for i in range(1000))
    os.chmod(str(folder), 0o555)          # nobody may read the folder and the file, write neither
    before = digest(path)
    code = textwrap.dedent(f"""
        import os, sys
        import mmkv                       # before dropping root: nobody cannot read this interpreter's files,
        with mmkv.open({path!r}, "r", lockless=True) as db:   # so every module the calls below need is loaded
            db.check(); db.stats(); dict(db.items())
        os.setgid(65534); os.setuid(65534)
        try:
            mmkv.open({path!r}, "w")
        except PermissionError as exc:
            assert "flag 'r'" in str(exc), exc
        else:
            sys.exit("flag 'w' opened a file this user may not write")
        with mmkv.open({path!r}, "r") as db:
            assert db.lockless
            assert db[b"k7"] == b"v7" and len(db) == 1000
            assert dict(db.items()) == {{b"k%d" % i: b"v%d" % i for i in range(1000)}}
            db.check()
            db.stats()
        print("ok")
    """)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stdout + out.stderr
    assert digest(path) == before
    with mmkv.open(path) as db:
        db.check()


def test_a_lockless_iteration_spoiled_by_writers_retries_smaller_batches(path, monkeypatch):
    """A lockless batch a writer spoils is read again an eighth the size (down to 256 bytes), and
    kept ones grow back: a busy writer's short pauses then suffice for a batch.  Writers are
    simulated by a sequence word that changes during each of the first 5 tries of every batch."""
    from mmkv.engine import locking, scanning
    with mmkv.open(path) as db:
        db.update((b"k%05d" % i, bytes(100)) for i in range(3000))
    budgets, spoils = [], [0]
    real_batch, real_seq = scanning.Cursor.batch, locking.LocklessReads._seq

    def batch(cursor, *args):
        budgets.append(cursor.budget)
        spoils[0] = 0 if len(budgets) > 1 and budgets[-1] > budgets[-2] else spoils[0]
        return real_batch(cursor, *args)

    def seq(reads):
        if spoils[0] < 5 * 2:             # two reads of the word per try: each try sees it move
            spoils[0] += 1
            return 2 * spoils[0]
        return real_seq(reads)
    monkeypatch.setattr(scanning.Cursor, "batch", batch)
    monkeypatch.setattr(locking.LocklessReads, "_seq", seq)
    monkeypatch.setattr(scanning, "BATCH_BYTES", 1 << 20)
    with mmkv.open(path, "r", lockless=True) as db:
        keys = list(db)
    assert sorted(keys) == [b"k%05d" % i for i in range(3000)]          # each key once
    # the first batch: 1 MiB, spoiled, then 128 KiB, 16 KiB, 2 KiB, 256 (spoiled twice), kept
    assert budgets[:6] == [1 << 20, 1 << 17, 1 << 14, 1 << 11, 256, 256], budgets[:8]
    assert budgets[6] == 512                    # the next batch: twice the last kept one
    assert len(budgets) > 10


def test_a_lockless_handle_never_changes_a_byte_of_the_file(path):
    with mmkv.open(path) as db:
        db.update((b"k%d" % i, b"v" * (i % 50)) for i in range(5000))
    before, mtime = digest(path), os.stat(path).st_mtime_ns
    with mmkv.open(path, "r", lockless=True) as db:
        assert db.lockless
        assert len(db) == 5000 and db[b"k9"] == b"v" * 9 and b"k1" in db and b"nope" not in db
        assert sum(1 for _ in db.items()) == 5000
        assert len(db.snapshot()) == 5000
        db.check()
        db.stats()
    assert digest(path) == before and os.stat(path).st_mtime_ns == mtime


def test_lockless_is_only_a_read_only_flag(path):
    with pytest.raises(ValueError, match="flag must be 'r'"):
        mmkv.open(path, "c", lockless=True)


def _crash_after_writing(path):
    db = mmkv.open(path)
    db[b"late"] = b"x"
    os.kill(os.getpid(), signal.SIGKILL)


def crash_while_writing(path: str) -> None:
    """Leave the store at path as a process killed with it open leaves it: not closed cleanly
    (it wrote b"late" first)."""
    p = mp.get_context("spawn").Process(target=_crash_after_writing, args=(path,))
    p.start()
    p.join(60)
    assert p.exitcode == -signal.SIGKILL


def _die_holding_the_lock(path, ready):
    db = mmkv.open(path)
    db._acquire()
    ready.set()
    time.sleep(60)


def test_a_file_left_by_a_crash_is_refused_until_a_writer_repairs_it(path):
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
    crash_while_writing(path)
    with pytest.raises(mmkv.RecoveryNeededError, match="not closed cleanly"):
        mmkv.open(path, "r", lockless=True)
    with mmkv.open(path, "r") as db:          # with write access: the first opener recovers
        assert not db.lockless and db[b"late"] == b"x"
    with mmkv.open(path, "r", lockless=True) as db:
        assert db[b"k"] == b"v"


def test_a_writer_that_dies_holding_the_lock_stops_lockless_reads_until_repaired(path):
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
    ctx = mp.get_context("spawn")
    reader = mmkv.open(path, "r", lockless=True, lock_timeout=30)
    try:
        ready = ctx.Event()
        p = ctx.Process(target=_die_holding_the_lock, args=(path, ready))
        p.start()
        assert ready.wait(60)
        os.kill(p.pid, signal.SIGKILL)
        p.join(30)
        t0 = time.monotonic()
        with pytest.raises(mmkv.RecoveryNeededError, match="died holding the lock"):
            reader.get(b"k")
        assert time.monotonic() - t0 < 5, "a dead holder is told at once, not after lock_timeout"
        with pytest.raises(mmkv.RecoveryNeededError):
            list(reader)
        with mmkv.open(path) as w:            # the first handle that may write repairs it
            w[b"k2"] = b"v2"
            assert reader[b"k"] == b"v" and reader[b"k2"] == b"v2"
    finally:
        reader.close()


def _hold_the_lock(path, ready, seconds):
    with mmkv.open(path) as db:
        with db.lock():
            ready.set()
            time.sleep(seconds)


def test_a_lockless_read_waits_for_a_writer_up_to_lock_timeout(path):
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    p = ctx.Process(target=_hold_the_lock, args=(path, ready, 1.5))
    p.start()
    try:
        assert ready.wait(60)
        with mmkv.open(path, "r", lockless=True, lock_timeout=0.2) as db:
            with pytest.raises(mmkv.LockTimeoutError, match="lockless read"):
                db.get(b"k")
        with mmkv.open(path, "r", lockless=True, lock_timeout=30) as db:
            t0 = time.monotonic()
            assert db[b"k"] == b"v"
            assert time.monotonic() - t0 > 0.2, "the read should have waited for the holder"
    finally:
        p.join(30)


def test_no_shrink_while_a_lockless_handle_has_the_file_mapped(path):
    with mmkv.open(path) as db:
        db.update((b"k%d" % i, bytes(1000)) for i in range(3000))
        for i in range(2900):
            del db[b"k%d" % i]
        size = os.stat(path).st_size
        with mmkv.open(path, "r", lockless=True) as reader:
            db.compact()
            assert os.stat(path).st_size == size, "a shrink under a read-only mapping would fault its reads"
            assert sum(1 for _ in reader) == 100
        db.compact()
        assert os.stat(path).st_size < size
