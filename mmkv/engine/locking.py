"""The store lock as one handle uses it: nesting, owner thread, timeouts, reports and triage.

The lock itself is the file's robust, process-shared mutex (``mmkv_lock`` in the C core).
One ``StoreLock`` per handle owns everything around it that used to be spread over the
Store: the nesting depth and owner thread of ``db.lock()``, the policy of waiting
``lock_report_after`` seconds, logging who holds the lock, then waiting the rest of
``lock_timeout``; what a dead holder means (recovery, then the mutex marked consistent);
and the triage of a result code from a fast call that took the lock itself (a lock-free
read or a fused write) before the general path runs.

Concurrency: a handle may be shared by threads.  The mutex serialises them with every other
process; ``depth``/``owner`` (and the view's ``held`` word, which tells the bindings' fast
paths in C that this handle holds the lock) are only written by the thread that holds the
mutex, so the check ``held_here()`` is exact for the calling thread.  Blocking: ``acquire`` waits up to
lock_timeout (None: forever) and raises LockTimeoutError after it; nothing else here waits,
except ``take_for_close``, which also waits for this handle's own threads.
"""
import _thread
import errno
import time

from .core import timeout_ns
from .layout import OFF_MUTEX, STATE_WORD
from .shim import error_for, ffi, lib, raise_for, ENEEDBACK, ESTALE
from ..errors import CorruptionError, Error, LockTimeoutError, RecoveryNeededError


#: Fast-call results after which the general (locked) path runs: nothing was changed and the
#: lock is not held (ESTALE: remap first; ENOBUFS: a value bigger than the buffer (get, pop); ENOSPC,
#: EAGAIN: the file or the index must grow first; ENEEDBACK: released pages must be backed first;
#: ENOENT: an incr of a non-counter).
_RETRY_LOCKED = (ESTALE, errno.ENOSPC, errno.EAGAIN, ENEEDBACK, errno.ENOENT, errno.ENOBUFS)
#: Fused-write results that come from taking the lock: nothing was changed, nothing is held.
_LOCK_FAILURES = (errno.ETIMEDOUT, errno.ENOTRECOVERABLE, errno.EINVAL, errno.EDEADLK, errno.EBADF)


def waited_since(words) -> str:
    """How long the current holder has held the lock (from the state's lock_since_ns)."""
    since = words[STATE_WORD["lock_since_ns"]]
    return f"{(time.monotonic_ns() - since) / 1e9:.1f}s" if since else "an unknown time"


