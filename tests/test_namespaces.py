"""Named sub-stores: db.namespace(name), its own key space in the same file (mmkv/namespace.py,
mmkv/engine/namespaces.py).  Also run on the cffi binding (test_binding.py runs this module)."""
import signal
import subprocess
import sys
import textwrap

import pytest

import mmkv
from mmkv.engine import namespaces, scanning
from mmkv.engine.shim import lib


def test_key_spaces_are_separate_and_len_is_each_ones_own(db):
    db[b"k"] = b"main"
    users = db.namespace("users")
    users[b"k"] = b"user"
    groups = db.namespace("groups")
    assert (db[b"k"], users[b"k"], groups.get(b"k")) == (b"main", b"user", None)
    users.update((b"u%d" % i, b"%d" % i) for i in range(5000))
    assert (len(db), len(users), len(groups)) == (1, 5001, 0)
    assert list(db) == [b"k"] and dict(db.items()) == {b"k": b"main"}
    assert sorted(users)[:2] == [b"k", b"u0"] and len(list(users.items())) == 5001
    assert db.namespaces() == ["groups", "users"]
    assert db.namespace("users") is users
    assert users.stats()["keys"] == 5001 and users.store is db
    del users[b"k"]
    assert b"k" in db and b"k" not in users
    report = db.check()
    assert (report.keys, report.namespaces, report.namespace_keys) == (1 + 5000, 2, 5000)
    assert "namespaces 2, holding 5000 of the keys" in str(report)


def test_every_per_key_call_works_in_a_namespace(db):
    ns = db.namespace("calls")
    ns[b"a"] = b"1"
    assert ns.pop(b"a") == b"1" and ns.pop(b"a", None) is None
    assert ns.incr(b"n", 5) == 5 and ns.incr(b"n") == 6
    assert ns.cas(b"c", None, b"x") and not ns.cas(b"c", b"y", b"z") and ns.cas(b"c", b"x", b"w")
    assert ns.setdefault(b"d", b"dv") == b"dv" and ns.setdefault(b"d", b"other") == b"dv"
    assert ns.get_many([b"c", b"zz", b"d"], b"-") == [b"w", b"-", b"dv"]
    ns.set(b"t", b"tv", ttl=1000)
    assert 990 < ns.ttl(b"t") <= 1000 and ns.deadlines().keys() == {b"t"}
    assert ns.expire(b"t", None) and ns.ttl(b"t") is None
    with pytest.raises(KeyError):
        ns[b"absent"]
    assert db.get(b"n") is None and len(db) == 0


def test_namespaces_persist_and_open_without_creating(path):
    with mmkv.open(path) as db:
        db.namespace("a")[b"x"] = b"1"
        db.namespace("b")
    with mmkv.open(path) as db:
        assert db.namespaces() == ["a", "b"]
        assert db.namespace("a", create=False)[b"x"] == b"1"
        with pytest.raises(mmkv.NamespaceError, match="no namespace 'c'"):
            db.namespace("c", create=False)
        assert db.namespaces() == ["a", "b"]
    with mmkv.open(path, "r") as db:
        assert db.namespace("a")[b"x"] == b"1"
        with pytest.raises(mmkv.ReadOnlyError):
            db.namespace("new")
        with pytest.raises(mmkv.ReadOnlyError):
            db.namespace("a")[b"y"] = b"2"


@pytest.mark.parametrize("bad, exc", [(b"bytes", TypeError), (1, TypeError), ("", ValueError),
                                      ("x" * 256, ValueError), ("a\0b", ValueError)])
def test_bad_names_are_refused_and_nothing_changes(db, bad, exc):
    with pytest.raises(exc):
        db.namespace(bad)
    with pytest.raises(exc):
        db.drop_namespace(bad)
    assert db.namespaces() == []


