"""db.backup(dest) and `mmkv backup`: a point-in-time, compact copy that passes check(), taken while
another process keeps writing; nothing is left behind when it fails."""
import errno
import multiprocessing as mp
import os

import pytest

import mmkv
from test_cli import run


def sequential_writer(path, started, stop):
    """Write key i (i = 0, 1, 2, ...) with a value derived from i, in order, until told to stop."""
    with mmkv.open(path) as db:
        i = 0
        while not stop.value:
            db[b"seq%08d" % i] = b"%d" % i * (1 + i % 50)
            i += 1
            if i == 2000:
                started.set()


def test_a_backup_is_the_store_compacted_and_passes_check(path, tmp_path):
    dest = str(tmp_path / "copy.mmkv")
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: os.urandom(i % 300) for i in range(20_000)})
        db.update({bytes([i, 0, 255]): bytes([i]) * i for i in range(256)})
        for i in range(0, 20_000, 2):
            del db[b"k%d" % i]
        result = db.backup(dest)
        expected = db.snapshot()
        live_size = os.path.getsize(path)
    assert result["keys"] == len(expected) and result["lock_seconds"] < result["seconds"]
    with mmkv.open(dest, "r") as copy:
        assert dict(copy.items()) == expected
        copy.check()
    assert os.path.getsize(dest) < live_size, "the copy is compacted"
    assert sorted(os.listdir(tmp_path)) == ["copy.mmkv", os.path.basename(path)]


def test_a_backup_while_another_process_writes_is_one_moment(path, tmp_path):
    """Keys are written in order by another process: a point-in-time copy holds keys 0..n-1 for
    some n, none missing in between, every value whole."""
    mmkv.open(path).close()
    ctx = mp.get_context("spawn")
    started, stop = ctx.Event(), ctx.Value("i", 0)
    p = ctx.Process(target=sequential_writer, args=(path, started, stop))
    p.start()
    try:
        assert started.wait(60)
        with mmkv.open(path, "r") as db:
            dest = str(tmp_path / "copy.mmkv")
            db.backup(dest)
    finally:
        stop.value = 1
        p.join(60)
    assert p.exitcode == 0
    with mmkv.open(dest, "r") as copy:
        keys = sorted(copy)
        n = len(keys)
        assert n >= 2000 and keys == [b"seq%08d" % i for i in range(n)]
        assert all(copy[b"seq%08d" % i] == b"%d" % i * (1 + i % 50) for i in range(n))
    with mmkv.open(path, "r") as db:
        assert len(db) > n, "the writer went on after the copy"


def test_an_existing_destination_is_refused_and_left_alone(path, tmp_path):
    dest = tmp_path / "copy.bad"           # (.bad: not a store, the teardown audit skips it)
    dest.write_bytes(b"precious")
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
        with pytest.raises(FileExistsError):
            db.backup(str(dest))
        with pytest.raises(FileNotFoundError):
            db.backup(str(tmp_path / "no-such-folder" / "copy.mmkv"))
    assert dest.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == sorted(["copy.bad", os.path.basename(path)])


def test_a_full_disk_leaves_nothing_behind(path, tmp_path, monkeypatch):
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"v" * 100 for i in range(1000)})

        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(os, "copy_file_range", full)
        with pytest.raises(mmkv.DiskFullError):
            db.backup(str(tmp_path / "copy.mmkv"))
        assert len(db) == 1000 and db[b"k7"] == b"v" * 100
        db[b"after"] = b"the lock was released"
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(path)]


def test_backup_inside_a_lock_block_or_on_a_lockless_handle_is_refused(path, tmp_path):
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
        with db.lock():
            with pytest.raises(mmkv.Error, match="inside lock"):
                db.backup(str(tmp_path / "copy.mmkv"))
    with mmkv.open(path, "r", lockless=True) as db:
        with pytest.raises(mmkv.ReadOnlyError):
            db.backup(str(tmp_path / "copy.mmkv"))
    assert not os.path.exists(tmp_path / "copy.mmkv")


def test_the_backup_command(path, tmp_path):
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"v" for i in range(500)})
    dest = str(tmp_path / "copy.mmkv")
    out = run(["backup", path, dest])
    assert out.returncode == 0, out.stderr
    assert "500 keys" in out.stdout and "writers waited" in out.stdout
    assert run(["backup", path, dest]).returncode == 2
    assert run(["backup", str(tmp_path / "missing.mmkv"), dest + "2"]).returncode == 2
    with mmkv.open(dest, "r") as copy:
        assert len(copy) == 500
