"""The open/close protocol keys on the file, not its name; only regular files; a failed open
creates nothing; close is safe while other threads use the handle (issue 9, findings 2, 5, 6, 7).

The protocol itself is described in mmkv/opening.py.
"""
import os
import pathlib
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

import mmkv
from mmkv.engine.layout import CLEAN_MARK, STATE_WORD


def dirty_word(path):
    """The state's dirty word as the file holds it (CLEAN_MARK after a clean last close)."""
    with open(path, "rb") as f:
        f.seek(STATE_WORD["dirty"] * 8)
        return int.from_bytes(f.read(8), "little")


# ---------------------------------------------------------------- one file, one identity

@pytest.mark.parametrize("other", ["hardlink", "symlink"])
def test_a_close_through_one_name_does_not_mark_the_file_clean_while_another_name_is_open(tmp_path, other):
    path = str(tmp_path / "s.mmkv")
    alias = str(tmp_path / "alias")
    mmkv.open(path).close()
    (os.link if other == "hardlink" else os.symlink)(path, alias)
    a = mmkv.open(alias)
    b = mmkv.open(path)
    b[b"k"] = b"v"
    b.close()                                   # not the last handle: a is still open through the alias
    assert dirty_word(path) != CLEAN_MARK
    a[b"k2"] = b"v2"
    a.close()                                   # the last one: now it is clean
    assert dirty_word(path) == CLEAN_MARK
    with mmkv.open(path) as db:
        assert dict(db.items()) == {b"k": b"v", b"k2": b"v2"}
        db.check()
    assert sorted(os.listdir(tmp_path)) == ["alias", "s.mmkv"]


def test_close_after_chdir_works_and_leaves_nothing_behind(tmp_path, monkeypatch):
    folder, elsewhere = tmp_path / "data", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(folder)
    db = mmkv.open("rel.mmkv")
    db[b"k"] = b"v"
    monkeypatch.chdir(elsewhere)
    db.close()
    assert os.listdir(elsewhere) == []
    assert os.listdir(folder) == ["rel.mmkv"]
    assert dirty_word(folder / "rel.mmkv") == CLEAN_MARK
    with mmkv.open(folder / "rel.mmkv") as again:
        assert again[b"k"] == b"v"


def test_bytes_and_pathlib_paths(tmp_path):
    p = tmp_path / "b.mmkv"
    with mmkv.open(os.fsencode(str(p))) as db:
        db[b"k"] = b"v"
        assert db.path == str(p)
    with mmkv.open(p, "r") as db:
        assert db[b"k"] == b"v"


def test_path_is_made_absolute_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with mmkv.open("x.mmkv") as db:
        assert db.path == str(tmp_path / "x.mmkv")


def test_two_handles_in_one_process_through_two_names_see_one_store(tmp_path):
    path = str(tmp_path / "s.mmkv")
    mmkv.open(path).close()
    os.symlink(path, str(tmp_path / "link"))
    with mmkv.open(path) as a, mmkv.open(str(tmp_path / "link")) as b:
        a[b"x"] = b"1"
        assert b[b"x"] == b"1"
        assert b.incr(b"n") == 1 and a.incr(b"n") == 2


# ---------------------------------------------------------------- only regular files

def _special(kind, where):
    if kind == "fifo":
        os.mkfifo(where)
    elif kind == "socket":
        s = socket.socket(socket.AF_UNIX)
        s.bind(where)
        s.close()
    elif kind == "directory":
        os.mkdir(where)
    elif kind == "device":
        try:
            os.mknod(where, 0o600 | stat.S_IFCHR, os.makedev(1, 3))      # like /dev/null
        except PermissionError:
            pytest.skip("creating a device node needs root")


@pytest.mark.parametrize("flag", ["r", "w", "c", "n"])
@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "device"])
def test_special_files_are_refused_and_left_untouched(tmp_path, kind, flag):
    where = str(tmp_path / "special")
    _special(kind, where)
    before = os.lstat(where)
    code = textwrap.dedent(f"""
        import mmkv, sys
        try:
            mmkv.open({where!r}, {flag!r})
        except mmkv.NotRegularFileError as exc:
            assert isinstance(exc, OSError)
            sys.exit(0)
        sys.exit(1)
    """)
    # in a child with a timeout: the old code blocked forever opening a FIFO
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    after = os.lstat(where)
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    assert sorted(os.listdir(tmp_path)) == ["special"]


def test_a_symlink_to_a_special_file_is_refused(tmp_path):
    os.mkfifo(str(tmp_path / "fifo"))
    os.symlink(str(tmp_path / "fifo"), str(tmp_path / "link.bad"))
    with pytest.raises(mmkv.NotRegularFileError):
        mmkv.open(str(tmp_path / "link.bad"), "c")
    assert stat.S_ISLNK(os.lstat(str(tmp_path / "link.bad")).st_mode)


@pytest.mark.parametrize("flag", ["c", "n"])
def test_a_symlink_to_an_empty_file_is_followed_and_kept(tmp_path, flag):
    target = tmp_path / "target.mmkv"
    target.write_bytes(b"")
    link = tmp_path / "link"
    os.symlink(str(target), str(link))
    with mmkv.open(str(link), flag) as db:
        db[b"k"] = b"v"
    assert stat.S_ISLNK(os.lstat(str(link)).st_mode)        # the link is still a link...
    with mmkv.open(str(target), "r") as db:                 # ...to the store
        assert db[b"k"] == b"v"


