"""A lock held too long is reported by the processes waiting for it; the timeout still holds."""
import logging
import time

import pytest

import mmkv
from children import hold_lock


@pytest.mark.parametrize("op", ["put", "get", "incr", "delete", "len"])
def test_waiters_report_a_long_holder_then_proceed(path, caplog, op):
    with mmkv.open(path, lock_report_after=0.3, lock_timeout=20) as db:
        db[b"k"] = b"v"
        db[b"n"] = bytes(8)
        child = hold_lock(path, 1.2)
        caplog.set_level(logging.WARNING, logger="mmkv")
        start = time.monotonic()
        {"put": lambda: db.__setitem__(b"k", b"w"), "get": lambda: db[b"k"], "incr": lambda: db.incr(b"n"),
         "delete": lambda: db.__delitem__(b"k"), "len": lambda: len(db)}[op]()
        waited = time.monotonic() - start
        assert child.finish() == 0
        child.close()
        assert 0.5 < waited < 10
        reports = [r.getMessage() for r in caplog.records if r.name == "mmkv"]
        assert len(reports) == 1 and f"pid {child.pid} has held it" in reports[0], reports
        assert db.stats()["lock_reports"] == 1


def test_timeout_still_applies_after_the_report(path, caplog):
    with mmkv.open(path, lock_report_after=0.2, lock_timeout=0.8) as db:
        child = hold_lock(path, 4)
        caplog.set_level(logging.WARNING, logger="mmkv")
        start = time.monotonic()
        with pytest.raises(mmkv.LockTimeoutError, match=str(child.pid)):
            db[b"k"] = b"v"
        waited = time.monotonic() - start
        assert child.finish() == 0
        child.close()
    assert 0.75 < waited < 2.0, waited          # about lock_timeout, not lock_timeout + report_after
    assert any("has held it" in r.getMessage() for r in caplog.records)


def test_no_report_when_it_would_come_after_the_timeout(path, caplog):
    with mmkv.open(path, lock_report_after=5, lock_timeout=0.3) as db:
        child = hold_lock(path, 2)
        caplog.set_level(logging.WARNING, logger="mmkv")
        with pytest.raises(mmkv.LockTimeoutError):
            db[b"k"]
        assert child.finish() == 0
        child.close()
    assert not [r for r in caplog.records if r.name == "mmkv"]
