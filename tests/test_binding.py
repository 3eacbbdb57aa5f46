"""The two bindings of the read path: the CPython extension (mmkv._fast) and cffi.

The binding is chosen once, at import (MMKV_BINDING, see mmkv/engine/shim.py), so each binding
runs the same scenario in its own interpreter and the results are compared.  Also here: the
environment variable really selects the binding, and a read that must wait for the lock does
not hold the GIL while it waits.
"""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import mmkv
import mmkv.store

try:
    import mmkv._fast  # noqa: F401
    HAVE_FAST = True
except ImportError:
    HAVE_FAST = False

needs_fast = pytest.mark.skipif(not HAVE_FAST, reason="the CPython extension is not built")

#: Runs in a child interpreter with MMKV_BINDING set; prints JSON.
SCENARIO = textwrap.dedent('''
    import json, os, sys
    import mmkv, mmkv.store

    path = sys.argv[1]
    big = bytes(range(256)) * 800                      # 204800 B: larger than the 64 KiB buffer
    keys = [b"a", "s\\u00e9", b"absent", "absent-str", b"big", b"edge", b"edge+1", b"empty", b"n", b""]

    def show(v):
        if isinstance(v, (bytes, bytearray, memoryview)):
            v = bytes(v)
            return ["bytes", len(v), v[:16].hex(), v[-16:].hex()]
        return ["obj", repr(v)]

    def attempt(f):
        try:
            return show(f())
        except Exception as exc:
            return ["raised", type(exc).__name__, str(exc) if isinstance(exc, KeyError) else ""]

    def probe(db):
        out = []
        for k in keys:
            out.append([repr(k), attempt(lambda: db[k]), attempt(lambda: db.get(k)),
                        attempt(lambda: db.get(k, "D")), attempt(lambda: k in db)])
        for bad in (1, None, 2.5):
            out.append([repr(bad), attempt(lambda: db[bad]), attempt(lambda: db.get(bad)),
                        attempt(lambda: bad in db)])
        return out

    def writes(db):
        out = []

        def rec(label, f):
            out.append([label, attempt(f)])

        rec("set bytes", lambda: db.__setitem__(b"w1", b"x"))
        rec("set str", lambda: db.__setitem__("w2", "\u00e9"))
        rec("set bytearray", lambda: db.__setitem__(bytearray(b"w3"), memoryview(b"mv")))
        rec("set bad key", lambda: db.__setitem__(1, b"x"))
        rec("set bad value", lambda: db.__setitem__(b"w4", 1.5))
        rec("set huge key", lambda: db.__setitem__(b"k" * 70000, b"x"))
        rec("set surrogate", lambda: db.__setitem__(chr(0xD800), b"x"))
        rec("read back", lambda: [db[b"w1"], db["w2"], db[b"w3"], db.get(b"w4")])
        rec("len", lambda: len(db))
        rec("del", lambda: db.__delitem__(b"w1"))
        rec("del absent", lambda: db.__delitem__(b"w1"))
        rec("del bad", lambda: db.__delitem__(2.5))
        rec("pop", lambda: db.pop("w2"))
        rec("pop absent default", lambda: db.pop(b"w2", "dflt"))
        rec("pop absent", lambda: db.pop(b"w2"))
        rec("set big", lambda: db.__setitem__(b"bigpop", big))
        rec("pop big", lambda: db.pop(b"bigpop"))
        rec("pop big again", lambda: db.pop(b"bigpop", None))
        rec("pop too many", lambda: db.pop(b"a", 1, 2))
        rec("pop empty", lambda: (db.__setitem__(b"e0", b""), db.pop(b"e0"))[1])
        rec("pop edge", lambda: (db.__setitem__(b"e1", b"x" * 65536), db.pop(b"e1"))[1])
        rec("pop edge+1", lambda: (db.__setitem__(b"e2", b"y" * 65537), db.pop(b"e2"))[1])
        rec("incr", lambda: db.incr(b"c"))
        rec("incr delta kw", lambda: db.incr(b"c", delta=5))
        rec("incr key kw", lambda: db.incr(key=b"c"))
        rec("incr negative", lambda: db.incr(b"c", -100))
        rec("incr huge delta", lambda: db.incr(b"c2", 1 << 70))
        rec("incr float", lambda: db.incr(b"c", 1.5))
        rec("incr bool", lambda: db.incr(b"c", True))
        rec("incr to max", lambda: db.incr(b"c3", (1 << 63) - 1))
        rec("incr overflow", lambda: db.incr(b"c3"))
        rec("incr not counter", lambda: db.incr(b"w3"))
        rec("incr plain 8 bytes", lambda: (db.__setitem__(b"c4", (5).to_bytes(8, "little")), db.incr(b"c4"))[1])
        rec("update dict", lambda: db.update({b"u1": b"1", "u2": "2"}))
        rec("update pairs kw", lambda: db.update([(b"u3", b"3")], u4=b"4"))
        rec("update generator", lambda: db.update((b"g%d" % i, b"v") for i in range(3)))
        rec("update short pair", lambda: db.update([(b"u5", b"5"), (b"u6",)]))
        rec("update bad value", lambda: db.update({b"u7": b"7", b"u8": 8}))
        rec("update not pairs", lambda: db.update([1]))
        rec("update huge value key", lambda: db.update({b"u9": b"9", b"k" * 70000: b""}))
        rec("nothing of a bad update", lambda: [k in db for k in (b"u5", b"u7", b"u9")])
        rec("update big", lambda: db.update({b"b%05d" % i: b"v" * (i % 50) for i in range(3000)}))
        rec("update mapping", lambda: db.update(dict.fromkeys([b"m1", b"m2"], b"m").items()))
        rec("read updates", lambda: [db.get(k) for k in (b"u1", b"u2", b"u3", b"u4", b"g2", b"b02999", b"m2")])
        rec("len", lambda: len(db))
        rec("check", lambda: db.check().ok)
        return out

    res = {"binding": mmkv.store.BINDING}
    db = mmkv.open(path, flag="n")
    db[b"a"] = b"1"
    db["s\\u00e9"] = "v\\u00e9"
    db[b"big"] = big
    db[b"edge"] = b"e" * 65536
    db[b"edge+1"] = b"f" * 65537
    db[b"empty"] = b""
    db.incr(b"n", 7)
    db[b""] = b"empty key"
    res["plain"] = probe(db)
    with db.lock():
        res["locked"] = probe(db)
    with db.transaction():
        db[b"absent"] = b"in txn"
        del db[b"a"]
        res["txn"] = probe(db)
    res["after_txn"] = probe(db)
    other = mmkv.open(path)                  # a second handle sees the first one's writes
    db[b"late"] = b"L" * 70000
    res["other"] = [show(other[b"late"]), show(other.get(b"late")), b"late" in other]
    other.close()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                            # child: the inherited handle is refused
        out = [attempt(lambda: db[b"big"]), attempt(lambda: db.get(b"big")), attempt(lambda: b"big" in db)]
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    res["forked"] = json.loads(os.read(r, 1 << 16).decode())
    res["still_open_in_parent"] = show(db[b"big"])
    db.close()
    res["closed"] = probe(db)
    w = mmkv.open(path + ".w", flag="n")
    res["writes"] = writes(w)
    w.clear()
    with w.lock():
        res["writes_locked"] = writes(w)
    w.clear()
    try:
        with w.transaction():
            res["writes_txn"] = writes(w)[:-1]         # (check() inside a transaction sees the old state)
    except Exception as exc:
        res["writes_txn_raised"] = [type(exc).__name__, str(exc)]
    res["after_txn_len"] = len(w)
    w.close()
    res["writes_closed"] = writes(w)
    ro = mmkv.open(path + ".w", flag="r")
    res["writes_readonly"] = writes(ro)
    ro.close()
    print(json.dumps(res))
''')


