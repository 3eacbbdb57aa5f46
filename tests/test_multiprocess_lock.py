"""Several unrelated processes on one file: sharing, the robust lock, lock timeouts, growth, kills.

Children are separate interpreters (``subprocess`` running ``sys.executable -c``),
driven over a line protocol on stdin/stdout.  Every read from a child has a
timeout, and every child still alive at the end of a test is killed.
"""
import os
import signal
import time

import pytest

import children

import mmkv

TIMEOUT = 30          # the most any single step may take; only hit when something hangs



@pytest.fixture
def spawn():
    with children.spawner() as start:
        yield start


def _recoveries(db):
    return db.stats()["recoveries"]


# ---------------------------------------------------------------- sharing

WORKER = """
    path, name, other, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    db = mmkv.open(path)
    say("open")
    wait_for("write")
    for i in range(n):
        db[f"{name}-{i}".encode()] = f"{name}:{i}".encode() * (i % 7 + 1)
    for i in range(500):
        db.incr(b"shared")
    say("written")
    wait_for("read")
    missing = [i for i in range(n) if db.get(f"{other}-{i}".encode()) != f"{other}:{i}".encode() * (i % 7 + 1)]
    say("read", len(missing), int.from_bytes(db[b"shared"], "little"), len(db))
    wait_for("close")
    db.close()
    say("closed")
"""


def test_two_processes_share_one_file(path, spawn):
    n = 200
    with mmkv.open(path) as db:          # created before the workers; also a third, live reader
        a = spawn(WORKER, path, "A", "B", n)
        b = spawn(WORKER, path, "B", "A", n)
        a.expect("open")
        b.expect("open")
        a.send("write")                  # both write at once (and fight over the counter)
        b.send("write")
        a.expect("written")
        b.expect("written")
        a.send("read")
        b.send("read")
        for c in (a, b):
            missing, shared, count = map(int, c.expect("read"))
            assert missing == 0, "a process does not see the other's committed writes"
            assert shared == 1000, "increments were lost between processes"
            assert count == 2 * n + 1
        # the third handle, open the whole time, sees both
        assert len(db) == 2 * n + 1
        assert db[b"A-5"] == b"A:5" * 6 and db[b"B-199"] == b"B:199" * 4
        assert db.incr(b"shared", 0) == 1000
        a.send("close")
        b.send("close")
        a.expect("closed")
        b.expect("closed")
        assert a.finish() == 0 and b.finish() == 0
        db.check()
        assert _recoveries(db) == 0, "no process died: recovery must not have run"


def test_write_in_one_process_visible_in_another_immediately(path, spawn):
    reader = spawn("""
        db = mmkv.open(sys.argv[1])
        say("open")
        while True:
            line = sys.stdin.readline().strip()
            if line == "quit":
                break
            say("value", db.get(line.encode(), b"-").decode())
        db.close()
    """, path)
    with mmkv.open(path) as db:
        reader.expect("open")
        for i in range(20):
            db[b"k"] = b"v%d" % i
            reader.send("k")
            assert reader.expect("value") == ["v%d" % i]
        del db[b"k"]
        reader.send("k")
        assert reader.expect("value") == ["-"]
        reader.send("quit")
        assert reader.finish() == 0


# ---------------------------------------------------------------- a lock holder dies

HOLD_AND_SLEEP = """
    db = mmkv.open(sys.argv[1])
    db._acquire()
    print("locked", flush=True)
    time.sleep(60)
"""


def _assert_lock_held_elsewhere(path):
    probe = mmkv.open(path, lock_timeout=0.2)
    try:
        with pytest.raises(mmkv.LockTimeoutError):
            len(probe)
    finally:
        probe.close()


