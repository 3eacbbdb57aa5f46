"""Failpoints: named places on the write path where a crash test can make the process die.

Arm one with ``arm(name, countdown)`` or, for a child process, the environment
variable ``MMKV_FAILPOINT=name:countdown`` (read when mmkv is imported): the
countdown-th time the point is reached, the process SIGKILLs itself.  Points in
C cost one predictable branch when nothing is armed; points in Python sit on
rare paths only (growth, splits, transactions, recovery) behind one flag test.

Points: put.after_record, put.after_slot, delete.mid_shift, alloc.mid,
free.mid, incr.before_store, sync.before, sync.after, release.before_punch,
release.after_punch, compact.after_copy, compact.after_switch, shrink.mid,
sweep.after_delete (in the shim);
grow.after_fallocate, meta.before_sync, split.before_meta, split.after_meta,
txn.after_records, txn.mid_journal, txn.after_journal, txn.after_commit,
txn.mid_apply, txn.before_retire, recover.mid_rebuild, rebuild.before_meta,
rebuild.after_meta, relocate.before_meta, relocate.after_meta, shrink.before_meta,
shrink.before_truncate, catalog.before_meta, catalog.after_meta, version.after_raise (in Python).
"""
import os

from .shim import lib

NAMES = ("put.after_record", "put.after_slot", "delete.mid_shift", "alloc.mid", "free.mid",
         "incr.before_store", "sync.before", "sync.after", "grow.after_fallocate", "meta.before_sync",
         "split.before_meta", "split.after_meta", "txn.after_records", "txn.mid_journal",
         "txn.after_journal", "txn.after_commit", "txn.mid_apply", "txn.before_retire",
         "recover.mid_rebuild", "rebuild.before_meta", "rebuild.after_meta", "release.before_punch",
         "release.after_punch", "compact.after_copy", "compact.after_switch", "relocate.before_meta",
         "relocate.after_meta", "shrink.mid", "shrink.before_meta", "shrink.before_truncate",
         "sweep.after_delete", "catalog.before_meta", "catalog.after_meta", "version.after_raise")

armed = False


def arm(name: str, countdown: int = 1) -> None:
    """Die (SIGKILL) the countdown-th time the point ``name`` is reached."""
    global armed
    if name not in NAMES:
        raise ValueError(f"unknown failpoint {name!r}; known: {', '.join(NAMES)}")
    if lib.mmkv_failpoint_set(name.encode(), countdown):
        raise ValueError(f"cannot arm failpoint {name!r}")
    armed = True


def disarm() -> None:
    global armed
    lib.mmkv_failpoint_set(b"", 0)
    armed = False


def hit(name: bytes) -> None:
    """A failpoint on the Python side (callers test ``failpoints.armed`` first)."""
    lib.mmkv_failpoint_hit(name)


def _from_environment() -> None:
    spec = os.environ.get("MMKV_FAILPOINT")
    if spec:
        name, _, count = spec.partition(":")
        arm(name, int(count or 1))


_from_environment()
