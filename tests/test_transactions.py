"""db.transaction(): all or nothing, own writes visible, isolation from other processes."""
import multiprocessing as mp
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import mmkv


@pytest.mark.parametrize("sync", ["none", "full"])
def test_commit_applies_everything(path, sync):
    with mmkv.open(path, sync=sync) as db:
        db.update({b"a": b"1", b"b": b"2"})
        with db.transaction():
            db[b"a"] = b"10"
            del db[b"b"]
            db[b"c"] = b"3"
            assert db.incr(b"n", 5) == 5 and db.incr(b"n") == 6
            assert db[b"a"] == b"10" and b"b" not in db and db.get(b"b") is None   # own writes
            assert len(db) == 3 and sorted(db) == [b"a", b"c", b"n"]
            assert dict(db.items())[b"c"] == b"3"
        assert dict(db.items()) == {b"a": b"10", b"c": b"3", b"n": (6).to_bytes(8, "little")}
    with mmkv.open(path) as db:                     # and it is in the file
        assert db[b"a"] == b"10" and b"b" not in db and db.incr(b"n", 0) == 6


def test_exception_discards_everything(db):
    db.update({b"a": b"1", b"b": b"2"})
    with pytest.raises(RuntimeError):
        with db.transaction():
            db[b"a"] = b"changed"
            del db[b"b"]
            db[b"new"] = b"x" * 100_000
            raise RuntimeError("boom")
    assert dict(db.items()) == {b"a": b"1", b"b": b"2"}
    assert db.stats()["keys"] == 2


def test_nested_transactions_join_the_outer_one(db):
    with pytest.raises(KeyError):
        with db.transaction():
            db[b"outer"] = b"1"
            with db.transaction():
                db[b"inner"] = b"2"
            assert db[b"inner"] == b"2"               # not committed yet, but visible inside
            raise KeyError("outer fails")
    assert b"outer" not in db and b"inner" not in db  # one commit, at the outermost exit
    with db.transaction():
        with db.transaction():
            db[b"inner"] = b"2"
        db[b"outer"] = b"1"
    assert db[b"inner"] == b"2" and db[b"outer"] == b"1"


def test_large_transaction_grows_file_and_index(db):
    with db.transaction():
        for i in range(40_000):
            db[b"k%d" % i] = b"v" * (i % 200)
        assert len(db) == 40_000
    assert len(db) == 40_000 and db[b"k39999"] == b"v" * (39999 % 200)
    assert db.stats()["index_segments"] > 1


def test_the_index_splits_before_the_commit_point_never_while_the_journal_is_applied(db, monkeypatch):
    """Applying a committed journal must not need space (a full disk there would leave it half
    applied): the segments the new keys need are split before the journal is named."""
    from mmkv.engine import index
    db._view.max_count = 50                          # a split every few dozen keys
    journal_named_at_split = []
    real_split = index.split

    def split(store, view, seg, publish=True):
        journal_named_at_split.append(store.meta.journal_off)
        return real_split(store, view, seg, publish)

    monkeypatch.setattr(index, "split", split)
    model = {b"pre%d" % i: b"x" for i in range(40)}
    db.update(model)
    with db.transaction():
        for i in range(500):
            db[b"t%d" % i] = model[b"t%d" % i] = b"%d" % i
        del db[b"pre0"]
        del model[b"pre0"]
    assert len(journal_named_at_split) >= 9          # 539 keys, at most 50 a segment: 11 segments or more
    assert not any(journal_named_at_split)
    assert db.stats()["index_segments"] >= 11
    assert dict(db.items()) == model
    db.check()


def test_clear_inside_is_refused_and_nothing_applied(db):
    db[b"a"] = b"1"
    with pytest.raises(mmkv.Error, match="clear"):
        with db.transaction():
            db[b"b"] = b"2"
            db.clear()
    assert dict(db.items()) == {b"a": b"1"}


def test_read_only_handle_cannot_start_one(path):
    mmkv.open(path).close()
    with mmkv.open(path, "r") as db:
        with pytest.raises(mmkv.ReadOnlyError):
            with db.transaction():
                pass


def _observer(path, done, out, seen_by_me):
    """Reads the two halves of every transaction until the writer is done; they must agree.
    seen_by_me: a shared [reads, versions seen], which the writer waits on."""
    torn = seen = 0
    versions = set()
    with mmkv.open(path, "r") as db:
        while not done.value:
            with db.lock():                         # two reads as one (separate gets could straddle a commit)
                a, b = db.get(b"a"), db.get(b"b")
            snapshot = dict(db.items())             # a snapshot is one lock hold too
            for x, y in ((a, b), (snapshot.get(b"a"), snapshot.get(b"b"))):
                seen += 1
                torn += x != y
                versions.add(x)
            seen_by_me[0], seen_by_me[1] = seen, len(versions)
    out.put((seen, torn, len(versions)))


def test_other_processes_never_see_half_a_transaction(path):
    with mmkv.open(path) as db:
        db.update({b"a": b"0", b"b": b"0"})
        ctx = mp.get_context("fork")
        out, done = ctx.Queue(), ctx.Value("i", 0)
        seen = [ctx.Array("i", 2, lock=False) for _ in range(2)]
        watchers = [ctx.Process(target=_observer, args=(path, done, out, s)) for s in seen]
        for w in watchers:
            w.start()
        # at least 3000 transactions, and on (up to a minute) until each observer has read 500
        # times and seen 10 versions: on a loaded machine the observers may get less of the CPU
        # than the writer (or read many times in one version while the writer waits for a CPU)
        i, deadline = 0, time.monotonic() + 60
        while i < 3000 or (min(min(s[0] - 500, s[1] - 10) for s in seen) <= 0 and time.monotonic() < deadline):
            with db.transaction():
                db[b"a"] = b"%d" % i
                db[b"b"] = b"%d" % i
            i += 1
        done.value = 1
        results = [out.get(timeout=120) for _ in watchers]
        for w in watchers:
            w.join(30)
    assert all(seen > 500 and versions > 10 for seen, _, versions in results), results
    assert all(torn == 0 for _, torn, _ in results), results


@pytest.mark.parametrize("point", ["txn.after_records", "txn.mid_journal", "txn.after_journal",
                                   "txn.after_commit", "txn.mid_apply", "txn.before_retire"])
@pytest.mark.parametrize("sync", ["none", "full"])
def test_killed_during_commit_is_all_or_nothing(path, point, sync):
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"old" for i in range(50)})
    child = textwrap.dedent(f"""
        import mmkv
        from mmkv.engine import failpoints
        db = mmkv.open({path!r}, sync={sync!r})
        failpoints.arm({point!r})
        with db.transaction():
            for i in range(50):
                db[b"k%d" % i] = b"new"
            db[b"extra"] = b"new"
            del db[b"k0"]
    """)
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=60)
    assert out.returncode == -signal.SIGKILL, out.stderr.decode()[-2000:]
    with mmkv.open(path) as db:
        db.check()
        state = dict(db.items())
    committed = point in ("txn.after_commit", "txn.mid_apply", "txn.before_retire")
    if committed:          # past the commit point: recovery finishes it
        assert state == {**{b"k%d" % i: b"new" for i in range(1, 50)}, b"extra": b"new"}
    else:
        assert state == {b"k%d" % i: b"old" for i in range(50)}
