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
