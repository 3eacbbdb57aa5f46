"""One batch read through the cffi core's mmkv_get_many: the cffi binding's get_many and a
lockless handle's retries (LocklessReads.get_many) both run it."""
import errno
from itertools import accumulate

from .shim import ffi, lib


class BatchRead:
    """The keys of one get_many call (a list of bytes), laid out for the core once.

    ``run(view, wait)`` reads them all as of one moment (see mmkv_get_many in mmkv_shim.h) and
    returns its result code; after ENOBUFS it has made a buffer of the size the values need, so
    the caller runs it again.  ``values(default)`` then gives the list.
    """

    __slots__ = ("n", "blob", "ends", "val_ends", "found", "out", "_mem")

    def __init__(self, keys: list, out=None):
        self.n = len(keys)
        self.blob = b"".join(keys)
        self.ends = ffi.new("uint64_t[]", list(accumulate(map(len, keys))) or 1)
        self.val_ends = ffi.new("uint64_t[]", self.n or 1)
        self.found = ffi.new("uint8_t[]", self.n or 1)
        self.out, self._mem = out, None
        if out is None:
            self._grow(4096)

    def _grow(self, size: int) -> None:
        self._mem = ffi.new("uint8_t[]", max(size, 1))
        self.out = ffi.new("struct mmkv_getbuf *")
        self.out.buf, self.out.cap = self._mem, max(size, 1)

    def run(self, view, wait: int) -> int:
        """One call of the core on view (never NULL: the caller checks the handle is open)."""
        rc = lib.mmkv_get_many(view, self.blob, self.ends, self.n, self.out, self.val_ends, self.found, wait)
        if rc == errno.ENOBUFS:
            self._grow(self.out.val_len)
        return rc

    def values(self, default) -> list:
        """The values of the last run that returned 0, default for an absent key."""
        data = ffi.buffer(self.out.buf, self.out.val_len)[:]
        result, start, found, ends = [], 0, self.found, self.val_ends
        for i in range(self.n):
            if found[i]:
                end = ends[i]
                result.append(data[start:end])
                start = end
            else:
                result.append(default)
        return result
