"""Iteration in hash order, in batches read under short lock holds.

The index's segments partition the 64-bit key-hash space (a segment of depth d holds the hashes
whose top d bits are its prefix), so the keys in hash order are the segments' keys in the order
of their ranges, each segment's sorted.  A batch is the keys of one segment from a cursor hash on
(``mmkv_scan``: verified, sorted), cut short when their bytes pass a budget; the next batch starts
just after the last hash it holds.  A batch never splits the keys of one hash (two keys with one
64-bit SipHash are possible, if improbable), so the cursor is a hash alone.

What iteration guarantees, whatever other processes do between batches (puts, deletes, index
splits, growth, compaction): a key present for the whole iteration is yielded exactly once, and
no key is yielded twice (the hash ranges batches cover are disjoint and, together, everything).
A key added or removed meanwhile may or may not be yielded.  Each value is the key's value at the
moment its batch was read.  Memory: one batch (at most one segment's keys, and no more than
BATCH_BYTES of keys and values unless a single key and value are larger).
"""
import errno

from .layout import MASK64, RECORD_HEADER, SEGMENT_SLOTS
from .shim import fast, ffi, lib, raise_for

#: Bytes of keys and values a batch gathers before it stops (after a whole hash's keys).
BATCH_BYTES = 4 << 20
#: The least budget a retried batch shrinks to (see Cursor.shrink).
MIN_BATCH_BYTES = 256


class Cursor:
    """Where an iteration is: the next hash to read from (``done`` when past the last), and
    the bytes of keys and values its next batch may gather (``budget``)."""

    __slots__ = ("start", "done", "budget", "_out", "_n", "_end")

    def __init__(self):
        self.start, self.done, self.budget = 0, False, BATCH_BYTES
        self._out = ffi.new("uint64_t[]", 4 * SEGMENT_SLOTS)
        self._n = ffi.new("uint64_t *")
        self._end = ffi.new("uint64_t *")

    def batch(self, eng, with_keys: bool, with_values: bool) -> list:
        """The next batch (caller holds the lock): keys, values or (key, value) pairs, and the
        cursor moved past them.
        :raises CorruptionError: a damaged slot, record or segment (recover() repairs).
        """
        view, mm = eng.view, eng.fm.mm
        rc = lib.mmkv_scan(view, self.start, self._out, SEGMENT_SLOTS, self._n, self._end)
        if rc:
            _diagnose(eng, rc, self.start)
        n = self._n[0]
        mode = 2 if with_keys and with_values else 1 if with_values else 0
        if fast is not None:
            out, used = fast._scan_batch(int(ffi.cast("uintptr_t", self._out)), n,
                                         int(ffi.cast("uintptr_t", view.base)), view.size, mode, self.budget)
        else:
            out, used = _batch(ffi.unpack(self._out, 4 * n), n, mm, mode, self.budget)
        if used < n:
            self.start = self._out[4 * (used - 1)] + 1     # below the range's end: no wrap
        elif self._end[0] == MASK64:
            self.done = True
        else:
            self.start = self._end[0] + 1
        return out

    def shrink(self) -> None:
        """A lockless batch was thrown away (a writer changed the store while it was read): make
        the next try an eighth the size, down to MIN_BATCH_BYTES.  A batch read in Python (the
        cffi binding) takes milliseconds for a whole segment, longer than a busy writer's pauses:
        without this, a writer that pauses for a millisecond between rounds starved a lockless
        iteration for as long as it wrote."""
        self.budget = max(self.budget // 8, min(MIN_BATCH_BYTES, self.budget))

    def regrow(self) -> None:
        """A batch was kept: let the next one gather twice as much, up to BATCH_BYTES."""
        self.budget = min(self.budget * 2, BATCH_BYTES)


def _diagnose(eng, rc: int, start: int):
    """Raise the error mmkv_scan's rc stands for: for damage, the full audit's account of it
    (index.verified_records says which slot and why), else a plain one."""
    from . import index
    if rc == errno.EBADMSG:
        for _ in index.verified_records(eng):
            pass
    raise_for(rc, f"iteration: the index segment of hash {start:#x} (record at {eng.view.rec_off})")


def _batch(flat: list, n: int, mm, mode: int, budget: int):
    """_fast._scan_batch in Python (the cffi binding): (items, entries used)."""
    out, taken, i = [], 0, 0
    while i < n:
        h, rec, klen, vlen = flat[4 * i:4 * i + 4]
        if taken >= budget and i and h != flat[4 * i - 4]:
            break
        klen, skip = klen & 0xffffffff, klen >> 32  # skip: a deadline's bytes before the value
        k0 = rec + RECORD_HEADER                    # key, padding to 8, (deadline,) value
        v0 = k0 + ((klen + 7) & ~7) + skip
        if mode == 0:
            out.append(mm[k0:k0 + klen])
        elif mode == 1:
            out.append(mm[v0:v0 + vlen])
        else:
            out.append((mm[k0:k0 + klen], mm[v0:v0 + vlen]))
        taken += klen * (mode != 1) + vlen * (mode != 0)
        i += 1
    return out, i
