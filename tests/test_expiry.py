"""Expiry: set(ttl=), expire, ttl, the sweep, len past a deadline, recovery, the checker's audit
of the expiry words, the clock semantics, memoize.  Runs on both bindings (test_binding).

Most tests drive a ManualClock (mmkv.open(path, clock=...)); the ones about other processes use
the wall clock, which is what every process shares.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import pytest

import mmkv
from mmkv.engine.layout import OFF_STATE, STATE_WORD, SWEEP_POISON
from mmkv.engine import tunables

T0 = 1_800_000_000.0        # the ManualClock's start: 2027-01-15


@pytest.fixture
def clock():
    return mmkv.ManualClock(T0)


@pytest.fixture
def tdb(path, clock):
    with mmkv.open(path, clock=clock) as store:
        yield store


def word(path, name):
    with open(path, "rb") as f:
        f.seek(STATE_WORD[name] * 8)
        return int.from_bytes(f.read(8), "little")


def test_a_key_is_there_until_its_deadline_and_absent_for_every_read_after(tdb, clock):
    tdb[b"plain"] = b"p"
    tdb.set(b"k", b"v", ttl=10)
    tdb.set("s", "text", ttl=20)
    assert tdb[b"k"] == b"v" and tdb.get("s") == b"text" and b"k" in tdb and len(tdb) == 3
    assert tdb.ttl(b"k") == pytest.approx(10) and tdb.ttl(b"plain") is None
    clock.advance(10 - 1e-9)
    assert tdb.get(b"k") == b"v"                       # 1 ns before: still there
    clock.advance(1e-9)
    # at the deadline: gone for every kind of read
    assert tdb.get(b"k") is None and b"k" not in tdb and tdb.get(b"k", b"d") == b"d"
    with pytest.raises(KeyError):
        tdb[b"k"]
    with pytest.raises(KeyError):
        tdb.ttl(b"k")
    assert tdb.get_many([b"plain", b"k", b"s"]) == [b"p", None, b"text"]
    assert sorted(tdb) == [b"plain", b"s"] and sorted(tdb.items()) == [(b"plain", b"p"), (b"s", b"text")]
    assert sorted(tdb.values()) == [b"p", b"text"] and tdb.snapshot() == {b"plain": b"p", b"s": b"text"}
    assert len(tdb) == 2
    with tdb.lock():
        assert tdb.get(b"k") is None and len(tdb) == 2 and sorted(tdb) == [b"plain", b"s"]
    clock.advance(100)
    assert len(tdb) == 1 and list(tdb) == [b"plain"]


@pytest.mark.parametrize("bad, exc", [(0, ValueError), (-1, ValueError), (float("nan"), ValueError),
                                      (float("inf"), ValueError), ("10", TypeError), (True, TypeError),
                                      ([1], TypeError), (1e300, OverflowError)])
def test_a_bad_ttl_is_refused_and_changes_nothing(tdb, bad, exc):
    tdb[b"k"] = b"old"
    with pytest.raises(exc):
        tdb.set(b"k", b"new", ttl=bad)
    with pytest.raises(exc):
        tdb.expire(b"k", bad)
    assert tdb[b"k"] == b"old" and tdb.ttl(b"k") is None


def test_clock_must_be_a_manual_clock(path):
    with pytest.raises(TypeError, match="ManualClock"):
        mmkv.open(path, clock=time.time)
    assert not os.path.exists(path)


def test_set_without_ttl_and_plain_writes_drop_a_deadline(tdb, clock):
    tdb.set(b"a", b"1", ttl=5)
    tdb.set(b"a", b"2")
    tdb.set(b"b", b"1", ttl=5)
    tdb[b"b"] = b"2"
    tdb.set(b"c", b"1", ttl=5)
    tdb.update({b"c": b"2"})
    clock.advance(60)
    assert [tdb.ttl(k) for k in (b"a", b"b", b"c")] == [None, None, None]
    assert tdb.get_many([b"a", b"b", b"c"]) == [b"2", b"2", b"2"]


def test_expire_sets_moves_and_takes_away_a_deadline(tdb, clock):
    tdb[b"k"] = b"v"
    assert tdb.expire(b"k", 5) is True and tdb.ttl(b"k") == pytest.approx(5)
    assert tdb.expire(b"k", 50) is True and tdb.ttl(b"k") == pytest.approx(50)
    clock.advance(10)
    assert tdb[b"k"] == b"v"
    assert tdb.expire(b"k", None) is True and tdb.ttl(b"k") is None
    clock.advance(100)
    assert tdb[b"k"] == b"v"
    assert tdb.expire(b"absent", 5) is False
    tdb.set(b"gone", b"x", ttl=1)
    clock.advance(1)
    assert tdb.expire(b"gone", 5) is False and b"gone" not in tdb


def test_writes_treat_an_expired_key_as_absent_and_reclaim_it(tdb, clock):
    for k in (b"del", b"pop", b"cas", b"cas-none", b"incr", b"setdefault", b"put"):
        tdb.set(k, b"12345678", ttl=1)
    clock.advance(1)
    with pytest.raises(KeyError):
        del tdb[b"del"]
    assert tdb.pop(b"pop", b"default") == b"default"
    assert tdb.cas(b"cas", b"12345678", b"new") is False          # the expected value is gone
    assert tdb.cas(b"cas-none", None, b"fresh") is True           # absent, as expected
    assert tdb.incr(b"incr") == 1                                 # counts from 0
    assert tdb.setdefault(b"setdefault", b"d") == b"d"
    tdb[b"put"] = b"p"
    assert len(tdb) == 4 and sorted(tdb) == [b"cas-none", b"incr", b"put", b"setdefault"]
    assert tdb.ttl(b"incr") is None and tdb.ttl(b"cas-none") is None
    report = tdb.check()
    assert report.expired == 0 and report.keys == 4        # reclaimed by those writes and len()


def test_a_read_that_meets_an_expired_key_gives_its_space_back(tdb, clock, path):
    """Space back on access: a lock-free read that finds the record expired reclaims it when the
    lock is free (never waiting for it); a read under the lock does it at once; a read-only
    handle leaves it (to writers and the sweep)."""
    keys = [b"get", b"item", b"in", b"locked", b"ro", b"untouched"]
    for k in keys:
        tdb.set(k, b"v" * 100, ttl=1)
    clock.advance(1)
    assert tdb.check().expired == 6
    assert tdb.get(b"get") is None and b"in" not in tdb
    with pytest.raises(KeyError):
        tdb[b"item"]
    with tdb.lock():
        assert tdb.get(b"locked") is None
    with mmkv.open(path, "r", clock=clock) as ro:
        assert ro.get(b"ro") is None and b"ro" not in ro
    report = tdb.check()
    assert report.expired == 2 and report.keys == 2          # "ro" and "untouched" are left
    assert word(path, "ttl_min") != 0                         # (nothing swept them)


def test_incr_keeps_a_deadline_and_counts_on(tdb, clock):
    tdb.set(b"n", (41).to_bytes(8, "little"), ttl=5)
    assert tdb.incr(b"n") == 42 and tdb.incr(b"n", 8) == 50
    assert tdb.ttl(b"n") == pytest.approx(5)
    clock.advance(5)
    assert tdb.get(b"n") is None and tdb.incr(b"n") == 1 and tdb.ttl(b"n") is None
    tdb.expire(b"n", 3)                      # a counter given a deadline
    assert tdb.incr(b"n") == 2 and tdb.ttl(b"n") == pytest.approx(3)


def test_transactions_carry_deadlines_and_roll_them_back(tdb, clock):
    tdb.set(b"old", b"o", ttl=100)
    with tdb.transaction():
        tdb.set(b"t", b"v", ttl=5)
        tdb.expire(b"old", None)
        assert tdb[b"t"] == b"v" and tdb.ttl(b"t") == pytest.approx(5) and tdb.ttl(b"old") is None
        assert len(tdb) == 2 and tdb.deadlines() == {b"t": int(T0 * 1e9) + 5 * 10**9}
    assert tdb.ttl(b"t") == pytest.approx(5) and tdb.ttl(b"old") is None
    with pytest.raises(RuntimeError):
        with tdb.transaction():
            tdb.set(b"t", b"w", ttl=50)
            tdb.set(b"u", b"u", ttl=50)
            raise RuntimeError
    assert tdb[b"t"] == b"v" and b"u" not in tdb and tdb.ttl(b"t") == pytest.approx(5)
    with tdb.transaction():
        tdb.set(b"brief", b"b", ttl=1)
        clock.advance(1)
        assert b"brief" not in tdb and len(tdb) == 2   # its own write, expired inside the block
    clock.advance(4)
    assert sorted(tdb) == [b"old"] and len(tdb) == 1


def test_the_sweep_gives_the_space_back(path, clock):
    with mmkv.open(path, clock=clock) as db:
        db[b"keep"] = b"k"
        used0 = db.stats()["used_bytes"]
        for i in range(2000):
            db.set(b"k%d" % i, b"x" * 300, ttl=10 + i % 7)
        assert db.stats()["used_bytes"] > used0 + 2000 * 300
        clock.advance(20)
        assert db.check().expired == 2000
        assert db.sweep(100) <= 100                 # a bounded step ...
        removed = db.sweep()                        # ... then the rest
        report = db.check()
        assert report.expired == 0 and report.expiring == 0 and report.keys == 1
        assert word(path, "ttl_min") == 0           # no deadline left: len() is O(1) again
        assert db.stats()["used_bytes"] == used0 and removed <= 2000 and db.sweep() == 0


def test_writes_sweep_in_steps_without_being_asked(path, clock):
    with mmkv.open(path, clock=clock) as db:
        for i in range(1500):
            db.set(b"t%d" % i, b"v", ttl=1)
        clock.advance(2)
        # every 4th write examines 128 slots (MMKV_SWEEP_EVERY, MMKV_SWEEP_STEP): a pass over the
        # 16384-slot index takes 512 writes; 600 plain writes finish one, which removes every expired key
        for i in range(600):
            db[b"p%d" % (i % 10)] = b"w"
        report = db.check()
        assert report.expired == 0 and report.keys == 10
        # the first pass's bound counted the deadlines written during it (a lower bound); the
        # second, which sees none, ends with ttl_min 0: nothing left to expire, len() is O(1)
        assert word(path, "ttl_min") != 0
        for i in range(520):
            db[b"p%d" % (i % 10)] = b"w"
        assert word(path, "ttl_min") == 0 and len(db) == 10


def test_len_past_a_deadline_sweeps_once_then_is_o1(path, clock):
    with mmkv.open(path, clock=clock) as db:
        for i in range(100):
            db.set(b"a%d" % i, b"v", ttl=5)
            db.set(b"b%d" % i, b"v", ttl=50)
        assert len(db) == 200 and word(path, "ttl_min") == int(T0 * 1e9) + 5 * 10**9
        clock.advance(10)
        assert db.stats()["keys"] == 100 and len(db) == 100   # swept: ttl_min moved to the next deadline
        assert word(path, "ttl_min") == int(T0 * 1e9) + 50 * 10**9
        assert db.check().expiring == 100


def test_a_lockless_handle_hides_expired_keys_and_counts_without_sweeping(path, clock):
    with mmkv.open(path, clock=clock) as db:
        db[b"p"] = b"1"
        db.set(b"t", b"2", ttl=5)
        with mmkv.open(path, "r", lockless=True, clock=clock) as ro:
            assert len(ro) == 2 and ro.ttl(b"t") == pytest.approx(5)
            clock.advance(5)
            assert ro.get(b"t") is None and list(ro) == [b"p"] and ro.get_many([b"t", b"p"]) == [None, b"1"]
            assert len(ro) == 1 and word(path, "ttl_min") != 0      # counted, nothing written
            with pytest.raises(mmkv.ReadOnlyError):
                ro.sweep()


def test_recovery_removes_expired_records_and_makes_ttl_min_exact(path, clock):
    with mmkv.open(path, clock=clock) as db:
        for i in range(50):
            db.set(b"short%d" % i, b"v", ttl=1)
            db.set(b"long%d" % i, b"v", ttl=100)
    with open(path, "r+b") as f:                      # as a crash leaves it: not marked clean
        f.seek(STATE_WORD["dirty"] * 8)
        f.write(b"\0" * 8)
    clock.advance(2)
    with mmkv.open(path, clock=clock) as db:
        assert db.last_recovery.expired == 50 and db.last_recovery.records == 50
        assert word(path, "ttl_min") == int(T0 * 1e9) + 100 * 10**9
        assert db.check().expiring == 50 and len(db) == 50


def test_the_checker_fires_on_expiry_words_that_would_hide_an_expiry(path, clock):
    with mmkv.open(path, clock=clock) as db:
        db.set(b"k", b"v", ttl=5)
    for bad in (0, int(T0 * 1e9) + 6 * 10**9):        # "no deadline" / after the record's deadline
        with open(path, "r+b") as f:
            f.seek(STATE_WORD["ttl_min"] * 8)
            f.write(bad.to_bytes(8, "little"))
        with mmkv.open(path, clock=clock) as db:
            with pytest.raises(mmkv.CorruptionError, match="ttl_min is"):
                db.check()
            db.recover()
            assert db.check().ok and word(path, "ttl_min") == int(T0 * 1e9) + 5 * 10**9
    with open(path, "r+b") as f:
        f.seek(STATE_WORD["sweep_at"] * 8)
        f.write((1 << 50).to_bytes(8, "little"))
    with mmkv.open(path, clock=clock) as db:
        with pytest.raises(mmkv.CorruptionError, match="sweep_at"):
            db.check()
        db.recover()
        assert db.check().ok


def test_any_deadline_word_reads_as_expired_or_not_and_is_swept(path, clock):
    """A record's deadline is a word from the file: 0, negative, huge.  Written as a writer would
    (checksummed), each reads as expired exactly when it is at most the clock, and the sweep and
    the checker take it."""
    from mmkv.engine.layout import REC_EXPIRES, deadline_value
    now = clock.now_ns()
    words = {b"zero": 0, b"one": 1, b"minus": -1, b"min": -(1 << 63), b"max": (1 << 63) - 1, b"now": now,
             b"next": now + 1}
    with mmkv.open(path, clock=clock) as db:
        for k, d in words.items():
            db._write_locked(db._put, k, deadline_value(d, b"value"), REC_EXPIRES)
        assert {k for k in words if k in db} == {b"max", b"next"}
        assert sorted(db) == [b"max", b"next"] and len(db) == 2
        assert db.check().ok and db.sweep() == 0 and db.check().expiring == 2


def test_splits_and_deletions_spoil_a_pass_and_the_bound_stays_true(path, clock, monkeypatch):
    """Deletions in the sweep's segment and splits move index entries behind it; ttl_min must
    still be at most every live deadline whenever check() looks (it audits that)."""
    import random
    monkeypatch.setattr(tunables, "MAX_LOAD", 0.02)      # segments split after ~330 keys
    rnd = random.Random(7)
    with mmkv.open(path, clock=clock) as db:
        keys = []
        for step in range(4000):
            r = rnd.random()
            if r < 0.5 or not keys:
                k = b"k%d" % rnd.randrange(3000)
                db.set(k, b"v" * rnd.randrange(40), ttl=rnd.choice((0.5, 3, 30, 300)))
                keys.append(k)
            elif r < 0.75:
                db.pop(rnd.choice(keys), None)
            elif r < 0.8:
                clock.advance(rnd.choice((0.3, 1, 5)))
            else:
                db[b"plain%d" % rnd.randrange(200)] = b"p"
            if step % 500 == 499:
                report = db.check()
                assert report.ok, report.problems
        assert db.stats()["index_slots"] > 16384             # it did split
        live = {k for k in set(keys) if k in db}
        clock.advance(301)
        assert not any(k in db for k in live) and db.check().ok


def test_dump_and_load_carry_deadlines(path, tmp_path):
    from mmkv.transfer import dump, load, parse_line
    from mmkv.cli import put_expiring
    import io
    with mmkv.open(path) as db:
        db[b"plain"] = b"p"
        db.set(b"timed", b"t", ttl=3600)
        db.set(b"brief", b"b", ttl=0.05)
        time.sleep(0.06)
        out = io.BytesIO()
        assert dump(db.items(), out, deadlines=db.deadlines()) == 2
    lines = out.getvalue().splitlines()
    parsed = {p[0]: p for p in (parse_line(raw, 1) for raw in lines)}
    assert parsed[b"plain"][2] is None and parsed[b"timed"][2] == pytest.approx(time.time() + 3600, abs=5)
    lines.append(json.dumps({"key": "past", "value": "x", "expires_at": time.time() - 1}).encode())
    with mmkv.open(str(tmp_path / "copy.mmkv")) as copy:
        assert load(lines, copy.update, None, put_expiring(copy)) == 2
        assert sorted(copy) == [b"plain", b"timed"] and copy.ttl(b"timed") == pytest.approx(3600, abs=5)
    with pytest.raises(ValueError):
        load([b'{"key": "a", "value": "b", "expires_at": "soon"}'], lambda pairs: None, None, put_expiring(None))
    redis = io.BytesIO()
    dump([(b"k", b"v")], redis, "redis", deadlines={b"k": 1_700_000_000_123_456_789})
    assert redis.getvalue().endswith(b"$4\r\nPXAT\r\n$13\r\n1700000000124\r\n")


def test_cli_put_ttl(path):
    cli = [sys.executable, "-m", "mmkv"]
    assert subprocess.run(cli + ["put", path, "k", "v", "--ttl", "3600"]).returncode == 0
    bad = subprocess.run(cli + ["put", path, "j", "v", "--ttl", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--ttl" in bad.stderr
    with mmkv.open(path) as db:
        assert db[b"k"] == b"v" and db.ttl(b"k") == pytest.approx(3600, abs=5) and b"j" not in db


#: Another process, on the wall clock: every read it makes before the deadline (by the clock read
#: just before it) sees the value, every one after (by the clock read just after) does not.
WATCHER = textwrap.dedent("""
    import sys, time, mmkv
    path, deadline = sys.argv[1], int(sys.argv[2])
    seen = gone = 0
    with mmkv.open(path) as db:
        while time.time_ns() < deadline + 50_000_000:
            t0 = time.time_ns()
            present = db.get(b"k") is not None, b"k" in db, db.get_many([b"k"])[0] is not None
            t1 = time.time_ns()
            if any(present):
                assert t0 < deadline, ("seen after the deadline", t0 - deadline)
                seen += 1
            if not all(present):
                assert t1 >= deadline, ("gone before the deadline", deadline - t1)
                gone += 1
    print(seen, gone)