def test_a_transaction_spans_namespaces_all_or_nothing(db):
    users, audit = db.namespace("users"), db.namespace("audit")
    with db.transaction():
        db[b"n"] = b"1"
        users[b"alice"] = b"a"
        audit.set(b"e1", b"created alice", ttl=3600)
        assert users[b"alice"] == b"a" and len(users) == 1    # the block sees its own writes
    assert (db[b"n"], users[b"alice"], audit[b"e1"]) == (b"1", b"a", b"created alice")
    with pytest.raises(RuntimeError):
        with users.transaction():           # a namespace's transaction is the store's
            users[b"bob"] = b"b"
            del db[b"n"]
            audit[b"e2"] = b"x"
            raise RuntimeError("abort")
    assert b"bob" not in users and db[b"n"] == b"1" and b"e2" not in audit
    assert (len(db), len(users), len(audit)) == (1, 1, 1)
    db.check()


def test_clear_of_one_namespace_is_one_switch_and_gives_the_space_back(db, monkeypatch):
    db[b"keep"] = b"main"
    other = db.namespace("other")
    other[b"keep"] = b"o"
    ns = db.namespace("big")
    used_before = db.stats()["used_bytes"]
    ns.update((b"k%d" % i, bytes(100)) for i in range(20000))
    holds = []
    real = namespaces.free_dropped
    monkeypatch.setattr(namespaces, "free_dropped", lambda eng, i, budget=namespaces.FREE_STEP:
                        holds.append(1) or real(eng, i, budget))
    ns.clear()
    assert len(ns) == 0 and list(ns) == [] and ns.get(b"k1") is None
    assert len(holds) >= 20000 // namespaces.FREE_STEP      # the old records freed over several lock holds
    assert db[b"keep"] == b"main" and other[b"keep"] == b"o"
    ns[b"again"] = b"1"
    assert len(ns) == 1
    del ns[b"again"]
    assert db.stats()["used_bytes"] == used_before          # every record block back
    db.check()


def test_clear_and_drop_in_another_process_reach_this_handle(path):
    with mmkv.open(path) as db:
        ns = db.namespace("shared")
        ns[b"a"] = b"1"
        code = textwrap.dedent(f"""
            import mmkv
            with mmkv.open({path!r}) as db:
                ns = db.namespace("shared", create=False)
                ns[b"b"] = b"2"
                ns.clear()
                ns[b"c"] = b"3"
        """)
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        assert dict(ns.items()) == {b"c": b"3"} and len(ns) == 1       # the name's new index
        code = f"import mmkv\nwith mmkv.open({path!r}) as db: db.drop_namespace('shared')"
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
        with pytest.raises(mmkv.NamespaceError):
            ns[b"c"]
        with pytest.raises(mmkv.NamespaceError):
            ns[b"d"] = b"4"
        with pytest.raises(mmkv.NamespaceError):
            len(ns)
        assert db.namespaces() == []
        again = db.namespace("shared")
        assert len(again) == 0
        db.check()


def test_drop_gives_the_space_back_and_the_name_is_free_again(db):
    used_before = db.stats()["used_bytes"]
    ns = db.namespace("tmp")
    ns.update((b"k%d" % i, bytes(300)) for i in range(10000))
    db.drop_namespace("tmp")
    assert db.stats()["used_bytes"] == used_before and db.namespaces() == []
    with pytest.raises(mmkv.NamespaceError):
        db.drop_namespace("tmp")
    assert len(db.namespace("tmp")) == 0
    db.check()


def test_the_store_clear_keeps_namespaces(db):
    ns = db.namespace("kept")
    ns.update((b"k%d" % i, b"v") for i in range(3000))
    db.update((b"m%d" % i, b"v") for i in range(3000))
    db.clear()
    assert len(db) == 0 and len(ns) == 3000 and ns[b"k7"] == b"v"
    db.check()


