"""mmkv.Sequence and the counter commands of the CLI (`mmkv incr`, `mmkv next-id`).

Child processes are separate interpreters (``sys.executable -c``) that report
every id on their stdout with one ``os.write`` per line, so a SIGKILL can cut a
child short but never tear a line.
"""
import os
import random
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mmkv
from mmkv.namespace import system_space
from mmkv.sequence import SEQ_PREFIX

TIMEOUT = 60
MMKV = [sys.executable, "-m", "mmkv"]

DRAW = textwrap.dedent("""
    import os, sys, mmkv
    path, name, block, quota = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    ids = mmkv.Sequence(path, name, block=block)
    os.write(1, b"ready\\n")
    for _ in range(quota):
        os.write(1, b"%d\\n" % ids.next())
    ids.close()
    os.write(1, b"done\\n")
""")


def counter(db, name):
    return int.from_bytes(system_space(db)[SEQ_PREFIX + name], "little", signed=True)


# ---------------------------------------------------------------- one process

def test_ids_start_at_one_and_follow_blocks(db):
    ids = mmkv.Sequence(db, "orders", block=3)
    assert [ids.next() for _ in range(7)] == [1, 2, 3, 4, 5, 6, 7]
    assert counter(db, b"orders") == 9            # three blocks of 3 reserved, by three incr calls
    assert next(ids) == 8 and [i for i, _ in zip(ids, range(2))] == [9, 10]
    ids.close()


def test_counter_key_is_prefixed_and_does_not_touch_user_keys(db):
    db[b"orders"] = b"user value"
    with mmkv.Sequence(db, "orders", block=10) as ids:
        assert ids.next() == 1
    assert db[b"orders"] == b"user value"
    assert sorted(db) == [b"orders"] and len(db) == 1           # the counter is in mmkv's own namespace
    assert SEQ_PREFIX + b"orders" in system_space(db)


def test_names_count_independently(db):
    a, b = mmkv.Sequence(db, "a", block=5), mmkv.Sequence(db, b"b", block=5)
    assert [a.next(), a.next(), b.next(), a.next()] == [1, 2, 1, 3]
    a.close(); b.close()


def test_two_handles_interleave_by_blocks_without_repeats(db):
    a, b = mmkv.Sequence(db, "x", block=10), mmkv.Sequence(db, "x", block=10)
    got = [a.next(), b.next(), a.next(), b.next()]
    assert got == [1, 11, 2, 12]
    drawn = got + [a.next() for _ in range(25)] + [b.next() for _ in range(25)]
    assert len(set(drawn)) == len(drawn)
    a.close(); b.close()


@pytest.mark.parametrize("block, exc", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                        (True, TypeError), ("3", TypeError), (None, TypeError)])
def test_block_is_validated(db, block, exc):
    with pytest.raises(exc, match="block"):
        mmkv.Sequence(db, "x", block=block)
    assert SEQ_PREFIX + b"x" not in system_space(db)


@pytest.mark.parametrize("name, exc", [("", ValueError), (b"", ValueError), (5, TypeError), (None, TypeError)])
def test_name_is_validated(db, name, exc):
    with pytest.raises(exc, match="name"):
        mmkv.Sequence(db, name)


def test_open_options_only_with_a_path(db):
    with pytest.raises(TypeError, match="only apply when a path"):
        mmkv.Sequence(db, "x", lock_timeout=1)


def test_path_opens_its_own_durable_store_and_closes_it(tmp_path):
    p = str(tmp_path / "ids.mmkv")
    with mmkv.Sequence(p, "orders") as ids:
        assert ids._db.sync_mode == "full"      # the power-loss promise by default
        assert ids.next() == 1
        store = ids._db
    assert repr(store).endswith("closed>")
    with pytest.raises(mmkv.ClosedError):
        ids.next()
    ids.close()                                  # twice is fine
    with mmkv.Sequence(p, "orders", sync="none") as ids:
        assert ids._db.sync_mode == "none" and ids.next() == 2


def test_store_passed_in_stays_open_after_close(db):
    ids = mmkv.Sequence(db, "x")
    ids.next()
    ids.close()
    db[b"still"] = b"open"
    assert db[b"still"] == b"open"
    with pytest.raises(mmkv.ClosedError, match="closed"):
        ids.next()


