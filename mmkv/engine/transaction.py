"""Transactions: writes buffered in the handle, committed all at once through a redo journal.

``Store.transaction()`` holds the store lock from the start of the block to the
end of the commit, so the block sees its own writes and nobody else's, and no
other process sees a half-applied transaction (their lock-free reads fall back
to waiting for the lock while it is held).  The commit order (the "transaction"
row of the README's "Commit orders" table), each step after the previous one is
in place (and, with sync="full", on disk):

1. every new value is written as a new record in free space (nothing refers to it yet),
   and every index segment the new keys go to is split if they would overfill it
   (index.reserve: step 4 must not need space);
2. the journal is written: one (new record, old record) pair per key;
3. COMMIT POINT: the meta names the journal (one checksummed meta-copy write);
4. the journal is applied to the index (slot switches, deletions);
5. the meta stops naming the journal; old records and the journal are freed.

A crash before 3 leaves the old values (the new records are leaked space that
recovery frees), and an error before 3 (DiskFullError) frees them before it is
raised; a crash after 3 is finished by recovery, which replays the
journal: every step of a replay is idempotent.  In sync="full" the barriers are
fdatasync calls (one per step, whatever the number of keys), so a committed
transaction also survives power loss; in sync="none" nothing is synced and a
transaction is all-or-nothing against process crashes.
"""
import errno

from . import failpoints, index
from .shim import ffi, lib, raise_for
from ..errors import DiskFullError
from .layout import (JOURNAL_HEADER, JOURNAL_MAGIC, MASK64, REC_EXPIRES, SLOT_OFF_MASK, deadline_value, record_size,
                     siphash, slot_word, stored_value_len)

_DELETE = None          # the buffered value of a deleted key


class Transaction:
    """The buffered writes of one transaction: key -> (value, flags, deadline), or _DELETE.
    now(): expiry's clock (nanoseconds), against which a write's own deadline is read."""

    def __init__(self, now):
        self.writes = {}
        self._now = now
        # namespace name -> (its index's engine, its plain put and delete, its Transaction)
        self.spaces = {}

    def sub(self, ieng, put_alone, delete_alone):
        """The part of this transaction that writes the namespace whose index ieng is (a
        namespaces.NamespaceIndex), made at its first use: a Transaction of its own, committed
        with this one.  put_alone and delete_alone: its plain writes (see commit)."""
        space = self.spaces.get(ieng.name)
        if space is None:
            space = self.spaces[ieng.name] = (ieng, put_alone, delete_alone, Transaction(self._now))
        return space[3]

    def lookup(self, k):
        """(True, value or None) when k was written in this transaction, else (False, None); a
        write whose deadline has passed reads as absent."""
        if k in self.writes:
            op = self.writes[k]
            if op is _DELETE or op[2] and op[2] <= self._now():
                return True, None
            return True, op[0]
        return False, None

    def deadline(self, k) -> int:
        """The deadline this transaction gave k (0: none); k was written in it."""
        op = self.writes[k]
        return 0 if op is _DELETE else op[2]

    def put(self, k, value, flags=0, deadline=0):
        self.writes[k] = (value, flags, deadline)

    def delete(self, k):
        self.writes[k] = _DELETE


def _journal_sum(eng, entries_bytes) -> int:
    return siphash(eng.ident.seed0, eng.ident.seed1, entries_bytes)