def test_iterating_a_namespace_reads_only_its_own_index(db, monkeypatch):
    db.update((b"m%d" % i, b"v") for i in range(40000))          # the main index splits into several segments
    small = db.namespace("small")
    small.update((b"s%d" % i, b"v") for i in range(10))
    assert db.stats()["index_segments"] >= 4
    batches = []
    real = scanning.Cursor.batch
    monkeypatch.setattr(scanning.Cursor, "batch", lambda self, eng, *a: batches.append(eng.view.dir_off)
                        or real(self, eng, *a))
    assert sorted(small) == sorted(b"s%d" % i for i in range(10))
    assert len(batches) == 1 and batches[0] == small._view.dir_off       # one segment: its own


def test_namespaces_grow_split_and_survive_reopen_and_compaction(path):
    with mmkv.open(path) as db:
        a, b = db.namespace("a"), db.namespace("b")
        for i in range(30000):
            a[b"a%d" % i] = b"x" * (i % 50)
            b[b"b%d" % i] = b"y" * 20
            db[b"m%d" % i] = b"z"
        for i in range(0, 30000, 2):
            del a[b"a%d" % i]
            del db[b"m%d" % i]
        assert a.stats()["index_segments"] >= 2 and b.stats()["index_segments"] >= 2
        moved = db.compact()["moved_records"]
        assert moved > 15000             # namespace records move too
        assert (len(a), len(b), len(db)) == (15000, 30000, 15000)
        assert a[b"a7"] == b"x" * 7 and b[b"b0"] == b"y" * 20
    with mmkv.open(path) as db:
        assert len(db.namespace("a")) == 15000 and db.check().keys == 60000


def test_a_lockless_handle_reads_namespaces_as_other_processes_change_them(path):
    with mmkv.open(path) as db:
        ns = db.namespace("x")
        ns[b"k"] = b"v"
        with mmkv.open(path, "r", lockless=True) as ro:
            assert ro.lockless and ro.namespaces() == ["x"]
            seen = ro.namespace("x")
            assert seen[b"k"] == b"v" and len(seen) == 1 and list(seen) == [b"k"] and b"k" in seen
            with pytest.raises(mmkv.ReadOnlyError, match="cannot create"):
                ro.namespace("new")
            with pytest.raises(mmkv.NamespaceError):
                ro.namespace("new", create=False)
            with pytest.raises(mmkv.ReadOnlyError):
                seen[b"k"] = b"w"
            code = textwrap.dedent(f"""
                import mmkv
                with mmkv.open({path!r}) as db:
                    ns = db.namespace("x")
                    ns.update((b"n%d" % i, b"%d" % i) for i in range(40000))     # splits, growth
            """)
            subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
            assert len(seen) == 40001 and seen[b"n39999"] == b"39999"
            assert seen.get_many([b"n1", b"absent"]) == [b"1", None]
            assert sum(1 for _ in seen) == 40001
            ns.clear()
            assert len(seen) == 0 and seen.get(b"k") is None
            db.drop_namespace("x")
            with pytest.raises(mmkv.NamespaceError):
                seen[b"k"]
            with pytest.raises(mmkv.NamespaceError):
                len(seen)
            assert ro.namespaces() == []


def test_closing_the_store_closes_its_namespaces(path):
    db = mmkv.open(path)
    ns = db.namespace("x")
    ns[b"k"] = b"v"
    db.close()
    with pytest.raises(mmkv.ClosedError):
        ns[b"k"]
    with pytest.raises(mmkv.ClosedError):
        ns[b"k"] = b"w"


def test_expiry_in_a_namespace_sweeps_its_own_index(path):
    clock = mmkv.ManualClock(1_000_000_000)
    with mmkv.open(path, clock=clock) as db:
        ns = db.namespace("cache")
        for i in range(100):
            ns.set(b"c%d" % i, b"v", ttl=10)
        db[b"plain"] = b"p"
        clock.advance(11)
        assert len(ns) == 0 and ns.get(b"c1") is None and db[b"plain"] == b"p"
        assert db.check().expiring == 0


