"""Store: the dict-like handle on one mmkv file.

Concurrency: every write takes the file's robust, process-shared mutex for its whole
duration, so each call is atomic with respect to every other process and thread, and a
write is visible to all other handles as soon as the call returns.  Reads of one key
(``db[k]``, ``get``, ``in``) are lock-free while no writer is active (a sequence word tells them to
retry, see ``mmkv_get``) and otherwise wait for the lock; reads of many keys (iteration,
``len``, ``items``) take the lock while they collect.  A handle may be used from several
threads; it must not be used after ``fork`` (ForkedHandleError: open the store again in
the child).  Two handles on the same file in one thread must not be nested inside
``db.lock()``: the second would wait for the first.

Every call that locks may raise LockTimeoutError (another process held the lock longer
than lock_timeout; the message names its pid), ClosedError (the handle is closed, also by
another thread) or ForkedHandleError; every write raises ReadOnlyError on a handle opened
with flag "r", and CorruptionError when the file is damaged beyond what recovery repairs in
place.  The docstrings below name only what a call adds to these.

A *lockless* handle (flag "r" on a file this process may read but not write, or
``lockless=True``) maps the file read-only and never writes a byte of it, not even the lock:
every read is lock-free, waits (up to lock_timeout) while a writer holds the lock and retries
when a writer changed the store under it, and raises RecoveryNeededError where a crash left
work only a writer can repair.  ``lock()`` and ``transaction()`` raise ReadOnlyError on it.
"""
from __future__ import annotations

import _thread
import _weakref
import errno
import os
from itertools import chain
from _collections_abc import ItemsView, MutableMapping, ValuesView   # (collections.abc, loaded at start-up)
from .engine.core import Engine, timeout_ns
from .engine.locking import LocklessReads, StoreLock
from .engine.mapping import disk_bytes
from .engine.shim import BINDING, ENEEDBACK, ffi, lib, raise_for  # noqa: F401 (mmkv.store.BINDING: the binding in use)
from .engine.shim import fast as _fast
from .errors import (ClosedError, CorruptionError, DiskFullError, Error, ForkedHandleError, LimitError,
                     NotACounterError, ReadOnlyError, RecoveryNeededError)
from .engine.layout import (CLEAN_MARK, DEADLINE_BYTES, HEADER_SIZE, MASK64, REC_COUNTER, REC_EXPIRES, STATE_WORD,
                            record_size)
from .engine import opening
from .engine import tunables
from .expiry import ManualClock, check_ttl, deadline_after
from .engine.tunables import LOCK_REPORT_AFTER, LOCK_TIMEOUT, OPEN_TIMEOUT

SYNC_MODES = ("none", "full")
FLAGS = ("r", "w", "c", "n")

_GEN = STATE_WORD["generation"]
_COUNT = STATE_WORD["count"]
_LIVE = STATE_WORD["live_bytes"]
_DIRTY = STATE_WORD["dirty"]
_TRY_LOCK = lib.MMKV_TRY_LOCK


def _expired(view, now: int) -> bool:
    """The record the view last described (a lookup, a verify) has a deadline, and now is past it."""
    return bool(view.rec_flags & REC_EXPIRES) and view.deadline <= now
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
#: Bytes a record's block may add to the record (header, footer room, rounding): for estimates.
BLOCK_OVERHEAD = 32
_EVEN_U64 = MASK64 - 1
#: Errors a write raises before it changes anything (so no repair is needed).
_CLEAN_ERRORS = (KeyError, TypeError, ValueError, OverflowError, LimitError, NotACounterError, ReadOnlyError,
                 DiskFullError)
TYPE_CHECKING = False       # (typing is not imported at run time: import mmkv stays cheap)
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator, Mapping
    from typing import Any, TypeVar, overload

    #: What a key or value may be: str is stored UTF-8; the others as they are.
    Bytes = bytes | bytearray | memoryview | str
    _T = TypeVar("_T")
    _MutableMapping = MutableMapping[bytes, bytes]

    class _Binding:
        """The per-call operations as the bindings give them (C or cffi), for type checkers."""
        def __getitem__(self, key: Bytes) -> bytes: ...
        @overload
        def get(self, key: Bytes) -> bytes | None: ...
        @overload
        def get(self, key: Bytes, default: bytes | _T) -> bytes | _T: ...
        def get(self, key: Bytes, default: Any = None) -> Any: ...
        def __contains__(self, key: object) -> bool: ...
        def __len__(self) -> int: ...
        def __setitem__(self, key: Bytes, value: Bytes) -> None: ...
        def __delitem__(self, key: Bytes) -> None: ...
        @overload
        def pop(self, key: Bytes) -> bytes: ...
        @overload
        def pop(self, key: Bytes, default: bytes | _T) -> bytes | _T: ...
        def pop(self, key: Bytes, *default: Any) -> Any: ...
        def incr(self, key: Bytes, delta: int = 1) -> int: ...
        def cas(self, key: Bytes, expected: Bytes | None, new: Bytes | None) -> bool: ...
        @overload
        def get_many(self, keys: Iterable[Bytes]) -> list[bytes | None]: ...
        @overload
        def get_many(self, keys: Iterable[Bytes], default: bytes | _T) -> list[bytes | _T]: ...
        def get_many(self, keys: Iterable[Bytes], default: Any = None) -> list[Any]: ...
else:
    _MutableMapping = MutableMapping
    #: The binding of the per-call operations (see engine/shim.py): the C type, or its cffi twin.
    if _fast is None:
        from .cffi_binding import CffiCalls as _Binding
    else:
        _Binding = _fast.Handle


#: id(store) -> weak reference, for every open handle (the fork handler drops them in a child).
_open_stores = {}


def _track(store) -> None:
    key = id(store)
    _open_stores[key] = _weakref.ref(store, lambda _, key=key: _open_stores.pop(key, None))


def _untrack(store) -> None:
    _open_stores.pop(id(store), None)


