"""Online backup: a point-in-time, compact, audited copy of a store that other processes keep using.

Steps (``backup``):

1. a temporary file beside the destination (same folder: same filesystem, so the last step is a
   link), as long as the store's file, holes kept;
2. **under the store lock** (every writer in every process waits; readers do not): the file's
   bytes, as the page cache holds them (coherent with every process's MAP_SHARED mapping, so
   every acknowledged write is in), are copied into it by the kernel (``copy_file_range``, data
   extents only: ``SEEK_DATA``/``SEEK_HOLE`` skip the pages the store released).  The copy is the
   store at the moment the lock was taken.  This is the only wait writers see: O(bytes in use);
3. the lock is released; the copy is opened as a store of its own: its first open finds it "not
   closed cleanly" and runs recovery (verifying every record's checksum), then it is compacted
   (alone: it shrinks), audited (``check``), closed (synced, marked clean) and fsynced;
4. it is linked to the destination name (never over an existing file) and the folder fsynced.

Any failure removes the temporary file; the live store is only read.
"""
import errno
import os
import time

from .errors import DiskFullError

#: Bytes per copy_file_range call (the lock is held across all of them).
COPY_CHUNK = 64 << 20


def backup(hold, fd: int, file_size, dest: str, open_store, progress=None) -> dict:
    """Write a compact copy of the store open on ``fd`` to the new file ``dest``.

    ``hold()``: a context manager holding the store lock (``Store.lock``); ``file_size()``: the
    file size the meta names (read under the lock); ``open_store(path, flag)``: opens a store
    (``mmkv.open``); ``progress(done, total)``: called as bytes are copied, and then as the copy
    is compacted.  Returns what was done: bytes copied, seconds under the lock (what writers
    waited), total seconds, the copy's keys and size.

    Blocks: other processes' writes wait for step 2 (the copy: about 1.6 s per GB from the page
    cache on this machine, more from disk); reads do not wait.
    :raises FileExistsError: dest exists (nothing is created).  :raises FileNotFoundError: no
        such folder.  :raises DiskFullError, OSError: no room for the copy (nothing is left).
    :raises CorruptionError: the copy fails its audit (the store itself should be checked).
    """
    from .engine.opening import fsync_dir, publish, temporary_name
    t0 = time.monotonic()
    dest = os.path.abspath(os.fspath(dest))
    if os.path.lexists(dest):
        raise FileExistsError(errno.EEXIST, "the backup's destination exists (nothing was written)", dest)
    if not os.path.isdir(os.path.dirname(dest)):
        raise FileNotFoundError(errno.ENOENT, "no such folder for the backup", dest)
    tmp = temporary_name(dest)
    out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with hold():
            locked = time.monotonic()
            size = file_size()
            os.ftruncate(out, size)
            copied = copy_data(fd, out, size, progress)
            held = time.monotonic() - locked
        os.close(out)
        out = -1
        with open_store(tmp, "w") as copy:
            recovered = copy.last_recovery
            compacted = copy.compact(progress)
            report = copy.check()
            keys = len(copy)
        fd2 = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd2)
        finally:
            os.close(fd2)
        if not publish(tmp, dest, replace=False):      # (publish removes tmp whatever happens)
            raise FileExistsError(errno.EEXIST, "the backup's destination appeared meanwhile (nothing was "
                                                "written there)", dest)
        fsync_dir(dest)
    except BaseException as exc:
        if out >= 0:
            os.close(out)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT) \
                and not isinstance(exc, DiskFullError):
            raise DiskFullError(exc.errno, f"no room for the backup ({exc.strerror}); nothing was left behind",
                                dest) from exc
        raise
    return {"bytes_copied": copied, "lock_seconds": held, "seconds": time.monotonic() - t0, "keys": keys,
            "file_size": compacted["file_size_after"], "source_file_size": size,
            "records_verified": recovered.records if recovered is not None else None, "report": report}


def copy_data(src: int, dst: int, size: int, progress=None) -> int:
    """Copy the data extents of src's first size bytes to the same offsets of dst (holes stay
    holes); returns the bytes copied.  In-kernel (copy_file_range) where the kernel and
    filesystem allow, else read and write.  :raises OSError: ENOSPC and other write failures."""
    copied, off = 0, 0
    while off < size:
        try:
            start = os.lseek(src, off, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:       # ENXIO: only a hole after off
                raise
            break
        if start >= size:
            break
        end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        copied += _copy_range(src, dst, start, end, progress, size, copied)
        off = end
    return copied


def _copy_range(src: int, dst: int, start: int, end: int, progress, size: int, before: int) -> int:
    pos = start
    while pos < end:
        n = min(COPY_CHUNK, end - pos)
        try:
            done = os.copy_file_range(src, dst, n, pos, pos)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, n, pos)
            done = len(data)
            view = memoryview(data)
            while view:
                view = view[os.pwrite(dst, view, pos + done - len(view)):]
        if done == 0:
            raise OSError(errno.EIO, f"the store file ended at {pos} while its meta names {size} bytes")
        pos += done
        if progress is not None:
            progress(before + pos - start, size)
    return end - start
