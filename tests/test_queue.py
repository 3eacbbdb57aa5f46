"""mmkv.Queue: FIFO, blocking get without polling, timeouts, signals, the 16-queue limit,
reconciliation of the semaphore after a restart, and delivery when processes die.

Children are separate interpreters (``sys.executable -c``) driven over a line
protocol on stdin/stdout; every read has a timeout and every child is killed at
the end of its test.
"""
import math
import os
import queue
import random
import signal
import threading
import time

import pytest

import children

import mmkv
from mmkv.namespace import system_space
from mmkv.queue import SEM_PREFIX, _Semaphore
from mmkv.engine.layout import NSEMS

TIMEOUT = 30



@pytest.fixture
def spawn():
    with children.spawner() as start:
        yield start


def drain(sem):
    """Take every wake-up the semaphore holds; how many there were."""
    n = 0
    while sem.trywait():
        n += 1
    return n


# ---------------------------------------------------------------- one process

def test_fifo_and_qsize(db):
    q = mmkv.Queue(db, "jobs")
    assert q.qsize() == 0
    for item in (b"a", "b", bytearray(b"c"), b""):
        q.put(item)
    assert q.qsize() == 4
    assert [q.get(), q.get(), q.get(), q.get()] == [b"a", b"b", b"c", b""]
    assert q.qsize() == 0
    q.close()


def test_items_are_removed_from_the_file(db):
    q = mmkv.Queue(db, "jobs")
    records = system_space(db)                 # mmkv's own namespace: the user's len(db) stays 0
    base = len(records)
    q.put(b"x" * 1000)
    assert len(records) == base + 1 and len(db) == 0
    q.get()
    assert len(records) == base
    q.close()


def test_put_rejects_non_bytes(db):
    q = mmkv.Queue(db, "jobs")
    with pytest.raises(TypeError, match="bytes or str"):
        q.put(5)
    assert q.qsize() == 0
    q.close()


def test_get_timeout_on_an_empty_queue(db):
    q = mmkv.Queue(db, "jobs")
    t0 = time.monotonic()
    with pytest.raises(mmkv.QueueEmpty) as info:
        q.get(timeout=0.3)
    elapsed = time.monotonic() - t0
    assert 0.3 <= elapsed < 2
    assert isinstance(info.value, queue.Empty) and isinstance(info.value, mmkv.Error)
    t0 = time.monotonic()
    with pytest.raises(queue.Empty):
        q.get(timeout=0)
    assert time.monotonic() - t0 < 0.2
    q.close()


@pytest.mark.parametrize("timeout, exc", [(-1, ValueError), (math.nan, ValueError), ("1", TypeError),
                                          (True, TypeError)])
def test_get_timeout_is_validated(db, timeout, exc):
    q = mmkv.Queue(db, "jobs")
    q.put(b"x")
    with pytest.raises(exc, match="timeout"):
        q.get(timeout=timeout)
    assert q.qsize() == 1
    q.close()


def test_get_refuses_to_wait_while_this_thread_holds_the_store_lock(db):
    q = mmkv.Queue(db, "jobs")
    with db.lock():
        with pytest.raises(mmkv.QueueEmpty):
            q.get(timeout=0)                       # no wait: fine
        t0 = time.monotonic()
        with pytest.raises(mmkv.Error, match="holds db.lock"):
            q.get(timeout=5)                       # a wait here could only time out
        assert time.monotonic() - t0 < 1
        q.put(b"x")
        assert q.get(timeout=5) == b"x"            # an item there: no wait, no error
    q.close()


def test_queue_names_do_not_collide_with_each_other_or_user_keys(db):
    db[b"a"] = b"user"
    a, b = mmkv.Queue(db, b"a"), mmkv.Queue(db, b"a:head")
    a.put(b"for a")
    b.put(b"for b")
    assert a.semaphore != b.semaphore
    assert (a.qsize(), b.qsize()) == (1, 1)
    assert b.get(timeout=0) == b"for b" and a.get(timeout=0) == b"for a"
    assert db[b"a"] == b"user"
    assert list(db) == [b"a"]                     # the queues' records are in mmkv's own namespace
    assert all(k.startswith(b"\x00mmkv:") for k in system_space(db))
    a.close(); b.close()


