"""Shared fixtures.  Every store a test leaves behind must pass check().

Convention: a test keeps its stores under ``tmp_path`` with names ending in
``.mmkv``; after the test, each one is opened and audited.  Files a test damages
on purpose get another suffix (``.bad``) and are not audited.
"""
import os

import pytest

import mmkv

#: Long torture, fuzz and scale runs are opt-in: MMKV_SLOW=1 pytest -m slow
SLOW = os.environ.get("MMKV_SLOW") == "1"


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


@pytest.fixture(autouse=True)
def _audit_stores(tmp_path):
    yield
    for name in sorted(os.listdir(tmp_path)):
        if name.endswith(".mmkv"):
            with mmkv.open(str(tmp_path / name), "w") as store:
                store.check()