@pytest.mark.parametrize("op", ["set", "get", "len", "incr", "contains"])
def test_holder_killed_does_not_block_and_recovers_once(path, spawn, op):
    with mmkv.open(path) as db:
        for i in range(100):
            db[b"k%d" % i] = b"v%d" % i
        db.incr(b"ctr", 41)
        assert _recoveries(db) == 0
        holder = spawn(HOLD_AND_SLEEP, path)
        holder.expect("locked")
        _assert_lock_held_elsewhere(path)           # the child really holds the store lock
        assert holder.kill() == -signal.SIGKILL

        t0 = time.monotonic()
        if op == "set":
            db[b"after"] = b"kill"
        elif op == "get":
            assert db[b"k7"] == b"v7"
        elif op == "len":
            assert len(db) == 101
        elif op == "incr":
            assert db.incr(b"ctr") == 42
        else:
            assert b"k99" in db
        took = time.monotonic() - t0
        assert took < 8, f"the first operation after the kill took {took:.1f}s (lock_timeout is 10s)"

        assert _recoveries(db) == 1, "recovery must run exactly once after the holder died"
        # everything committed before the kill is there
        assert all(db[b"k%d" % i] == b"v%d" % i for i in range(100))
        assert db.incr(b"ctr", 0) == (42 if op == "incr" else 41)
        # more operations do not recover again
        db[b"more"] = b"1"
        assert len(db) == (102 if op == "set" else 101) + 1
        assert _recoveries(db) == 1
        db.check()

        other = spawn("""
            db = mmkv.open(sys.argv[1])
            db[b"from-other"] = b"1"
            say("stats", db.stats()["recoveries"], len(db), db[b"k50"].decode())
            db.close()
        """, path)
        recs, count, k50 = other.expect("stats")
        assert int(recs) == 1, "another process ran recovery again"
        assert k50 == "v50"
        assert other.finish() == 0
        assert _recoveries(db) == 1
        assert db[b"from-other"] == b"1"
        db.check()


def test_holder_killed_with_two_waiters_recovers_once(path, spawn):
    """Two lockers (a thread here, another process) are waiting when the holder dies:
    exactly one of them recovers, both complete."""
    import threading
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"v%d" % i for i in range(50)})
        holder = spawn(HOLD_AND_SLEEP, path)
        holder.expect("locked")
        waiter = spawn("""
            db = mmkv.open(sys.argv[1])
            say("trying")
            db.incr(b"waiters")
            say("done", db.stats()["recoveries"])
            wait_for("close")
            db.close()
        """, path)
        waiter.expect("trying")
        result = {}

        def wait_in_thread():
            try:
                result["incr"] = db.incr(b"waiters")
            except BaseException as exc:          # reported below
                result["error"] = exc

        t = threading.Thread(target=wait_in_thread)
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and not result, "the thread did not wait for the lock"
        assert waiter.p.poll() is None
        holder.kill()
        t.join(TIMEOUT)
        assert not t.is_alive()
        assert "error" not in result, result
        (recs,) = waiter.expect("done")
        assert int(recs) in (0, 1)
        waiter.send("close")
        assert waiter.finish() == 0
        assert result["incr"] in (1, 2)
        assert db.incr(b"waiters", 0) == 2, "one of the two waiters' increments was lost"
        assert _recoveries(db) == 1, "recovery must run exactly once"
        assert len(db) == 51
        db.check()


def test_flag_n_in_another_process_empties_for_everyone(path, spawn):
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"v" for i in range(30)})
        c = spawn("""
            db = mmkv.open(sys.argv[1], "n")
            say("len", len(db))
            db[b"fresh"] = b"1"
            db.close()
        """, path)
        assert c.expect("len") == ["0"]
        assert c.finish() == 0
        assert dict(db.items()) == {b"fresh": b"1"}


def test_holder_killed_next_process_not_blocked(path, spawn):
    """The next opener after the kill is another process (no handle survives in between)."""
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"v%d" % i for i in range(50)})
    keeper = spawn("""
        db = mmkv.open(sys.argv[1])
        say("open")
        wait_for("write")
        t0 = time.monotonic()
        db[b"after"] = b"kill"
        say("wrote", round(time.monotonic() - t0, 3), db.stats()["recoveries"], len(db))
        wait_for("close")
        db.close()
    """, path)
    keeper.expect("open")
    holder = spawn(HOLD_AND_SLEEP, path)
    holder.expect("locked")
    holder.kill()
    keeper.send("write")
    took, recs, count = keeper.expect("wrote")
    assert float(took) < 8
    assert int(recs) == 1 and int(count) == 51
    keeper.send("close")
    assert keeper.finish() == 0
    with mmkv.open(path) as db:
        assert _recoveries(db) == 1
        assert db[b"after"] == b"kill" and db[b"k49"] == b"v49"


