"""The open and close protocol: who is first, who is last, creating a file, refusing what is not one.

Identity.  The protocol keys on the file itself, never on the name it was opened by: its two
locks are open-file-description (OFD) byte locks on the data file (``fcntl(F_OFD_SETLK)``, the
shim's ``mmkv_file_lock``).  A hard link, a symlink, a relative path after ``os.chdir`` all
reach the same inode and so the same locks; nothing is created beside the file.  (The first
version used ``flock`` on a sidecar ``PATH.lock``: one file opened under two names had two
sidecars, so a close through one name could mark the file clean while a process that opened it
through the other was still using it.  An OFD lock is owned by the open file description like a
``flock``, so two opens in one process conflict and a forked child shares its parent's, and it
locks byte ranges, so one file carries both locks.)

* byte 0, the **protocol lock**: exclusive while a process opens or closes the file; opens and
  closes of one file run one at a time.  Released by the system if the process dies.
* byte 1, the **attached lock**: every open handle holds it shared for its whole life.  A process
  that holds the protocol lock and can take byte 1 exclusively knows that no other handle is
  open: it is the *first opener* (open) or the *last closer* (close).

States of the file on disk: ``clean`` (the state's ``dirty`` word holds CLEAN_MARK: the last
closer synced everything and no lock holder died unrepaired, and nothing has changed the file
since but read-only handles, which change nothing but the lock area) or ``dirty`` (anything else).

Open (``open_store``, called by ``Store.__init__``), each step with the protocol lock held from step 2 on:

1. open the path (``O_NONBLOCK``: a FIFO never blocks; nothing is created here); ``fstat`` it and
   refuse anything but a regular file (``NotRegularFileError``).  Missing: ``"r"``/``"w"`` raise
   ``FileNotFoundError``; ``"c"``/``"n"`` build a new store in a temporary file next to the
   target and ``link`` it into place (``EEXIST``: another process created it first; start over).
2. take the protocol lock, then check that the path still names the inode we locked (a
   concurrent ``"n"`` or create may have replaced it while we waited): if not, start over.
3. try byte 1 exclusively: success means first opener.
4. first opener, and the file is empty (``"c"``/``"n"``) or the flag is ``"n"``: replace it with
   a new store by rename (the waiting openers of the old inode fail step 2's check and start
   over), start over once.
5. validate the header and map the file.  First opener: reinitialise the mutex and semaphores
   (memory from a previous boot or a dead process), and run recovery unless the file is clean
   *and* its meta names no journal (a named journal is an unfinished commit: never trust a
   clean mark beside it).  Then (``mark_in_use``) a handle that may write clears the dirty word,
   durably: the first opener always, a later one when the word still holds the clean mark (only
   read-only handles had the file open).  A read-only handle leaves a clean file marked clean
   (a recovery it runs unmarks the file first), so it writes nothing to the disk to open or close.
6. turn byte 1 into a shared lock, release the protocol lock.

Close (``close_store``, called by ``Store.close``):

1. refuse new calls on this handle from other threads and wait for the calls already inside the
   shim without the store lock (``mmkv_view_close``);
2. take the protocol lock;
3. take the store mutex (waiting for this handle's other threads that hold it).  ``EOWNERDEAD``
   (a process died holding it): run recovery now and mark the mutex consistent;
4. try byte 1 exclusively: the last closer, *if it holds the mutex and no journal is named*,
   syncs the whole file, then writes the clean mark and syncs the header (nothing to do when the
   file is still marked clean: only read-only handles had it open, and they changed nothing);
5. release the mutex, unmap, close the descriptor (which releases both byte locks).

Lockless open (``open_lockless``: flag "r" on a file this process may read but not write, or
``lockless=True``).  A read-only descriptor cannot take a write lock, and a read-only mapping
cannot take the mutex, so such a handle takes part only as far as reading allows:

1. open the path O_RDONLY (regular files only, as above);
2. take the protocol lock *shared* (waits while another process opens, closes or shrinks; other
   lockless openers share it), and check that the path still names that inode;
3. test, without taking it, whether any handle that may write holds the attached byte
   (``F_OFD_GETLK``); attach: validate the header and map the file PROT_READ.  A file that is not
   marked clean (or names a journal, or has impossible counters) with no such handle open was left
   by a crash and needs a recovery this handle cannot run: ``RecoveryNeededError``, nothing read;
4. hold the lockless byte shared, release the protocol lock.

It never writes a byte of the file.  It reads lock-free (the sequence word, see mmkv_get) and
retries while a writer holds the lock; a holder that died leaves the word odd, and its reads
raise ``RecoveryNeededError`` until a handle that may write repairs the file (its next lock).
Close releases the descriptor and nothing else.

Interleavings considered (P, Q processes; "dies" is SIGKILL at any instruction):

* P dies holding the store mutex while Q has the file open and closes afterwards: Q's step 3
  gets EOWNERDEAD and repairs before step 4 can mark the file clean.  (The flaw of the sidecar
  version: close never looked at the mutex, so Q marked a half-applied write clean.)
* P dies holding the mutex and nobody else has the file open: the file stays dirty; the next
  first opener recovers.
* P dies during its own close: before the clean mark, the file stays dirty; after it (everything
  was synced first), the mark is true.
* P dies while opening: the protocol lock dies with it; a file P was creating is either absent
  (the temporary file is removed, or left under a temporary name, never the target name) or a
  complete new store.
* P opens while Q closes: the protocol lock orders them; if Q is last, P becomes first after Q
  and finds the file clean (or dirty, and recovers).
* Two first openers at once: impossible, the protocol lock orders them; the second sees byte 1
  held shared by the first.
* P opens by a symlink or hard link while Q uses another name: same inode, same locks.
* P replaces the file ("n", or an empty file under "c") while Q waits for the protocol lock on the
  old inode: Q's step 2 sees the path now names another inode and starts over on the new file.
* A forked child inherits P's descriptors: the child closes its copies at once (the locks stay
  with P's open file description) and its handles refuse every call.
* A lock holder that is alive but stuck while another process closes last: impossible while it
  has the file open (it holds byte 1); if the mutex cannot be taken in time anyway, the closer
  leaves the file dirty rather than mark it clean.
* R opens a clean file read-only (first), then W opens to write: W's step 5 finds the clean mark
  and clears it (durably) before W can change anything, under the protocol lock, so no last
  close can mark the file clean meanwhile; whoever closes last syncs and marks it clean again.
  W dies: the file is dirty, and R (or the next first opener) recovers.
* R, read-only, finds a dead holder (EOWNERDEAD) or impossible counters on a file marked clean:
  recovery unmarks the file, durably, before it repairs anything (``recovery.recover``).
  R dies holding the mutex without having changed anything: the file stays clean, and the
  next first opener reinitialises the mutex.
"""
import errno
import os
import stat
import time