def commit(eng, txn: Transaction, put_alone, delete_alone) -> None:
    """Apply txn's writes atomically (caller holds the lock).  Safe against a crash at any point.

    Everything that needs space happens before the commit point: the new records are
    allocated, the index segments the new keys go to are split where they would overfill
    (index.reserve), then the journal is allocated.  An error before the commit point (DiskFullError, say) frees every
    block the commit took, so the content is unchanged and nothing leaks; the splits
    already made stay (they keep the content).  On DiskFullError a transaction of a
    single write is then applied as a plain write, which is atomic by itself and needs
    no journal: a lone ``del`` or ``pop`` in a transaction works on a full disk.  A
    transaction of several writes needs a journal block of 32 + 16 bytes per write
    (plus 8 of block header) in the file's free space or from the disk.
    ``put_alone(k, value, flags)`` and ``delete_alone(k)`` are the plain writes of the
    store (lock held) that carry out that fallback.  Writes to namespaces (txn.spaces) commit
    in the same journal: each entry carries its index's id (namespaces.journal_word).
    :raises DiskFullError: no space for the records or the journal; nothing applied.
    """
    from .namespaces import journal_word
    spaces = [(0, eng, txn.writes, put_alone, delete_alone)]
    spaces += [(ieng.id, ieng, sub.writes, put_one, delete_one)
               for _, (ieng, put_one, delete_one, sub) in sorted(txn.spaces.items())]
    total = sum(len(space[2]) for space in spaces)
    if not total:
        return
    entries, lengths = [], []       # (new record, old record) as journal words; (new len, old len) of key + value
    counted = []                    # the index engine of each entry (its counters)
    taken = []                      # (block, payload) allocated so far: freed on an error before the commit point
    needs = []                      # payload bytes of each entry's old record (0: none)
    try:
        for ns_id, ieng, writes, _, _ in spaces:
            v = ieng.view
            hashes, segments = [], set()    # of the new keys: the index needs a slot for each
            for k, op in writes.items():
                rc = lib.mmkv_find(v, k, len(k))
                if rc not in (0, errno.ENOENT):
                    raise_for(rc, "lookup")
                old, old_len = (v.rec_off, len(k) + stored_value_len(v, len(k))) if rc == 0 else (0, 0)
                old_need = v.rec_need if rc == 0 else 0
                if op is _DELETE:
                    if old:
                        entries.append((0, journal_word(ns_id, old)))
                        lengths.append((0, old_len))
                        needs.append(old_need)
                        counted.append(ieng)
                    continue
                value, flags, deadline = op
                if deadline:        # stored before the value; the sweep's bounds go below it first
                    value, flags = deadline_value(deadline, value), flags | REC_EXPIRES
                    raise_for(lib.mmkv_note_deadline(v, max(deadline, 1)), "deadline")
                h = v.hash
                if not old:
                    hashes.append(h)
                    segments.add(v.seg)
                need = record_size(len(k), len(value))
                rec = eng.allocate(need)                                                  # 1. the new record
                taken.append((rec, need))
                raise_for(lib.mmkv_record_write(eng.view, rec, eng.alloc.capacity(rec), h, k, len(k), value,
                                                len(value), flags), "record write")
                entries.append((journal_word(ns_id, rec), journal_word(ns_id, old)))
                lengths.append((len(k) + len(value), old_len))
                needs.append(old_need)
                counted.append(ieng)
            index.reserve(ieng, hashes, segments)                               # 1b. room in the index
        if not entries:
            return
        if failpoints.armed:
            failpoints.hit(b"txn.after_records")
        body = b"".join(n.to_bytes(8, "little") + o.to_bytes(8, "little") for n, o in entries)
        j = eng.allocate(JOURNAL_HEADER + len(body))                              # 2. the journal
        taken.append((j, JOURNAL_HEADER + len(body)))
        mm = eng.fm.mm
        mm[j + JOURNAL_HEADER:j + JOURNAL_HEADER + len(body)] = body
        if failpoints.armed:
            failpoints.hit(b"txn.mid_journal")
        txn_id = (eng.meta.seq + 1) & MASK64     # the meta write that names it; seq wraps
        header = ffi.new("struct mmkv_journal *")
        header.magic, header.txn, header.count, header.checksum = JOURNAL_MAGIC, txn_id, len(entries), \
            _journal_sum(eng, body)
        mm[j:j + JOURNAL_HEADER] = bytes(ffi.buffer(header))
        eng.barrier()
    except BaseException as exc:
        for off, need in taken:
            eng.free(off, need)
        if isinstance(exc, DiskFullError) and total == 1:
            for _, _, writes, put_one, delete_one in spaces:     # one write: its own single commit point
                for k, op in writes.items():
                    if op is _DELETE:
                        delete_one(k)
                    else:
                        put_one(k, *op)
            return
        raise
    if failpoints.armed:
        failpoints.hit(b"txn.after_journal")
    eng.write_meta(journal_off=j, journal_txn=txn_id, durable=eng.full)         # 3. COMMIT POINT
    if failpoints.armed:
        failpoints.hit(b"txn.after_commit")
    replay(eng, entries)                                                         # 4. apply
    eng.barrier()
    if failpoints.armed:
        failpoints.hit(b"txn.before_retire")
    retire(eng, entries, needs, taken[-1])                                    # 5. retire, free
    w = eng.words
    for ieng in {id(x): x for x in counted}.values():
        mine = [i for i, c in enumerate(counted) if c is ieng]
        keys = sum((1 if entries[i][0] else 0) - (1 if entries[i][1] else 0) for i in mine)
        live = sum(lengths[i][0] - lengths[i][1] for i in mine)
        for word, delta in ((ieng.index_word("count"), keys), (ieng.index_word("live_bytes"), live)):
            w[word] = (w[word] + delta) & MASK64   # counters are a cache (recovery recounts): wrap, never raise