def test_holder_killed_in_the_middle_of_a_write_loop(path, spawn):
    """A writer killed at an arbitrary moment (maybe holding the lock) loses no acknowledged write."""
    acked = {}
    with mmkv.open(path) as db:
        for round_ in range(3):
            w = spawn("""
                path, tag = sys.argv[1], sys.argv[2]
                db = mmkv.open(path)
                i = 0
                while True:
                    db[f"{tag}-{i}".encode()] = f"{i}".encode() * (i % 50 + 1)
                    if i % 3 == 0:
                        del db[f"{tag}-{i}".encode()]
                    say("ack", i)
                    i += 1
            """, path, round_)
            for _ in range(50 + 40 * round_):
                w.expect("ack")
            w.kill()
            # collect every ack the child printed before it died
            while w.readline(5) is not None:
                pass
            acks = [int(line.split()[1]) for line in w.lines if line.startswith("ack")]
            for i in acks:
                acked[f"{round_}-{i}".encode()] = None if i % 3 == 0 else f"{i}".encode() * (i % 50 + 1)
            for k, v in acked.items():
                assert db.get(k) == v, f"acknowledged write of {k!r} lost after kill in round {round_}"
            db.check()


# ---------------------------------------------------------------- lock timeout

def test_lock_timeout_when_another_process_holds_the_lock(path, spawn):
    with mmkv.open(path) as setup:
        setup[b"a"] = b"1"
    db = mmkv.open(path, lock_timeout=0.3)
    try:
        holder = spawn("""
            db = mmkv.open(sys.argv[1])
            db._acquire()
            say("locked")
            wait_for("release")
            db._release()
            say("released")
            db.close()
        """, path)
        holder.expect("locked")
        t0 = time.monotonic()
        with pytest.raises(mmkv.LockTimeoutError) as info:
            db[b"b"] = b"2"
        waited = time.monotonic() - t0
        assert 0.28 <= waited < 10, waited
        assert isinstance(info.value, TimeoutError) and isinstance(info.value, mmkv.Error)
        assert str(holder.pid) in str(info.value), f"the message should name the holder: {info.value}"
        for op in (lambda: db[b"a"], lambda: len(db), lambda: db.get(b"a"), lambda: b"a" in db):
            with pytest.raises(mmkv.LockTimeoutError):
                op()
        holder.send("release")
        holder.expect("released")
        assert holder.finish() == 0
        # the lock is free again: everything works, nothing was written by the failed call
        assert b"b" not in db
        db[b"b"] = b"2"
        assert db[b"a"] == b"1" and len(db) == 2
        assert _recoveries(db) == 0
    finally:
        db.close()


def test_lock_timeout_none_waits(path, spawn):
    """lock_timeout=None waits as long as the holder holds the lock."""
    db = mmkv.open(path, lock_timeout=None)
    try:
        holder = spawn("""
            db = mmkv.open(sys.argv[1])
            db._acquire()
            say("locked")
            time.sleep(0.5)
            db[b"by-holder"] = b"1"
            db._release()
            db.close()
            say("released")
        """, path)
        holder.expect("locked")
        t0 = time.monotonic()
        db[b"mine"] = b"2"
        assert time.monotonic() - t0 >= 0.2, "the write did not wait for the holder"
        assert db[b"by-holder"] == b"1"
        assert holder.finish() == 0
    finally:
        db.close()


# ---------------------------------------------------------------- growth seen by another process

GROWER = """
    path, n = sys.argv[1], int(sys.argv[2])
    db = mmkv.open(path)
    say("open", db.stats()["file_size"])
    wait_for("go")
    for i in range(n):
        size = 1000 + (i * 7919) % 100000
        db[b"big-%d" % i] = bytes([i % 251]) * size
    say("done", db.stats()["file_size"], len(db))
    db.close()
"""


def _big(i):
    return bytes([i % 251]) * (1000 + (i * 7919) % 100000)