from . import mapping
from .core import new_view
from .shim import error_for, lib
from .tunables import INITIAL_FILE_SIZE
from ..errors import Error, LockTimeoutError, NotRegularFileError
from .layout import (CLEAN_MARK, EPILOGUE_BYTES, HEADER_SIZE, OFF_IDENTITY, OFF_META, OFF_MUTEX, OFF_SEMS, NSEMS,
                     SEM_BYTES, STATE_WORD, Identity, Meta, build_identity, build_meta)

#: The byte of the data file whose exclusive OFD lock serialises opens and closes.
PROTOCOL_BYTE = 0
#: The byte every open handle holds a shared OFD lock on (exclusive: nobody else has it open).
ATTACHED_BYTE = 1
#: The byte every lockless handle (read-only descriptor and mapping) holds shared: the shrink
#: waits until none does.  Lockless handles take no part in "first opener" and "last closer":
#: they never use the mutex, the semaphores or the clean mark those decide about.
LOCKLESS_BYTE = 2


def raise_for_os(rc: int, what: str) -> None:
    if rc:
        raise error_for(rc, what, OSError)


def lock_within(fd: int, byte: int, mode: int, timeout: float) -> bool:
    """Take an OFD lock (mode: lib.MMKV_FLOCK_SHARED or _EXCLUSIVE) on one byte of fd,
    polling with backoff; False after timeout seconds.  :raises OSError: the lock call failed."""
    deadline, delay = time.monotonic() + timeout, 0.0002
    while True:
        rc = lib.mmkv_file_lock(fd, byte, mode)
        if rc == 0:
            return True
        if rc != errno.EAGAIN:
            raise error_for(rc, "lock of the store file", OSError)
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


