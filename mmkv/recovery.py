"""Recovery: make the file consistent again after a crash, from the index alone.

Run by the next locker after a lock holder died (EOWNERDEAD) and by the first
opener after an unclean shutdown, with the store lock held.  The index is the
truth: a record is live if and only if a slot points to it and it verifies.

Steps, each safe to repeat if recovery itself is killed:
1. verify every slot's record (block in the heap and in use, lengths fit,
   checksum, key hash, tag); drop what fails, duplicates and overlaps;
2. rebuild the allocator's headers and free lists from the gaps between the
   live blocks (records, the index table): leaked space comes back;
3. if any slot was dropped or the probe invariant is broken, copy the good
   entries into a new table, make it durable, switch the meta to it;
4. recompute the counters in the state sector.
"""
import errno
from dataclasses import dataclass

from ._shim import ffi, lib
from .errors import CorruptionError
from .layout import BLOCK_ALLOC, BLOCK_FLAGS, HEAP_START, REC_KEY_LEN_AT, SLOT_OFF_BITS, STATE_WORD


@dataclass
class RecoveryResult:
    reason: str
    records: int = 0            # live records kept
    dropped: int = 0            # slots whose record failed verification
    duplicates: int = 0         # slots pointing at a record (or key) already seen
    overlaps: int = 0           # records whose block overlaps another live block
    index_rebuilt: bool = False
    leaked_bytes: int = 0       # allocated bytes no live structure referenced, now free


def table_block(store):
    """(offset, size) of the block holding the index table, validated against the meta."""
    v, w = store._view, store._words
    b = v.index_off - 8
    need = 8 * v.index_slots + 8
    head = w[b >> 3]
    size = head & ~BLOCK_FLAGS
    if not head & BLOCK_ALLOC or size < need or b + size > store._alloc.end or size & 15:
        size = (need + 15) & ~15   # a torn header: the table needs at least this much
    return b, size


def live_records(store, result=None):
    """[(block, size, slot, key_len + val_len)] for every slot whose record verifies, plus
    the slots to drop; duplicates (same record or same key twice) are dropped too."""
    v, w, end = store._view, store._words, store._alloc.end
    keep, drop, by_rec, by_hash = [], [], set(), {}
    for slot, rec in store._entries():
        word = w[(v.index_off >> 3) + slot]
        rc = lib.mmkv_record_verify(v, rec)
        b = rec - 8
        if rc or (word >> SLOT_OFF_BITS) != (v.hash >> SLOT_OFF_BITS) or b < HEAP_START or \
                (b - HEAP_START) & 15:
            drop.append(slot)
            if result:
                result.dropped += 1
            continue
        size = w[b >> 3] & ~BLOCK_FLAGS
        if b + size > end:
            drop.append(slot)
            if result:
                result.dropped += 1
            continue
        key = store._record_key(rec)
        same = by_hash.setdefault(v.hash, [])
        if rec in by_rec or any(store._record_key(r) == key for r in same):
            drop.append(slot)
            if result:
                result.duplicates += 1
            continue
        by_rec.add(rec)
        same.append(rec)
        keep.append((b, size, slot, (w[(rec + REC_KEY_LEN_AT) >> 3] & 0xFFFFFFFF) + v.val_len))
    return keep, drop


def recover(store, reason: str) -> RecoveryResult:
    """Repair the store in place (caller holds the lock) and return what was found."""
    result = RecoveryResult(reason)
    v, alloc = store._view, store._alloc
    keep, drop = live_records(store, result)
    tb, tsize = table_block(store)
    # overlaps: sort every live block by offset; a record overlapping its predecessor goes
    blocks = sorted([(b, s, slot, n) for b, s, slot, n in keep] + [(tb, tsize, None, 0)])
    live, records, live_bytes, prev_end = [], 0, 0, HEAP_START
    for b, s, slot, n in blocks:
        if b < prev_end:
            if slot is None:   # the table overlaps a record: drop the record before it instead
                pb, ps, pslot, pn = live.pop()
                drop.append(pslot)
                records -= 1
                live_bytes -= pn
                result.overlaps += 1
            else:
                drop.append(slot)
                result.overlaps += 1
                continue
        live.append((b, s, slot, n))
        prev_end = b + s
        if slot is not None:
            records += 1
            live_bytes += n
    for slot in drop:
        lib.mmkv_slot_set(v, slot, 0)
    used_before = store._words[STATE_WORD["used_bytes"]]
    alloc.rebuild([(b, s) for b, s, _, _ in live])
    result.leaked_bytes = max(0, used_before - store._words[STATE_WORD["used_bytes"]])
    bad = ffi.new("uint64_t *")
    if drop or lib.mmkv_index_audit(v, bad) == errno.EBADMSG:
        slots = v.index_slots
        while records + 1 > slots * 0.75:
            slots *= 2
        store._grow_index(slots)
        result.index_rebuilt = True
        if lib.mmkv_index_audit(v, bad):
            raise CorruptionError(f"recovery: the rebuilt index fails its audit at slot {bad[0]}")
    w = store._words
    w[STATE_WORD["count"]] = records
    w[STATE_WORD["live_bytes"]] = live_bytes
    w[STATE_WORD["recoveries"]] += 1
    result.records = records
    store._last_recovery = result
    return result