def test_growth_by_another_process_is_seen_without_reopening(path, spawn):
    n = 400                                       # about 20 MB of values
    a = mmkv.open(path)
    try:
        a[b"mine"] = b"before"
        size0 = a.stats()["file_size"]
        b = spawn(GROWER, path, n)
        assert int(b.expect("open")[0]) == size0
        b.send("go")
        # A keeps reading while B grows the file under it
        seen, end = 0, time.monotonic() + TIMEOUT
        while b.p.poll() is None and time.monotonic() < end:
            assert a[b"mine"] == b"before"
            seen = max(seen, len(a))
            time.sleep(0.005)
        final_size, count = map(int, b.expect("done"))
        assert b.finish() == 0
        assert count == n + 1
        assert final_size >= 8 * size0, "the test should make the file grow several times"
        assert sum(len(_big(i)) for i in range(n)) > 19_000_000

        # A, without reopening
        assert len(a) == n + 1
        for i in range(n):
            assert a[b"big-%d" % i] == _big(i), f"A reads a wrong value for big-{i}"
        st = a.stats()
        assert st["file_size"] == final_size == os.path.getsize(path)
        assert st["keys"] == n + 1
        assert sorted(a) == sorted([b"mine"] + [b"big-%d" % i for i in range(n)])
        # and A can write into the grown file
        a[b"after-growth"] = b"x" * 200_000
        assert a[b"after-growth"] == b"x" * 200_000
        a.check()
    finally:
        a.close()


def test_growth_seen_by_a_reader_that_only_reads(path, spawn):
    """A "r" handle opened before the growth follows it too (get, iteration, stats)."""
    with mmkv.open(path) as w:
        w[b"x"] = b"1"
    r = mmkv.open(path, "r")
    try:
        size0 = r.stats()["file_size"]
        b = spawn(GROWER, path, 150)
        b.expect("open")
        b.send("go")
        final_size, count = map(int, b.expect("done"))
        assert b.finish() == 0
        assert r.stats()["file_size"] == final_size > size0
        assert r.get(b"big-149") == _big(149)
        assert len(list(r.items())) == count
    finally:
        r.close()


# ---------------------------------------------------------------- a process dies without the lock

WRITE_THEN_SLEEP = """
    db = mmkv.open(sys.argv[1])
    for i in range(300):
        db[b"k%d" % i] = b"v%d" % i * 10
    for i in range(0, 300, 5):
        del db[b"k%d" % i]
    for i in range(100):
        db.incr(b"ctr")
    say("done")
    time.sleep(60)
"""


def _expected_after_write_then_sleep():
    d = {b"k%d" % i: b"v%d" % i * 10 for i in range(300) if i % 5}
    d[b"ctr"] = (100).to_bytes(8, "little")
    return d


def test_killed_without_lock_next_opener_sees_all(path, spawn):
    w = spawn(WRITE_THEN_SLEEP, path)
    w.expect("done")
    assert w.kill() == -signal.SIGKILL
    # no handle was open in between: this is the first open after an unclean shutdown
    with mmkv.open(path) as db:
        assert dict(db.items()) == _expected_after_write_then_sleep()
        assert len(db) == 241
        assert db.incr(b"ctr") == 101
        db.check()
        assert _recoveries(db) == 1, "the first open after an unclean shutdown runs recovery"
    with mmkv.open(path) as db:
        assert _recoveries(db) == 1, "a clean close needs no recovery on the next open"
        assert len(db) == 241


def test_killed_without_lock_while_others_keep_it_open(path, spawn):
    with mmkv.open(path) as db:
        w = spawn(WRITE_THEN_SLEEP, path)
        w.expect("done")
        w.kill()
        assert dict(db.items()) == _expected_after_write_then_sleep()
        db[b"after"] = b"1"
        assert _recoveries(db) == 0, "nobody died holding the lock: no recovery needed"
        db.check()
    with mmkv.open(path, "r") as db:
        assert db[b"after"] == b"1" and len(db) == 242


def test_killed_process_opened_read_only(path, spawn):
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
    r = spawn("""
        db = mmkv.open(sys.argv[1], "r")
        say("value", db[b"a"].decode())
        time.sleep(60)
    """, path)
    assert r.expect("value") == ["1"]
    r.kill()
    with mmkv.open(path) as db:
        assert db[b"a"] == b"1"
        db[b"b"] = b"2"
        db.check()
