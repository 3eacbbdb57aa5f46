"""The open and close protocol: who is first, who is last, and creating a new file.

Opening and closing are serialised between processes by a ``filelock`` on a
sidecar file (``PATH.lock``, left in place).  Every open handle keeps a shared
``flock`` on the data file; a process that can take it exclusively while
holding the sidecar lock knows no other process has the file open:

* the first opener reinitialises the lock area (mutex and semaphores left by a
  previous boot or a killed process are garbage) and, if the file was not
  closed cleanly, runs recovery;
* the last closer syncs everything and marks the file clean.
"""
import fcntl
import os
import secrets
import time

from filelock import FileLock, Timeout

from ._shim import lib
from .errors import Error, LockTimeoutError
from .layout import (HEADER_SIZE, OFF_IDENTITY, OFF_META, OFF_MUTEX, OFF_SEMS, NSEMS, SEM_BYTES,
                     Identity, build_identity, build_meta)


def sidecar_lock(path: str, timeout: float) -> FileLock:
    return FileLock(path + ".lock", timeout=timeout)


def acquire_sidecar(lock: FileLock, path: str) -> None:
    """:raises LockTimeoutError: another process is stuck opening or closing the store."""
    try:
        lock.acquire()
    except Timeout:
        raise LockTimeoutError(f"timed out waiting for {path}.lock: another process is opening or "
                               "closing the store; raise open_timeout or remove a stale lock holder") from None


def open_fd(path: str, flag: str, mode: int) -> int:
    """Open the data file as flag asks; "r" and "w" need it to exist (FileNotFoundError)."""
    flags = os.O_RDWR | os.O_CLOEXEC
    if flag in ("c", "n"):
        flags |= os.O_CREAT
    try:
        return os.open(path, flags, mode)
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"{exc.strerror}: mmkv needs read-write access to the file, "
                                         "even for flag 'r' (its lock lives in the file)", path) from None


def try_exclusive(fd: int) -> bool:
    """True when no other handle has the file open (we now hold the exclusive flock)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def hold_shared(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_SH)


def init_locks(base) -> None:
    """Reinitialise the mutex and the semaphores of the lock area (first opener only)."""
    rc = lib.mmkv_mutex_init(base + OFF_MUTEX)
    if rc:
        raise Error(f"cannot initialise the store mutex: {os.strerror(rc)}")
    for i in range(NSEMS):
        rc = lib.mmkv_sem_init(base + OFF_SEMS + i * SEM_BYTES, 0)
        if rc:
            raise Error(f"cannot initialise semaphore {i}: {os.strerror(rc)}")


def new_identity(page_size: int) -> Identity:
    return Identity(page_size, secrets.randbits(64), secrets.randbits(64), time.time_ns())


def write_new_header(fd: int, ident: Identity, meta) -> None:
    """Write identity and meta copy A of a new file with pwrite (the file is not mapped yet)."""
    os.pwrite(fd, build_identity(ident), OFF_IDENTITY)
    os.pwrite(fd, build_meta(meta, ident), OFF_META[0])
    os.pwrite(fd, bytes(HEADER_SIZE - OFF_META[1]), OFF_META[1])  # meta B and the rest: zero


def fsync_dir(path: str) -> None:
    """Make a new file's directory entry durable."""
    d = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(d)
    finally:
        os.close(d)
