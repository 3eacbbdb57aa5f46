"""The per-call operations through cffi: the portable twin of the CPython extension.

``CffiCalls`` is the base class of ``mmkv.Store`` when the extension ``mmkv._fast`` is not
in use (PyPy, a build without it, ``MMKV_BINDING=cffi``); ``mmkv._fast.Handle`` is its base
otherwise.  Both give the same calls the same meaning: ``db[k]``, ``get``, ``in``, ``len``,
``db[k] = v``, ``del db[k]``, ``pop``, ``incr`` and the loop of ``update`` (``_put_pairs``).
Each tries the C core's one-call fast path (a lock-free read, a fused write that takes the
lock itself) and hands everything else (inside ``db.lock()``, a remap, growth, a split, a dead
holder, a timeout, a closed handle) to the Store's general path, the ``_*_slow`` methods, with
the core's result code (None: not tried).  The docstrings are the Store's; see mmkv.store for
what the calls raise.

Here cffi converts the arguments and releases the GIL around every C call; native/mmkv_fast.c
says what the extension does instead.
"""
import _thread
import errno
from itertools import accumulate

from .engine.batchread import BatchRead
from .engine.shim import ffi, lib
from .engine.tunables import GET_BUFFER, MAX_KEY_SIZE, MAX_VALUE_SIZE
from .errors import LimitError

_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
#: Pairs per call of the core's batch put in _put_pairs.
_BATCH = 4096
_RECORD_HEADER = ffi.sizeof("struct mmkv_record")


def as_bytes(obj, what: str) -> bytes:
    """obj as bytes: bytes as is, str as UTF-8, bytearray and memoryview copied.
    :raises TypeError: anything else (what: "key" or "value" names it)."""
    if type(obj) is bytes:
        return obj
    if isinstance(obj, str):
        return obj.encode("utf-8")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj)
    raise TypeError(f"mmkv {what}s must be bytes or str, not {type(obj).__name__}")


def check_sizes(k: bytes, val: bytes) -> None:
    """:raises LimitError: k or val is longer than the engine's limits."""
    if len(k) > MAX_KEY_SIZE:
        raise LimitError(f"key of {len(k)} bytes is longer than the {MAX_KEY_SIZE}-byte limit")
    if len(val) > MAX_VALUE_SIZE:
        raise LimitError(f"value of {len(val)} bytes is longer than the {MAX_VALUE_SIZE}-byte limit")


def checked_pairs(source) -> list:
    """The pairs of source (a mapping, an object with items(), or an iterable of pairs) as a list
    of (key bytes, value bytes), each checked as dict.update and a put check them.
    :raises TypeError, ValueError: a pair is not a pair of bytes or str.  :raises LimitError: too large."""
    pairs = source.items() if hasattr(source, "items") else source
    items = []
    for i, pair in enumerate(pairs):
        try:
            pair = tuple(pair)
        except TypeError:
            raise TypeError(f"cannot convert dictionary update sequence element #{i} to a sequence") from None
        if len(pair) != 2:
            raise ValueError(f"dictionary update sequence element #{i} has length {len(pair)}; 2 is required")
        key, value = pair
        k = key if type(key) is bytes else as_bytes(key, "key")
        val = value if type(value) is bytes else as_bytes(value, "value")
        if len(k) > MAX_KEY_SIZE or len(val) > MAX_VALUE_SIZE:
            check_sizes(k, val)
        items.append((k, val))
    return items


class _PerThread(_thread._local):
    """Each thread's own output buffers for the fast paths."""

    def __init__(self):
        self.mem = ffi.new("uint8_t[]", GET_BUFFER)
        self.cbuf = ffi.cast("char *", self.mem)      # ffi.unpack of a char * gives bytes
        self.out = ffi.new("struct mmkv_getbuf *")
        self.out.buf, self.out.cap = self.mem, GET_BUFFER
        self.probe = ffi.new("struct mmkv_getbuf *")  # capacity 0: `in` copies nothing
        self.probe.buf, self.probe.cap = self.mem, 0
        self.i64 = ffi.new("int64_t *")
        self.u64 = ffi.new("uint64_t *")


