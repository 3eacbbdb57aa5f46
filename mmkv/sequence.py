"""Sequence: unique ids for many processes from one file, without a server.

    with mmkv.Sequence("ids.mmkv", "orders") as ids:
        order_id = ids.next()

The promise: ``next()`` never returns an id that any process (this one, another
one, one that ran before a crash or a reboot) has received from the same name in
the same file.  Ids start at 1 and grow within one handle; between handles they
interleave by blocks.

How: the file holds one 8-byte counter per name, the highest id reserved so far,
under the key ``b"\\x00mmkv:seq:" + name`` of mmkv's own namespace (mmkv.namespace.SYSTEM).  A handle reserves ``block`` ids with
ONE atomic ``db.incr(key, block)`` and then hands them out from memory.  The
counter only moves forward, and it moves before any id of the block is handed
out, so a process killed at any instruction can only skip ids (the rest of its
block), never repeat one.  Across power loss the same holds when the counter
write is durable before ``next()`` returns: a Sequence that opens its own store
does so with ``sync="full"`` by default (one msync per block, so about 0.3 us
per id at block=1000); one built on a Store opened with ``sync="none"`` gives
the power-loss promise only after ``db.sync()``.

Design turned down: one ``incr`` per id (block=1) is exact and gap-free but
costs a locked, and with sync="full" durable, write per id; it is still
available as ``block=1`` (the ``mmkv next-id`` command uses it, since one
process there draws one id).

mmkv's own records live in a namespace of their own: ``len(db)``, ``db.clear()`` and iteration
of the user's keys never see them.  Files written before namespaces kept them under
``b"\\x00mmkv:"`` keys of the main key space; the first Sequence or Queue that may write moves
them (mmkv.namespace.system_space).
"""
from __future__ import annotations

import os
import threading

from .errors import ClosedError, ForkedHandleError
from .store import Store

TYPE_CHECKING = False       # (typing is not imported at run time)
if TYPE_CHECKING:
    from typing import Any

#: Prefix of every sequence's counter key; the name follows as given.
SEQ_PREFIX = b"\x00mmkv:seq:"


def record_name(name, what: str) -> bytes:
    """name as non-empty bytes (str is UTF-8 encoded). :raises TypeError, ValueError:"""
    if isinstance(name, str):
        name = name.encode("utf-8")
    if not isinstance(name, (bytes, bytearray, memoryview)):
        raise TypeError(f"{what} name must be bytes or str, not {type(name).__name__}")
    name = bytes(name)
    if not name:
        raise ValueError(f"{what} name must not be empty")
    return name


def open_or_use(path_or_store, sync: str, options: dict):
    """(store, owned): a Store passed in is used as is; a path is opened here (flag "c")."""
    if isinstance(path_or_store, Store):
        if options:
            raise TypeError(f"open options {sorted(options)} only apply when a path is given, not a Store")
        return path_or_store, False
    return Store(path_or_store, flag="c", sync=sync, **options), True


class Sequence:
    """Ids unique across every process using ``name`` in one file; see the module docstring.

    path_or_store: a path (the store is opened here with ``sync`` and ``options``
    and closed by ``close()``) or an open Store (left open by ``close()``).
    block: ids reserved per write of the counter (>= 1).  A handle killed, or
    closed after another handle reserved, skips the unused rest of its block.

    Threads may share a handle.  A handle must not be used after ``fork``.
    :raises TypeError: block is not an int, name not bytes or str.
    :raises ValueError: block < 1 or an empty name.
    """

    def __init__(self, path_or_store: str | os.PathLike[str] | Store, name: str | bytes, block: int = 1000,
                 sync: str = "full", **options: Any):
        if type(block) is not int:
            raise TypeError(f"block must be an int, not {type(block).__name__}")
        if block < 1:
            raise ValueError(f"block must be >= 1, not {block}")
        self.name = record_name(name, "sequence")
        self.block = block
        self.key = SEQ_PREFIX + self.name
        self._next = self._end = 0          # ids [_next, _end) are reserved for this handle
        self._pid = os.getpid()
        self._mutex = threading.Lock()
        self._db = self._store = None
        self._store, self._owned = open_or_use(path_or_store, sync, options)
        try:
            from .namespace import system_space
            self._db = system_space(self._store)     # mmkv's own namespace (moved there from old files)
        except BaseException:
            if self._owned:
                self._store.close()
            raise

    def next(self) -> int:
        """The next id: never returned before, by any process, for this name in this file.

        Takes no lock while the handle's block lasts; then one atomic ``incr``
        (waiting up to the store's lock_timeout for other processes).
        :raises ClosedError: the handle was closed.  :raises ForkedHandleError: used after fork.
        :raises NotACounterError: the name's key holds something else than a counter.
        :raises OverflowError: the counter would leave the signed 64-bit range.
        :raises LockTimeoutError: another process held the store lock too long.
        """
        with self._mutex:
            self._usable()
            if self._next >= self._end:
                end = self._db.incr(self.key, self.block) + 1   # the commit point of the block
                self._next, self._end = end - self.block, end
            value = self._next
            self._next += 1
            return value

    __next__ = next

    def __iter__(self):
        return self

    def _usable(self):
        if self._db is None:
            raise ClosedError(f"the sequence {self.name!r} is closed")
        if os.getpid() != self._pid:      # the block in memory is the parent's: never hand it out twice
            raise ForkedHandleError(f"the sequence {self.name!r} was opened before fork(); "
                                    "create a new Sequence in the child process")

    def close(self) -> None:
        """Give back the unused rest of the block if no handle has reserved since, then
        close the store if this handle opened it.  Safe to call twice.

        Giving back is one conditional decrement under the store lock: when the
        counter still ends at this handle's block, nobody can hold those ids.
        """
        with self._mutex:
            if self._db is None:
                return
            db, self._db = self._db, None
            store, self._store = self._store, None
            if os.getpid() != self._pid:
                if self._owned:
                    store.close()    # the child's copy: the Store drops it without touching the file
                return
            try:
                unused = self._end - self._next
                if unused and not db.readonly:
                    with db.lock():
                        raw = db.get(self.key)
                        if raw is not None and int.from_bytes(raw, "little", signed=True) == self._end - 1:
                            db.incr(self.key, -unused)
                self._next = self._end = 0
            finally:
                if self._owned:
                    store.close()

    def __enter__(self) -> Sequence:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self):
        state = "closed" if self._db is None else f"block={self.block}"
        return f"<mmkv.Sequence {self.name!r} {state}>"
