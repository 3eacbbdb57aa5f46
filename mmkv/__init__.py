"""mmkv: an embedded, memory-mapped, persistent key-value store shared live between processes.

    import mmkv
    with mmkv.open("data.mmkv") as db:
        db[b"key"] = b"value"
        db.incr("hits")

    ids = mmkv.Sequence("ids.mmkv", "orders")      # unique ids across processes
    q = mmkv.Queue("jobs.mmkv", "resize")           # persistent multi-process FIFO, blocking get
"""
from __future__ import annotations

from .errors import (ChecksumError, ClosedError, CorruptionError, DiskFullError, Error, ForkedHandleError,
                     InUseError, LimitError, LockTimeoutError, NamespaceError, NotACounterError, NotMmkvFileError,
                     NotRegularFileError, ReadOnlyError, RecoveryNeededError, TooManyQueuesError, TruncatedError,
                     VersionError)
from .store import Store
from .expiry import ManualClock, memoize
from .engine.tunables import MAX_KEY_SIZE, MAX_VALUE_SIZE

__version__ = "0.1.0"

__all__ = [
    "open", "Store", "Error", "CorruptionError", "NotMmkvFileError", "VersionError", "ChecksumError",
    "TruncatedError", "LockTimeoutError", "DiskFullError", "ClosedError", "ForkedHandleError", "NotRegularFileError",
    "ReadOnlyError", "RecoveryNeededError", "LimitError", "NotACounterError", "InUseError", "MAX_KEY_SIZE", "MAX_VALUE_SIZE",
    "Sequence", "Queue", "QueueEmpty", "TooManyQueuesError", "ManualClock", "memoize", "NamespaceError",
    "Namespace",
]

#: Names served on first use (PEP 562): the counter service is not needed to open a store, and
#: ``import mmkv`` is part of every short-lived process's start-up.  ``mmkv.Queue``,
#: ``from mmkv import Sequence`` and ``from mmkv import *`` work as before.  (QueueEmpty: see
#: mmkv/errors.py.)
_LAZY = {"Sequence": "sequence", "Queue": "queue", "sequence": "sequence", "queue": "queue",
         "QueueEmpty": "errors", "Namespace": "namespace", "namespace": "namespace"}


TYPE_CHECKING = False        # (typing is not imported at run time)
if TYPE_CHECKING:
    import os
    from typing import Any
    from .errors import QueueEmpty
    from .namespace import Namespace
    from .queue import Queue
    from .sequence import Sequence


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mmkv' has no attribute {name!r}")
    from importlib import import_module
    value = import_module(f"{__name__}.{module}")      # also sets mmkv.sequence / mmkv.queue
    if name != module:
        value = getattr(value, name)
        globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def open(path: str | bytes | os.PathLike[str] | os.PathLike[bytes], flag: str = "c", sync: str = "none",
         mode: int = 0o600, namespace: str | None = None, **options: Any) -> Store:
    """Open (and with flag "c" or "n", create) the store at path.

    flag: "r" read-only, "w" read-write (must exist), "c" read-write, created if missing,
    "n" always a new empty store.  sync: "none" (survives any process crash) or "full"
    (every write is on disk when the call returns).  options: lock_timeout (seconds,
    None for no limit), lock_report_after (seconds a lock wait lasts before the holder's pid
    and time held are logged on the "mmkv" logger; None: never), open_timeout (seconds),
    lockless (flag "r" only: map the file read-only and never write a byte of it, not even the
    lock; automatic when the process may read the file but not write it), clock (an
    mmkv.ManualClock that expiry reads instead of the wall clock: for tests).
    :raises CorruptionError: not an mmkv file, other version, bad checksum, truncated.
    :raises FileNotFoundError: flag "r" or "w" and no file (nothing is created).
    :raises NotRegularFileError: path names a directory, device, FIFO or socket (left untouched).
    path: str, bytes or os.PathLike; it is made absolute once, so a later os.chdir changes nothing.
    namespace: open that named sub-store of the file directly (a Namespace, created with flag "c"
    or "n" when absent; closing it closes the store it opened).
    :raises NamespaceError: flag "r" or "w" and no such namespace (nothing is left open).
    """
    store = Store(path, flag=flag, sync=sync, mode=mode, **options)
    if namespace is None:
        return store
    try:
        ns = store.namespace(namespace, create=flag in ("c", "n"))
    except BaseException:
        store.close()
        raise
    ns._owns_store = True
    return ns