def run_scenario(binding, path):
    env = dict(os.environ, MMKV_BINDING=binding)
    out = subprocess.run([sys.executable, "-c", SCENARIO, path], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@needs_fast
def test_both_bindings_give_identical_results(tmp_path):
    fast = run_scenario("cpython", str(tmp_path / "fast.mmkv"))
    portable = run_scenario("cffi", str(tmp_path / "cffi.mmkv"))
    assert fast.pop("binding") == "cpython"
    assert portable.pop("binding") == "cffi"
    assert fast == portable
    # and the results are the right ones, not merely the same
    plain = {row[0]: row[1:] for row in fast["plain"]}
    assert plain["b'a'"][0] == ["bytes", 1, b"1".hex(), b"1".hex()]
    assert plain["b'absent'"] == [["raised", "KeyError", repr(b"absent")], ["obj", "None"], ["obj", "'D'"],
                                  ["obj", "False"]]
    assert plain["'absent-str'"][0] == ["raised", "KeyError", repr("absent-str")]
    assert plain["b'big'"][0][:2] == ["bytes", 204800] and plain["b'big'"][3] == ["obj", "True"]
    assert plain["b'edge+1'"][0][:2] == ["bytes", 65537]
    assert plain["b'empty'"][0][:2] == ["bytes", 0] and plain["b'empty'"][3] == ["obj", "True"]
    assert plain["1"][0][:2] == ["raised", "TypeError"]
    txn = {row[0]: row[1:] for row in fast["txn"]}
    assert txn["b'a'"][3] == ["obj", "False"] and txn["b'absent'"][0][:2] == ["bytes", 6]
    assert all(cell[:2] == ["raised", "ForkedHandleError"] for cell in fast["forked"])
    assert all(cell[:2] == ["raised", "ClosedError"] for row in fast["closed"][:10] for cell in row[1:])
    writes = dict(fast["writes"])
    assert writes["set bytes"] == ["obj", "None"]
    assert writes["set bad key"][:2] == writes["set bad value"][:2] == ["raised", "TypeError"]
    assert writes["set huge key"][:2] == ["raised", "LimitError"]
    assert writes["set surrogate"][:2] == ["raised", "UnicodeEncodeError"]
    assert writes["read back"] == ["obj", repr([b"x", "\u00e9".encode(), b"mv", None])]
    assert writes["del absent"] == ["raised", "KeyError", repr(b"w1")]
    assert writes["pop"][:2] == ["bytes", 2] and writes["pop absent default"] == ["obj", "'dflt'"]
    assert writes["pop absent"][:2] == ["raised", "KeyError"] and writes["pop too many"][:2] == ["raised", "TypeError"]
    assert writes["pop big"][:2] == ["bytes", 204800] and writes["pop big again"] == ["obj", "None"]
    assert [writes[k][:2] for k in ("pop empty", "pop edge", "pop edge+1")] == \
        [["bytes", 0], ["bytes", 65536], ["bytes", 65537]]
    assert [writes[k] for k in ("incr", "incr delta kw", "incr key kw", "incr negative")] == \
        [["obj", "1"], ["obj", "6"], ["obj", "7"], ["obj", "-93"]]
    assert writes["incr huge delta"][:2] == writes["incr overflow"][:2] == ["raised", "OverflowError"]
    assert writes["incr float"][:2] == ["raised", "TypeError"] and writes["incr bool"] == ["obj", "-92"]
    assert writes["incr not counter"][:2] == ["raised", "NotACounterError"]
    assert writes["incr plain 8 bytes"] == ["obj", "6"]
    assert writes["update short pair"][:2] == ["raised", "ValueError"]
    assert writes["update bad value"][:2] == writes["update not pairs"][:2] == ["raised", "TypeError"]
    assert writes["update huge value key"][:2] == ["raised", "LimitError"]
    assert writes["nothing of a bad update"] == ["obj", "[False, False, False]"]
    assert writes["read updates"] == ["obj", repr([b"1", b"2", b"3", b"4", b"v", b"v" * 49, b"m"])]
    assert writes["check"] == ["obj", "True"]
    assert fast["writes_locked"] == fast["writes"]          # inside db.lock(): the general path, same answers
    assert fast["writes_txn"] == fast["writes"][:-1]
    assert all(cell[1][:2] == ["raised", "ReadOnlyError"] for cell in fast["writes_readonly"]
               if cell[0] in ("set bytes", "del", "pop", "incr", "update dict"))
    assert all(cell[1][:2] == ["raised", "ClosedError"] for cell in fast["writes_closed"]
               if cell[0] in ("set bytes", "del", "pop", "incr", "update dict", "len", "read back"))


@pytest.mark.parametrize("wanted", ["cffi", "cpython"])
def test_the_environment_variable_selects_the_binding(wanted):
    if wanted == "cpython" and not HAVE_FAST:
        pytest.skip("the CPython extension is not built")
    code = "import mmkv.store, mmkv.engine.shim as s; print(mmkv.store.BINDING, s.fast is None)"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, MMKV_BINDING=wanted),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [wanted, str(wanted == "cffi")]