def take_protocol_lock(fd: int, path: str, timeout: float, shared: bool = False) -> None:
    """Exclusive (or, for a lockless open, shared) lock on the protocol byte (released by
    release_protocol_lock, close or death).

    :raises LockTimeoutError: another process is stuck opening or closing the store.
    """
    mode = lib.MMKV_FLOCK_SHARED if shared else lib.MMKV_FLOCK_EXCLUSIVE
    if not lock_within(fd, PROTOCOL_BYTE, mode, timeout):
        raise LockTimeoutError(f"timed out after {timeout}s waiting to open or close {path!r}: another process "
                               "is opening or closing it; raise open_timeout or find that process")


def release_protocol_lock(fd: int) -> None:
    """:raises OSError: the unlock call failed (a bad descriptor: a bug, never the file's state)."""
    raise_for_os(lib.mmkv_file_lock(fd, PROTOCOL_BYTE, lib.MMKV_FLOCK_UNLOCK), "unlock of the store file")


def try_alone(fd: int) -> bool:
    """True when no other handle has the file open; this description then holds the attached
    byte exclusively (call hold_attached to share it again)."""
    rc = lib.mmkv_file_lock(fd, ATTACHED_BYTE, lib.MMKV_FLOCK_EXCLUSIVE)
    if rc in (0, errno.EAGAIN):
        return rc == 0
    raise error_for(rc, "lock of the store file", OSError)


def hold_attached(fd: int) -> None:
    """Take (or turn an exclusive one into) the shared lock every open handle keeps.

    Never waits: the caller holds the protocol lock, and only a protocol-lock holder takes the
    attached byte exclusively.  :raises OSError: the lock call failed.
    """
    raise_for_os(lib.mmkv_file_lock(fd, ATTACHED_BYTE, lib.MMKV_FLOCK_SHARED), "lock of the store file")


def can_write(path: str) -> bool:
    """False when this process may not open the file at path for writing (permissions, a
    read-only filesystem or mount); True otherwise (also when the path names nothing, or
    something open_store refuses with its own error)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        return exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS)
    os.close(fd)
    return True


def open_lockless(path: str, open_timeout: float, attach, detach) -> int:
    """Run the lockless open above (steps 1 to 4) and return the read-only descriptor.
    ``attach(fd, writers_open)`` is step 3 (validate, map, refuse a file that needs recovery);
    if it raises, ``detach()`` undoes it and the descriptor is closed.

    :raises FileNotFoundError: no file.  :raises PermissionError: not even readable.
    :raises NotRegularFileError: not a regular file.
    :raises LockTimeoutError: another open or close held the protocol lock past open_timeout.
    """
    for _ in range(OPEN_ATTEMPTS):
        fd = open_readable(path)
        try:
            take_protocol_lock(fd, path, open_timeout, shared=True)
            if not same_file(fd, path):                     # replaced while we waited: start over
                os.close(fd)
                continue
            attach(fd, not lock_free(fd, ATTACHED_BYTE))
            raise_for_os(lib.mmkv_file_lock(fd, LOCKLESS_BYTE, lib.MMKV_FLOCK_SHARED), "lock of the store file")
            release_protocol_lock(fd)
        except BaseException:
            detach()
            os.close(fd)
            raise
        return fd
    raise Error(f"could not open {path!r}: it was replaced {OPEN_ATTEMPTS} times while opening; "
                "another process keeps recreating it")


def lock_free(fd: int, byte: int) -> bool:
    """True when no other open file description holds a lock on the byte (takes nothing;
    works on a read-only descriptor).  :raises OSError: the test failed."""
    rc = lib.mmkv_file_lock(fd, byte, lib.MMKV_FLOCK_TEST)
    if rc in (0, errno.EAGAIN):
        return rc == 0
    raise error_for(rc, "lock test of the store file", OSError)


def no_lockless_handles(fd: int) -> bool:
    """True when no lockless handle has the file open (the caller holds the protocol lock, so
    none can open meanwhile)."""
    return lock_free(fd, LOCKLESS_BYTE)


def open_readable(path: str) -> int:
    """A read-only descriptor on the regular file at path.
    :raises FileNotFoundError, PermissionError, NotRegularFileError."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "no store here (flag 'r' needs an existing file; nothing "
                                              "was created)", path) from None
    except IsADirectoryError:
        raise not_regular(path, stat.S_IFDIR) from None
    return regular_or_close(fd, path)


