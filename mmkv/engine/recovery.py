"""Recovery: make the file consistent again after a crash, from the index alone.

Run by the next locker after a lock holder died (EOWNERDEAD) and by the first
opener after an unclean shutdown, with the store lock held.  The index is the
truth: a record is live if and only if a slot points to it and it verifies.

Steps, each safe to repeat if recovery itself is killed:
0. a file still marked clean (recovery run through a read-only handle, which leaves the mark
   in place, see opening.mark_in_use) is marked not clean, durably, before anything changes;
1. verify every slot's record (block in the heap and in use, lengths fit,
   checksum, key hash, tag); drop what fails, duplicates and overlaps;
2. rebuild the allocator's headers and free lists from the gaps between the
   live blocks (records, the index directory and segments): leaked space comes back;
3. if any slot was dropped or the index fails its audit, build a new index of
   the good entries, make it durable, switch the meta to it;
4. recompute the counters in the state sector.
"""
from . import index, transaction
from .shim import ffi, lib, raise_for
from ..errors import CorruptionError
from .allocator import block_size_for
from .layout import MASK64, SEGMENT_HEADER, STATE_WORD, hash_tag, record_key_len, slot_tag, slot_word, stored_value_len


class RecoveryResult:
    """What one recovery found.  A plain class, not a dataclass: ``dataclasses`` imports
    ``inspect`` (about 8 ms of ``import mmkv``) and this module is imported with the store;
    it keeps a dataclass's face (keyword construction, field-wise repr and equality)."""
    __slots__ = ("reason", "records", "dropped", "duplicates", "overlaps", "resized", "index_rebuilt",
                 "leaked_bytes", "journal", "expired")

    def __init__(self, reason: str, records: int = 0, dropped: int = 0, duplicates: int = 0, overlaps: int = 0,
                 resized: int = 0, index_rebuilt: bool = False, leaked_bytes: int = 0, journal: str = "",
                 expired: int = 0):
        self.reason = reason
        self.records = records              # live records kept
        self.dropped = dropped              # slots whose record failed verification
        self.duplicates = duplicates        # slots pointing at a record (or key) already seen
        self.overlaps = overlaps            # records whose block overlaps another live block
        self.resized = resized              # live blocks whose header claimed more room than they had (trimmed)
        self.index_rebuilt = index_rebuilt
        self.leaked_bytes = leaked_bytes    # allocated bytes no live structure referenced, now free
        self.journal = journal              # a committed transaction: "replayed", or "dropped" (unreadable journal)
        self.expired = expired              # expired records removed (the sweep that ends a recovery)

    def _fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other):
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None     # mutable, and equal by value: unhashable, as a dataclass is

    def __repr__(self):
        return f"RecoveryResult({', '.join(f'{n}={getattr(self, n)!r}' for n in self.__slots__)})"


def live_records(eng, result=None, deadlines=None):
    """([(block, size, (segment, slot), key_len + val_len, slot word, least block size)],
    [(segment, slot) to drop]) for every slot whose record verifies (and, into the dict deadlines if
    given, each kept record's deadline, 0 for none).  Of two slots holding one
    record or one key, the one kept is the one lookups find (what gets and writes have used: the
    other may hold a stale record, freed and merged into a free block whose interior still reads
    as that record), else the first."""
    v, w, alloc = eng.view, eng.words, eng.alloc
    keep, drop, by_rec, by_hash, at = [], [], set(), {}, {}
    for seg, slot, rec in index.entries(v):
        word = w[((seg + SEGMENT_HEADER) >> 3) + slot]
        # the record alone decides: its block header is allocator state, which recovery rewrites
        # (a damaged size word must not cost an intact record)
        rc = lib.mmkv_record_verify_contents(v, rec)
        b = alloc.placement(rec)
        if rc or slot_tag(word) != hash_tag(v.hash) or b is None:
            drop.append((seg, slot))
            if result:
                result.dropped += 1
            continue
        key = eng.record_key(rec)
        same = by_hash.setdefault(v.hash, [])
        twin = rec if rec in by_rec else next((r for r in same if eng.record_key(r) == key), None)
        if twin is not None:
            if result:
                result.duplicates += 1
            if twin == rec or lib.mmkv_find(v, key, len(key)) or v.rec_off != rec:
                drop.append((seg, slot))
                continue
            drop.append(keep[at[twin]][2])              # lookups find this one: the twin goes
            keep[at.pop(twin)] = None
            by_rec.discard(twin)
            same.remove(twin)
            lib.mmkv_record_verify_contents(v, rec)     # v describes rec again
        by_rec.add(rec)
        same.append(rec)
        klen = record_key_len(w, rec)
        least = block_size_for(v.rec_need)
        size = alloc.claimed(b, least)                       # a damaged header: what the record fills
        if b + size > alloc.end:
            drop.append((seg, slot))
            if result:
                result.dropped += 1
            continue
        at[rec] = len(keep)
        if deadlines is not None:
            deadlines[rec] = v.deadline
        keep.append((b, size, (seg, slot), klen + stored_value_len(v, klen), slot_word(v.hash, rec), least))
        # items: (block, size, (segment, slot), key + value bytes, slot word, least block size);
        # blocks and sizes are the allocator's opaque pairs (allocator.placement/claimed)
    return [item for item in keep if item is not None], drop


