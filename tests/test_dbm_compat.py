"""mmkv.dbm against CPython's own dbm and shelve tests, and the conventions they rely on.

CPython's ``Lib/test/test_dbm.py`` (its generic ``AnyDBMTestCase``) and ``Lib/test/test_shelve.py``
(the file-backed shelf tests over ``mapping_tests.BasicTestMappingProtocol``, and the shelve.open
tests) run here against ``mmkv.dbm``, in the versions of 3.11 and 3.13 where this machine has them
(pyenv's interpreters ship their ``Lib/test``; the running interpreter's own first).  They skip
with a message where a version is not installed.  Left out: ``WhichDBTestCase`` (it checks that a
freshly imported stdlib ``dbm`` recognises each stdlib backend's own files, which mmkv's files are
not) and the tests of one backend's own files (``test_dbm_dumb``, ``test_dbm_gnu``, ...).

The tests after them show the same behaviours without CPython's test package.
"""
import dbm
import glob
import importlib.util
import os
import pickle
import shelve
import sys
import unittest

import pytest

import mmkv
import mmkv.dbm as mdbm

mdbm.register()          # stdlib dbm.open (and so shelve.open) reopens mmkv files


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """CPython's tests write relative to the working directory (os_helper.TESTFN)."""
    monkeypatch.chdir(tmp_path)