def open_existing(path: str, flag: str) -> int | None:
    """A read-write descriptor on the regular file at path, or None when there is none.

    Opened with O_NONBLOCK so that a FIFO cannot block the open; the type is checked on the
    descriptor itself (no race with a rename).
    :raises NotRegularFileError: a directory, device, FIFO or socket.
    :raises PermissionError: the file is not writable (flag "r" opens such a file lockless).
    :raises OSError: EROFS, a read-only filesystem (likewise).
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except IsADirectoryError:
        raise not_regular(path, stat.S_IFDIR) from None
    except PermissionError as exc:
        raise PermissionError(exc.errno, f"{exc.strerror}: flag {flag!r} needs read-write access to the file "
                                         "(flag 'r' opens it read-only)", path) from None
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        raise OSError(exc.errno, f"{exc.strerror}: flag {flag!r} needs to write; flag 'r' opens a store on a "
                                 "read-only filesystem", path) from None
    return regular_or_close(fd, path)


def regular_or_close(fd: int, path: str) -> int:
    """fd, when it is open on a regular file (checked on the descriptor itself: no race with a
    rename); else it is closed.  :raises NotRegularFileError: a device, FIFO, socket..."""
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def not_regular(path: str, mode: int) -> NotRegularFileError:
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a regular file")
    return NotRegularFileError(errno.EINVAL, f"this is {kind}: an mmkv store must be a regular file "
                                             "(nothing was changed)", path)


def same_file(fd: int, path: str) -> bool:
    """True when path (following symlinks) still names the file open on fd."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def temporary_name(target: str) -> str:
    """A name beside target for a file under construction (same directory: same filesystem)."""
    folder, name = os.path.split(target)
    return os.path.join(folder, f".{name}.mmkv-new-{os.getpid()}-{os.urandom(4).hex()}")


def publish(tmp: str, target: str, replace: bool) -> bool:
    """Give the finished file tmp the name target: atomically, and only if target does not exist
    unless replace.  Returns False when another process created target first (tmp is removed).
    """
    try:
        if replace:
            os.replace(tmp, target)
            return True
        try:
            os.link(tmp, target)           # fails if target exists: never clobber a new store
        except FileExistsError:
            return False
        except OSError as exc:             # a filesystem without hard links
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)                   # claim the name, then move the finished file over it
            os.replace(tmp, target)
            return True
        return True
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def init_locks(base) -> None:
    """Reinitialise the mutex and the semaphores of the lock area (first opener only)."""
    rc = lib.mmkv_mutex_init(base + OFF_MUTEX)
    if rc:
        raise error_for(rc, "initialising the store mutex")
    for i in range(NSEMS):
        rc = lib.mmkv_sem_init(base + OFF_SEMS + i * SEM_BYTES, 0)
        if rc:
            raise error_for(rc, f"initialising semaphore {i}")


def mark_in_use(eng, first: bool, writable: bool) -> None:
    """Open step 5's end: the dirty word of a handle that may write.

    A handle that may write clears it and makes that durable before it can change anything:
    the first opener always, a later opener when the word still holds the clean mark (only
    read-only handles had the file open since the last clean close).  A read-only handle
    leaves it as it is: it changes nothing but the lock area (which every first opener
    reinitialises), and a recovery it runs unmarks the file itself first.  So a read-only
    open and close of a clean file write nothing to the disk (the msync of the header
    page here, and the close's whole-file msync, fsync and clean mark, were about 1 ms of a
    fresh process's open, more on a busy disk).  Caller holds the protocol lock: no last
    closer marks the file clean in between.
    """
    if writable:
        eng.mark_dirty(always=first)


def new_identity(page_size: int) -> Identity:
    seed = os.urandom(16)      # the per-file SipHash key: unpredictable, so no collision flooding
    return Identity(page_size, int.from_bytes(seed[:8], "little"), int.from_bytes(seed[8:], "little"),
                    time.time_ns())


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


#: Times an open starts over because another process replaced the file meanwhile.
OPEN_ATTEMPTS = 100