""")


def test_every_process_sees_the_key_go_at_its_deadline(path):
    with mmkv.open(path) as db:
        now = time.time_ns()
        clock = mmkv.ManualClock(now / 1e9)         # to know the deadline to the nanosecond
        with mmkv.open(path, clock=clock) as timed:
            timed.set(b"k", b"v", ttl=0.4)
            deadline = clock.now_ns() + 400_000_000
        watchers = [subprocess.Popen([sys.executable, "-c", WATCHER, path, str(deadline)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(2)]
        while time.time_ns() < deadline + 100_000_000:
            db[b"other"] = b"x"              # a writer meanwhile (its steps may sweep k away)
            time.sleep(0.001)
        for w in watchers:
            out, err = w.communicate(timeout=60)
            assert w.returncode == 0, err
            seen, gone = map(int, out.split())
            assert seen > 0 and gone > 0
        assert b"k" not in db


MEMO_CHILD = textwrap.dedent("""
    import sys, mmkv
    path = sys.argv[1]
    db = mmkv.open(path)

    @db.memoize(ttl=float(sys.argv[2]), name="slow")
    def slow(x, scale=1):
        db.incr(b"calls")
        return {"x": x * scale}

    print(slow(int(sys.argv[3])), slow(int(sys.argv[3]), scale=1), slow(int(sys.argv[3]), scale=2))
    db.close()