def _after_fork_in_child():
    """In a forked child, inherited handles are dead: every call raises ForkedHandleError.

    Their descriptors (the store's and the ones each mmap keeps) are closed in the
    child at once: they share the parent's open file description, and with it the
    flock that tells who has the file open, so an idle child holding them would keep
    the parent's lock alive after the parent closed (and block the next opener).
    """
    for store in [ref() for ref in list(_open_stores.values())]:
        if store is None:
            continue
        store._forked = True
        store._forget_namespaces()
        store._unbind()                                     # before the mapping goes
        store._view = None
        try:
            if store._engine is not None:
                store._engine.close()
            if store._fd is not None:
                os.close(store._fd)
        except OSError:
            pass
        store._engine = None
        store._fd = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class Store(_Binding, _MutableMapping):
    """A persistent, process-shared mapping of bytes to bytes; see ``mmkv.open``."""

    # a handle compares and hashes by identity (comparing contents would read the whole file)
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, path: str | bytes | os.PathLike[str] | os.PathLike[bytes], flag: str = "c",
                 sync: str = "none", mode: int = 0o600,
                 lock_timeout: float | None = LOCK_TIMEOUT, open_timeout: float = OPEN_TIMEOUT,
                 lock_report_after: float | None = LOCK_REPORT_AFTER, lockless: bool = False,
                 clock: ManualClock | None = None):
        if flag not in FLAGS:
            raise ValueError(f"flag must be one of {FLAGS}, not {flag!r}")
        if lockless and flag != "r":
            raise ValueError(f"lockless=True is a read-only open: flag must be 'r', not {flag!r}")
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
        if clock is not None and not isinstance(clock, ManualClock):
            raise TypeError(f"clock must be an mmkv.ManualClock or None, not {type(clock).__name__}")
        self._clock = clock      # expiry's clock (None: the wall clock); see mmkv/expiry.py
        self.path = os.path.abspath(os.fsdecode(os.fspath(path)))   # resolved once: chdir changes nothing
        self.flag = flag
        self.sync_mode = sync
        self._full = sync == "full"
        self._readonly = flag == "r"
        self._lockless = False   # set by _open: a read-only mapping that never takes the lock
        self._reads = None       # its LocklessReads
        self._engine = None      # the mapped file beneath this handle (mmkv.engine.core.Engine)
        self._view = None        # self._engine.view (one object for the handle's life), for the hot paths
        self._fd = None
        self._forked = False
        self._lock = None        # the StoreLock (mmkv.engine.locking), made at attach
        self._txn = None         # the transaction in progress on this handle
        self._namespaces = {}    # name -> the Namespace handle given out (mmkv/namespace.py)
        self._close_guard = _thread.allocate_lock()
        timeout_ns(lock_timeout)    # reject bad timeouts before touching anything
        timeout_ns(lock_report_after)
        self._report_after = lock_report_after
        if lock_report_after is not None and lock_timeout is not None and lock_report_after >= lock_timeout:
            self._report_after = None                   # the timeout comes first: nothing to report
        self._open(flag, mode, lock_timeout, open_timeout, lockless)
        _track(self)

    # ================================================================ open / close
    # The protocol, its states and the interleavings considered: mmkv/opening.py.

    def _open(self, flag, mode, lock_timeout, open_timeout, lockless):
        """Open (or create) the file and attach to it: opening.open_store runs the protocol
        and calls back _attach (header, mapping, first-opener recovery) at its step 5;
        opening.open_lockless, for a read-only handle without write access, _attach_lockless."""
        self._open_timeout = open_timeout

        def attach(fd, first):
            self._fd = fd
            self._attach(lock_timeout, first)

        def attach_lockless(fd, writers_open):
            self._fd = fd
            self._attach_lockless(lock_timeout, writers_open)

        def detach():
            self._detach()
            self._fd = None

        if flag == "r" and (lockless or not opening.can_write(self.path)):
            self._lockless = True
            opening.open_lockless(self.path, open_timeout, attach_lockless, detach)
            return
        fd, first = opening.open_store(self.path, flag, mode, open_timeout, attach, detach)
        if flag == "n" and not first:
            self.clear()
            for name in self.namespaces():      # a new empty store: no namespace either (mmkv's own stays)
                self.drop_namespace(name)

    def _attach(self, lock_timeout, first):
        """Map the file (the engine validates the header) and, as first opener, reset the
        locks and recover when the file was not closed cleanly or its state does not add up."""
        eng = self._engine = Engine(self.path, self._fd, self._full)
        # the shim waits at most until it is time to report the holder; the rest is _acquire's
        eng.attach(lock_timeout if self._report_after is None else self._report_after, first, self._readonly)
        self._set_clock(eng.view)
        self._view = eng.view
        # the binding serves the per-call operations from this view (the C one keeps eng.view, the
        # cffi object owning it, alive while it is bound)
        self._bind(eng.view, int(ffi.cast("uintptr_t", eng.view)), self._readonly)
        self._lock = StoreLock(eng, lock_timeout, self._report_after, self._dead)
        if first:
            w = eng.words
            opening.init_locks(eng.fm.base)
            w[STATE_WORD["seq"]] = (w[STATE_WORD["seq"]] + 2) & _EVEN_U64   # no lock holder: even; wraps
            reason = ("the file was not closed cleanly" if w[_DIRTY] != CLEAN_MARK else
                      "its meta names a journal" if eng.meta.journal_off else    # an unfinished commit
                      "its counters are impossible" if not eng.state_plausible() else None)
            if reason:
                from .engine import recovery
                self._acquire()
                try:
                    recovery.recover(eng, reason)
                finally:
                    self._release()
        # a handle that may write marks the file "not clean" (durably) until the last one closes
        opening.mark_in_use(eng, first, not self._readonly)

    def _attach_lockless(self, lock_timeout, writers_open):
        """Map the file read-only.  With no handle that may write open, a file a crash left
        unrepaired is refused: only a writer can recover it.

        :raises RecoveryNeededError: not marked clean (or a journal named, or impossible
            counters) and no handle that may write has it open."""
        eng = self._engine = Engine(self.path, self._fd, self._full, writable=False)
        eng.attach(lock_timeout, False, True)
        self._set_clock(eng.view)
        if not writers_open:
            reason = ("was not closed cleanly" if eng.words[_DIRTY] != CLEAN_MARK else
                      "names an unfinished commit" if eng.meta.journal_off else
                      "has impossible counters" if not eng.state_plausible() else None)
            if reason:
                raise RecoveryNeededError(
                    f"{self.path}: the file {reason} and needs recovery, which this handle cannot run (no "
                    "write access): open it once with write access, or run `mmkv check --repair`")
        self._view = eng.view
        self._bind(eng.view, int(ffi.cast("uintptr_t", eng.view)), True)
        self._lock = StoreLock(eng, lock_timeout, None, self._dead)
        self._reads = LocklessReads(eng, lock_timeout, self._dead)

    def _set_clock(self, view):
        if self._clock is not None:
            view.clock = self._clock._cell      # the cell lives as long as self._clock, which we hold

    def _reload(self):
        """Another process changed the meta (growth, new index): load it (under the lock)."""
        self._engine.reload()

    def _forget_namespaces(self):
        """Unbind the Namespace handles given out (before the mapping goes): their calls then
        raise what this handle's raise."""
        for ns in self._namespaces.values():
            ns._detach_namespace()
        self._namespaces.clear()

    def _detach(self):
        self._forget_namespaces()
        self._unbind()
        if self._engine is not None:
            self._engine.close()
        self._engine = self._view = None

    def close(self) -> None:
        """Close the handle; the last handle on the file syncs it and marks it clean.

        Concurrency: calls in other threads on this handle either finish first or raise
        ClosedError; close waits for those running (a call waiting for the store lock ends
        within its lock_timeout) and for another thread's ``lock()`` or transaction block.
        If a process died holding the store lock, close repairs its work first (recovery),
        so the clean mark is never written over a half-done write.  Safe to call twice and
        from several threads.  In a forked child it only drops the child's copy.
        :raises: what recovery raises if a dead holder's work cannot be repaired (the handle
            is closed anyway and the file stays marked for recovery).
        """
        if self._forked:          # the child's copy: drop it, touch nothing shared
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            return
        with self._close_guard:
            view = self._view
            if view is None:
                return
            lib.mmkv_view_close(view)          # new unlocked calls: EBADF; wait for those inside the shim
            for ns_view in self._engine.ns_views.values():      # (and through the namespaces' views)
                lib.mmkv_view_close(ns_view)
            fd = self._fd
            try:
                if not self._lockless:         # a lockless handle wrote nothing: nothing to close but the fd
                    opening.close_store(self._engine, self._lock, self._open_timeout)
            finally:
                self._detach()
                self._fd = None
                os.close(fd)                   # releases the protocol and attached locks
                _untrack(self)

    # ================================================================ for mmkv's own layers
    @property
    def engine(self) -> Any:
        """The engine beneath this handle (``mmkv.engine.core.Engine``: mapping, view,
        allocator, meta).  For mmkv's own Queue, CLI, tests and crash kit; not a stable API.
        :raises ClosedError, ForkedHandleError: the handle is closed or was forked."""
        if self._engine is None:
            raise self._dead()
        return self._engine

    @property
    def readonly(self) -> bool:
        """True when the handle was opened with flag "r"."""
        return self._readonly

    @property
    def lockless(self) -> bool:
        """True when the handle maps the file read-only and never takes the lock (flag "r"
        without write access to the file, or lockless=True): it never writes a byte of it."""
        return self._lockless

    @property
    def last_recovery(self) -> Any:
        """What the last recovery run through this handle found (a RecoveryResult), or None."""
        return None if self._engine is None else self._engine.last_recovery

    def lock_held(self) -> bool:
        """True when the calling thread holds the store lock through this handle (inside
        ``lock()`` or ``transaction()``): a blocking wait there would deadlock."""
        return self._lock is not None and self._lock.held_here()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        try:
            if self._view is not None and not self._forked:
                self.close()
        except Exception:
            pass

    def __repr__(self):
        state = "closed" if self._view is None else f"flag={self.flag!r} sync={self.sync_mode!r}"
        return f"<mmkv.Store {self.path!r} {state}>"

    # ================================================================ locking
    def _dead(self):
        if self._forked:
            return ForkedHandleError(f"this mmkv handle on {self.path!r} was opened before fork(); "
                                     "call mmkv.open again in the child process")
        return ClosedError(f"the mmkv handle on {self.path!r} is closed")

    def _alive(self):
        """:raises ClosedError, ForkedHandleError: the handle is closed or was forked."""
        if self._forked or self._view is None:
            raise self._dead()

    def _acquire(self):
        """Take the store lock for this thread (see StoreLock.acquire).
        :raises ReadOnlyError: a lockless handle (it may not write the lock)."""
        self._alive()
        if self._lockless:
            raise ReadOnlyError(f"{self.path!r} is open lockless (read-only, without write access): it cannot take "
                                "the store lock, so lock() and transaction() are not available")
        self._lock.acquire()

    def _consistently(self, read):
        """read() as of one moment: under the store lock, or, on a lockless handle, retried
        until no writer was active around it (LocklessReads.read: waits up to lock_timeout)."""
        if self._lockless:
            self._alive()
            return self._reads.read(read)
        self._acquire()
        try:
            return read()
        finally:
            self._release()

    def _release(self):
        if self._lock is not None:
            self._lock.release()

    def lock(self) -> _LockBlock:
        """Hold the store lock for a block of calls on this handle (a read-modify-write, say):
        ``with db.lock(): ...``.

        Other processes and threads wait (up to their lock_timeout) until the block ends;
        calls on this handle inside the block do not wait.  Nothing is rolled back on
        an exception: use ``transaction()`` for all-or-nothing.
        """
        return _LockBlock(self)

    def transaction(self) -> _TransactionBlock:
        """All-or-nothing: ``with db.transaction(): ...``; the writes in the block are applied
        together, or (on an exception, or a crash before the commit point) not at all.

        Holds the store lock from the start of the block to the end of the commit: other
        processes' calls wait (up to their lock_timeout) — keep blocks short.  Reads in the
        block see its own writes.  A nested transaction() joins the outer one (one commit at
        the outermost exit).  clear() is not allowed inside.  With sync="full" the commit is
        on disk when the block exits.  :raises: whatever the block raises (nothing is applied).
        :raises DiskFullError: no room for the commit's records or journal; nothing is applied
            and no space is lost (a transaction of one write is then done as a plain write).
        """
        return _TransactionBlock(self)

    def _begin(self):
        """Enter a transaction block: True when it joins one this thread has open."""
        self._writable()
        if self._txn is not None and self._lock.held_here():
            return True
        self._acquire()
        from .engine import transaction
        self._txn = transaction.Transaction(self._now)
        return False

    def _end(self, failed: bool) -> None:
        """Leave the outermost transaction block: drop it (failed) or commit it, then unlock."""
        txn, self._txn = self._txn, None
        if failed:
            self._release()
            return
        if self._view is None:          # the block closed the handle: nothing was applied
            raise self._dead()
        from .engine import transaction
        try:
            transaction.commit(self._engine, txn, self._put, self._delete)
        except BaseException as exc:
            self._abort_write(exc)
            raise
        finally:
            self._release()

    def _writable(self):
        if self._readonly:
            raise ReadOnlyError(f"{self.path!r} was opened with flag 'r'; open it with 'w' or 'c' to write")

    # ================================================================ reads
    # The per-call operations (db[k], get, in, len, db[k] = v, del, pop, incr, update's loop) are
    # the binding's: mmkv._fast.Handle (C) or cffi_binding.CffiCalls, this class's base.  Each
    # tries the core's one-call fast path and hands the rest (inside db.lock(), a remap, growth,
    # a split, a dead holder, a timeout, a closed handle) to the *_slow methods here, with the
    # core's result code (None: not tried because this handle holds the lock).
    def _read_slow(self, rc, k):
        """Finish a read the fast path could not (rc None: not tried); the value or None."""
        if rc == errno.ENOENT:
            return None
        if self._lockless:  # EAGAIN (a writer was active), ESTALE (remap), ENOBUFS, EOWNERDEAD
            if rc == errno.EBADMSG:     # (the core returns it only when no writer was active: damage)
                raise_for(rc, f"lookup of {bytes(k)[:40]!r}")
            self._alive()
            return self._reads.get(k)
        self._lock.after_fast_read(rc)
        self._acquire()     # remap, a value bigger than the buffer, inside db.lock(), after repair
        try:
            return self._lookup(k)
        finally:
            self._release()

    def _lookup(self, k):
        """Value of k or None (a transaction's own writes first); caller holds the lock."""
        if self._txn is not None:
            written, value = self._txn.lookup(k)
            if written:
                return value
        v = self._view
        rc = lib.mmkv_find(v, k, len(k))
        if rc == errno.ENOENT:
            return None
        raise_for(rc, "lookup")
        # damaged bytes are never returned as a value (the fast path checks in C)
        raise_for(lib.mmkv_record_verify_contents(v, v.rec_off), f"record of key {bytes(k)[:40]!r}")
        if _expired(v, self._now()):
            if self._txn is None and not self._readonly:    # the lock is held: space back on access
                raise_for(lib.mmkv_reap(v, k, len(k), 0), "reap")
            return None
        return self._engine.fm.mm[v.val_off:v.val_off + v.val_len]

    def _reap(self, k):
        """A lock-free read found k's record expired: reclaim it, if the lock is free right now
        (never waits: a read must not).  A read-only handle leaves it to writers and the sweep;
        so does a busy lock.  Damage found on the way is repaired (recovery), not raised: the read
        that called this has its answer."""
        if self._readonly or self._view is None:
            return
        rc = lib.mmkv_reap(self._view, k, len(k), _TRY_LOCK)
        if rc in (0, errno.ENOENT, errno.EBUSY):
            return
        try:
            self._lock.after_fused_write(rc)
        except Error:
            pass

    def _now(self):
        """Expiry's clock now, in nanoseconds: the core's (mmkv_now: the handle's ManualClock or
        the wall clock), so that this side and the core never disagree on what has expired."""
        view = self._view
        if view is None:        # closed or forked: never hand the core a NULL view
            raise self._dead()
        out = ffi.new("int64_t *")
        lib.mmkv_now(view, out)
        return out[0]

    def _deadline(self, k):
        """The deadline of live key k (0: it has none; None: absent or expired); the lock held
        (inside a transaction: its writes first)."""
        if self._txn is not None:
            written, value = self._txn.lookup(k)
            if written:
                return None if value is None else self._txn.deadline(k)
        if self._lookup(k) is None:
            return None
        return self._view.deadline

    def _get_many_slow(self, rc, keys, default):
        """Finish a batch read the fast path could not (rc None: not tried, e.g. inside lock() or a
        transaction): the values of keys (bytes) as of one moment, default for an absent one."""
        if self._lockless:              # EAGAIN (a writer was active), ESTALE (remap), EOWNERDEAD
            if rc == errno.EBADMSG:     # (returned only when no writer was active: damage)
                raise_for(rc, "batch lookup")
            self._alive()
            values = self._reads.get_many(keys)
        else:
            self._lock.after_fast_read(rc)
            values = self._consistently(lambda: [self._lookup(k) for k in keys])
        return [default if value is None else value for value in values]

    def _contains_slow(self, rc, k):
        """Finish a membership test the fast path could not (rc None: not tried)."""
        if rc == errno.ENOENT:
            return False
        if rc == errno.ENOBUFS:
            return True
        return self._read_slow(rc, k) is not None

    def _len_slow(self):
        """The number of keys, under the lock (inside a transaction, counting its writes)."""
        return self._consistently(self._count)

    def _count(self):
        if not self._engine.count_plausible():     # a damaged cache word: recount
            if self._lockless:
                raise RecoveryNeededError(f"{self.path}: the key count is impossible and this handle cannot "
                                          "repair it (no write access); open it with write access")
            self._recover("the key count is impossible")
        eng = self._engine
        w, ttl_min = eng.words, eng.index_word("ttl_min")
        if w[ttl_min] and self._now() >= w[ttl_min]:     # some key may have expired since the last pass
            if self._lockless:
                return self._count_unexpired()
            self._sweep(0)                 # the whole index, once: ttl_min is exact again
        n = w[eng.index_word("count")]
        if self._txn is not None:
            txn, self._txn = self._txn, None    # (this store's keys as they are, without the transaction)
            try:
                for k in txn.writes:
                    n += (txn.lookup(k)[1] is not None) - (self._lookup(k) is not None)
            finally:
                self._txn = txn
        return n

    def _count_unexpired(self):
        """The live keys, counted through the index (a lockless handle past ttl_min: it may not sweep)."""
        from .engine import index
        v, now = self._view, self._now()
        return sum(1 for _ in index.verified_records(self._engine) if not _expired(v, now))

    def _recover(self, reason):
        """Run recovery (lock held) and remember what it found."""
        from .engine import recovery
        return recovery.recover(self._engine, reason)

    def _snapshot(self, with_values: bool):
        """All keys (or (key, value) pairs) as of one moment, read under one lock hold."""
        return self._consistently(lambda: self._collect(with_values))

    def _collect(self, with_values: bool):
        from .engine import index      # on first use: not needed to open or read
        eng = self._engine
        mm, v, out = eng.fm.mm, self._view, []
        txn = self._txn.writes if self._txn is not None else {}
        # a slot that is not its record's (wrong tag) or a key listed twice is damage: it
        # raises rather than list a stale or foreign value (lookups never reach such a slot)
        now = self._now()
        for rec, key in index.verified_records(eng):
            if key in txn or _expired(v, now):
                continue        # the transaction's version follows; an expired key is absent
            out.append((key, mm[v.val_off:v.val_off + v.val_len]) if with_values else key)
        for key, op in txn.items():
            if op is not None:
                out.append((key, op[0]) if with_values else key)
        return out

    def _stream(self, with_keys: bool, with_values: bool):
        """An iterator of keys, values or (key, value) pairs in hash order, read in batches
        under short lock holds (see engine/scanning.py for what is guaranteed).  Inside a
        transaction of this thread: from one snapshot that includes its writes."""
        if self._txn is not None and self._lock.held_here():
            items = self._snapshot(with_values)
            return iter(items if with_keys or not with_values else [v for _, v in items])
        return chain.from_iterable(self._batches(with_keys, with_values))

    def _batches(self, with_keys: bool, with_values: bool):
        """The lists _stream yields from, each read under one lock hold."""
        from .engine.scanning import Cursor
        cursor, tries = Cursor(), [0]

        def read():
            cursor.start, cursor.done = start     # a lockless read may run more than once:
            if tries[0]:                          # a writer spoiled the last try, a smaller batch
                cursor.shrink()
            tries[0] += 1
            return cursor.batch(self._engine, with_keys, with_values)
        while not cursor.done:
            start, tries[0] = (cursor.start, cursor.done), 0
            batch = self._consistently(read)
            cursor.regrow()
            yield batch

    def __iter__(self) -> Iterator[bytes]:
        """Keys as bytes, in hash order, read in batches (a segment of the index at most) under
        short lock holds: other processes' writes go on between batches, and memory stays
        bounded whatever the store's size.  A key present for the whole iteration is yielded
        exactly once, none twice; one added or removed meanwhile may or may not be.  For one
        consistent moment, use snapshot() (or iterate under db.lock()).
        :raises CorruptionError: a damaged index slot or record (recover() repairs).
        :raises ClosedError: the handle was closed (also while iterating).
        """
        return self._stream(True, False)

    def items(self) -> _ItemsView:
        """(key, value) pairs, streamed as __iter__ streams keys; each value is the key's value
        when its batch was read."""
        return _ItemsView(self)

    def values(self) -> _ValuesView:
        """Values, streamed as items()."""
        return _ValuesView(self)

    def snapshot(self) -> dict[bytes, bytes]:
        """Every key and value as of one moment: a dict, read under one lock hold (other
        processes' writes wait for it: O(keys); memory for the whole store).  Inside a
        transaction, its writes included."""
        return dict(self._snapshot(True))

    # ================================================================ writes
    def _put_slow(self, rc, k, val):
        """Finish a put the fast path could not (rc: its result; None: not tried)."""
        if rc is not None:
            self._lock.after_fused_write(rc)
        self._write_locked(self._put, k, val, 0)

    def _write_locked(self, fn, *args):
        """Run fn(*args) under the lock as a write; see _abort_write for errors."""
        self._writable()
        self._acquire()
        try:
            return fn(*args)
        except BaseException as exc:
            self._abort_write(exc)
            raise
        finally:
            self._release()

    def _abort_write(self, exc):
        """A write raised with the lock held.  The errors in _CLEAN_ERRORS are raised before
        anything changes; anything else (KeyboardInterrupt, say) may have stopped the
        allocator half way, so recovery runs before the lock goes to another process."""
        if isinstance(exc, _CLEAN_ERRORS):
            return
        self._recover(f"a write was interrupted by {type(exc).__name__}")

    def _put(self, k, val, flags, deadline=0):
        """Write a new record (with a deadline, when not 0), switch the slot to it, free the old
        one (the shim's mmkv_put), growing the index or the file first when it asks.  Caller
        holds the lock."""
        if self._txn is not None:
            self._txn.put(k, val, flags, deadline)
            return
        grew_for = None
        while True:
            if deadline:
                rc = lib.mmkv_put_until(self._view, k, len(k), val, len(val), deadline, 0)
            else:
                rc = lib.mmkv_put(self._view, k, len(k), val, len(val), flags, 0)
            if rc == 0:
                return
            grew_for = self._make_room(rc, k, val, grew_for, DEADLINE_BYTES if deadline else 0)

    def _make_room(self, rc, k, val, grew_for=None, extra=0):
        """A put of (k, val) returned rc: grow the file (ENOSPC) or split the key's index
        segment (EAGAIN) so that the retry fits; any other result is an error.

        Returns k when it grew the file for it (pass that back with the retry's result), else
        None.  :raises CorruptionError: ENOSPC again right after a growth that made room for
        this key: the free lists are damaged (the caller's recovery rebuilds them); never a
        file grown without end on the word of a damaged cache.
        """
        from .engine import index      # on first use: not needed to open or read
        need = record_size(len(k), len(val) + extra)     # extra: a deadline's bytes
        if rc == errno.ENOSPC:
            if grew_for is k:
                raise self._engine.no_fit(need)
            self._engine.grow(need)
            return k
        if rc == errno.EAGAIN:
            index.split(self._engine, self._view, self._view.seg)
        elif rc == ENEEDBACK:
            self._engine.alloc.back(self._view.holes_block, need)
        else:
            raise_for(rc, "put")
        return None

    def _delete_slow(self, rc, k):
        """Finish a delete the fast path could not (rc: its result; None: not tried); False when
        k is absent."""
        if rc is not None:
            self._lock.after_fused_write(rc)
        return self._write_locked(self._delete, k)

    def _delete(self, k):
        """Remove k (the shim's mmkv_delete); False when absent.  Caller holds the lock."""
        if self._txn is not None:
            if self._lookup(k) is None:
                return False
            self._txn.delete(k)
            return True
        rc = lib.mmkv_delete(self._view, k, len(k), 0)
        if rc == errno.ENOENT:
            return False
        raise_for(rc, "delete")
        return True

    def _pop_slow(self, rc, k):
        """Finish a pop the fast path could not (rc: its result; None: not tried): the value, or
        None when k is absent."""
        if rc is not None:
            self._lock.after_fused_write(rc)
        return self._write_locked(self._pop, k)

    def _pop(self, k):
        value = self._lookup(k)
        if value is not None:
            self._delete(k)
        return value

    def _cas_slow(self, rc, k, pair):
        """Finish a compare-and-swap the fast path could not (rc: its result; None: not tried,
        e.g. inside lock() or a transaction); pair: (expected, new), bytes or None."""
        if rc is not None:
            self._lock.after_fused_write(rc)
        return self._write_locked(self._cas, k, *pair)

    def _cas(self, k, expected, new):
        """The compare-and-swap itself; caller holds the lock (inside a transaction: its view and
        its writes)."""
        if self._lookup(k) != expected:
            return False
        if new is not None:
            self._put(k, new, 0)
        elif expected is not None:
            self._delete(k)
        return True

    # ================================================================ expiry (see mmkv/expiry.py)
    def set(self, key: Bytes, value: Bytes, ttl: float | None = None) -> None:
        """db[key] = value; with ttl, the key expires ttl seconds from now (by the wall clock, or
        the handle's ManualClock): from then on it is absent for every read of every process.
        Without ttl, a deadline the key had is dropped (as db[key] = value does).
        :raises TypeError: ttl is not a number.  :raises ValueError: ttl <= 0, NaN or infinite.
        :raises LimitError: too large.  :raises DiskFullError: no room; the store is unchanged."""
        if ttl is None:
            self[key] = value
            return
        k, val = self._key_value(key, value)
        deadline = deadline_after(self._now(), ttl)
        self._write_locked(self._put, k, val, 0, deadline)

    def expire(self, key: Bytes, ttl: float | None) -> bool:
        """Give key a deadline ttl seconds from now (ttl None: take its deadline away, so it
        never expires); its value is unchanged.  One atomic write under the lock (the record is
        rewritten).  False when key is absent (or expired).
        :raises TypeError, ValueError: a bad ttl, as set().  :raises DiskFullError: no room."""
        from .cffi_binding import as_bytes      # on first use: not needed to open or read
        k = key if type(key) is bytes else as_bytes(key, "key")
        if ttl is not None:
            check_ttl(ttl)
        return self._write_locked(self._expire, k, ttl)

    def _expire(self, k, ttl):
        value = self._lookup(k)
        if value is None:
            return False
        value = bytes(value)
        if ttl is None:     # (an 8-byte value becomes a plain record: incr makes it a counter again)
            self._put(k, value, 0)
        else:
            self._put(k, value, 0, deadline_after(self._now(), ttl))
        return True

    def ttl(self, key: Bytes) -> float | None:
        """Seconds until key expires (by the clock as it reads now), or None when it has no
        deadline.  Read as one moment (under the lock, or lock-free on a lockless handle).
        :raises KeyError: key is absent or expired."""
        from .cffi_binding import as_bytes      # on first use: not needed to open or read
        k = key if type(key) is bytes else as_bytes(key, "key")

        def read():
            deadline = self._deadline(k)
            return None if deadline is None else (deadline, self._now())
        found = self._consistently(read)
        if found is None:
            raise KeyError(key)
        deadline, now = found
        return None if not deadline else max(deadline - now, 1) / 1e9

    def sweep(self, limit: int | None = None) -> int:
        """Remove expired keys and give their space back: the whole index (limit None, which also
        makes len() O(1) again until the next deadline passes), or the next `limit` index slots
        from where the sweep last stopped.  Holds the lock throughout: a whole pass costs about as
        long as a scan of the index (tens of ms per million keys).  The number removed."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
            raise ValueError(f"limit must be a positive int or None, not {limit!r}")
        self._writable()
        return self._write_locked(self._sweep, limit or 0)

    def _sweep(self, budget):
        """The sweep (mmkv_sweep; budget 0: a whole pass); caller holds the lock."""
        removed, nxt = ffi.new("uint64_t *"), ffi.new("int64_t *")
        raise_for(lib.mmkv_sweep(self._view, budget, removed, nxt), "sweep")
        return removed[0]

    def deadlines(self) -> dict[bytes, int]:
        """{key: deadline} of every live key that has one (nanoseconds since the epoch), as of one
        moment (one pass over the index under the lock, or lock-free on a lockless handle)."""
        from .engine import index      # on first use: not needed to open or read

        def read():
            v, now, out = self._view, self._now(), {}
            for _, key in index.verified_records(self._engine):
                if v.rec_flags & REC_EXPIRES and not _expired(v, now):
                    out[bytes(key)] = v.deadline
            if self._txn is not None:
                for key, op in self._txn.writes.items():
                    out.pop(key, None)
                    if op is not None and op[2] > now:
                        out[key] = op[2]
            return out
        return self._consistently(read)

    def memoize(self, ttl: float | None = None, name: str | None = None) -> Callable:
        """A decorator caching a function's results in this store, for every process that opens
        it (``@db.memoize(ttl=60)``); see mmkv.expiry.memoize."""
        from .expiry import memoize
        return memoize(self, ttl, name)

    def _key_value(self, key, value):
        """(key, value) as bytes, their sizes checked, on a handle that may write."""
        from .cffi_binding import as_bytes, check_sizes      # on first use: not needed to open or read
        k = key if type(key) is bytes else as_bytes(key, "key")
        val = value if type(value) is bytes else as_bytes(value, "value")
        check_sizes(k, val)
        self._writable()
        return k, val

    def setdefault(self, key: Bytes, default: Bytes = b"") -> bytes:
        """The value of key; if absent, store default first and return it, atomically under the
        lock (another process's setdefault of the same key sees one or the other, never both).
        :raises LimitError: key or default too large.  :raises DiskFullError: no room; unchanged."""
        from .cffi_binding import as_bytes, check_sizes      # on first use: not needed to open or read
        k = key if type(key) is bytes else as_bytes(key, "key")
        d = as_bytes(default, "value")
        check_sizes(k, d)
        if self._readonly:          # only a read, unless the key is missing
            value = self.get(k)
            if value is not None:
                return value
        return self._write_locked(self._setdefault, k, d)

    def _setdefault(self, k, d):
        value = self._lookup(k)
        if value is None:
            self._put(k, d, 0)
            value = d
        return value

    def update(self, other: Mapping[Any, Any] | Iterable[tuple[Any, Any]] = (), /, **kw: Bytes) -> None:
        """Store every pair of other (a mapping or pairs) and kw, under one lock hold.

        Every pair is checked first: a TypeError, ValueError or LimitError is raised before
        anything is written.  Pairs are then written in order; a crash part way leaves the first
        ones written and the rest not (each pair whole).  For all-or-nothing, call it inside
        transaction().  Holds the store lock throughout (other processes' calls wait).
        :raises DiskFullError: a pair does not fit; the pairs before it stay written, the
            rest are not, and no space is lost.
        """
        source = other
        if kw or type(other) is not dict:     # read once, before the lock: it may run any code
            source = list(chain(other.items() if hasattr(other, "items") else other, kw.items()))
        self._write_locked(self._update, source)

    def _update(self, source):
        """Put every pair: the binding's loop (_put_pairs), or into the transaction."""
        from .cffi_binding import checked_pairs      # on first use: not needed to open or read
        if self._txn is None:
            self._put_pairs(source)
            return
        for k, val in checked_pairs(source):
            self._txn.put(k, val)

    def _reserve_for(self, n: int, nbytes: int) -> None:
        """n pairs holding nbytes of records are about to be put (update's loop, lock held):
        for a batch of at least tunables.PRESIZE_PAIRS, make room in one step where the puts one by one
        would take many: an index that would split is rebuilt at its final size when the batch
        is at least as large as the store (index.presize: O(keys)), and the file grows once
        for the records that do not fit in its free space.  Only an optimisation: a full disk
        leaves it to the puts, which grow as far as they can and report what does not fit."""
        from .engine import index      # on first use: not needed to open or read
        if n < tunables.PRESIZE_PAIRS or self._txn is not None:
            return
        eng = self._engine
        w = eng.words
        count = w[eng.index_word("count")]
        depth = index.presize_depth(eng, count + n) if count <= n else None
        if depth is not None:       # the new index, and the old one until it is freed
            nbytes += ((1 << depth) + 1) * (index.SEGMENT_BYTES + BLOCK_OVERHEAD)
        try:
            short = nbytes + n * BLOCK_OVERHEAD - w[STATE_WORD["free_bytes"]]
            if short > 0:
                eng.grow(short)
            if depth is not None:
                index.presize(eng, count + n)
        except DiskFullError:
            pass

    def clear(self) -> None:
        """Remove every key of the main key space, atomically: a new empty index replaces the old one
        in one meta switch (the "clear" row of the README's "Commit orders" table).  Namespaces
        keep their keys (``ns.clear()``, ``drop_namespace``); so do Sequences and Queues.

        Holds the store lock throughout; other processes' calls wait for it.  The new index
        (one 128 KiB segment and a directory) needs free space.  On a full disk, where it
        does not fit, keys are deleted one by one, largest record first, each through the
        engine's own crash-safe delete, until it fits (then the switch drops the rest) or
        no key is left: so on a full disk, and only there, a crash during clear() may leave
        a subset of the keys.  Design turned down: clearing the old index in place under a
        journal entry (atomic, but it needs a journal block too, rewrites live segments under
        lock-free readers, and gives recovery a new kind of journal to finish).
        :raises Error: called inside a transaction.
        """
        self._write_locked(self._clear)

    def _clear(self):
        from .engine import index, namespaces
        if self._txn is not None:
            raise Error("clear() inside a transaction is not supported; call it outside")
        eng = self._engine
        others = namespaces.blocks_to_keep(eng)            # the namespaces' structures and records stay
        try:
            index.rebuild(eng, [])                           # a new empty index, switched in atomically
        except DiskFullError:                                # (rebuild gave back what it took)
            if not self._delete_until_index_fits():
                return                                       # every key deleted: the old index stays
        eng.alloc.rebuild(index.blocks(eng) + others)        # every record and the old index: free
        w = eng.words
        w[_COUNT] = w[_LIVE] = 0

    def _delete_until_index_fits(self) -> bool:
        """clear() on a full disk: delete keys, largest record first, until a new empty index
        fits, and switch to it (True); False when every key was deleted before it fit.

        Each delete is the plain crash-safe one (no allocation); a new index is tried again
        after every SEGMENT_BYTES // 4 bytes freed.  Caller holds the lock.
        """
        from .engine import index      # on first use: not needed to open or read
        eng = self._engine
        victims = sorted(((eng.alloc.capacity(rec), rec) for _, _, rec in index.entries(self._view)), reverse=True)
        freed = 0
        for i, (size, rec) in enumerate(victims):
            self._delete(bytes(eng.record_key(rec)))      # frees only its own block: the others stay put
            freed += size
            if freed >= index.SEGMENT_BYTES // 4 or i == len(victims) - 1:
                freed = 0
                try:
                    index.rebuild(eng, [])
                    return True
                except DiskFullError:
                    pass
        return False

    def _incr_slow(self, rc, k, delta):
        """Finish an increment the fast path could not or did not try (rc None): also says why
        for a delta that is not an int, a key too long or a read-only handle."""
        from .cffi_binding import check_sizes      # on first use: not needed to open or read
        if not isinstance(delta, int):
            raise TypeError(f"delta must be an int, not {type(delta).__name__}")
        if rc == errno.ERANGE:
            raise OverflowError(f"counter {k!r} would leave the signed 64-bit range")
        check_sizes(k, b"")
        self._writable()
        if rc is not None:
            self._lock.after_fused_write(rc)
        return self._write_locked(self._incr, k, delta)

    def _incr(self, k, delta):
        """The general increment: a counter record in place, else a new counter record."""
        if _INT64_MIN <= delta <= _INT64_MAX and self._txn is None:
            out = ffi.new("int64_t *")
            rc = lib.mmkv_incr(self._view, k, len(k), delta, out, 0)
            if rc == 0:
                return out[0]
            if rc == errno.ERANGE:
                raise OverflowError(f"counter {k!r} would leave the signed 64-bit range")
            if rc != errno.ENOENT:
                raise_for(rc, "incr")
        old = self._lookup(k)            # absent, a plain 8-byte value, or something else
        if old is not None and len(old) != 8:
            raise NotACounterError(f"value of {k!r} is {len(old)} bytes, not an 8-byte counter")
        new = (int.from_bytes(old, "little", signed=True) if old is not None else 0) + delta
        if not _INT64_MIN <= new <= _INT64_MAX:
            raise OverflowError(f"counter {k!r} would leave the signed 64-bit range")
        deadline = self._deadline(k) if old is not None else 0
        # a key with a deadline keeps it (a plain 8-byte record: counters are updated in place,
        # and a counter record carries no deadline); any other is a counter record
        self._put(k, new.to_bytes(8, "little", signed=True), 0 if deadline else REC_COUNTER, deadline or 0)
        return new

    # ================================================================ namespaces (mmkv/namespace.py)
    def namespace(self, name: str, create: bool = True) -> Any:
        """The named sub-store ``name`` of this file (a Namespace: a mapping of its own keys that
        shares the file, the lock, transactions and durability), created when absent (one
        durable catalog commit; with create=False, NamespaceError instead).  The same object for
        the same name while this handle is open.  Takes the store lock briefly.
        :raises TypeError, ValueError: name is not a str of 1 to 255 bytes of UTF-8 without NUL.
        :raises NamespaceError: absent and create is false.  :raises ReadOnlyError: absent on a
            read-only handle.
        :raises Error: created inside a transaction."""
        from .namespace import open_namespace
        return open_namespace(self, name, create)

    def namespaces(self) -> list[str]:
        """The names of the file's namespaces, sorted (read under the lock)."""
        from .engine import namespaces
        self._alive()

        def read():
            eng = self._engine
            if eng.catalog_error is not None:
                raise eng.catalog_error
            return namespaces.user_names(eng)
        return self._consistently(read)

    def drop_namespace(self, name: str) -> None:
        """Remove namespace name and all its keys: one durable catalog commit (O(1) under the
        lock), then its records are freed a bounded number per lock hold.  Handles on it, in
        every process, raise NamespaceError from then on.
        :raises NamespaceError: no such namespace.  :raises Error: inside a transaction."""
        from .namespace import drop
        drop(self, name)

    def _free_dropped(self) -> None:
        """Free the indexes of dropped and cleared namespaces, namespaces.FREE_STEP records per
        lock hold (other processes' calls go on between holds)."""
        from .engine import namespaces
        while True:
            self._acquire()
            try:
                pending = namespaces.dropped_ids(self._engine)
                if not pending:
                    return
                self._write_locked(namespaces.free_dropped, self._engine, pending[0])
            finally:
                self._release()

    # ================================================================ durability, audit
    def sync(self) -> None:
        """Make every write so far durable (msync MS_SYNC of the whole file, then fsync).

        Holds the store lock through the whole-file msync: other processes' calls wait for it
        (a large file with many dirty pages takes seconds).  A lockless handle wrote nothing:
        nothing to do.  :raises OSError: msync or fsync failed."""
        if self._lockless:
            self._alive()
            return
        self._acquire()
        try:
            self._engine.fm.sync()
            os.fsync(self._fd)
        finally:
            self._release()

    def check(self) -> Any:
        """Audit every structure in the file; returns a checker.Report.

        Holds the lock for the whole audit (O(file size): about a second per million
        keys).  :raises CorruptionError: the audit found a problem (``exc.report`` lists all).
        """
        from .engine import checker      # imported on first use: the audit is not on any hot path
        report = self._consistently(lambda: checker.audit(self._engine))
        if not report.ok:
            err = CorruptionError(f"{self.path}: {len(report.problems)} problem(s): " + "; ".join(report.problems[:5]))
            err.report = report
            raise err
        return report

    def recover(self) -> Any:
        """Run recovery now (verify every record, rebuild free lists, rebuild the index if a
        slot was bad); returns what it found (a RecoveryResult).  Holds the lock throughout:
        O(keys + file size).  :raises CorruptionError: the index cannot be repaired in place."""
        self._writable()
        self._acquire()
        try:
            return self._recover("requested")
        finally:
            self._release()

    def compact(self, progress: Callable[[int, int], object] | None = None) -> dict[str, Any]:
        """Move live records toward the start of the file and give the free space back: the file
        shrinks when no other handle (in any process) has it open, else the pages of its free
        space are released to the filesystem (the size stays, so no other process can fault).
        Returns what was done (records and bytes moved, sizes and disk bytes before and after,
        the longest lock hold).  ``progress(done, total)``, when given, is called after each step
        (bytes of the heap walked so far, of the whole heap).

        Works in steps of about 2 ms each under the store lock (with sync="full", each move also
        waits for two msyncs); other processes' writes wait at most one step, reads never.  Each
        move is as crash-safe as a put.  The shrink waits for the open/close protocol lock (up to
        open_timeout) so that no handle opens meanwhile.
        :raises Error: called inside lock() or a transaction on this thread.
        :raises ReadOnlyError: a read-only handle.  :raises DiskFullError: space released earlier
            could not be backed for a move (the store is consistent; moves so far stay).
        """
        from .errors import Error
        from .engine import compaction
        self._writable()
        if self._txn is not None or self._lock.held_here():
            raise Error("compact() cannot run inside lock() or a transaction: it takes and releases the lock "
                        "in steps, and the open/close protocol lock before it")
        return compaction.compact(self._engine, self.lock, self._when_alone, progress)

    def backup(self, dest: str | os.PathLike[str], progress: Callable[[int, int], object] | None = None) -> dict[str, Any]:
        """Write a point-in-time, compact copy of the store to the new file dest while other
        processes keep using the store; the copy passes check().  Returns what was done
        (``bytes_copied``, ``lock_seconds``: how long writers waited, ``seconds``, ``keys``,
        ``file_size``).  ``progress(done, total)``: bytes copied, then the copy's compaction.

        Writers in every process wait while the file's bytes are copied under the store lock (in
        the kernel, data extents only: about 1.6 s per GB on this machine, measured in the
        README); readers do not wait.  Then, holding nothing, the copy is recovered (every record
        verified), compacted, audited, synced and linked to dest.  See mmkv/backup.py.
        :raises FileExistsError: dest exists (nothing is written).  :raises DiskFullError: no room
            (nothing is left behind).  :raises Error: called inside lock() or a transaction.
        :raises ReadOnlyError: a lockless handle (it cannot take the lock).
        """
        from . import backup as _backup, open as open_store
        if self._txn is not None or self._lock.held_here():
            raise Error("backup() cannot run inside lock() or a transaction: the copy is opened, compacted and "
                        "synced after the lock is released")
        if self._lockless:
            self._acquire()              # raises ReadOnlyError, naming the lock
        eng = self.engine
        return _backup.backup(self.lock, eng.fd, lambda: eng.meta.file_size, os.fspath(dest), open_store, progress)

    def _when_alone(self, fn) -> bool:
        """Run fn() holding the open/close protocol lock and the store lock, if no other handle has
        the file open (lockless handles included); True when it ran.  Lock order as close(): protocol lock first."""
        from .engine import opening
        fd = self._engine.fd
        opening.take_protocol_lock(fd, self.path, self._open_timeout)
        try:
            with self.lock():
                if not opening.try_alone(fd):
                    return False
                if not opening.no_lockless_handles(fd):   # a read-only mapping would fault past a shrink
                    opening.hold_attached(fd)
                    return False
                try:
                    return fn()
                finally:
                    opening.hold_attached(fd)
        finally:
            opening.release_protocol_lock(fd)

    def stats(self) -> dict[str, Any]:
        """Counters and space figures (keys, bytes used and free, index shape, largest free
        block, bytes on disk (``disk_bytes``: st_blocks * 512) and at most how many of them
        compact() could give back (``reclaimable_bytes``), lock reports), read under the lock: one consistent moment (O(1) but for one
        free-list walk and the directory).  :raises CorruptionError: a damaged free list."""
        return self._consistently(self._stats)

    def _stats(self) -> dict:
        from .engine import index      # on first use: not needed to open or read
        w = self._engine.words
        largest = self._engine.alloc.largest_free()
        st = {name: w[STATE_WORD[name]] for name in ("count", "live_bytes", "used_bytes", "free_bytes",
                                                     "generation", "recoveries", "lock_pid")}
        st.pop("count")
        st["keys"] = self._count()      # exact: past a deadline, as len() does (one sweep, or a count)
        st["file_size"] = self._engine.fm.size
        st.update(index.shape(self._engine))
        st["load_factor"] = st["keys"] / st["index_slots"]
        st["largest_free_block"] = largest
        st["fragmentation"] = 1 - largest / st["free_bytes"] if st["free_bytes"] else 0.0
        st["disk_bytes"] = disk_bytes(self._engine.fd)
        # what compaction and release could give back at most: disk blocks beyond the header,
        # the blocks in use and the epilogue
        st["reclaimable_bytes"] = max(0, st["disk_bytes"] - (HEADER_SIZE + st["used_bytes"] + 8))
        st["sync"] = self.sync_mode
        st["lock_reports"] = self._lock.reports
        return st


class _LockBlock:
    """``with db.lock():`` (see Store.lock)."""
    __slots__ = ("store",)

    def __init__(self, store):
        self.store = store

    def __enter__(self):
        self.store._acquire()
        return self.store

    def __exit__(self, *exc):
        self.store._release()
        return False


class _TransactionBlock:
    """``with db.transaction():`` (see Store.transaction): a nested block joins the outer one."""
    __slots__ = ("store", "joined")

    def __init__(self, store):
        self.store, self.joined = store, False

    def __enter__(self):
        self.joined = self.store._begin()
        return self.store

    def __exit__(self, exc_type, exc, tb):
        if not self.joined:
            self.store._end(failed=exc_type is not None)
        return False


class _ItemsView(ItemsView):
    def __iter__(self):
        return self._mapping._stream(True, True)


class _ValuesView(ValuesView):
    def __iter__(self):
        return self._mapping._stream(False, True)
