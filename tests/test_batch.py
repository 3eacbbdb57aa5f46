"""update() of a large batch: the index at its final size in one step, the file grown once
(Store._reserve_for, index.presize), and what a crash in that step leaves."""
import signal
import subprocess
import sys
import textwrap

import pytest

import mmkv
from mmkv.engine import index, tunables


@pytest.fixture
def spies(monkeypatch):
    """Count the index's splits and presizes, and the file's growths."""
    from mmkv.engine import core
    calls = {"split": 0, "presize": 0, "grow": 0}

    def spy(owner, name, label):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            calls[label] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(owner, name, counted)

    spy(index, "split", "split")
    spy(index, "presize", "presize")
    spy(core.Engine, "grow", "grow")
    return calls


def test_a_big_batch_into_an_empty_store_needs_no_split(path, spies):
    n = 30_000
    pairs = {b"key%06d" % i: b"v" * (i % 200) for i in range(n)}
    with mmkv.open(path) as db:
        db.update(pairs)
        assert spies["split"] == 0 and spies["presize"] == 1
        assert spies["grow"] <= 2           # the records' room in one step (the index may take one more)
        shape = db.stats()
        assert shape["index_segments"] * index.SEGMENT_SLOTS * tunables.MAX_LOAD >= n
        assert len(db) == n and all(db[k] == v for k, v in pairs.items())
        db.check()


def test_a_batch_smaller_than_the_store_is_not_presized(path, spies):
    with mmkv.open(path) as db:
        db.update({b"old%06d" % i: b"o" for i in range(5000)})
        before = spies["presize"]
        db.update({b"new%06d" % i: b"n" for i in range(2000)})     # 2000 < 5000 keys already there
        assert spies["presize"] == before
        db.update({b"s%d" % i: b"s" for i in range(tunables.PRESIZE_PAIRS - 1)})   # below the threshold
        assert spies["presize"] == before
        assert len(db) == 5000 + 2000 + tunables.PRESIZE_PAIRS - 1
        db.check()


def test_presize_keeps_every_key_already_there(path, spies):
    with mmkv.open(path) as db:
        db.update({b"old%d" % i: b"o%d" % i for i in range(3000)})
        db.update({b"new%d" % i: b"n%d" % i for i in range(20_000)})      # count 3000 <= 20000: rebuilt
        assert spies["presize"] == 1 and spies["split"] == 0     # the first batch fits one segment
        assert all(db[b"old%d" % i] == b"o%d" % i for i in range(3000))
        assert all(db[b"new%d" % i] == b"n%d" % i for i in range(20_000))
        db.check()


@pytest.mark.parametrize("point", ["rebuild.before_meta", "rebuild.after_meta"])
def test_killed_while_presizing(path, point):
    """The presize is a whole index rebuild: a crash before its meta switch leaves the old index,
    after it the new one; either way every key is there and the batch's puts had not begun."""
    with mmkv.open(path) as db:
        db.update({b"old%d" % i: b"o%d" % i for i in range(500)})
    code = textwrap.dedent(f"""
        import mmkv
        from mmkv.engine import failpoints
        db = mmkv.open({path!r})
        failpoints.arm({point!r})
        db.update({{b"new%d" % i: b"n" for i in range(40_000)}})
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr.decode()[-2000:]
    with mmkv.open(path) as db:
        assert len(db) == 500 and all(db[b"old%d" % i] == b"o%d" % i for i in range(500))
        db.check()
        db.update({b"new%d" % i: b"n" for i in range(40_000)})     # and the batch works afterwards
        assert len(db) == 40_500
        db.check()
