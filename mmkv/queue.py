"""Queue: a persistent FIFO of bytes shared by every process that opens the file.

    q = mmkv.Queue("jobs.mmkv", "resize")      # or mmkv.Queue(db, "resize")
    q.put(b"photo-17.jpg")                     # any process
    item = q.get(timeout=5)                    # any process: blocks without polling

What it promises:

* **FIFO, exactly once while nobody dies**: items come out in the order their
  ``put`` calls returned, each to one ``get`` only.  Consumers are not served
  in any particular order among themselves.
* **Durable items**: an item is in the file when ``put`` returns; it survives
  the producer, every consumer, close and reopen, and with ``sync="full"``
  power loss.
* **At-most-once delivery when a consumer dies**: an item is removed from the
  file inside ``get``, before ``get`` returns it.  A consumer killed between
  those two points (or before it has processed the item) loses that one item;
  no other item is lost or delivered twice.  (At-least-once would need an
  acknowledgement protocol and a lease per item; left out for simplicity.)
* **Blocking without polling**: a ``get`` that finds the queue empty sleeps on
  a process-shared semaphore in the file's lock area and is woken by the
  ``put`` of any process.
* **16 queues per file**: the lock area has ``layout.NSEMS`` (16) semaphores.
  A queue's name is bound to one of them the first time it is opened, for the
  life of the file (recorded under ``b"\\x00mmkv:sem:NN"``); a 17th name raises
  TooManyQueuesError.

Records, in mmkv's own namespace (mmkv.namespace.SYSTEM: ``len(db)``, ``db.clear()`` and
iteration of the user's keys never see them).  With ``Q = b"\\x00mmkv:q:<len(name)>:" + name + b":"``
(the length makes the name unambiguous whatever bytes it holds):
``Q + b"head"`` and ``Q + b"tail"`` are 8-byte counters, and the item at index
i (head <= i < tail) is ``Q + b"i" + i.to_bytes(8, "big")``.

Protocol.  Every step below runs under the store lock (``db.lock()``), so the
lock-holding process is the only one changing the queue, and a holder that dies
is repaired by the next one (the engine's robust mutex).
* put: write the item at index tail, post the semaphore, then ``incr(tail)``:
  the commit point.  A producer killed before the ``incr`` leaves a stray record
  at index tail (never read: consumers stop below tail; the next put overwrites
  it) and perhaps one spare wake-up, never a hole.  (The obvious order, reserve
  with ``incr(tail)`` first and then write, leaves a hole below tail when the
  producer dies in between; this order needs no hole handling for producers.)
* get: take the item at head (delete it), then ``incr(head)``.  A consumer
  killed in between leaves a hole at head, which the next consumer skips.

Wake-ups.  The semaphore's count T is kept at least the number of items R,
less the consumers that have been woken but have not yet taken their item:
put posts once per item; a get first tries to take an item without waiting
(then takes a wake-up back with ``sem_trywait`` if one is left), and only when
the queue is empty does it wait on the semaphore, then take an item under the
lock.  A wake-up that finds the queue empty (a spare one) is dropped and the
get waits again for what is left of its timeout.  Crashes can leave spare
wake-ups (harmless: one empty pass of some get) or, when a consumer dies
between its wake-up and its take, one item with no wake-up.  Such an item is
handed out by the next ``get`` (which tries before waiting), and a get that
takes an item while others remain and the count is 0 posts one (so waiters in
other processes hear of them).  Opening a Queue reconciles: under the lock, it
posts ``R - T`` when positive.  That is what makes items put before a restart
reachable with a blocking get: the first process to open the file resets every
semaphore to 0 (their memory may be garbage from a dead process or a previous
boot).

The semaphore is reached through the Queue's own one-page mapping of the
file's header, so a get blocked in one thread stays safe while another thread
grows the file (remap) or closes the Store.
"""
from __future__ import annotations

import errno
import math
import mmap
import os
import threading
import time

from .engine.shim import error_for, ffi, lib
from .errors import (ClosedError, Error, ForkedHandleError, NotACounterError, QueueEmpty, ReadOnlyError,
                     TooManyQueuesError)
from .engine.layout import HEADER_SIZE, NSEMS, OFF_SEMS, SEM_BYTES

TYPE_CHECKING = False       # (typing is not imported at run time)
if TYPE_CHECKING:
    from typing import Any
    from .store import Store
from .sequence import open_or_use, record_name