def recover(eng, reason: str) -> RecoveryResult:
    """Repair the file in place (caller holds the lock) and return what was found; the
    result is also left in ``eng.last_recovery``.  Every index is repaired the same way: the
    main one and each namespace's (engine/namespaces.py); the indexes of dropped namespaces
    (being freed when the crash came) are dropped whole: their blocks come back as free space.
    :raises CorruptionError: the index blocks themselves overlap, the rebuilt index
        fails its audit (the store is then beyond repair in place), or the catalog of
        namespaces is unreadable (it cannot be rebuilt)."""
    from . import namespaces
    result = RecoveryResult(reason)
    alloc = eng.alloc
    eng.mark_dirty()        # a read-only handle may run it on a file still marked clean: unmark it first
    result.journal = transaction.finish_committed(eng)       # 0. a committed transaction is finished
    indexes = [ieng for _, ieng, entry in namespaces.all_indexes(eng) if entry is None or not entry.dropped]
    keep, drops = [], [[] for _ in indexes]
    structure = [(b, s, None, 0, 0, block_size_for(need))
                 for (b, s), need in zip(index.blocks(eng), index.needs(eng.view))]
    for (off, need) in namespaces.catalog_blocks(eng):
        b = alloc.placement(off)
        structure.append((b, alloc.claimed(b, block_size_for(need)), None, 0, 0, block_size_for(need)))
    for k, ieng in enumerate(indexes):
        kept, dropped = live_records(ieng, result)
        keep += [(b, s, (k, *where), n, word, least) for b, s, where, n, word, least in kept]
        drops[k] += dropped
        if k:
            v = ieng.view
            structure += [(b, s, None, 0, 0, block_size_for(need))
                          for (b, s), need in zip(index.blocks(ieng, v), index.needs(v))]
    # overlaps: sort every live block by offset.  A block whose header claims more room than
    # lies before the next live block, but whose contents fit there, is trimmed (a damaged
    # size must not cost its neighbour); what still overlaps its predecessor goes.
    live = []
    for item in sorted(keep + structure, key=lambda it: (it[0], it[1])):
        b, s, where, n, _, least = item
        if s > alloc.most_for_size(b, least) or s < least:
            # more than its allocation had, or less than its verified contents fill (a damaged
            # size word must not hand the tail of an intact record to the allocator): its own
            item = (b, least, *item[2:])
            result.resized += 1
        if live and live[-1][0] + live[-1][1] > b and live[-1][0] + live[-1][5] <= b:
            pb, ps, *rest = live.pop()
            live.append((pb, b - pb, *rest))
            result.resized += 1
        if live and live[-1][0] + live[-1][1] > b:
            result.overlaps += 1
            if where is not None:
                drops[where[0]].append(where[1:])
                continue
            while live and live[-1][0] + live[-1][1] > b:   # index block over records: the records go
                pb, ps, pwhere, pn, *_ = live.pop()
                if pwhere is None:
                    raise CorruptionError(f"recovery: index blocks overlap at {b}; the index is lost")
                drops[pwhere[0]].append(pwhere[1:])
        live.append(item)
    for k, ieng in enumerate(indexes):
        v = ieng.view
        for seg, slot in drops[k]:
            raise_for(lib.mmkv_slot_set(v, seg, slot, 0), "recovery: slot clear")
    used_before = eng.words[STATE_WORD["used_bytes"]]
    alloc.rebuild([(b, s) for b, s, *_ in live])
    result.leaked_bytes = max(0, used_before - eng.words[STATE_WORD["used_bytes"]])
    gone = [e.id for e in namespaces.entries_now(eng) if e.dropped]
    if gone:        # their blocks were left out of the allocator's rebuild: free now; the entries go
        namespaces.commit(eng, eng.catalog.next_id, [e for e in namespaces.entries_now(eng) if not e.dropped])
    records = 0
    for k, ieng in enumerate(indexes):
        mine = [item for item in live if item[2] is not None and item[2][0] == k]
        if drops[k] or index.audit(ieng.view) is not None:
            index.rebuild(ieng, [word for _, _, _, _, word, _ in mine])
            result.index_rebuilt = True
            fault = index.audit(ieng.view)
            if fault is not None:
                raise CorruptionError(f"recovery: the rebuilt index fails its audit at {fault}")
        w = eng.words            # (a rebuild may have grown the file: the mapping, and the catalog, moved)
        w[ieng.index_word("count")] = len(mine)
        w[ieng.index_word("live_bytes")] = sum(item[3] for item in mine)
        # expiry: a whole sweep pass removes the expired records and makes ttl_min exact
        removed, nxt = ffi.new("uint64_t *"), ffi.new("int64_t *")
        raise_for(lib.mmkv_sweep(ieng.view, 0, removed, nxt), "recovery: sweep")
        result.expired += removed[0]
        records += len(mine) - removed[0]
    w = eng.words
    w[STATE_WORD["recoveries"]] = (w[STATE_WORD["recoveries"]] + 1) & MASK64
    w[STATE_WORD["compacting_pid"]] = 0       # a compaction that was running is not any more
    # every other handle reloads the meta before its next locked step: a holder may have died
    # between writing a new meta (a growth, say) and bumping the generation that announces it
    w[STATE_WORD["generation"]] = (w[STATE_WORD["generation"]] + 1) & MASK64
    result.records = records
    eng.last_recovery = result
    return result