def open_store(path: str, flag: str, mode: int, open_timeout: float, attach, detach) -> tuple:
    """Run the open protocol above (steps 1 to 6) on the absolute path and return
    (descriptor, first opener?).  ``attach(fd, first)`` is step 5 (validate, map, recover);
    if it raises, ``detach()`` undoes it, the descriptor is closed (releasing both locks)
    and the error propagates.  Blocks up to open_timeout for another process's open or close.

    :raises FileNotFoundError: no directory, or no file and flag "r"/"w" (nothing created).
    :raises NotRegularFileError: the path names a device, FIFO, socket or directory.
    :raises LockTimeoutError: another open or close held the protocol lock past open_timeout.
    :raises Error: the file was replaced OPEN_ATTEMPTS times while opening.
    """
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):   # dbm raises too; nothing is created
        raise FileNotFoundError(errno.ENOENT, f"no such directory: {folder}", path)
    created = False
    for _ in range(OPEN_ATTEMPTS):
        fd = open_existing(path, flag)
        if fd is None:
            if flag not in ("c", "n"):
                raise FileNotFoundError(errno.ENOENT, f"no store here (flag {flag!r} needs an existing file; "
                                                      "nothing was created)", path)
            create_store_file(path, mode, replace=False)    # False: another process created it first
            created = True
            continue
        try:
            take_protocol_lock(fd, path, open_timeout)
            if not same_file(fd, path):                     # replaced while we waited: start over
                os.close(fd)
                continue
            first = try_alone(fd)
            if first and flag in ("c", "n") and (os.fstat(fd).st_size == 0 or (flag == "n" and not created)):
                create_store_file(path, mode, replace=True)  # waiting openers see a new inode: they start over
                created = True
                os.close(fd)
                continue
            attach(fd, first)
            hold_attached(fd)
            release_protocol_lock(fd)
        except BaseException:
            detach()
            os.close(fd)                                     # releases both byte locks
            raise
        return fd, first
    raise Error(f"could not open {path!r}: it was replaced {OPEN_ATTEMPTS} times while opening; "
                "another process keeps recreating it")


def create_store_file(path: str, mode: int, replace: bool) -> None:
    """Build a new, empty store beside the path's target and give it the target's name:
    atomically, and (replace false) only if no file has that name yet.  A symlink is followed.
    Nothing is left behind on failure.  :raises DiskFullError: no room for the first 256 KiB."""
    from . import index        # on first use: opening an existing store needs neither
    from .allocator import Allocator
    target = os.path.realpath(path)
    page = os.sysconf("SC_PAGE_SIZE")
    tmp = temporary_name(target)
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        size = max(INITIAL_FILE_SIZE, HEADER_SIZE + page)
        mapping.grow_file(fd, size)     # looked up at each call: tests simulate a full disk here
        ident = new_identity(page)
        write_new_header(fd, ident, Meta(0, size, 0, 0))
        fm = mapping.FileMap(fd, size)
        try:
            view = new_view(fm, ident, False, None)
            alloc = Allocator(fm, view)
            alloc.format(size - EPILOGUE_BYTES)
            dir_off, dir_bits = index.create(alloc.alloc, lambda: view, lambda: fm.words)   # a fresh heap: no growth
            raw = build_meta(Meta(1, size, dir_off, dir_bits), ident)
            fm.mm[OFF_META[0]:OFF_META[0] + len(raw)] = raw
            init_locks(fm.base)
            fm.words[STATE_WORD["dirty"]] = CLEAN_MARK
            fm.sync()
        finally:
            fm.close()
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    os.close(fd)
    if publish(tmp, target, replace):        # publish removes tmp whatever happens
        fsync_dir(target)


def close_store(eng, lock, open_timeout: float) -> None:
    """Close steps 2 to 5 above for the handle whose engine and StoreLock are given (step 1,
    refusing new calls, is the caller's; so is closing the descriptor, which releases both
    byte locks).  The last closer that holds the store mutex, with no journal named, syncs
    the whole file and writes the clean mark (the "last close" row of the README's commit
    orders), unless the file is still marked clean (read-only handles only: nothing to sync).  Blocks up to open_timeout for the protocol lock and lock_timeout for the mutex;
    when either cannot be had, the file simply stays marked for recovery (logged).
    :raises: what recovery raises if a dead holder's work cannot be repaired.
    """
    fd = eng.fd
    try:
        take_protocol_lock(fd, eng.path, open_timeout)
    except LockTimeoutError:       # no protocol: cannot know if last; leave it for recovery
        from . import report       # on first use, as logging itself: import mmkv needs neither
        report.warn("mmkv: %s: closing without the open/close lock; the file stays marked for recovery",
                    eng.path)
        lock.forget()
        return
    held = False
    try:
        held = lock.take_for_close()
        if held and try_alone(fd) and not eng.meta.journal_off and not eng.marked_clean():
            eng.fm.sync()              # last one out: everything durable, then the clean mark
            os.fsync(fd)
            eng.words[STATE_WORD["dirty"]] = CLEAN_MARK
            eng.fm.sync(0, HEADER_SIZE)
    finally:
        if held:
            lib.mmkv_unlock(eng.view)
        lock.forget()