def test_recovery_finishes_a_drop_a_crash_interrupted(db, monkeypatch):
    used_before = db.stats()["used_bytes"]
    ns = db.namespace("gone")
    ns.update((b"k%d" % i, bytes(200)) for i in range(9000))
    monkeypatch.setattr(mmkv.Store, "_free_dropped", lambda self: None)      # as if killed right after the switch
    db.drop_namespace("gone")
    assert namespaces.dropped_ids(db.engine)                               # the old index waits to be freed
    db.check()                                                             # and is accounted for meanwhile
    result = db.recover()
    assert not namespaces.dropped_ids(db.engine) and result.leaked_bytes > 9000 * 200
    assert db.stats()["used_bytes"] == used_before
    db.check()


def test_the_checker_fires_on_a_damaged_catalog_and_bad_namespace_counters(path, tmp_path):
    with mmkv.open(path) as db:
        db[b"main"] = b"kept"
        ns = db.namespace("n")
        ns.update((b"k%d" % i, b"v") for i in range(100))
        eng = db.engine
        off, counts = eng.catalog.off, ns._engine.index_word("count")
        eng.words[counts] = 5                                     # a wrong counter: found, and repaired
        with pytest.raises(mmkv.CorruptionError, match="namespace 'n': count says 5 keys, the index holds 100"):
            db.check()
        db.recover()
        assert len(ns) == 100
        db.check()
    bad = str(tmp_path / "catalog.bad")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[off + 40] ^= 0xFF                                        # an entry's id: the checksum fails
    with open(bad, "wb") as f:
        f.write(data)
    with mmkv.open(bad) as db:
        assert db.get(b"main") == b"kept"          # the main index is still readable
        with pytest.raises(mmkv.CorruptionError, match="catalog"):
            db.check()
        with pytest.raises(mmkv.CorruptionError, match="fails its checksum"):
            db.namespace("n")
        for change in (db.clear, lambda: db.namespace("new"), lambda: db.drop_namespace("n")):
            with pytest.raises(mmkv.CorruptionError, match="fails its checksum"):
                change()                           # nothing that could free what the namespaces hold
        assert db.get(b"main") == b"kept"


@pytest.mark.parametrize("failpoint, op", [
    ("catalog.before_meta", "create"), ("catalog.after_meta", "create"),
    ("catalog.before_meta", "drop"), ("catalog.after_meta", "drop"),
    ("catalog.before_meta", "clear"), ("catalog.after_meta", "clear"),
    ("catalog.before_meta", "split"), ("catalog.after_meta", "split"),
])
def test_killed_at_each_catalog_commit_step(path, failpoint, op):
    """A process killed (SIGKILL) before or after the meta names the new catalog: the next opener
    finds the namespace as before the operation, or as after it, never anything else."""
    with mmkv.open(path) as db:
        keep = db.namespace("keep")
        keep.update((b"k%d" % i, b"v") for i in range(500))
        if op != "create":
            victim = db.namespace("victim")
            victim.update((b"v%d" % i, b"w") for i in range(1000 if op != "split" else 100))
    body = {"create": "db.namespace('victim')",
            "drop": "db.drop_namespace('victim')",
            "clear": "db.namespace('victim').clear()",
            "split": "ns = db.namespace('victim')\nfor i in range(100, 40000): ns[b'v%d' % i] = b'w'"}[op]
    code = textwrap.dedent(f"""
        import mmkv
        from mmkv.engine import failpoints
        db = mmkv.open({path!r})
        failpoints.arm({failpoint!r})
    """) + body + "\nprint('survived')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stdout.decode() + out.stderr.decode()[-2000:]
    with mmkv.open(path) as db:
        db.check()
        names = db.namespaces()
        assert "keep" in names and len(db.namespace("keep")) == 500
        if op == "create":
            assert names in (["keep"], ["keep", "victim"])
            if "victim" in names:
                assert len(db.namespace("victim")) == 0
        elif op == "drop":
            assert names in (["keep"], ["keep", "victim"])
            if "victim" in names:
                assert len(db.namespace("victim")) == 1000
        elif op == "clear":
            assert len(db.namespace("victim")) in (0, 1000)
        else:
            n = len(db.namespace("victim"))
            assert 100 <= n < 40000
            assert all(db.namespace("victim")[b"v%d" % i] == b"w" for i in range(n))
    with mmkv.open(path) as db:
        db.check()