class CffiCalls:
    """The per-call operations of a Store, through cffi.  Uses the Store's ``_view`` (None when
    closed or forked), ``_lock`` (its depth: this handle holds the lock) and ``_readonly``."""

    __slots__ = ()
    _per_thread = None

    def _bind(self, owner, view, readonly):
        """Nothing to do: the calls read the Store's own attributes (the extension keeps a copy)."""
        self._per_thread = _PerThread()

    def _unbind(self):
        """Nothing to do (see _bind)."""

    # ------------------------------------------------------------ reads
    def __getitem__(self, key):
        """The value of key, as bytes.  Lock-free when no writer is active (see mmkv_get), else
        under the lock.  :raises KeyError: absent.  :raises TypeError: key is not bytes or str."""
        k = key if type(key) is bytes else as_bytes(key, "key")
        rc = None
        v = self._view
        if v is None:           # closed or forked
            raise self._dead()
        if not self._lock.depth:   # the hot path, repeated in get(): a call costs more than these lines
            local = self._per_thread
            out = local.out
            rc = lib.mmkv_get(v, k, len(k), out)
            if rc == 0:
                return ffi.unpack(local.cbuf, out.val_len)
            if rc == errno.ENOENT and out.expired:
                self._reap(k)
        value = self._read_slow(rc, k)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key, default=None):
        """The value of key, or default when it is absent (never KeyError).  Lock-free while no
        writer is active, else waits for the lock.  :raises TypeError: key is not bytes or str."""
        k = key if type(key) is bytes else as_bytes(key, "key")
        rc = None
        v = self._view
        if v is None:
            raise self._dead()
        if not self._lock.depth:
            local = self._per_thread
            out = local.out
            rc = lib.mmkv_get(v, k, len(k), out)
            if rc == 0:
                return ffi.unpack(local.cbuf, out.val_len)
            if rc == errno.ENOENT:
                if out.expired:
                    self._reap(k)
                return default
        value = self._read_slow(rc, k)
        return default if value is None else value

    def get_many(self, keys, default=None) -> list:
        """The values of keys, in their order (default for an absent key), all as of one moment:
        no other process's write lands between two of them.  Lock-free while no writer is active
        (else under one hold of the lock, O(len(keys))).  :raises TypeError: keys is not
        iterable, or one is not bytes or str."""
        ks = [k if type(k) is bytes else as_bytes(k, "key") for k in keys]
        v = self._view
        if v is None:
            raise self._dead()
        rc = None
        if not self._lock.depth:
            batch = BatchRead(ks, self._per_thread.out)
            for _ in range(3):
                rc = batch.run(v, 1)
                if rc != errno.ENOBUFS:
                    break
            if rc == 0:
                return batch.values(default)
        return self._get_many_slow(rc, ks, default)

    def __contains__(self, key):
        """True when key is present (its record verified, as get does); lock-free like get."""
        k = key if type(key) is bytes else as_bytes(key, "key")
        rc = None
        v = self._view
        if v is None:
            raise self._dead()
        if not self._lock.depth:
            probe = self._per_thread.probe
            rc = lib.mmkv_get(v, k, len(k), probe)   # capacity 0: copies nothing
            if rc == 0 or rc == errno.ENOBUFS:
                return True
            if rc == errno.ENOENT:
                if probe.expired:
                    self._reap(k)
                return False
        return self._contains_slow(rc, k)

    def __len__(self):
        """Number of keys: O(1), lock-free while no writer is active (else under the lock; inside a
        transaction, counting its writes)."""
        v = self._view
        if v is None:
            raise self._dead()
        if not self._lock.depth:
            out = self._per_thread.u64
            if lib.mmkv_count_nowait(v, out) == 0 and out[0] <= v.size // _RECORD_HEADER:
                return out[0]
        return self._len_slow()

    # ------------------------------------------------------------ writes
    def __setitem__(self, key, value):
        """Store value under key; visible to every process when the call returns (with sync="full",
        the record is on disk before the slot that makes it live, both before it returns).
        :raises TypeError: key or value is not bytes or str.  :raises LimitError: too large.
        :raises DiskFullError: the file cannot grow; the store is unchanged."""
        k = key if type(key) is bytes else as_bytes(key, "key")
        val = value if type(value) is bytes else as_bytes(value, "value")
        if self._readonly:
            self._writable()
        if len(k) > MAX_KEY_SIZE or len(val) > MAX_VALUE_SIZE:
            check_sizes(k, val)
        v = self._view
        if v is None:
            raise self._dead()
        rc = None
        if not self._lock.depth:
            rc = lib.mmkv_put(v, k, len(k), val, len(val), 0, 1)
            if rc == 0:
                return
        self._put_slow(rc, k, val)

    def __delitem__(self, key):
        """Remove key; visible to every process when the call returns.
        :raises KeyError: key is absent.  :raises TypeError: key is not bytes or str."""
        k = key if type(key) is bytes else as_bytes(key, "key")
        if self._readonly:
            self._writable()
        v = self._view
        if v is None:
            raise self._dead()
        rc = None
        if not self._lock.depth:
            rc = lib.mmkv_delete(v, k, len(k), 1)
            if rc == 0:
                return
            if rc == errno.ENOENT:
                raise KeyError(key)
        if not self._delete_slow(rc, k):
            raise KeyError(key)

    def pop(self, key, *default):
        """Remove key and return its value (or default), atomically under the lock.
        :raises KeyError: absent and no default."""
        if len(default) > 1:
            raise TypeError(f"pop expected at most 2 arguments, got {1 + len(default)}")
        k = key if type(key) is bytes else as_bytes(key, "key")
        if self._readonly:
            self._writable()
        v = self._view
        if v is None:
            raise self._dead()
        rc = None
        if not self._lock.depth:
            local = self._per_thread
            out = local.out
            rc = lib.mmkv_take(v, k, len(k), out, 1)
            if rc == 0:
                return ffi.unpack(local.cbuf, out.val_len)
        value = None if rc == errno.ENOENT else self._pop_slow(rc, k)
        if value is None:
            if default:
                return default[0]
            raise KeyError(key)
        return value

    def incr(self, key, delta: int = 1) -> int:
        """Add delta to the 8-byte signed counter at key and return the new value; atomic across
        processes, a missing key counts from 0; stored as 8 little-endian bytes.
        :raises NotACounterError: the value is not 8 bytes.  :raises OverflowError: the result
            leaves the signed 64-bit range.  :raises TypeError: delta is not an int."""
        k = key if type(key) is bytes else as_bytes(key, "key")
        v = self._view
        rc = None
        if (v is not None and type(delta) is int and len(k) <= MAX_KEY_SIZE and not self._readonly
                and not self._lock.depth and _INT64_MIN <= delta <= _INT64_MAX):
            out = self._per_thread.i64
            rc = lib.mmkv_incr(v, k, len(k), delta, out, 1)
            if rc == 0:
                return out[0]
        return self._incr_slow(rc, k, delta)     # also says why for a bad delta, key or handle

    def cas(self, key, expected, new) -> bool:
        """Compare-and-swap: when key holds expected (None: when key is absent), store new (None:
        delete key) and return True; else change nothing and return False.  Atomic across
        processes (the comparison and the write under one hold of the store lock; inside a
        transaction, against its view and into its writes).  Blocks while another process holds
        the lock.  :raises TypeError: key, expected or new is not bytes or str (or None).
        :raises LimitError: new too large.  :raises DiskFullError: no room; nothing changed.
        :raises ReadOnlyError: a read-only handle."""
        k = key if type(key) is bytes else as_bytes(key, "key")
        e = expected if expected is None or type(expected) is bytes else as_bytes(expected, "value")
        n = new if new is None or type(new) is bytes else as_bytes(new, "value")
        if self._readonly:
            self._writable()
        check_sizes(k, b"" if n is None else n)
        v = self._view
        if v is None:
            raise self._dead()
        rc = None
        if not self._lock.depth:
            rc = lib.mmkv_cas(v, k, len(k), b"" if e is None else e, 0 if e is None else len(e), e is not None,
                              b"" if n is None else n, 0 if n is None else len(n), n is not None, 1)
            if rc == 0 or rc == errno.ECANCELED:
                return rc == 0
        return self._cas_slow(rc, k, (e, n))

    def _put_pairs(self, source):
        """Store every pair of source (a dict, an object with items(), or pairs) in order; the
        caller holds the lock.  Every pair is checked before anything is written."""
        items = checked_pairs(source)
        self._reserve_for(len(items), sum(_RECORD_HEADER + ((len(k) + 7) & ~7) + len(val) for k, val in items))
        done = ffi.new("uint64_t *")
        for start in range(0, len(items), _BATCH):
            chunk = items[start:start + _BATCH]
            keys, vals = b"".join(k for k, _ in chunk), b"".join(val for _, val in chunk)
            key_ends = ffi.new("uint64_t[]", list(accumulate(len(k) for k, _ in chunk)))
            val_ends = ffi.new("uint64_t[]", list(accumulate(len(val) for _, val in chunk)))
            done[0], grew_for = 0, None
            while True:
                rc = lib.mmkv_put_many(self._view, keys, key_ends, vals, val_ends, len(chunk), done)
                if rc == 0:
                    break
                grew_for = self._make_room(rc, *chunk[done[0]], grew_for)