def test_a_dangling_symlink_with_flag_c_creates_its_target(tmp_path):
    os.symlink(str(tmp_path / "target.mmkv"), str(tmp_path / "link"))
    with mmkv.open(str(tmp_path / "link"), "c") as db:
        db[b"k"] = b"v"
    assert stat.S_ISLNK(os.lstat(str(tmp_path / "link")).st_mode)
    assert sorted(os.listdir(tmp_path)) == ["link", "target.mmkv"]


# ---------------------------------------------------------------- a failed open creates nothing

@pytest.mark.parametrize("flag", ["r", "w"])
def test_opening_a_missing_file_creates_nothing(tmp_path, flag):
    with pytest.raises(FileNotFoundError):
        mmkv.open(str(tmp_path / "missing.mmkv"), flag)
    assert os.listdir(tmp_path) == []


def test_opening_a_missing_file_in_an_unwritable_folder_says_not_found(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to run a step as user nobody")
    top = tempfile.mkdtemp(prefix="mmkv-open-", dir="/tmp")   # pytest's folders: only root may enter them
    os.chmod(top, 0o755)
    folder = pathlib.Path(top) / "ro"
    folder.mkdir()
    os.chmod(str(folder), 0o555)
    code = textwrap.dedent(f"""
        import os, sys
        import mmkv                       # before dropping root: nobody cannot read this interpreter's files
        os.setgid(65534); os.setuid(65534)
        try:
            mmkv.open({str(folder / 'missing.mmkv')!r}, "r")
        except FileNotFoundError:
            sys.exit(0)
        except BaseException as exc:
            print(type(exc).__name__, exc)
        sys.exit(1)
    """)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    try:
        assert out.returncode == 0, out.stdout + out.stderr
        assert os.listdir(folder) == []
    finally:
        shutil.rmtree(top)


def test_a_failed_create_leaves_no_temporary_file(tmp_path, monkeypatch):
    from mmkv.engine import mapping

    def full(fd, size):
        raise mmkv.DiskFullError(28, "no space (simulated)")
    monkeypatch.setattr(mapping, "grow_file", full)     # the create step looks it up at each call
    with pytest.raises(mmkv.DiskFullError):
        mmkv.open(str(tmp_path / "new.mmkv"), "c")
    assert os.listdir(tmp_path) == []


def test_flag_n_on_a_store_another_process_has_open_empties_it_in_place(tmp_path):
    path = str(tmp_path / "s.mmkv")
    with mmkv.open(path) as keep:
        keep[b"a"] = b"1"
        with mmkv.open(path, "n") as again:
            assert len(again) == 0
        assert b"a" not in keep


def test_flag_n_replaces_a_file_that_is_not_a_store(tmp_path):
    path = tmp_path / "s.mmkv"
    path.write_bytes(b"not a store" * 1000)
    with mmkv.open(str(path), "n") as db:
        db[b"k"] = b"v"
    assert os.listdir(tmp_path) == ["s.mmkv"]


# ---------------------------------------------------------------- close under concurrent use

CLOSE_WHILE_BUSY = r"""
import os, sys, threading, time
import mmkv
path = sys.argv[1]
db = mmkv.open(path)
for i in range(200):
    db[b"k%d" % i] = b"v" * (i % 50)
stop = threading.Event()
errors = []

def worker(n):
    i = 0
    while not stop.is_set():
        i += 1
        try:
            k = b"k%d" % (i % 200)
            op = (i + n) % 8
            if op == 0:
                db.get(k)
            elif op == 1:
                db[k] = b"w%d" % i
            elif op == 2:
                db.incr(b"ctr")
            elif op == 3:
                k in db
            elif op == 4:
                len(db)
            elif op == 5:
                with db.transaction():
                    db[b"t"] = b"%d" % i
            elif op == 6:
                list(db.keys())[:1]
            else:
                db[b"big%d" % (i % 3)] = b"x" * 70000
        except mmkv.ClosedError:
            return
        except Exception as exc:             # anything but ClosedError is a failure
            errors.append(repr(exc))
            return

threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
for t in threads:
    t.start()
time.sleep(float(sys.argv[2]))
db.close()
stop.set()
for t in threads:
    t.join()
if errors:
    print(errors)
    sys.exit(1)
with mmkv.open(path) as again:
    again.check()
"""


@pytest.mark.parametrize("delay", [0.0, 0.01, 0.05, 0.2])
def test_close_while_other_threads_use_the_handle(tmp_path, delay):
    for run in range(3):
        path = str(tmp_path / f"busy{run}.mmkv")
        out = subprocess.run([sys.executable, "-c", CLOSE_WHILE_BUSY, path, str(delay)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, f"run {run}: exit {out.returncode}: {out.stdout} {out.stderr[-2000:]}"


def test_close_inside_a_lock_block_of_the_same_thread(path):
    db = mmkv.open(path)
    db[b"a"] = b"1"
    with db.lock():
        db[b"b"] = b"2"
        db.close()
    with pytest.raises(mmkv.ClosedError):
        db[b"a"]
    with mmkv.open(path) as again:
        assert dict(again.items()) == {b"a": b"1", b"b": b"2"}


def test_close_waits_for_another_threads_lock_block(path):
    db = mmkv.open(path)
    inside, release = threading.Event(), threading.Event()
    done = []

    def holder():
        with db.lock():
            inside.set()
            release.wait(30)
            db[b"written-inside"] = b"yes"      # still allowed: close waits for this block
            done.append(True)

    t = threading.Thread(target=holder)
    t.start()
    inside.wait(30)
    closer = threading.Thread(target=db.close)
    closer.start()
    closer.join(0.3)
    assert closer.is_alive(), "close did not wait for the other thread's lock() block"
    release.set()
    t.join(30)
    closer.join(30)
    assert done == [True] and not closer.is_alive()
    with mmkv.open(path) as again:
        assert again[b"written-inside"] == b"yes"