def test_namespace_handles_refuse_direct_construction():
    with pytest.raises(TypeError, match="db.namespace"):
        mmkv.Namespace("x")


def test_sequences_and_queues_keep_their_records_out_of_the_users_keys(path):
    with mmkv.open(path) as db:
        db[b"mine"] = b"1"
        with mmkv.Sequence(db, "orders", block=1) as ids:
            assert [ids.next() for _ in range(3)] == [1, 2, 3]
        with mmkv.Queue(db, "jobs") as q:
            q.put(b"job-1")
            q.put(b"job-2")
        assert len(db) == 1 and list(db) == [b"mine"] and db.namespaces() == []
        db.clear()                                  # the user's keys only
        with mmkv.Sequence(db, "orders", block=1) as ids:
            assert ids.next() == 4                  # never an id twice
        with mmkv.Queue(db, "jobs") as q:
            assert q.get(timeout=1) == b"job-1"
        db.check()


def test_a_file_written_before_namespaces_has_its_records_moved_on_first_use(path):
    """Before namespaces, Sequence and Queue kept their records under b"\\x00mmkv:" keys of the main
    key space (written here as those versions wrote them): the first Sequence or Queue moves them,
    counters staying counters, and both go on where they were."""
    q = b"\x00mmkv:q:4:jobs:"
    with mmkv.open(path) as db:
        db[b"user"] = b"u"
        db.incr(b"\x00mmkv:seq:orders", 41)
        db[b"\x00mmkv:sem:00"] = b"queue:jobs"
        db.incr(q + b"head", 0)
        db.incr(q + b"tail", 2)
        db[q + b"i" + (0).to_bytes(8, "big")] = b"first"
        db[q + b"i" + (1).to_bytes(8, "big")] = b"second"
        assert len(db) == 7
    with mmkv.open(path, "r") as db:               # a read-only handle leaves the file as it is
        with mmkv.Sequence(db, "orders") as ids:
            assert ids._db is db
        assert len(db) == 7
    with mmkv.open(path) as db:
        with mmkv.Sequence(db, "orders", block=1) as ids:
            assert ids.next() == 42
        assert len(db) == 1 and list(db) == [b"user"]
        with mmkv.Queue(db, "jobs") as jobs:
            assert jobs.semaphore == 0
            assert jobs.get(timeout=1) == b"first" and jobs.get(timeout=1) == b"second"
            jobs.put(b"third")
        db.check()
    with mmkv.open(path) as db:
        with mmkv.Queue(db, "jobs") as jobs:
            assert jobs.get(timeout=1) == b"third"
        with mmkv.Sequence(db, "orders", block=1) as ids:
            assert ids.next() == 43
        assert dict(db.items()) == {b"user": b"u"}
        db.check()


def test_the_command_line_works_in_a_namespace(path):
    def run(*args, stdin=None):
        return subprocess.run([sys.executable, "-m", "mmkv", *args], capture_output=True, text=True, timeout=120,
                              input=stdin)
    assert run("put", path, "k", "in-users", "--namespace", "users").returncode == 0
    assert run("put", path, "k", "in-main").returncode == 0
    assert run("get", path, "k", "--namespace", "users").stdout == "in-users"
    assert run("get", path, "k").stdout == "in-main"
    assert run("ls", path, "--namespace", "users", "--values").stdout == "k\tin-users\n"
    missing = run("get", path, "k", "--namespace", "nope")
    assert missing.returncode == 1 and "no namespace 'nope'" in missing.stderr
    dumped = run("dump", path, "--namespace", "users")
    assert run("load", path, "--namespace", "copy", stdin=dumped.stdout).returncode == 0
    assert run("namespaces", path).stdout == "copy\t1\nusers\t1\n"
    assert run("del", path, "k", "--namespace", "users").returncode == 0
    assert run("namespaces", path, "--json").stdout.splitlines()[1] == '{"namespace": "users", "keys": 0}'
    assert run("check", path).returncode == 0


