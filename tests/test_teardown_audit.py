"""The teardown audit of tests/conftest.py: which stores it finds, which it leaves alone.

The audit is what makes "every store a test leaves behind passes check()" true; a walk that
missed a nested folder would pass for the wrong reason, so its discovery rule is tested here.
"""
import os

import pytest

import mmkv
from conftest import stores_to_audit
from mmkv.engine.layout import STATE_WORD


def _store(p, **items):
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with mmkv.open(p) as db:
        db.update({k.encode(): v.encode() for k, v in items.items()})


def test_finds_stores_at_every_depth_and_keeps_the_exemptions(tmp_path):
    root = tmp_path / "tree"
    top, deep = str(root / "top.mmkv"), str(root / "a" / "b" / "c" / "deep.mmkv")
    _store(top, k="v")
    _store(deep, k="v")
    _store(str(root / "a" / "damaged.bad" / "inside.mmkv"))         # a folder damaged on purpose
    _store(str(root / "a" / "one.bad"))                              # a file damaged on purpose
    _store(str(root / "a" / "other-suffix.db"))                      # not named as a store
    os.symlink(deep, str(root / "link.mmkv"))                        # another name of deep.mmkv
    os.symlink(str(root / "a"), str(root / "linked-folder"))         # would list deep.mmkv twice
    os.mkfifo(str(root / "a" / "fifo.mmkv"))                         # not a regular file
    os.mkdir(str(root / "a" / "folder.mmkv"))                        # a folder, not a store
    assert stores_to_audit(root) == [deep, top]


def test_a_damaged_store_in_a_nested_folder_is_found_and_fails_check(tmp_path):
    # what the teardown would do to it, here on a copy named .bad so the real teardown passes
    p = str(tmp_path / "x" / "y" / "nested.mmkv")
    _store(p, k="v")
    [found] = stores_to_audit(tmp_path)
    assert found == p
    with mmkv.open(p) as db:
        with db.lock():
            db.engine.words[STATE_WORD["count"]] += 1       # the key count lies
        with pytest.raises(mmkv.CorruptionError, match="count says"):
            db.check()
    os.rename(str(tmp_path / "x"), str(tmp_path / "x.bad"))            # exempt from here on
    assert stores_to_audit(tmp_path) == []


def test_an_unreadable_folder_fails_the_walk(tmp_path, monkeypatch):
    def refuse(path, *a, **k):
        raise PermissionError(13, "simulated", str(path))
    (tmp_path / "sub").mkdir()
    real = os.scandir
    monkeypatch.setattr(os, "scandir", lambda p=".": refuse(p) if str(p).endswith("sub") else real(p))
    with pytest.raises(PermissionError):
        stores_to_audit(tmp_path)