def _cpython_tests(name: str):
    """[(version tag, module)] of CPython's Lib/test/<name>.py: the running interpreter's own,
    and pyenv's 3.11 and 3.13 copies when they are installed."""
    found, paths = [], []
    own = os.path.join(os.path.dirname(os.__file__), "test", name + ".py")
    if os.path.exists(own):
        paths.append((f"{sys.version_info[0]}{sys.version_info[1]}", own))
    for minor in ("11", "13"):
        for path in sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/lib/python3.{minor}/test/{name}.py"))):
            if all(tag != "3" + minor for tag, _ in paths):
                paths.append(("3" + minor, path))
            break
    for tag, path in paths:
        spec = importlib.util.spec_from_file_location(f"cpython{tag}_{name}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as exc:              # a version whose test needs what 3.11 lacks
            print(f"CPython {tag}'s {name} cannot be loaded here: {exc!r}", file=sys.stderr)
            continue
        found.append((tag, module))
    return found


_DBM_TESTS = _cpython_tests("test_dbm")
_SHELVE_TESTS = _cpython_tests("test_shelve")


def test_cpython_test_suites_are_found():
    if not _DBM_TESTS or not _SHELVE_TESTS:
        pytest.skip("CPython's Lib/test (test_dbm.py, test_shelve.py) is not installed here")
    assert {tag for tag, _ in _DBM_TESTS} >= {f"{sys.version_info[0]}{sys.version_info[1]}"}


for _tag, _mod in _DBM_TESTS:
    _name = f"TestCPython{_tag}AnyDBM"
    globals()[_name] = type(_name, (_mod.AnyDBMTestCase, unittest.TestCase), {"module": mdbm})

for _tag, _mod in _SHELVE_TESTS:
    from test import mapping_tests
    for _proto in range(pickle.HIGHEST_PROTOCOL + 1):
        _name = f"TestCPython{_tag}Proto{_proto}FileShelve"
        globals()[_name] = type(_name, (_mod.TestShelveFileBase, mapping_tests.BasicTestMappingProtocol),
                                {"dbm_mod": mdbm, "_args": {"protocol": _proto}})

    def _default_mmkv(self):
        self.addCleanup(setattr, dbm, "_defaultmod", dbm._defaultmod)
        dbm._defaultmod = mdbm
    _name = f"TestCPython{_tag}Shelve"
    globals()[_name] = type(_name, (_mod.TestCase,), {"setUp": _default_mmkv})


# ---------------------------------------------------------------- the conventions, shown directly

def test_error_is_an_oserror_and_an_mmkv_error():
    assert issubclass(mdbm.error, OSError) and issubclass(mdbm.error, mmkv.Error)


def test_open_of_a_missing_file_read_only_is_an_error_and_creates_nothing():
    with pytest.raises(mdbm.error) as info:
        mdbm.open("missing")
    assert isinstance(info.value, FileNotFoundError) and info.value.filename
    with pytest.raises(mdbm.error):
        mdbm.open("missing", "w")
    assert not os.path.exists("missing")


def test_keys_is_a_list_and_str_is_utf8():
    with mdbm.open("db", "c") as db:
        assert db.keys() == [] and isinstance(db.keys(), list)
        db["é"] = "ü"
        db[b"b"] = b""
        assert sorted(db.keys()) == [b"b", "é".encode()]
        assert db["é"] == "ü".encode() and db[b"b"] == b""
        assert db.get(b"none") is None and db.get(b"none", b"d") == b"d"
        assert db.setdefault(b"x", b"1") == b"1" and db[b"x"] == b"1"
        with pytest.raises(KeyError):
            db[b"none"]
        with pytest.raises(KeyError):
            del db[b"none"]
        with pytest.raises(TypeError):
            db[1] = b"v"
        db.store.check()


def test_everything_mmkv_raises_is_caught_as_dbm_error_and_as_itself(tmp_path):
    db = mdbm.open("db", "c")
    db[b"k"] = b"v"
    db.close()
    db.close()                                   # twice is allowed
    for call in (lambda: db[b"k"], lambda: db.keys(), lambda: len(db), lambda: db.__setitem__(b"k", b"v")):
        with pytest.raises(mdbm.error) as info:
            call()
        assert isinstance(info.value, mmkv.ClosedError) and isinstance(info.value, ValueError)
    with open("other", "wb") as f:
        f.write(b"GDBM" + b"\0" * 4092)          # another dbm's file: refused, untouched
    with pytest.raises(mdbm.error) as info:
        mdbm.open("other", "w")
    assert isinstance(info.value, mmkv.NotMmkvFileError)
    try:
        mdbm.open("other", "w")
    except dbm.error:                            # the stdlib's tuple catches it too
        pass
    assert open("other", "rb").read(4) == b"GDBM"


def test_read_only_database_refuses_writes():
    with mdbm.open("db", "c") as db:
        db[b"k"] = b"v"
    with mdbm.open("db") as db:
        assert db[b"k"] == b"v"
        with pytest.raises(mdbm.error) as info:
            db[b"k"] = b"w"
        assert isinstance(info.value, PermissionError)


def test_flags_and_mode():
    with pytest.raises(ValueError):
        mdbm.open("db", "x")
    with mdbm.open("db", "cs") as db:            # "s": sync="full"
        db[b"k"] = b"v"
        assert db.store.sync_mode == "full"
    old = os.umask(0o022)
    try:
        with mdbm.open("db2", "nf", 0o640):
            pass
    finally:
        os.umask(old)
    assert os.stat("db2").st_mode & 0o777 == 0o640
    with mdbm.open("db", "n") as db:             # "n": new and empty
        assert len(db) == 0


def test_whichdb_and_the_stdlib_open():
    with mdbm.open("db", "c") as db:
        db[b"k"] = b"v"
    assert mdbm.whichdb("db") == "mmkv.dbm" == dbm.whichdb("db")
    with dbm.open("db") as db:                   # registered: the stdlib opens it with mmkv.dbm
        assert isinstance(db, mdbm.Database) and db[b"k"] == b"v"
    assert mdbm.whichdb("absent") is None


def test_a_shelf_opens_and_reopens_by_path():
    with mdbm.open_shelf("shelf") as s:
        s["a"] = {"x": [1, 2]}
    with mdbm.open_shelf("shelf", "r") as s:
        assert s["a"] == {"x": [1, 2]} and list(s.keys()) == ["a"]
    with shelve.open("shelf") as s:              # registered: shelve.open finds the mmkv file
        assert s["a"] == {"x": [1, 2]}
        s["b"] = 2
    with mdbm.open_shelf("shelf", "r") as s:
        assert s["b"] == 2
        s.dict.store.check()


def test_register_default_makes_new_shelves_mmkv():
    saved = dbm._defaultmod
    try:
        mdbm.register(default=True)
        with shelve.open("new") as s:
            s["k"] = 1
        assert mdbm.whichdb("new") == "mmkv.dbm"
    finally:
        dbm._defaultmod = saved
