"""Recovery: damaged records are dropped, leaked space comes back, killed writers lose nothing.

The full crash harness (failpoints, hundreds of kills, power-loss images) is
tests/test_crash_*.py; these are the direct checks of the recovery function.
"""
import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import mmkv
from mmkv.engine.shim import lib


def value_offset(db, key):
    with db.lock():
        assert lib.mmkv_find(db._view, key, len(key)) == 0
        return db._view.val_off


def test_damaged_record_is_reported_then_dropped_alone(tmp_path):
    p = str(tmp_path / "rot.bad")
    with mmkv.open(p) as db:
        for i in range(200):
            db[b"k%d" % i] = b"value-%d" % i
        off = value_offset(db, b"k7")
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(b"#")
    with mmkv.open(p) as db:
        with pytest.raises(mmkv.CorruptionError) as exc:
            db.check()
        assert any("slot" in problem for problem in exc.value.report.problems)
        result = db.recover()
        assert result.dropped == 1 and result.records == 199 and result.index_rebuilt
        assert b"k7" not in db and len(db) == 199
        assert all(db[b"k%d" % i] == b"value-%d" % i for i in range(200) if i != 7)
        db.check()
    os.rename(p, str(tmp_path / "rot-repaired.mmkv"))       # conftest audits it once more


def test_space_leaked_by_a_killed_lock_holder_comes_back(path):
    with mmkv.open(path) as db:
        for i in range(100):
            db[b"k%d" % i] = os.urandom(100)
        before = db.stats()
        child = textwrap.dedent(f"""
            import os, signal, mmkv
            db = mmkv.open({path!r})
            db._acquire()
            for _ in range(50):
                db.engine.alloc.alloc_block(5000)        # allocated, referenced by nothing: a leak
            os.kill(os.getpid(), signal.SIGKILL)
        """)
        out = subprocess.run([sys.executable, "-c", child], timeout=60)
        assert out.returncode == -signal.SIGKILL
        db[b"after"] = b"x"                  # the next locker repairs
        after = db.stats()
        assert after["recoveries"] == before["recoveries"] + 1
        assert after["used_bytes"] < before["used_bytes"] + 50 * 5000
        del db[b"after"]
        assert db.stats()["used_bytes"] == before["used_bytes"]
        db.check()


WRITER = textwrap.dedent("""
    import hashlib, os, random, sys, mmkv
    path, seed = sys.argv[1], int(sys.argv[2])
    rnd = random.Random(seed)
    db = mmkv.open(path)
    out = os.fdopen(1, "w", buffering=1)
    while True:
        key = b"k%d" % rnd.randrange(500)
        r = rnd.random()
        if r < 0.6:
            value = os.urandom(rnd.choice([0, 10, 100, 1000, 5000, 70000]))
            db[key] = value
            out.write("P %s %s\\n" % (key.hex(), hashlib.sha1(value).hexdigest()))
        elif r < 0.8:
            db.pop(key, None)
            out.write("D %s\\n" % key.hex())
        else:
            out.write("I %d\\n" % db.incr(b"counter"))
""")


def digest(value):
    return hashlib.sha1(value).hexdigest()


@pytest.mark.parametrize("keep_open", [False, True], ids=["reopen", "handle-kept-open"])
def test_sigkilled_writer_loses_no_acknowledged_write(tmp_path, keep_open):
    """A writer is SIGKILLed at random moments; every write it reported is then present.

    With keep_open the parent holds a handle throughout, so a writer killed inside
    the lock is repaired through EOWNERDEAD; otherwise through the unclean-open path.
    """
    path = str(tmp_path / "killed.mmkv")
    rnd = random.Random(1234)
    model, counter = {}, 0
    keeper = mmkv.open(path) if keep_open else None
    for round_ in range(25):
        child = subprocess.Popen([sys.executable, "-c", WRITER, path, str(round_)], stdout=subprocess.PIPE, text=True)
        time.sleep(rnd.uniform(0.3, 0.6))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=60)
        lines = out.split("\n")[:-1]          # a line cut by the kill was never acknowledged
        for line in lines:
            op, *args = line.split(" ")
            if op == "P":
                model[args[0]] = args[1]
            elif op == "D":
                model.pop(args[0], None)
            else:
                counter = int(args[0])
        db = keeper or mmkv.open(path)
        try:
            db.check()
            got = int.from_bytes(db.get(b"counter", bytes(8)), "little", signed=True)
            assert got in (counter, counter + 1)          # the increment in flight may have landed
            present = {k.hex(): digest(v) for k, v in db.items() if k != b"counter"}
            differ = {k for k in set(model) | set(present) if model.get(k) != present.get(k)}
            assert len(differ) <= 1, (round_, sorted(differ)[:5])   # only the write in flight
            model, counter = present, got
        finally:
            if not keep_open:
                db.close()
    if keeper:
        keeper.close()