class StoreLock:
    """The store mutex for one handle.

    ``engine``: the handle's Engine (its view carries the shim's wait limit: lock_report_after
    when reports are on, else lock_timeout).  ``dead()``: the exception for a closed or forked
    handle (EBADF from the shim means close() has begun in another thread).
    """

    def __init__(self, engine, lock_timeout, report_after, dead):
        self.engine = engine
        self.path = engine.path
        self.timeout = lock_timeout
        self.report_after = report_after
        self.dead = dead
        self.depth = 0              # db.lock() nesting in the owning thread
        self.owner = None           # that thread's ident
        self.reports = 0            # times this handle logged a long lock holder
        self._local = _thread._local()    # .waited: a fast call already waited report_after

    def held_here(self) -> bool:
        """True when the calling thread holds the lock through this handle."""
        return bool(self.depth) and self.owner == _thread.get_ident()

    def _mine(self) -> None:
        self.depth, self.owner = 1, _thread.get_ident()
        self.engine.set_held(1)         # the bindings' fast paths take the general path meanwhile

    # ------------------------------------------------------------ acquire, release
    def acquire(self) -> None:
        """Take the mutex (nested calls in the holding thread only count); reload the meta if
        another process changed it; repair first if the previous holder died.

        Blocks up to lock_timeout.  :raises LockTimeoutError: held past lock_timeout (the
        message names the holder's pid).  :raises CorruptionError: the mutex is unrecoverable
        (an earlier recovery failed) or recovery fails now.  :raises ClosedError: close()
        began in another thread.
        """
        if self.depth and self.owner == _thread.get_ident():
            self.depth += 1
            return
        eng = self.engine
        v = eng.view
        if getattr(self._local, "waited", False):   # a fast call already waited report_after
            self._local.waited = False
            rc = errno.ETIMEDOUT
        else:
            rc = lib.mmkv_lock(v)
        if rc == errno.ETIMEDOUT and self.report_after is not None:
            rc = self._wait_after_report(v)
        if rc == errno.EOWNERDEAD:
            self.repair_dead_owner()
        elif rc:
            raise self.error(rc)
        if eng.stale():
            try:
                eng.reload()
            except BaseException:
                lib.mmkv_unlock(v)
                raise
        self._mine()

    def _wait_after_report(self, v) -> int:
        """The lock was not free within lock_report_after seconds: log who holds it and for how
        long, then wait for the rest of lock_timeout.  Returns the shim's result."""
        w = self.engine.words
        from . import report          # (logging is imported at the first warning)
        report.warn("mmkv: %s: waited %.1fs for the lock; pid %s has held it for %s",
                    self.path, self.report_after, w[STATE_WORD["lock_pid"]] or "?", waited_since(w))
        self.reports += 1
        rest = None if self.timeout is None else max(0.0, self.timeout - self.report_after)
        saved, v.lock_timeout_ns = v.lock_timeout_ns, timeout_ns(rest)
        try:
            return lib.mmkv_lock(v)
        finally:
            v.lock_timeout_ns = saved

    def release(self) -> None:
        """Undo one acquire; the outermost releases the mutex.  A no-op after close() ran inside
        this thread's lock() block (close unlocked)."""
        if self.engine.view is None:
            return
        self.depth -= 1
        if self.depth == 0:
            self.owner = None
            self.engine.set_held(0)
            raise_for(lib.mmkv_unlock(self.engine.view), f"unlock of {self.path!r}")

    def forget(self) -> None:
        """The handle is closing: nobody holds the lock through it any more."""
        self.depth, self.owner = 0, None
        if self.engine.view is not None:
            self.engine.set_held(0)

    def take_for_close(self) -> bool:
        """Take the mutex for close (True), repairing a dead holder's work; False when another
        process holds it past lock_timeout.  Waits for this handle's own threads that hold it."""
        if self.held_here():
            return True                        # close() inside this thread's lock() block
        eng = self.engine
        while True:
            rc = lib.mmkv_lock_final(eng.view)
            if rc in (0, errno.EOWNERDEAD):
                break
            if rc == errno.ETIMEDOUT and self.owner is not None:
                continue                       # another thread of this handle: it will finish
            return False
        self._mine()
        if rc == errno.EOWNERDEAD:
            self.repair_dead_owner()           # recovery; on failure it unlocks and raises
        elif eng.stale():
            eng.reload()                       # the meta as it is now (journal, file size)
        return True

    # ------------------------------------------------------------ failures
    def repair_dead_owner(self) -> None:
        """We hold the lock its previous owner died with: reload, recover, mark it consistent.
        On failure the mutex is released unmarked: every locker then gets ENOTRECOVERABLE
        (CorruptionError) until every handle is closed and the first opener repairs."""
        eng = self.engine
        try:
            eng.reload()
            from . import recovery        # on first use: not needed to open or read
            recovery.recover(eng, "a process died holding the lock")
        except BaseException:
            lib.mmkv_unlock(eng.view)
            raise
        rc = lib.mmkv_mutex_consistent(eng.fm.base + OFF_MUTEX)
        if rc:
            lib.mmkv_unlock(eng.view)
            raise error_for(rc, "marking the store mutex consistent")

    def error(self, rc: int) -> Exception:
        """The exception for a failed lock call."""
        if rc == errno.EBADF:            # close() has begun in another thread
            return self.dead()
        if rc == errno.ETIMEDOUT:
            pid = self.engine.words[STATE_WORD["lock_pid"]]
            return LockTimeoutError(f"timed out after {self.timeout}s waiting for the lock of "
                                    f"{self.path!r}, held by pid {pid}; raise lock_timeout or stop that process")
        if rc == errno.ENOTRECOVERABLE:
            return CorruptionError(f"the lock of {self.path!r} is unrecoverable (recovery failed earlier); "
                                   "close every handle and reopen: the first opener repairs the store")
        return error_for(rc, f"lock of {self.path!r}")

    def after_fast_read(self, rc) -> None:
        """A lock-free read returned rc (None: not tried, ENOENT already handled): make the
        locked path that follows possible (repair a dead holder, note a reported wait), or
        raise what it means."""
        if rc == errno.EOWNERDEAD:       # the read took the lock a dead process left: repair first
            self.repair_dead_owner()
            lib.mmkv_unlock(self.engine.view)
        elif rc == errno.EBADMSG:
            raise_for(rc, "lookup")
        elif rc == errno.ETIMEDOUT and self.report_after is not None:
            self._local.waited = True    # acquire reports the holder and waits the rest
        elif rc not in (None, ESTALE, errno.ENOBUFS):
            raise self.error(rc)

    def after_fused_write(self, rc: int) -> None:
        """A fused write (one that takes the lock itself) returned rc != 0.  Return when the
        general path should run (nothing changed, the lock released); raise otherwise.  A
        write that failed half way (the lock still held) is repaired first, so the error
        raised leaves the store consistent."""
        if rc in _RETRY_LOCKED:
            return
        if rc == errno.EOWNERDEAD:
            self.repair_dead_owner()
            lib.mmkv_unlock(self.engine.view)
            return
        if rc == errno.ETIMEDOUT and self.report_after is not None:
            self._local.waited = True
            return
        if rc in _LOCK_FAILURES:
            raise self.error(rc)
        self._mine()                     # still held, the write maybe half done: repair, then report
        failed = f"a write failed ({errno.errorcode.get(rc, rc)})"
        try:
            from . import recovery
            recovery.recover(self.engine, failed)
        except Error as exc:
            raise CorruptionError(f"{self.path}: {failed} and recovery could not repair the store: {exc}") from exc
        finally:
            self.release()
        raise_for(rc, "write")