#: Prefix of every queue's records.
QUEUE_PREFIX = b"\x00mmkv:q:"
#: Prefix of the semaphore registry: key + b"%02d" % i -> the owner (b"queue:" + name).
SEM_PREFIX = b"\x00mmkv:sem:"
#: The shim waits forever for this many nanoseconds or more (its FOREVER_NS).
_FOREVER = 1 << 62
#: Longest single semaphore wait of a get without timeout (ns): how late a signal may be noticed.
_SIGNAL_SLICE_NS = 200_000_000


def _as_item(obj) -> bytes:
    if type(obj) is bytes:
        return obj
    if isinstance(obj, str):
        return obj.encode("utf-8")
    if isinstance(obj, (bytearray, memoryview)):
        return bytes(obj)
    raise TypeError(f"queue items must be bytes or str, not {type(obj).__name__}")


def _reopen(fd: int) -> int:
    """A new descriptor on the file behind fd, with its own open file description.

    The private mapping must not share the Store's description: Python's mmap
    keeps a dup of the descriptor it maps, and a dup shares the description's
    flock, so a mapping of the Store's own fd would keep the Store's open/close
    lock alive after ``db.close()`` (and block every later open of the file).
    """
    st = os.fstat(fd)
    try:
        new = os.open(f"/proc/self/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise Error(f"cannot reopen the store's file for its semaphores: {exc}") from None
    other = os.fstat(new)
    if (other.st_dev, other.st_ino) != (st.st_dev, st.st_ino):
        os.close(new)
        raise Error("the store's file was replaced while opening its queue")
    return new


class _Semaphore:
    """One semaphore of the file's lock area, through a private shared mapping of page 0.

    fd: any descriptor on the file; the mapping is made through a new description
    (see _reopen), which is closed at once: the mapping alone keeps the page.
    """

    def __init__(self, fd: int, index: int):
        fd = _reopen(fd)
        try:
            self._mm = mmap.mmap(fd, HEADER_SIZE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._buf = ffi.from_buffer("uint8_t[]", self._mm)
        self.ptr = ffi.cast("uint8_t *", self._buf) + OFF_SEMS + index * SEM_BYTES
        self._out = ffi.new("int32_t *")

    def post(self) -> None:
        rc = lib.mmkv_sem_post(self.ptr)
        if rc and rc != errno.EOVERFLOW:   # 2**31 - 1 wake-ups pending: enough for anyone
            raise error_for(rc, "sem_post")

    def trywait(self) -> bool:
        rc = lib.mmkv_sem_trywait(self.ptr)
        if rc in (0, errno.EAGAIN):
            return rc == 0
        raise error_for(rc, "sem_trywait")

    def wait(self, timeout_ns: int) -> int:
        """0 (took a wake-up), ETIMEDOUT or EINTR; < 0 waits forever."""
        if timeout_ns < 0:
            rc = lib.mmkv_sem_wait(self.ptr)
        else:
            rc = lib.mmkv_sem_timedwait(self.ptr, timeout_ns)
        if rc in (0, errno.ETIMEDOUT, errno.EINTR):
            return rc
        raise error_for(rc, "sem_wait")

    def value(self) -> int:
        rc = lib.mmkv_sem_value(self.ptr, self._out)
        if rc:
            raise error_for(rc, "sem_getvalue")
        return self._out[0]

    def close(self) -> None:
        self.ptr = None
        ffi.release(self._buf)
        self._mm.close()


class Queue:
    """A persistent multi-process FIFO of bytes; see the module docstring for the promises.

    path_or_store: a path (the store is opened here, flag "c", with ``sync`` and
    ``options``, and closed by ``close()``) or an open, writable Store (left open).
    Opening binds the name to one of the file's 16 semaphores (once per file)
    and reconciles the semaphore's count with the items in the file.
    Threads may share a handle; it must not be used after ``fork``.
    :raises TooManyQueuesError: 16 other queue names already use this file.
    :raises ReadOnlyError: the store was opened with flag "r".
    :raises TypeError, ValueError: a name that is not non-empty bytes or str.
    """

    def __init__(self, path_or_store: str | os.PathLike[str] | Store, name: str | bytes, sync: str = "none",
                 **options: Any):
        self.name = record_name(name, "queue")
        base = QUEUE_PREFIX + b"%d:" % len(self.name) + self.name + b":"
        self._k_head, self._k_tail, self._k_item = base + b"head", base + b"tail", base + b"i"
        self._owner = b"queue:" + self.name
        self._pid = os.getpid()
        self._sem = None
        self._closed = False
        self._active = 0                   # put/get calls running in this handle, for close()
        self._cond = threading.Condition()
        self._db = self._store = None
        self._store, self._owned = open_or_use(path_or_store, sync, options)
        try:
            if self._store.readonly:
                raise ReadOnlyError(f"queue {self.name!r}: the store was opened with flag 'r'; a queue writes")
            from .namespace import system_space
            self._db = system_space(self._store)     # mmkv's own namespace (moved there from old files)
            with self._db.lock():
                self.semaphore = self._assign_semaphore()
                self._sem = _Semaphore(self._db.engine.fd, self.semaphore)
                self._reconcile()
        except BaseException:
            if self._sem is not None:
                self._sem.close()
            if self._owned:
                self._store.close()
            raise

    # ================================================================ records (caller holds the lock)
    def _item_key(self, i: int) -> bytes:
        return self._k_item + i.to_bytes(8, "big")

    def _counter(self, key) -> int:
        raw = self._db.get(key)
        if raw is None:
            return 0
        if len(raw) != 8:
            raise NotACounterError(f"queue record {key!r} holds {len(raw)} bytes, not an 8-byte counter; "
                                   "keys starting with b'\\x00mmkv:' are reserved for mmkv")
        return int.from_bytes(raw, "little", signed=True)

    def _assign_semaphore(self) -> int:
        """The semaphore bound to this name, binding a free one the first time."""
        db, free = self._db, None
        for i in range(NSEMS):
            owner = db.get(SEM_PREFIX + b"%02d" % i)
            if owner == self._owner:
                return i
            if owner is None and free is None:
                free = i
        if free is None:
            raise TooManyQueuesError(
                f"{db.path}: all {NSEMS} semaphores already belong to other queues; a file holds at most "
                f"{NSEMS} queues: reuse a name or put queue {self.name!r} in another file")
        db[SEM_PREFIX + b"%02d" % free] = self._owner
        return free

    def _skip_hole(self, head: int, tail: int) -> int:
        """head, past the hole a consumer killed in mid-take leaves (at most one, at head)."""
        if head < tail and self._item_key(head) not in self._db:
            self._db.incr(self._k_head, 1)
            head += 1
        return head

    def _reconcile(self) -> None:
        """Post the wake-ups the items in the file lack (after a restart the count is 0)."""
        db = self._db
        for key in (self._k_head, self._k_tail):
            if db.get(key) is None:
                db.incr(key, 0)        # a counter record, updated in place from now on
        tail = self._counter(self._k_tail)
        head = self._skip_hole(self._counter(self._k_head), tail)
        for _ in range(tail - head - self._sem.value()):
            self._sem.post()

    def _take(self, have_token: bool):
        """Remove and return the item at head, or None when empty (under the lock)."""
        db = self._db
        with db.lock():
            self._usable()
            tail = self._counter(self._k_tail)
            head = self._counter(self._k_head)
            item = None
            while head < tail and item is None:    # at most one hole, left by a consumer killed in mid-take
                item = db.pop(self._item_key(head), None)
                head += 1
                # the item is out of the file: a death from here to the return loses it (at most once)
                db.incr(self._k_head, 1)
            if item is not None:
                if not have_token:
                    self._sem.trywait()            # keep the count in step with the items
                if head < tail and self._sem.value() == 0:
                    self._sem.post()               # items without a wake-up (after a crash): hand one on
            return item

    # ================================================================ API
    def put(self, item: bytes | bytearray | memoryview | str) -> None:
        """Append item (bytes; str is UTF-8 encoded) and wake one waiting get, in any process.

        Durable (in the file, and with sync="full" on disk) when it returns.  Holds
        the store lock for three writes; waits for the lock up to lock_timeout.
        :raises TypeError: not bytes or str.  :raises LimitError: larger than MAX_VALUE_SIZE.
        :raises DiskFullError: the file cannot grow (the queue is unchanged).
        :raises LockTimeoutError: another process held the lock too long.
        :raises ClosedError, ForkedHandleError: closed handle, or used after fork.
        """
        data = _as_item(item)
        self._enter()
        try:
            db = self._db
            with db.lock():
                self._usable()
                tail = self._counter(self._k_tail)
                db[self._item_key(tail)] = data
                self._sem.post()          # the woken get waits for our lock, so it sees the commit below
                db.incr(self._k_tail, 1)  # the commit point: the item is in the queue
        finally:
            self._leave()

    def get(self, timeout: float | None = None) -> bytes:
        """Remove and return the oldest item; if there is none, block until one is put.

        timeout: seconds to wait at most (None: forever, 0: do not wait).  The
        wait sleeps on a semaphore (no polling of the store; a wait without timeout re-arms every
        0.2 s so that signal handlers run) and wakes on a put by any process.
        Signals: a handler runs during the wait; if it raises (KeyboardInterrupt),
        get raises it and takes nothing; otherwise the wait resumes with what is
        left of the timeout.  The item is deleted from the file before get
        returns it: a consumer killed then loses it (at-most-once).
        :raises QueueEmpty: (also a queue.Empty) no item came within timeout.
        :raises Error: the queue is empty and this thread holds ``db.lock()`` (waiting would deadlock).
        :raises ValueError: negative or NaN timeout.  :raises TypeError: not a number.
        :raises LockTimeoutError: another process held the lock too long.
        :raises ClosedError: the handle was closed (also by another thread while waiting).
        :raises ForkedHandleError: used after fork.
        """
        deadline = self._deadline(timeout)
        self._enter()
        try:
            have_token = False
            while True:
                try:
                    item = self._take(have_token)
                except BaseException:
                    if have_token:
                        self._sem.post()   # the wake-up we took belongs to an item still there
                    raise
                if item is not None:
                    return item
                have_token = False         # a spare wake-up: the queue is empty, drop it
                if deadline is not None and deadline <= time.monotonic():
                    raise QueueEmpty(f"queue {self.name!r}: no item within {timeout}s")
                if self._db.lock_held():
                    raise Error(f"queue {self.name!r}: get would wait while this thread holds db.lock(), "
                                "so no process could put; call get outside the lock, or with timeout=0")
                if deadline is None:
                    # in slices: a signal that lands between the interpreter's last check and the
                    # wait itself would otherwise go unnoticed until a put (SIGINT lost under load);
                    # each slice returns to the interpreter, which runs pending handlers
                    while (rc := self._sem.wait(_SIGNAL_SLICE_NS)) == errno.ETIMEDOUT:
                        pass
                else:
                    rc = self._sem.wait(max(0, min(_FOREVER, int((deadline - time.monotonic()) * 1e9))))
                if rc == 0:
                    have_token = True
                elif rc == errno.ETIMEDOUT:
                    raise QueueEmpty(f"queue {self.name!r}: no item within {timeout}s")
                # EINTR: the interpreter runs the signal's handler before the next bytecode; if it
                # raised, we are gone; if not, try again with what is left of the timeout
        finally:
            self._leave()

    @staticmethod
    def _deadline(timeout):
        if timeout is None:
            return None
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool):
            raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
        if math.isnan(timeout) or timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds or None, not {timeout}")
        return time.monotonic() + min(timeout, 1e9)

    def qsize(self) -> int:
        """Items in the queue now (read under the lock; others may change it right after).

        :raises ClosedError, ForkedHandleError, LockTimeoutError: as for get.
        """
        self._enter()
        try:
            with self._db.lock():
                self._usable()
                tail = self._counter(self._k_tail)
                head = self._counter(self._k_head)
                if head < tail and self._item_key(head) not in self._db:
                    head += 1                     # the hole of a consumer killed in mid-take
                return tail - head
        finally:
            self._leave()

    def _usable(self):
        if os.getpid() != self._pid:
            raise ForkedHandleError(f"the queue {self.name!r} was opened before fork(); "
                                    "create a new Queue in the child process")
        if self._closed:
            raise ClosedError(f"the queue {self.name!r} is closed")

    def _enter(self):
        with self._cond:
            self._usable()
            self._active += 1

    def _leave(self):
        with self._cond:
            self._active -= 1
            if not self._active:
                self._cond.notify_all()

    def close(self) -> None:
        """Close the handle (and the store, if this handle opened it).  Safe to call twice.

        gets blocked in other threads on this handle are woken and raise ClosedError
        (each wake-up this costs is at most one spare one, dropped by some get); close
        returns when they have left.  Items stay in the file.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            forked = os.getpid() != self._pid
            if not forked:
                for _ in range(self._active):
                    self._sem.post()
                while self._active:
                    self._cond.wait()
        self._sem.close()
        if self._owned:
            self._store.close()

    def __enter__(self) -> Queue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"semaphore {self.semaphore}"
        return f"<mmkv.Queue {self.name!r} {state}>"