def test_sixteen_queues_per_file_then_a_clear_error(db, path, spawn):
    queues = [mmkv.Queue(db, f"q{i}") for i in range(NSEMS)]
    assert sorted(q.semaphore for q in queues) == list(range(NSEMS))
    with pytest.raises(mmkv.TooManyQueuesError, match="at most 16 queues"):
        mmkv.Queue(db, "one too many")
    assert isinstance(mmkv.TooManyQueuesError("x"), mmkv.Error)
    again = mmkv.Queue(db, "q7")                     # an existing name keeps its semaphore
    assert again.semaphore == queues[7].semaphore
    child = spawn("""
        q = mmkv.Queue(sys.argv[1], "q7")
        say("sem", q.semaphore)
        q.close()
    """, path)
    assert child.expect("sem") == [str(queues[7].semaphore)]
    assert child.finish() == 0
    for q in queues + [again]:
        q.close()
    assert system_space(db)[SEM_PREFIX + b"%02d" % queues[3].semaphore] == b"queue:q3"


def test_path_opens_and_closes_its_own_store(tmp_path):
    p = str(tmp_path / "q.mmkv")
    with mmkv.Queue(p, "jobs", sync="full") as q:
        assert q._db.sync_mode == "full"
        q.put(b"x")
        store = q._db
    assert repr(store).endswith("closed>")
    with pytest.raises(mmkv.ClosedError):
        q.put(b"y")
    q.close()
    with mmkv.Queue(p, "jobs") as q:
        assert q.get(timeout=0) == b"x"


def test_read_only_store_is_refused(path):
    mmkv.open(path).close()
    with mmkv.open(path, "r") as ro:
        with pytest.raises(mmkv.ReadOnlyError):
            mmkv.Queue(ro, "jobs")


def test_reopen_reconciles_the_wakeups(db):
    q = mmkv.Queue(db, "jobs")
    for i in range(3):
        q.put(b"%d" % i)
    assert q._sem.value() == 3
    assert drain(q._sem) == 3                        # as if lost: a restart resets the count to 0
    q2 = mmkv.Queue(db, "jobs")                      # opening reconciles
    assert q2._sem.value() == 3
    assert [q2.get(timeout=1) for _ in range(3)] == [b"0", b"1", b"2"]
    assert q2._sem.value() == 0
    q.close(); q2.close()


def test_a_get_hands_on_a_missing_wakeup(db):
    q = mmkv.Queue(db, "jobs")
    for i in range(3):
        q.put(b"%d" % i)
    drain(q._sem)
    assert q.get(timeout=0) == b"0"                  # tries before it waits
    assert q._sem.value() == 1                       # items left and no wake-up: it posted one
    assert q.get(timeout=1) == b"1" and q.get(timeout=1) == b"2"
    q.close()


def test_a_spare_wakeup_is_dropped_and_the_timeout_still_holds(db):
    q = mmkv.Queue(db, "jobs")
    q._sem.post()                                     # a spare wake-up, as a crashed producer leaves
    t0 = time.monotonic()
    with pytest.raises(mmkv.QueueEmpty):
        q.get(timeout=0.3)
    assert 0.3 <= time.monotonic() - t0 < 2
    assert q._sem.value() == 0
    q.close()


def test_close_wakes_a_get_blocked_in_another_thread(db):
    q = mmkv.Queue(db, "jobs")
    got = []

    def consumer():
        try:
            q.get()
        except mmkv.ClosedError as exc:
            got.append(exc)

    t = threading.Thread(target=consumer)
    t.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    q.close()
    t.join(5)
    assert not t.is_alive() and len(got) == 1
    assert time.monotonic() - t0 < 2
    db[b"k"] = b"store still open"