_SEQ_OFF = STATE_WORD["seq"] * 8


class LocklessReads:
    """Consistent reads for a lockless handle (read-only descriptor and mapping), which can
    never take the store mutex: run a read, and keep it only if no writer held the lock
    before, during or after it (the state's sequence word even and unchanged), as the C
    core's lock-free get does.  Every offset the shim reads is bounds-checked and the Python
    layers' walks are bounded, so a read that raced a writer can only be wrong, and a wrong
    one is thrown away and run again.

    Blocking: while a writer holds the lock, a read waits (sleeping, with backoff) up to
    ``timeout`` seconds (None: forever); a long read (an audit, a big batch) that writers
    keep invalidating is retried up to the same limit.  Threads of one handle read one at
    a time (the lookup results live in the shared view).
    """

    def __init__(self, engine, timeout, dead):
        self.engine = engine
        self.timeout = timeout
        self.dead = dead
        self._mutex = _thread.allocate_lock()
        self._word = ffi.new("uint64_t *")      # _seq's output (read() runs one thread at a time)

    def get(self, key: bytes):
        """The value of key, or None: the C core's lock-free get (it spins, GIL released, for a
        moment without a writer), retried with backoff as read() retries.
        :raises RecoveryNeededError, LockTimeoutError: as read()."""
        g = ffi.new("struct mmkv_getbuf *")
        room = [ffi.new("uint8_t[]", 4096)]
        g.buf, g.cap = room[0], 4096

        def attempt(view):
            rc = lib.mmkv_get(view, key, len(key), g)
            if rc == errno.ENOBUFS:              # a bigger value: a buffer of its size
                room[0] = ffi.new("uint8_t[]", g.val_len)
                g.buf, g.cap = room[0], g.val_len
            return rc
        if self._retried(attempt, f"lookup of {bytes(key)[:40]!r}") == errno.ENOENT:
            return None
        return ffi.unpack(ffi.cast("char *", room[0]), g.val_len)

    def get_many(self, keys: list) -> list:
        """The values of keys (bytes; None for an absent one) as of one moment: the core's batch
        read, which polls for a moment without a writer, retried with backoff as read() retries.
        :raises RecoveryNeededError, LockTimeoutError: as read()."""
        from .batchread import BatchRead
        batch = BatchRead(keys)
        self._retried(lambda view: batch.run(view, 1), "batch lookup")
        return batch.values(None)

    def _retried(self, attempt, what: str) -> int:
        """attempt(view)'s result once it is 0 or ENOENT: run again at once after ENOBUFS (attempt
        has made room), and after a writer was active (EAGAIN), a remap (ESTALE) or a dead holder
        (EOWNERDEAD) once read() has waited for the writer (remapped; a dead holder raises), up to
        the timeout.  :raises: the error of any other result (what: the read, for its message)."""
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            view = self.engine.view
            if view is None:                     # closed by another thread meanwhile
                raise self.dead()
            rc = attempt(view)
            if rc in (0, errno.ENOENT):
                return rc
            if rc == errno.ENOBUFS:
                continue
            if rc not in (errno.EAGAIN, ESTALE, errno.EOWNERDEAD):
                raise_for(rc, what)
            if rc == errno.EAGAIN and deadline is not None and time.monotonic() >= deadline:
                raise self.timed_out()
            self.read(_nothing)

    def timed_out(self) -> LockTimeoutError:
        pid = self.engine.words[STATE_WORD["lock_pid"]]
        return LockTimeoutError(
            f"{self.engine.path}: writers kept the store changing for {self.timeout}s (last holder pid {pid}); a "
            "lockless read needs a moment without a writer (one key, or one batch of an iteration): raise "
            "lock_timeout, or read through a handle with write access, which waits for the lock")

    def _seq(self) -> int:
        """The state's sequence word (caller holds self._mutex)."""
        eng = self.engine
        raise_for(lib.mmkv_atomic_load(eng.fm.base, eng.fm.size, _SEQ_OFF, self._word), "read of the sequence word")
        return self._word[0]

    def read(self, fn):
        """fn()'s result, from a moment when no writer was active.

        :raises RecoveryNeededError: the lock's holder died mid-write (only a handle that may
            write can repair).  :raises LockTimeoutError: writers kept the store changing past
            the timeout.  :raises: what fn raises on a read no writer disturbed (damage).
        """
        with self._mutex:
            if self.engine.view is None:
                raise self.dead()
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            delay, tries = 0, 0
            while True:
                s1 = self._seq()
                if not s1 & 1:
                    try:
                        if self.engine.stale():
                            self.engine.reload()
                        result = fn()
                    except Exception:
                        if self._seq() == s1:
                            raise            # nothing changed meanwhile: the file says so
                    else:
                        if self._seq() == s1:
                            return result
                elif lib.mmkv_lock_holder_dead(self.engine.view):
                    pid = self.engine.words[STATE_WORD["lock_pid"]]
                    raise RecoveryNeededError(
                        f"{self.engine.path}: process {pid} died holding the lock, mid-write; this handle "
                        "cannot repair it (opened without write access): any handle that may write repairs "
                        "it when it next takes the lock (or run `mmkv check --repair`)")
                if deadline is not None and time.monotonic() >= deadline:
                    raise self.timed_out()
                time.sleep(delay)        # 0 at first: only yield (a busy writer leaves gaps of microseconds)
                delay = min(max(delay * 2, 0.00002), 0.005) if tries > 16 else 0
                tries += 1


def _nothing():
    return None