def test_a_namespace_made_inside_lock_does_not_wait_for_the_lock_its_thread_holds(path):
    """A namespace's view is marked held with the store's (the fast paths then take the general
    path): made inside db.lock(), its calls must not wait for the lock this thread holds."""
    with mmkv.open(path, lock_timeout=0.5, lock_report_after=None) as db:
        with db.lock():
            ns = db.namespace("x")
            ns[b"a"] = b"1"
            assert ns.get(b"a") == b"1" and b"a" in ns and len(ns) == 1 and ns.get_many([b"a"]) == [b"1"]
            assert ns.incr(b"n") == 1 and ns.pop(b"a") == b"1"
        assert ns.get(b"n") == (1).to_bytes(8, "little")


def test_open_a_namespace_directly(path):
    with mmkv.open(path, namespace="users") as users:
        assert isinstance(users, mmkv.Namespace) and users.name == "users"
        users[b"a"] = b"1"
    with mmkv.open(path) as db:
        assert db.namespaces() == ["users"] and len(db) == 0
        assert db.namespace("users")[b"a"] == b"1"
    with mmkv.open(path, "r", namespace="users") as users:
        assert dict(users.items()) == {b"a": b"1"}
    with pytest.raises(mmkv.NamespaceError):
        mmkv.open(path, "w", namespace="absent")
    with mmkv.open(path, "w") as db:                 # the failed open left nothing open, created nothing
        assert db.namespaces() == ["users"]
    users = mmkv.open(path, namespace="users")
    store = users.store
    users.close()
    with pytest.raises(mmkv.ClosedError):
        store[b"x"]


def test_compaction_lowers_namespace_index_blocks_and_the_catalog(path):
    """Namespaces made after the main data have their directory, segments and the catalog at the
    top of the file: once the main data is deleted, compaction moves them down (relocation: a
    catalog commit each) so the file shrinks past them."""
    with mmkv.open(path) as db:
        db.update((b"big%d" % i, b"x" * 20000) for i in range(1000))        # ~20 MB low in the file
        a, b = db.namespace("a"), db.namespace("b")
        for i in range(20000):                                                  # splits: segments high up
            a[b"a%d" % i] = b"1"
            b[b"b%d" % i] = b"2"
        with mmkv.Sequence(db, "ids") as ids:                                   # mmkv's own namespace too
            assert ids.next() == 1
        for i in range(1000):
            del db[b"big%d" % i]
        keys = db.check().keys                                                  # with the Sequence's records
        result = db.compact()
        assert result["index_blocks_moved"] >= 5
        assert result["file_size_after"] < result["file_size_before"] // 4, result
        assert (len(a), len(b), len(db)) == (20000, 20000, 0)
        assert a[b"a19999"] == b"1" and b[b"b0"] == b"2"
        db.check()
    with mmkv.open(path) as db:
        assert len(db.namespace("a")) == 20000 and db.check().keys == keys
        with mmkv.Sequence(db, "ids") as ids:
            assert ids.next() > 1