""")


def test_memoize_shares_results_between_processes_until_they_expire(path):
    def run(x, ttl):
        out = subprocess.run([sys.executable, "-c", MEMO_CHILD, path, str(ttl), str(x)], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()
    assert run(3, 0.5) == "{'x': 3} {'x': 3} {'x': 6}"
    with mmkv.open(path) as db:
        # slow(3) once (its second call a hit), slow(3, scale=1) once (other arguments, as
        # functools.lru_cache counts them), slow(3, scale=2) once
        assert db.incr(b"calls", 0) == 3
    assert run(3, 0.5) == "{'x': 3} {'x': 3} {'x': 6}"
    with mmkv.open(path) as db:
        assert db.incr(b"calls", 0) == 3           # all three from the first process's results
    time.sleep(0.6)
    run(3, 0.5)
    with mmkv.open(path) as db:
        assert db.incr(b"calls", 0) == 6           # expired: computed again
    with pytest.raises(ValueError):
        mmkv.memoize(None, ttl=0)


def test_a_store_without_deadlines_never_reads_the_clock_for_len(path, clock):
    with mmkv.open(path, clock=clock) as db:
        db[b"a"] = b"1"
        clock.set(-1)                   # a clock that would expire everything: no record has a deadline
        assert len(db) == 1 and word(path, "ttl_min") == 0 and word(path, "sweep_at") & SWEEP_POISON == 0
    assert math.isfinite(clock.now())


def test_expiry_calls_on_a_closed_handle_raise_closed_error(path, clock):
    db = mmkv.open(path, clock=clock)
    db.set(b"k", b"v", ttl=5)
    db.close()
    for call in (lambda: db.set(b"k", b"w", ttl=1), lambda: db.ttl(b"k"), lambda: db.expire(b"k", 1),
                 lambda: db.sweep(), lambda: db.deadlines()):
        with pytest.raises(mmkv.ClosedError):
            call()