def test_close_gives_back_the_rest_of_the_block_only_when_nobody_reserved_since(db):
    a = mmkv.Sequence(db, "x", block=100)
    assert a.next() == 1
    a.close()
    assert counter(db, b"x") == 1                # 2..100 were never handed out: given back
    a, b = mmkv.Sequence(db, "x", block=100), mmkv.Sequence(db, "x", block=100)
    assert a.next() == 2 and b.next() == 102     # b reserved after a
    a.close()
    assert counter(db, b"x") == 201              # a's rest is below b's block: skipped, not given back
    assert b.next() == 103
    b.close()
    assert counter(db, b"x") == 103
    with mmkv.Sequence(db, "x", block=100) as c:
        assert c.next() == 104


def test_sequences_continue_across_reopen(tmp_path):
    p = str(tmp_path / "ids.mmkv")
    drawn = []
    for round_ in range(4):
        with mmkv.Sequence(p, "orders", block=50) as ids:
            drawn += [ids.next() for _ in range(30 + round_)]
    assert drawn == list(range(1, len(drawn) + 1))   # contiguous: each close gave its rest back


def test_a_killed_process_skips_at_most_its_block(tmp_path):
    p = str(tmp_path / "ids.mmkv")
    child = subprocess.Popen([sys.executable, "-c", DRAW, p, "orders", "100", "1000000"],
                             stdout=subprocess.PIPE)
    lines = []
    while len(lines) < 250:
        lines += child.stdout.readline().split()
    child.kill()
    child.wait(TIMEOUT)
    lines += child.stdout.read().split()          # what it reported before it died, still in the pipe
    child.stdout.close()
    seen = [int(x) for x in lines[1:]]
    assert seen == list(range(1, len(seen) + 1))
    with mmkv.Sequence(p, "orders", block=100) as ids:   # first opener: recovery, lock reset
        first = ids.next()
    assert first > max(seen)
    assert first - max(seen) - 1 <= 100                  # skipped: at most the one block it died with


def test_counter_that_is_not_a_counter_raises(db):
    system_space(db)[SEQ_PREFIX + b"x"] = b"abc"
    with pytest.raises(mmkv.NotACounterError):
        mmkv.Sequence(db, "x").next()


def test_overflow_raises_and_reserves_nothing(db):
    system_space(db).incr(SEQ_PREFIX + b"x", (1 << 63) - 5)
    ids = mmkv.Sequence(db, "x", block=10)
    with pytest.raises(OverflowError):
        ids.next()
    assert counter(db, b"x") == (1 << 63) - 5
    assert mmkv.Sequence(db, "x", block=4).next() == (1 << 63) - 4


def test_threads_share_a_handle(db):
    ids = mmkv.Sequence(db, "t", block=7)
    out = [[] for _ in range(4)]

    def draw(mine):
        for _ in range(3000):
            mine.append(ids.next())

    threads = [threading.Thread(target=draw, args=(o,)) for o in out]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = sorted(x for o in out for x in o)
    assert every == list(range(1, 12001))
    for o in out:
        assert o == sorted(o)                      # increasing within each thread
    ids.close()


def test_a_forked_child_cannot_reuse_the_parents_block(db):
    ids = mmkv.Sequence(db, "f", block=100)
    assert ids.next() == 1
    pid = os.fork()
    if pid == 0:                                   # child: must refuse, never hand out 2
        code = 1
        try:
            ids.next()
        except mmkv.ForkedHandleError:
            code = 0
        except BaseException:
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ids.next() == 2
    ids.close()


# ---------------------------------------------------------------- many processes, with kills