def test_a_get_blocked_in_a_thread_survives_growth_of_the_file(db):
    q = mmkv.Queue(db, "jobs")
    got = []
    t = threading.Thread(target=lambda: got.append(q.get(timeout=20)))
    t.start()
    time.sleep(0.1)
    size = db.stats()["file_size"]
    db.update((b"fill%06d" % i, b"v" * 100) for i in range(20000))   # remaps this handle
    assert db.stats()["file_size"] > size
    q.put(b"after growth")
    t.join(20)
    assert got == [b"after growth"]
    q.close()


def test_closing_the_store_before_its_queue_does_not_block_later_opens(path, spawn):
    child = spawn("""
        db = mmkv.open(sys.argv[1])
        q = mmkv.Queue(db, "jobs")
        q.put(b"x")
        db.close()                      # the queue is still open: its mapping must not hold the file's flock
        with mmkv.open(sys.argv[1]) as again:
            from mmkv.namespace import system_space
            say("reopened", len(system_space(again)))
        q.close()
    """, path)
    assert child.expect("reopened", timeout=15) == ["5"]     # the queue's 4 records, and the mark of the move
    assert child.finish() == 0
    with mmkv.Queue(path, "jobs") as q:
        assert q.get(timeout=1) == b"x"


def test_forked_child_cannot_use_the_parents_queue(db):
    q = mmkv.Queue(db, "jobs")
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            q.put(b"from child")
        except mmkv.ForkedHandleError:
            code = 0
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert q.qsize() == 0
    q.close()


# ---------------------------------------------------------------- several processes

CONSUMER = """
    q = mmkv.Queue(sys.argv[1], "jobs")
    say("ready")
    while True:
        item = q.get(timeout=20)
        if item == b"STOP":
            break
        say("got", item.decode())
    q.close()
    say("done")
"""

PRODUCER = """
    q = mmkv.Queue(sys.argv[1], "jobs")
    me, n = sys.argv[2], int(sys.argv[3])
    say("ready")
    wait_for("go")
    for i in range(n):
        q.put(f"{me}:{i}")
    q.close()
    say("done")
"""


def test_producers_and_consumers_deliver_every_item_exactly_once(path, spawn):
    n = 1500
    mmkv.Queue(path, "jobs").close()
    consumers = [spawn(CONSUMER, path) for _ in range(2)]
    producers = [spawn(PRODUCER, path, f"p{i}", n) for i in range(2)]
    for c in consumers + producers:
        c.expect("ready")
    for p in producers:
        p.send("go")
    for p in producers:
        p.expect("done")
        assert p.finish() == 0
    with mmkv.Queue(path, "jobs") as q:
        for _ in consumers:
            q.put(b"STOP")
        received = []
        for c in consumers:
            mine = []
            while (line := c.readline()) != "done":
                assert line is not None and line.startswith("got "), c.stderr()
                mine.append(line[4:])
            assert c.finish() == 0
            for producer in ("p0", "p1"):        # FIFO: each producer's items in order
                seq = [int(x.split(":")[1]) for x in mine if x.startswith(producer + ":")]
                assert seq == sorted(seq)
            received += mine
        assert sorted(received) == sorted(f"p{p}:{i}" for p in range(2) for i in range(n))
        assert q.qsize() == 0


def _cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])          # utime + stime


