"""The one exception hierarchy: every error mmkv raises on purpose derives from Error.

Where a standard exception says it better, the class derives from that too, so
``except KeyError`` / ``except ValueError`` / ``except OSError`` keep working.
"""
import _thread


class Error(Exception):
    """Base of every error mmkv raises on purpose."""


class CorruptionError(Error):
    """The file is damaged or is not an mmkv file.

    Run ``mmkv check PATH`` for a full report; restore from a copy if it fails.
    """


class NotMmkvFileError(CorruptionError):
    """The file does not start with mmkv's magic bytes: it is some other file."""


class VersionError(CorruptionError):
    """The file was written by an mmkv with another format version; use that version."""


class ChecksumError(CorruptionError):
    """A checksum in the file does not match its contents (torn write or damage)."""


class TruncatedError(CorruptionError):
    """The file is shorter than its header says: it was cut short after it was written."""


class LockTimeoutError(Error, TimeoutError):
    """The store's lock was not acquired in time: another process holds it.

    Raise ``lock_timeout`` in ``mmkv.open`` or find the process that holds it
    (``db.stats()["lock_pid"]``).
    """


class DiskFullError(Error, OSError):
    """The file could not grow: the disk (or quota) is full. The store is unchanged."""


class ClosedError(Error, ValueError):
    """The handle was closed; open the store again."""


class NotRegularFileError(Error, OSError):
    """The path names a directory, device, FIFO or socket: a store must be a regular file.

    Nothing was opened, created or changed.  A symlink to a regular file is followed.
    """


class ForkedHandleError(Error):
    """The handle was opened in a parent process; call ``mmkv.open`` again in the child."""


class ReadOnlyError(Error, PermissionError):
    """The handle was opened with flag "r"; open with "w" or "c" to write."""


class RecoveryNeededError(Error):
    """The file needs a recovery that this handle cannot run: a lockless handle (no write access)
    found it left by a crash, or the process holding its lock died mid-write.  Any handle that
    may write repairs it (at its open, or its next lock); so does ``mmkv check --repair``."""


class LimitError(Error, ValueError):
    """A key or value is larger than mmkv allows (see mmkv.MAX_KEY_SIZE, mmkv.MAX_VALUE_SIZE)."""


class NotACounterError(Error, TypeError):
    """incr() on a key whose value is not an 8-byte signed integer."""


class InUseError(Error):
    """The operation needs the file to be open in this process only."""


class NamespaceError(Error, KeyError):
    """No namespace of that name (never created, or dropped by this or another process)."""

    def __str__(self):                  # a KeyError's str() is its argument's repr(): keep the message
        return Error.__str__(self)


class TooManyQueuesError(Error):
    """Every one of the file's semaphores already belongs to a queue (16 per file).

    Reuse an existing queue name or keep further queues in another file.
    """


# QueueEmpty is made at its first use (PEP 562): its base, the standard library's queue.Empty,
# lives in the C module _queue, a shared library only the counter service needs (loading it was
# 0.2 ms of `import mmkv`).  It is made once, under a lock, so that every `except QueueEmpty`,
# `mmkv.QueueEmpty` and `from mmkv.errors import QueueEmpty` names the one class.
_making = _thread.allocate_lock()


def __getattr__(name):
    if name != "QueueEmpty":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    with _making:
        if "QueueEmpty" not in globals():
            _make_queue_empty()
    return globals()["QueueEmpty"]


def __dir__():
    return sorted(set(globals()) | {"QueueEmpty"})


def _make_queue_empty():
    global QueueEmpty
    try:      # the standard library's queue.Empty itself, without importing queue (and threading)
        from _queue import Empty
    except ImportError:  # pragma: no cover - an interpreter without the C module
        from queue import Empty

    class QueueEmpty(Error, Empty):
        """``Queue.get`` found no item before its timeout ran out.

        Also a ``queue.Empty``, so code written for the standard library's queues keeps working.
        """