def test_processes_killed_and_restarted_never_repeat_an_id(tmp_path):
    """4 slots draw ids; some instances are SIGKILLed mid-run and restarted.

    No id is ever reported twice, and the ids reserved but never reported are
    at most one block per kill (a clean instance draws whole blocks only).
    """
    p = str(tmp_path / "ids.mmkv")
    block, quota, kills_wanted = 50, 1000, 6
    rng = random.Random(7)
    reported, kills, clean = [], 0, 0
    plan = [True] * kills_wanted + [False] * 6     # True: kill this instance part way
    rng.shuffle(plan)
    running = {}                                   # fd -> [proc, buffer, count, kill_at]

    def spawn():
        kill_at = rng.randrange(1, quota) if plan.pop() else None
        proc = subprocess.Popen([sys.executable, "-c", DRAW, p, "orders", str(block), str(quota)],
                                stdout=subprocess.PIPE)
        running[proc.stdout.fileno()] = [proc, b"", 0, kill_at]

    for _ in range(4):
        spawn()
    deadline = time.monotonic() + TIMEOUT
    while running:
        assert time.monotonic() < deadline, "children hung"
        ready, _, _ = select.select(list(running), [], [], 5)
        for fd in ready:
            entry = running[fd]
            chunk = os.read(fd, 65536)
            entry[1] += chunk
            *lines, entry[1] = entry[1].split(b"\n")
            for line in lines:
                if line.isdigit():
                    reported.append(int(line))
                    entry[2] += 1
            proc, kill_at = entry[0], entry[3]
            if kill_at is not None and entry[2] >= kill_at and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                entry[3] = None
            if not chunk:                          # EOF: the instance ended
                rc = proc.wait(TIMEOUT)
                proc.stdout.close()
                del running[fd]
                if rc == -signal.SIGKILL:
                    kills += 1
                else:
                    assert rc == 0
                    assert entry[2] == quota
                    clean += 1
                if plan:
                    spawn()
    assert kills >= 1 and clean >= 1
    assert len(reported) == len(set(reported)), "an id was handed out twice"
    with mmkv.open(p) as db:
        reserved = counter(db, b"orders")
    assert min(reported) >= 1 and max(reported) <= reserved
    assert reserved - len(reported) <= block * kills


# ---------------------------------------------------------------- the command line

def run(args, cwd=None):
    return subprocess.run(MMKV + args, capture_output=True, text=True, cwd=cwd, timeout=TIMEOUT)


def test_cli_incr_prints_the_new_value(path):
    outs = [run(["incr", path, "hits"]), run(["incr", path, "hits", "5"]), run(["incr", path, "hits", "-10"])]
    assert [o.returncode for o in outs] == [0, 0, 0], [o.stderr for o in outs]
    assert [o.stdout for o in outs] == ["1\n", "6\n", "-4\n"]
    with mmkv.open(path) as db:
        assert db[b"hits"] == (-4).to_bytes(8, "little", signed=True)


def test_cli_incr_on_a_value_that_is_not_a_counter_fails_clearly(path):
    with mmkv.open(path) as db:
        db[b"name"] = b"alice"
    out = run(["incr", path, "name"])
    assert out.returncode == 1 and out.stdout == ""
    assert "not an 8-byte counter" in out.stderr
    with mmkv.open(path) as db:
        assert db[b"name"] == b"alice"


def test_cli_next_id_prints_consecutive_ids_per_name(path):
    outs = [run(["next-id", path, "orders"]), run(["next-id", path, "orders"]),
            run(["next-id", path, "invoices"]), run(["next-id", path, "orders", "--sync", "none"])]
    assert [o.stdout for o in outs] == ["1\n", "2\n", "1\n", "3\n"], [o.stderr for o in outs]
    with mmkv.open(path) as db:
        assert counter(db, b"orders") == 3 and b"orders" not in db


def test_cli_unrelated_processes_draw_distinct_ids(path):
    procs = [subprocess.Popen(MMKV + ["next-id", path, "orders"], stdout=subprocess.PIPE, text=True)
             for _ in range(8)]
    got = []
    for proc in procs:
        out, _ = proc.communicate(timeout=TIMEOUT)
        assert proc.returncode == 0
        got.append(int(out))
    assert sorted(got) == list(range(1, 9))           # block=1: distinct and no gaps


def test_readme_shell_snippet(tmp_path):
    python = sys.executable
    script = f"for i in 1 2 3 4; do {python} -m mmkv next-id ids.mmkv orders & done; wait"
    out = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert sorted(int(x) for x in out.stdout.split()) == [1, 2, 3, 4]