def test_blocked_get_sleeps_and_wakes_when_another_process_puts(path, spawn):
    mmkv.Queue(path, "jobs").close()
    child = spawn("""
        q = mmkv.Queue(sys.argv[1], "jobs")
        say("waiting")
        item = q.get(timeout=30)
        say("got", time.monotonic(), item.decode())
        q.close()
    """, path)
    child.expect("waiting")
    time.sleep(0.2)
    ticks = _cpu_ticks(child.pid)
    assert child.silent_for(0.5)                      # blocked: nothing to get
    assert _cpu_ticks(child.pid) - ticks <= 2         # and asleep, not polling
    try:
        wchan = open(f"/proc/{child.pid}/wchan").read()
    except OSError:
        wchan = ""
    if wchan not in ("", "0"):
        assert "futex" in wchan                        # asleep in the semaphore's futex
    with mmkv.Queue(path, "jobs") as q:
        t0 = time.monotonic()
        q.put(b"wake")
    woke_at, item = child.expect("got")
    latency = float(woke_at) - t0                      # CLOCK_MONOTONIC is system-wide
    assert item == "wake"
    assert 0 <= latency < 2, latency
    assert child.finish() == 0


def test_items_survive_close_and_reopen_of_every_handle(path, spawn):
    with mmkv.Queue(path, "jobs") as q:
        for i in range(5):
            q.put(b"item%d" % i)
    # every handle is closed: the next opener is first and resets the semaphores to 0
    with mmkv.open(path) as db:
        index = [i for i in range(NSEMS) if system_space(db).get(SEM_PREFIX + b"%02d" % i) == b"queue:jobs"]
        assert len(index) == 1
        sem = _Semaphore(db.engine.fd, index[0])
        raw_before = sem.value()
        sem.close()
        q = mmkv.Queue(db, "jobs")
        assert raw_before == 0 and q._sem.value() == 5     # reset by the first opener, then reconciled
        q.close()
    child = spawn("""
        q = mmkv.Queue(sys.argv[1], "jobs")
        say("items", *[q.get(timeout=5).decode() for _ in range(5)])
        q.close()
    """, path)
    assert child.expect("items") == [f"item{i}" for i in range(5)]
    assert child.finish() == 0


def test_items_put_before_a_producer_was_killed_are_got_after_restart(path, spawn):
    child = spawn("""
        q = mmkv.Queue(sys.argv[1], "jobs")
        for i in range(3):
            q.put(b"item%d" % i)
        say("put")
        time.sleep(60)
    """, path)
    child.expect("put")
    child.kill()                                        # the file was never closed
    child = spawn("""
        q = mmkv.Queue(sys.argv[1], "jobs")
        say("value", q._sem.value())
        say("items", *[q.get(timeout=5).decode() for _ in range(3)])
    """, path)
    assert child.expect("value") == ["3"]
    assert child.expect("items") == ["item0", "item1", "item2"]
    assert child.finish() == 0


def test_reconciliation_on_open_wakes_a_blocked_get(path, spawn):
    q = mmkv.Queue(path, "jobs")
    child = spawn("""
        q = mmkv.Queue(sys.argv[1], "jobs")
        say("waiting")
        say("got", q.get(timeout=20).decode())
    """, path)
    child.expect("waiting")
    time.sleep(0.2)
    db = q._db
    with db.lock():                                    # an item without its wake-up, as a crash leaves
        tail = q._counter(q._k_tail)
        db[q._item_key(tail)] = b"stranded"
        db.incr(q._k_tail, 1)
    assert child.silent_for(0.5)
    mmkv.Queue(db, "jobs").close()                     # any open reconciles
    assert child.expect("got") == ["stranded"]
    assert child.finish() == 0
    q.close()


def test_a_consumer_killed_after_taking_an_item_loses_only_that_item(path, spawn):
    q = mmkv.Queue(path, "jobs")
    for i in range(4):
        q.put(b"item%d" % i)
    child = spawn("""
        q = mmkv.Queue(sys.argv[1], "jobs")
        pop = q._db.pop
        def pop_and_die(key, *default):           # dies inside get, holding the lock, item removed
            value = pop(key, *default)
            if value is not None:
                os.kill(os.getpid(), 9)
            return value
        q._db.pop = pop_and_die
        say("ready")
        wait_for("go")
        q.get(timeout=5)
        say("survived")
    """, path)
    child.expect("ready")
    child.send("go")
    assert child.readline() is None and child.finish() == -signal.SIGKILL
    assert q.qsize() == 3
    assert [q.get(timeout=1) for _ in range(3)] == [b"item1", b"item2", b"item3"]   # item0 is lost
    with pytest.raises(mmkv.QueueEmpty):
        q.get(timeout=0.1)
    q.close()