def test_an_unknown_binding_is_refused():
    out = subprocess.run([sys.executable, "-c", "import mmkv"], env=dict(os.environ, MMKV_BINDING="rust"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "MMKV_BINDING" in out.stderr


@needs_fast
def test_the_default_is_the_extension():
    env = {k: v for k, v in os.environ.items() if k != "MMKV_BINDING"}
    out = subprocess.run([sys.executable, "-c", "import mmkv.store; print(mmkv.store.BINDING)"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "cpython", out.stderr


def test_a_read_waiting_for_the_lock_lets_the_holder_run(path):
    """Another thread of this process holds the lock (through a second handle) and runs Python
    code: a read on the first handle must wait without the GIL, else the holder cannot finish and
    the read times out."""
    holder = mmkv.open(path, lock_timeout=10)
    reader = mmkv.open(path, lock_timeout=3, lock_report_after=None)
    holder[b"k"] = b"old"
    locked = threading.Event()
    spins = []

    def hold():
        with holder.lock():
            locked.set()
            n, end = 0, time.monotonic() + 0.3
            while time.monotonic() < end:     # Python work: needs the GIL
                n += 1
            holder[b"k"] = b"new"
            spins.append(n)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert locked.wait(10)
        got = [reader.get(b"k"), reader[b"k"], b"k" in reader, b"other" in reader]
    finally:
        t.join()
        holder.close()
        reader.close()
    assert got[0] in (b"old", b"new") and got[1] in (b"old", b"new") and got[2:] == [True, False]
    assert spins and spins[0] > 0


def test_reads_racing_a_close_in_another_thread(path):
    """Readers in threads while another thread closes the handle: each read returns a value or
    raises ClosedError, never crashes."""
    db = mmkv.open(path)
    for i in range(200):
        db[b"k%d" % i] = b"v%d" % i
    errors, stop = [], threading.Event()

    def read():
        i = 0
        while not stop.is_set():
            k = b"k%d" % (i % 250)
            try:
                v = db.get(k)
                assert v == (b"v%d" % (i % 250) if i % 250 < 200 else None)
                assert (k in db) == (i % 250 < 200)
            except mmkv.ClosedError:
                return
            except BaseException as exc:     # pragma: no cover - reported below
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=read) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    db.close()
    stop.set()
    for t in threads:
        t.join()
    assert errors == []


@pytest.mark.parametrize("call", ["set", "delete", "pop", "incr", "len", "update"])
def test_a_write_waiting_for_the_lock_lets_the_holder_run(path, call):
    """As for reads: a write (or len) that must wait for the lock, held by another thread of this
    process that needs the GIL to finish, waits without the GIL."""
    holder = mmkv.open(path, lock_timeout=10)
    waiter = mmkv.open(path, lock_timeout=3, lock_report_after=None)
    holder[b"k"] = b"old"
    holder[b"n"] = (0).to_bytes(8, "little")
    locked = threading.Event()
    spins = []

    def hold():
        with holder.lock():
            locked.set()
            n, end = 0, time.monotonic() + 0.3
            while time.monotonic() < end:     # Python work: needs the GIL
                n += 1
            spins.append(n)

    ops = {"set": lambda: waiter.__setitem__(b"k", b"new"), "delete": lambda: waiter.__delitem__(b"k"),
           "pop": lambda: waiter.pop(b"k"), "incr": lambda: waiter.incr(b"n"), "len": lambda: len(waiter),
           "update": lambda: waiter.update({b"u": b"1"})}
    t = threading.Thread(target=hold)
    t.start()
    try:
        assert locked.wait(10)
        t0 = time.monotonic()
        got = ops[call]()
        waited = time.monotonic() - t0
    finally:
        t.join()
    try:
        assert spins and spins[0] > 0
        assert waited < 3                     # done once the holder let go, never a timeout
        expected = {"set": None, "delete": None, "pop": b"old", "incr": 1, "len": 2, "update": None}[call]
        assert got == expected
        waiter.check()
    finally:
        holder.close()
        waiter.close()


def test_writes_racing_a_close_in_another_thread(path):
    """Writers in threads while another thread closes the handle: each call completes or raises
    ClosedError; the file is sound afterwards."""
    db = mmkv.open(path)
    errors = []

    def write(t):
        i = 0
        while True:
            k = b"t%d-%d" % (t, i % 50)
            try:
                if i % 4 == 0:
                    db[k] = b"v" * (i % 300)
                elif i % 4 == 1:
                    db.pop(k, None)
                elif i % 4 == 2:
                    db.incr(b"ctr%d" % t)
                else:
                    db.update({k: b"u", k + b"x": b"w"})
            except mmkv.ClosedError:
                return
            except BaseException as exc:     # pragma: no cover - reported below
                errors.append(exc)
                return
            i += 1

    threads = [threading.Thread(target=write, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    db.close()
    for t in threads:
        t.join()
    assert errors == []
    with mmkv.open(path) as db:
        db.check()
        assert sum(1 for k in db if k.startswith(b"ctr")) == 3


#: The suites run again on the other binding within the default run: the store API, the hypothesis
#: state machines, concurrency, transactions, lock-free reads, batches, iteration and lockless handles.  The crash
#: suites (a minute there) are not: the kill harness runs on the other binding in the test below.
OTHER_BINDING_SUITES = ("test_store_api.py", "test_stateful.py", "test_concurrency.py", "test_transactions.py",
                        "test_lockfree_reads.py", "test_multiprocess_lock.py", "test_batch.py", "test_iteration.py",
                        "test_lockless.py", "test_cas.py", "test_get_many.py", "test_expiry.py", "test_namespaces.py")


def test_the_store_suites_pass_on_the_other_binding(tmp_path):
    """This run uses one binding (the extension unless MMKV_BINDING says cffi); the suites that
    exercise the store's behaviour run here once more on the other, in a child pytest."""
    other = "cffi" if mmkv.store.BINDING == "cpython" else "cpython"
    if other == "cpython" and not HAVE_FAST:
        pytest.skip("the CPython extension is not built: only the cffi binding can be tested")
    here = os.path.dirname(os.path.abspath(__file__))
    # the child's own teardown audits the stores its tests leave: its folder is outside tmp_path,
    # so that this test's audit does not check them all again (16 s)
    import shutil
    import tempfile
    base = tempfile.mkdtemp(prefix="mmkv-other-binding-")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", os.path.join(base, "run"),
           *(os.path.join(here, name) for name in OTHER_BINDING_SUITES)]
    try:
        out = subprocess.run(cmd, env=dict(os.environ, MMKV_BINDING=other), capture_output=True, text=True,
                             timeout=1200, cwd=os.path.dirname(here))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    assert out.returncode == 0, f"on the {other} binding:\n{out.stdout[-6000:]}\n{out.stderr[-3000:]}"
    assert " passed" in out.stdout and " failed" not in out.stdout


def test_the_kill_harness_passes_on_the_other_binding(tmp_path):
    """Writers killed at random moments and at every failpoint, with bystanders, on the binding
    this run does not use (the default run's crash suites use this one)."""
    other = "cffi" if mmkv.store.BINDING == "cpython" else "cpython"
    if other == "cpython" and not HAVE_FAST:
        pytest.skip("the CPython extension is not built: only the cffi binding can be tested")
    for sync, kills in (("none", 60), ("full", 20)):
        cmd = [sys.executable, "-m", "mmkv", "torture", "kill", str(tmp_path / f"k-{sync}.mmkv"), "--kills",
               str(kills), "--bystanders", "2", "--sync", sync, "--seed", "1313"]
        out = subprocess.run(cmd, env=dict(os.environ, MMKV_BINDING=other), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, f"on the {other} binding, sync={sync}:\n{out.stdout[-4000:]}\n{out.stderr[-2000:]}"
        assert "no failure" in out.stdout and "killed" in out.stdout