_NS_WORKER = textwrap.dedent("""
    import os, sys, time
    import mmkv
    path, stop = sys.argv[1], sys.argv[2]
    db = mmkv.open(path)
    a = db.namespace("a")
    print("open", flush=True)
    n = 0
    deadline = time.time() + 60
    while not (n % 64 == 0 and (os.path.exists(stop) or time.time() > deadline)):
        i = n % 20000
        if a.get(b"a%d" % i) != b"1":
            print("BAD", i, a.get(b"a%d" % i))
            sys.exit(1)
        a.incr(b"c%d" % (n % 100))      # in place: the writer allocates nothing, so the tail stays the index's
        n += 1
    print("OK", n)
    db.close()
""")


def test_compaction_moves_namespace_blocks_under_another_process_using_them(path, tmp_path):
    """Another process reads namespace "a" and increments counters in it while compaction moves its
    segments, its directory and the catalog (each a catalog commit it must follow): every read is
    right, every increment lands."""
    with mmkv.open(path) as db:
        db.update((b"big%d" % i, b"x" * 20000) for i in range(500))
        a = db.namespace("a")
        a.update((b"a%d" % i, b"1") for i in range(20000))
        for i in range(100):
            a.incr(b"c%d" % i, 0)
        for i in range(500):
            del db[b"big%d" % i]
        script, stop = str(tmp_path / "worker.py"), str(tmp_path / "stop")
        with open(script, "w") as f:
            f.write(_NS_WORKER)
        kid = subprocess.Popen([sys.executable, script, path, stop], stdout=subprocess.PIPE, text=True)
        try:
            assert kid.stdout.readline().strip() == "open"
            result = db.compact()
        finally:
            open(stop, "w").close()
            out = kid.communicate(timeout=60)[0]
        assert out.startswith("OK"), out
        increments = int(out.split()[1])
        assert result["index_blocks_moved"] >= 2 and not result["shrunk"]
        db.check()
        assert len(a) == 20100 and all(a[b"a%d" % i] == b"1" for i in range(0, 20000, 7))
        assert sum(a.incr(b"c%d" % i, 0) for i in range(100)) == increments


def test_two_handles_free_one_dropped_namespace_by_turns(path, monkeypatch):
    """Each handle keeps where its freeing stopped (mmkv_drain_index's cursor); slots of a dropped
    index are only ever cleared, so two handles freeing it by turns, with budgets that do not
    line up, free every record once and the space comes back exactly."""
    with mmkv.open(path) as one, mmkv.open(path) as two:
        used_before = one.stats()["used_bytes"]
        ns = one.namespace("gone")
        ns.update((b"k%d" % i, bytes(i % 300)) for i in range(9000))
        monkeypatch.setattr(mmkv.Store, "_free_dropped", lambda self: None)   # the freeing done here, below
        one.drop_namespace("gone")
        (ns_id,) = namespaces.dropped_ids(one.engine)
        turns, done = 0, False
        while not done:
            for db, budget in ((one, 700), (two, 301)):
                with db.lock():
                    done = namespaces.free_dropped(db.engine, ns_id, budget)
                turns += 1
                if done:
                    break
        assert turns >= 9000 // 1001
        with one.lock():                                      # (a lock hold follows the other's commit)
            assert not namespaces.dropped_ids(one.engine)
        assert one.stats()["used_bytes"] == used_before
        one.check()
        two.check()


def test_a_damaged_record_of_a_dropped_namespace_is_left_to_recovery(db, monkeypatch):
    used_before = db.stats()["used_bytes"]
    ns = db.namespace("gone")
    ns.update((b"k%d" % i, b"value-%d" % i) for i in range(3000))
    with db.lock():
        assert lib.mmkv_find(ns._view, b"k77", 3) == 0
        off = ns._view.val_off
    db.engine.fm.mm[off + 2:off + 3] = b"#"                    # its checksum now fails
    db.drop_namespace("gone")                                 # frees the 2,999 others
    assert not namespaces.dropped_ids(db.engine)
    assert db.stats()["used_bytes"] > used_before             # the damaged one's block is not freed
    result = db.recover()
    assert result.leaked_bytes > 0 and db.stats()["used_bytes"] == used_before
    db.check()