def test_a_consumer_killed_after_its_wakeup_loses_nothing(path, spawn):
    q = mmkv.Queue(path, "jobs")
    child = spawn("""
        q = mmkv.Queue(sys.argv[1], "jobs")
        take = q._take
        def die_when_woken(have_token):          # dies holding a wake-up, before taking the item
            if have_token:
                os.kill(os.getpid(), 9)
            return take(have_token)
        q._take = die_when_woken
        say("waiting")
        q.get(timeout=10)
    """, path)
    child.expect("waiting")
    time.sleep(0.2)
    q.put(b"precious")
    assert child.readline() is None and child.finish() == -signal.SIGKILL
    assert q.qsize() == 1 and q._sem.value() == 0     # the item is there, its wake-up died
    assert q.get(timeout=1) == b"precious"            # a get tries before it waits
    q.close()


def test_consumers_killed_at_random_lose_at_most_one_item_each(path, spawn):
    n = 2000
    with mmkv.Queue(path, "jobs") as q:
        for i in range(n):
            q.put(b"%d" % i)
    script = """
        q = mmkv.Queue(sys.argv[1], "jobs")
        try:
            while True:
                say(q.get(timeout=1.0).decode())
        except mmkv.QueueEmpty:
            say("empty")
    """
    rng = random.Random(3)
    received, kills = [], 0
    for round_ in range(12):
        child = spawn(script, path)
        stop_after = rng.randrange(20, 200) if round_ < 6 else None
        count = 0
        while True:
            line = child.readline()
            if line is None or line == "empty":
                break
            received.append(int(line))
            count += 1
            if stop_after is not None and count >= stop_after:
                child.kill()
                kills += 1
                stop_after = None
        rc = child.finish()
        if line == "empty":
            assert rc == 0
            break
    assert kills == 6
    assert len(received) == len(set(received)), "an item was delivered twice"
    missing = set(range(n)) - set(received)
    assert len(missing) <= kills
    with mmkv.Queue(path, "jobs") as q:
        assert q.qsize() == 0


def test_signals_during_a_blocked_get(path, spawn):
    mmkv.Queue(path, "jobs").close()
    child = spawn("""
        import signal
        seen = []
        signal.signal(signal.SIGUSR1, lambda *a: seen.append(1))
        # Python leaves SIGINT ignored when it starts ignored (a background job of a
        # non-interactive shell): install the KeyboardInterrupt handler whatever we inherited
        signal.signal(signal.SIGINT, signal.default_int_handler)
        q = mmkv.Queue(sys.argv[1], "jobs")
        say("waiting")
        t0 = time.monotonic()
        try:
            q.get(timeout=1.0)
        except mmkv.QueueEmpty:
            say("timeout", time.monotonic() - t0, len(seen))
        say("waiting")
        t0 = time.monotonic()
        try:
            q.get()
        except KeyboardInterrupt:
            say("interrupted", time.monotonic() - t0)
        say("got", q.get(timeout=5).decode())
    """, path)
    child.expect("waiting")
    for _ in range(3):
        time.sleep(0.2)
        child.p.send_signal(signal.SIGUSR1)
    elapsed, handled = child.expect("timeout")
    assert 1.0 <= float(elapsed) < 2.5               # the handler ran and the wait resumed, on time
    assert handled == "3"
    child.expect("waiting")
    time.sleep(0.3)
    child.p.send_signal(signal.SIGINT)
    (elapsed,) = child.expect("interrupted")
    assert float(elapsed) < 2
    with mmkv.Queue(path, "jobs") as q:
        q.put(b"after")
    assert child.expect("got") == ["after"]
    assert child.finish() == 0