def retire(eng, entries, needs, journal) -> None:
    """Stop naming the journal, then free the replaced records (needs: the payload of each)
    and the journal block (journal: (block, payload)).  A block whose header claims more
    than its payload allows is damage: the free is refused (CorruptionError), never let
    loose on the blocks after it."""
    eng.write_meta(journal_off=0, journal_txn=0, durable=eng.full)
    for (new, old), need in zip(entries, needs):
        if old:
            eng.free(old & SLOT_OFF_MASK, need)
    eng.free(*journal)


def read_journal(eng, meta):
    """The entries of the journal the meta names, or None when it fails its checks."""
    j = meta.journal_off
    w, end = eng.words, eng.alloc.end
    if j % 8 or j + JOURNAL_HEADER > end:
        return None
    header = ffi.cast("struct mmkv_journal *", eng.fm.base + j)
    n = header.count
    if header.magic != JOURNAL_MAGIC or header.txn != meta.journal_txn or n > (end - j) // 16:
        return None
    body = eng.fm.mm[j + JOURNAL_HEADER:j + JOURNAL_HEADER + 16 * n]
    if header.checksum != _journal_sum(eng, body):
        return None
    base = (j + JOURNAL_HEADER) >> 3
    return [(w[base + 2 * i], w[base + 2 * i + 1]) for i in range(n)]


def replay(eng, entries) -> None:
    """Make the indexes say what the journal says (idempotent; caller holds the lock).  An entry
    of a namespace the catalog no longer lists (dropped since) is skipped: its records are
    leaked space recovery frees."""
    from .namespaces import index_of, split_journal_word
    indexes = {}
    for i, (new_word, old_word) in enumerate(entries):
        if failpoints.armed and i == len(entries) // 2:
            failpoints.hit(b"txn.mid_apply")
        ns_id, new = split_journal_word(new_word)
        old_id, old = split_journal_word(old_word)
        ns_id = ns_id if new else old_id
        if ns_id not in indexes:
            indexes[ns_id] = index_of(eng, ns_id)
        ieng = indexes[ns_id]
        if ieng is None:
            continue
        v = ieng.view
        rec = new or old
        if lib.mmkv_record_verify(v, rec):
            # new: only sync="none" after power loss can lose a record its journal names (the
            #      change is dropped: a recent write);  old: the delete was applied already
            continue
        h = v.hash
        key = eng.record_key(rec)
        rc = lib.mmkv_find(v, key, len(key))
        if rc not in (0, errno.ENOENT):
            raise_for(rc, "lookup")
        if not new:
            if rc == 0 and v.rec_off == old:
                raise_for(lib.mmkv_slot_delete(v, v.seg, v.slot), "slot delete")
        elif rc == 0:
            if v.rec_off != new:
                raise_for(lib.mmkv_slot_set(v, v.seg, v.slot, slot_word(h, new)), "slot write")
        else:
            index.insert(ieng, v, slot_word(h, new))


def finish_committed(eng) -> str:
    """Recovery's first step: finish the transaction the meta names, if any.

    Returns "" (none), "replayed", or "dropped" (its journal failed its checks:
    possible only after power loss in sync="none", or damage).
    """
    meta = eng.meta
    if not meta.journal_off:
        return ""
    entries = read_journal(eng, meta)
    if entries is not None:
        replay(eng, entries)
        eng.fm.sync()
    eng.write_meta(journal_off=0, journal_txn=0)
    return "replayed" if entries is not None else "dropped"
