"""Named sub-stores: ``db.namespace(name)``, a mapping with its own key space in the same file.

A Namespace is a handle on one namespace's index (see mmkv/engine/namespaces.py for the format
and commit orders), made from an open Store and sharing everything else with it: the file, the
mapping, the store lock, transactions and durability.  Every per-key call of a Store works on it
(gets, puts, deletes, pop, incr, cas, get_many, set with a ttl, expire, ttl, sweep, iteration,
len, setdefault, update, memoize) with the same guarantees; ``len()`` is the namespace's own
counter (O(1)), iteration reads only its own index, ``clear()`` switches in an empty index in
one commit and frees the old one's records a bounded number per lock hold.

A transaction of the store, or of any of its namespaces, spans them all: ``with db.transaction():
users[k] = v; db[b"n"] = b"1"`` commits both or neither.  ``db.lock()`` and ``ns.lock()`` are the
one store lock.  The handle follows the name: cleared in another process, it reads the new empty
index; dropped, its calls raise NamespaceError.  Whole-file operations (check, recover, compact,
backup, sync) run on the store.  Through a lockless handle a namespace is read as the store is
(every read kept only if no writer was active around it); it cannot be created there.
"""
from __future__ import annotations

from .engine import namespaces
from .engine.namespaces import NamespaceIndex
from .errors import Error, NamespaceError, ReadOnlyError
from .store import Store, _TransactionBlock, _LockBlock

__all__ = ["Namespace", "NamespaceError"]


class Namespace(Store):
    """A named sub-store (``db.namespace(name)``): a MutableMapping of bytes to bytes of its own,
    in its store's file.  See the module docstring."""

    def __init__(self, *args, **kwargs):
        raise TypeError("a Namespace comes from an open store: db.namespace(name)")

    @classmethod
    def _bound(cls, parent: Store, name: str) -> Namespace:
        """A handle on namespace name of parent (which holds the lock; the namespace exists)."""
        ns = cls.__new__(cls)
        eng = NamespaceIndex(parent._engine, name)
        view = eng.view
        for attr in ("path", "flag", "sync_mode", "_full", "_readonly", "_lockless", "_reads", "_fd", "_forked",
                     "_lock", "_close_guard", "_report_after", "_clock", "_open_timeout"):
            object.__setattr__(ns, attr, getattr(parent, attr))
        ns._parent, ns.name, ns._hide_txn, ns._owns_store = parent, name, False, False
        ns._engine, ns._view = eng, view
        if parent._lockless:                  # its reads, retried as the store's are, on its own view
            from .engine.locking import LocklessReads
            ns._reads = LocklessReads(eng, parent._reads.timeout, parent._dead)
        from .engine.shim import ffi
        ns._bind(view, int(ffi.cast("uintptr_t", view)), parent._readonly)
        return ns

    # ------------------------------------------------------------ shared with the store
    @property
    def _txn(self):
        """The store's transaction in progress, as far as it writes this namespace."""
        if self._hide_txn:
            return None
        txn = self._parent._txn
        return None if txn is None else txn.sub(self._engine, self._put, self._delete)

    @_txn.setter
    def _txn(self, value):
        self._hide_txn = value is None     # (Store._count hides the transaction for a moment)

    @property
    def store(self) -> Store:
        """The store this namespace lives in."""
        return self._parent

    def _begin(self):
        return self._parent._begin()

    def _end(self, failed: bool) -> None:
        self._parent._end(failed)

    def transaction(self) -> _TransactionBlock:
        """The store's transaction (see Store.transaction): it spans every namespace."""
        return _TransactionBlock(self._parent)

    def lock(self) -> _LockBlock:
        """The store lock (see Store.lock)."""
        return _LockBlock(self._parent)

    def _acquire(self):
        """Take the store lock; the namespace must still exist.
        :raises NamespaceError: it was dropped (here or in another process)."""
        self._alive()
        self._lock.acquire()
        try:
            self._engine.entry
        except BaseException:
            self._lock.release()
            raise

    def _alive(self):
        if self._parent._view is None or self._view is None:
            self._view = None
            raise self._dead()

    def _dead(self):
        return self._parent._dead()

    def _recover(self, reason):
        from .engine import recovery
        return recovery.recover(self._engine.main, reason)

    # ------------------------------------------------------------ whole-file calls: the store's
    def check(self):
        """The store's audit (every namespace included): see Store.check."""
        return self._parent.check()

    def recover(self):
        """Recovery of the whole store: see Store.recover."""
        return self._parent.recover()

    def compact(self, progress=None):
        """Compaction of the whole store: see Store.compact."""
        return self._parent.compact(progress)

    def backup(self, dest, progress=None):
        """A backup of the whole store (every namespace): see Store.backup."""
        return self._parent.backup(dest, progress)

    def sync(self) -> None:
        """Make every write to the store durable: see Store.sync."""
        self._parent.sync()

    def stats(self):
        """{"namespace": name, "keys", "live_bytes"} and the index's shape, read under the lock."""
        def read():
            from .engine import index
            eng = self._engine
            out = {"namespace": self.name, "keys": self._count(),
                   "live_bytes": eng.words[eng.index_word("live_bytes")]}
            out.update(index.shape(eng))
            return out
        return self._consistently(read)

    def close(self) -> None:
        """Forget this handle; the store stays open (closing the store closes its namespaces),
        unless this handle opened it (``mmkv.open(path, namespace=name)``): then it closes too."""
        self._detach_namespace()
        if self._owns_store:
            self._parent.close()

    def _detach_namespace(self) -> None:
        if self._view is not None:
            self._unbind()
            self._view = None

    def __del__(self):
        pass

    def __repr__(self):
        state = "closed" if self._view is None else f"in {self.path!r}"
        return f"<mmkv.Namespace {self.name!r} {state}>"

    # ------------------------------------------------------------ clear
    def _clear(self):
        """Switch in a fresh empty index (one catalog commit, the lock held); the old index is
        then freed by the caller, a bounded number of records per lock hold."""
        if self._txn is not None:
            raise Error("clear() inside a transaction is not supported; call it outside")
        namespaces.drop(self._engine.main, self.name, clear=True)

    def clear(self) -> None:
        """Remove every key of this namespace, atomically: one catalog commit switches in an empty
        index (O(1) under the lock); the old records are then freed, FREE_STEP per lock hold,
        other processes' calls going on between.  A crash meanwhile leaves them to recovery.
        :raises Error: called inside a transaction."""
        self._write_locked(self._clear)
        self._parent._free_dropped()


