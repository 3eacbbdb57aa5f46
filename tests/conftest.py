"""Shared fixtures.  Every store a test leaves behind must pass check().

Convention: a test keeps its stores under ``tmp_path`` (at any depth) with names
ending in ``.mmkv``; after the test, each one is opened and audited
(``_audit_stores``).  What the audit leaves alone, on purpose:

* a file or folder whose name ends in ``.bad``: damaged on purpose (a folder
  named so exempts everything below it, e.g. a folder of damaged copies);
* any name not ending in ``.mmkv``: not a store (sidecars, logs, images, FIFOs);
* a symbolic link, to a file or a folder: another name of something audited
  under its own name, or of something outside the test's folder;
* anything that is not a regular file (a folder named ``x.mmkv``, a FIFO...).
"""
import os
import stat

import pytest

import mmkv

#: Long torture, fuzz and scale runs are opt-in: MMKV_SLOW=1 pytest -m slow
SLOW = os.environ.get("MMKV_SLOW") == "1"

#: The suffix of files and folders damaged on purpose (see the module docstring).
DAMAGED = ".bad"
#: The suffix of the stores the teardown audit checks.
STORE = ".mmkv"


def pytest_collection_modifyitems(config, items):
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow: set MMKV_SLOW=1 to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def path(tmp_path):
    """Path of a store file (not yet created) inside the test's temporary folder."""
    return str(tmp_path / "test.mmkv")


@pytest.fixture
def db(path):
    """An open store, closed after the test."""
    store = mmkv.open(path)
    yield store
    store.close()


def _raise(exc):
    raise exc


def stores_to_audit(root) -> list:
    """Paths of every store under root, at any depth, that the teardown audit checks (sorted).

    Follows the exemptions of the module docstring; a folder that cannot be listed fails the
    test (an audit that skips what it cannot see would pass for the wrong reason)."""
    found = []
    for folder, dirs, files in os.walk(str(root), onerror=_raise):      # never follows links to folders
        dirs[:] = sorted(d for d in dirs if not d.endswith(DAMAGED))
        for name in files:
            if not name.endswith(STORE):
                continue
            p = os.path.join(folder, name)
            if stat.S_ISREG(os.lstat(p).st_mode):                           # a link or a FIFO is not audited
                found.append(p)
    return sorted(found)


@pytest.fixture(autouse=True)
def _audit_stores(tmp_path):
    yield
    for p in stores_to_audit(tmp_path):
        with mmkv.open(p, "w") as store:
            store.check()