def drop(store: Store, name: str) -> None:
    """Remove namespace name and every key in it (Store.drop_namespace)."""
    namespaces.check_name(name)
    store._writable()
    store._acquire()
    try:
        if store._txn is not None:
            raise Error("drop_namespace() inside a transaction is not supported; call it outside")
        store._write_locked(namespaces.drop, store._engine, name, False)
    finally:
        store._release()
    store._free_dropped()


def open_namespace(store: Store, name: str, create: bool) -> Namespace:
    """Store.namespace: the handle on namespace name, created (one catalog commit) when absent."""
    namespaces.check_name(name)
    store._alive()
    if store._lockless:                       # (it may not write: the namespace must exist)
        def find():
            eng = store._engine
            if eng.catalog_error is not None:
                raise eng.catalog_error
            if eng.catalog is None or eng.catalog.named(name) is None:
                raise (ReadOnlyError(f"{store.path!r} is open lockless (read-only): it cannot create namespace "
                                     f"{name!r}") if create else NamespaceError(f"{store.path}: no namespace {name!r}"))
            ns = store._namespaces.get(name)
            if ns is None or ns._view is None:
                ns = store._namespaces[name] = Namespace._bound(store, name)
            return ns
        return store._consistently(find)
    store._acquire()
    try:
        eng = store._engine
        if eng.catalog_error is not None:
            raise eng.catalog_error
        entry = eng.catalog.named(name) if eng.catalog is not None else None
        if entry is None:
            if not create:
                raise NamespaceError(f"{store.path}: no namespace {name!r}")
            store._writable()
            if store._txn is not None:
                raise Error("a namespace cannot be created inside a transaction; create it before")
            store._write_locked(namespaces.create, eng, name)
        handles = store._namespaces
        ns = handles.get(name)
        if ns is None or ns._view is None:
            ns = handles[name] = Namespace._bound(store, name)
        return ns
    finally:
        store._release()


#: The namespace mmkv keeps its own records in (Sequence counters, Queue state and semaphore
#: owners): a name db.namespace() refuses (it holds a NUL), which db.namespaces() does not list.
SYSTEM = "\x00mmkv"
#: The prefix of mmkv's own records in the main key space of files written before namespaces.
LEGACY_PREFIX = b"\x00mmkv:"
#: Set in SYSTEM by the transaction that moved a file's legacy records into it.
_MIGRATED = b"\x00mmkv:moved"


def system_space(store: Store):
    """The mapping mmkv's own records live in: namespace SYSTEM of store, made at first use.
    A file written before namespaces keeps them under LEGACY_PREFIX in its main key space: the
    first handle that may write moves them into SYSTEM, counters staying counters, in one
    transaction (all or nothing, whatever crashes), which also marks the move done.  A read-only
    handle on a file not yet moved gets the store itself, where that file keeps them.  Takes the
    store lock.  :raises ReadOnlyError: a lockless handle."""
    if isinstance(store, Namespace):       # a Sequence or Queue given a namespace: its store's records
        store = store.store
    ns = store._namespaces.get(SYSTEM)
    if ns is not None and ns._view is not None:
        return ns
    store._alive()
    with store.lock():
        eng = store._engine
        if eng.catalog_error is not None:
            raise eng.catalog_error
        if (eng.catalog.named(SYSTEM) if eng.catalog is not None else None) is None:
            if store.readonly:
                return store
            store._write_locked(namespaces.create, eng, SYSTEM)
        ns = store._namespaces[SYSTEM] = Namespace._bound(store, SYSTEM)
        if not store.readonly and ns.get(_MIGRATED) is None:
            _move_legacy_records(store, ns)
    return ns


def _move_legacy_records(store: Store, ns: Namespace) -> None:
    """Move the store's LEGACY_PREFIX records into ns, in one transaction (the lock held)."""
    from .engine.layout import REC_COUNTER
    old = [k for k in store if k.startswith(LEGACY_PREFIX)]
    with store.transaction():
        for k in old:
            value = store._lookup(k)
            if value is None:
                continue
            flags = store._view.rec_flags & REC_COUNTER
            ns._put(k, bytes(value), flags)
            store._delete(k)
        ns._put(_MIGRATED, b"%d" % len(old), 0)
