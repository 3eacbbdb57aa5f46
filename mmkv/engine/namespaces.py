"""Named sub-stores: the catalog of namespaces and the index of each (layout: "Catalog of named
sub-stores" in native/mmkv_layout.h).

A namespace is an index of its own (a directory and segments, as the main index) over the one
heap, so its len() is its own counter, its iteration reads only its own segments, and clearing
or dropping it is one switch of roots.  The catalog, a block the meta names, lists each
namespace's name, id and index roots, and carries its counters.  Every change of the catalog
copies it: the new copy is written and made durable, the meta names it (the commit point: one
checksummed meta write), the old copy is freed.  A crash before the meta write leaves the old
catalog in force (the new copy is leaked space the next recovery frees); after it, the new.

Dropping or clearing a namespace switches its index out (its entry marked MMKV_NS_DROPPED, or
replaced by a fresh empty index) in one such commit; the records and blocks of the old index
are then freed a bounded number per lock hold (``free_dropped``), and the entry goes from the
catalog when its index is empty.  What a crash leaves of it is freed by recovery, which keeps
only the blocks live indexes reach.

Callers hold the store lock for every change; reads of the catalog happen in Engine.set_meta,
which every handle runs when the meta changes.  Functions here are handed the Engine, never the
Store.
"""
import errno

from . import failpoints
from .layout import CATALOG_ENTRY, CATALOG_HEADER, DIR_MAX_BITS, MASK64, SLOT_OFF_MASK, siphash
from .shim import ffi, lib, raise_for
from ..errors import CorruptionError, NamespaceError

MAGIC = lib.MMKV_CATALOG_MAGIC
MAX_NAMESPACES = lib.MMKV_CATALOG_MAX
NAME_MAX = lib.MMKV_NAME_MAX
DROPPED = lib.MMKV_NS_DROPPED
_COUNTS_AT = ffi.offsetof("struct mmkv_catalog_entry", "counts")
_NAME_LEN_SHIFT = 48
#: Records of a dropped index freed per lock hold (free_dropped).
FREE_STEP = 512


class Entry:
    """One catalog entry as the engine uses it: ``id``, ``dir_off``, ``dir_bits``, ``name``
    (str), ``flags``, and ``counts_at``, the mapping offset of its counters in the catalog copy
    it was read from."""
    __slots__ = ("id", "dir_off", "dir_bits", "name", "flags", "counts_at")

    def __init__(self, id, dir_off, dir_bits, name, flags=0, counts_at=0):
        self.id, self.dir_off, self.dir_bits, self.name, self.flags = id, dir_off, dir_bits, name, flags
        self.counts_at = counts_at

    @property
    def dropped(self) -> bool:
        return bool(self.flags & DROPPED)

    def __repr__(self):
        return f"Entry({self.id}, {self.name!r}, dir {self.dir_off}/{self.dir_bits}, flags {self.flags})"


class Catalog:
    """A parsed catalog: ``off`` (its payload offset), ``next_id``, ``entries`` (list of Entry)."""
    __slots__ = ("off", "next_id", "entries")

    def __init__(self, off, next_id, entries):
        self.off, self.next_id, self.entries = off, next_id, entries

    def named(self, name: str):
        """The live (not dropped) entry of that name, or None."""
        return next((e for e in self.entries if e.name == name and not e.dropped), None)

    def by_id(self, ns_id: int):
        """The entry with that id (dropped or not), or None."""
        return next((e for e in self.entries if e.id == ns_id), None)


def check_name(name) -> str:
    """name as a namespace name (str, 1..255 bytes of UTF-8, no NUL).
    :raises TypeError: not a str.  :raises ValueError: empty, too long, or holds a NUL."""
    if not isinstance(name, str):
        raise TypeError(f"a namespace name must be a str, not {type(name).__name__}")
    raw = name.encode("utf-8", "surrogatepass")
    if not raw or len(raw) > NAME_MAX or "\0" in name:
        raise ValueError(f"a namespace name must be 1 to {NAME_MAX} bytes of UTF-8 without NUL: {name[:40]!r}")
    return name


def block_bytes(entries) -> int:
    """Payload bytes of a catalog holding these entries."""
    return CATALOG_HEADER + CATALOG_ENTRY * len(entries) + sum(len(e.name.encode("utf-8", "surrogatepass"))
                                                               for e in entries)


def _sum(ident, raw: bytes, count: int) -> int:
    """The catalog checksum over raw (the whole catalog's bytes): the header's first three words,
    each entry's roots (its first five words) and the names."""
    parts = [raw[:24]]
    for i in range(count):
        at = CATALOG_HEADER + i * CATALOG_ENTRY
        parts.append(raw[at:at + 40])
    parts.append(raw[CATALOG_HEADER + count * CATALOG_ENTRY:])
    return siphash(ident.seed0, ident.seed1, b"".join(parts))


def parse(eng, off: int) -> Catalog:
    """The catalog at payload offset off, every field checked against the file.
    :raises CorruptionError: it lies outside the heap, or fails its magic, checksum or bounds."""
    alloc, mm = eng.alloc, eng.fm.mm
    end = alloc.end

    def bad(why):
        return CorruptionError(f"{eng.path}: the catalog of namespaces at {off} {why}; recovery cannot rebuild "
                               "it (restore from a backup)")
    if off % 8 or alloc.placement(off) is None or off + CATALOG_HEADER > end:
        raise bad("lies outside the heap")
    head = ffi.cast("struct mmkv_catalog *", eng.fm.base + off)
    count, next_id = head.count, head.next_id
    if head.magic != MAGIC:
        raise bad("has no catalog magic")
    if count > MAX_NAMESPACES or off + CATALOG_HEADER + count * CATALOG_ENTRY > end:
        raise bad(f"claims {count} entries")
    raw_entries = ffi.cast("struct mmkv_catalog_entry *", eng.fm.base + off + CATALOG_HEADER)
    names_at = CATALOG_HEADER + count * CATALOG_ENTRY
    names_end = names_at
    lens = []
    for i in range(count):
        e = raw_entries[i]
        at, n = e.name_at & ((1 << _NAME_LEN_SHIFT) - 1), e.name_at >> _NAME_LEN_SHIFT
        if at != names_end or not 1 <= n <= NAME_MAX or off + at + n > end:
            raise bad(f"names entry {i} out of place")
        lens.append(n)
        names_end += n
    raw = bytes(mm[off:off + names_end])
    if head.checksum != _sum(eng.ident, raw, count):
        raise bad("fails its checksum")
    entries, ids, names, pos = [], set(), set(), names_at
    for i in range(count):
        e = raw_entries[i]
        try:
            name = raw[pos:pos + lens[i]].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            raise bad(f"holds a name that is not UTF-8 (entry {i})") from None
        pos += lens[i]
        if not 1 <= e.id < next_id or e.id in ids or e.flags & ~DROPPED or e.dir_bits > DIR_MAX_BITS \
                or e.dir_off % 8 or alloc.placement(e.dir_off) is None or e.dir_off + (8 << e.dir_bits) > end:
            raise bad(f"has an impossible entry {i} (id {e.id}, directory {e.dir_off}/{e.dir_bits})")
        if not e.flags & DROPPED:
            if name in names:
                raise bad(f"names {name!r} twice")
            names.add(name)
        ids.add(e.id)
        entries.append(Entry(e.id, e.dir_off, e.dir_bits, name, e.flags,
                             off + CATALOG_HEADER + i * CATALOG_ENTRY + _COUNTS_AT))
    return Catalog(off, next_id, entries)


def commit(eng, next_id: int, entries: list, fresh_counts=(), allocate=None) -> None:
    """Write a new catalog copy of these entries, make it durable, name it in the meta (the
    commit point), free the old copy.  Each entry's counters are copied from its counts_at (0:
    zeros); those in fresh_counts (ids) start at zero.  The copy's block comes from
    ``allocate(payload)`` (default: the engine's; compaction passes one that takes low free
    space).  Caller holds the lock.  An empty list with no old catalog writes nothing.
    :raises DiskFullError: no room for the copy; nothing changed (also whatever ``allocate``
        raises, before anything is written)."""
    old = eng.catalog
    if not entries and old is None:
        return
    if not entries:
        new_off = 0
    else:
        eng.raise_version()         # before any catalog exists: older mmkvs must refuse the file
        need = block_bytes(entries)
        new_off = (allocate or eng.allocate)(need)
        try:
            mm, w = eng.fm.mm, eng.words
            names = b"".join(e.name.encode("utf-8", "surrogatepass") for e in entries)
            raw = bytearray(need)
            buf = ffi.from_buffer(raw)
            head = ffi.cast("struct mmkv_catalog *", buf)
            head.magic, head.count, head.next_id = MAGIC, len(entries), next_id
            slots = ffi.cast("struct mmkv_catalog_entry *", ffi.cast("char *", buf) + CATALOG_HEADER)
            at = CATALOG_HEADER + CATALOG_ENTRY * len(entries)
            for i, e in enumerate(entries):
                slot = slots + i
                n = len(e.name.encode("utf-8", "surrogatepass"))
                slot.id, slot.dir_off, slot.dir_bits, slot.flags = e.id, e.dir_off, e.dir_bits, e.flags
                slot.name_at = at | n << _NAME_LEN_SHIFT
                at += n
                if e.counts_at and e.id not in fresh_counts:
                    c = e.counts_at >> 3
                    slot.counts.count, slot.counts.live_bytes = w[c], w[c + 1]
                    slot.counts.ttl_min, slot.counts.sweep_at, slot.counts.sweep_min = w[c + 2], w[c + 3], w[c + 4]
            raw[CATALOG_HEADER + CATALOG_ENTRY * len(entries):] = names
            head.checksum = _sum(eng.ident, bytes(raw), len(entries))
            mm[new_off:new_off + need] = raw
            eng.make_durable((new_off, need))
            if failpoints.armed:
                failpoints.hit(b"catalog.before_meta")
        except BaseException:
            eng.free(new_off, need)
            raise
    eng.write_meta(catalog_off=new_off)
    if failpoints.armed:
        failpoints.hit(b"catalog.after_meta")
    if old is not None:
        eng.free(old.off, block_bytes(old.entries))


def entries_now(eng) -> list:
    """The entries of the catalog in force (a copy of the list), [] without one.
    :raises CorruptionError: the catalog the meta names is unreadable (a change made from an
        empty list would lose every namespace)."""
    if eng.catalog_error is not None:
        raise eng.catalog_error
    return list(eng.catalog.entries) if eng.catalog is not None else []


def create(eng, name: str) -> Entry:
    """Add an empty namespace called name (caller holds the lock; the name is not in use).
    :raises LimitError: MAX_NAMESPACES exist.  :raises DiskFullError: no room; nothing changed."""
    from . import index
    from ..errors import LimitError
    entries = entries_now(eng)
    if len(entries) >= MAX_NAMESPACES:
        raise LimitError(f"{eng.path}: a file holds at most {MAX_NAMESPACES} namespaces")
    next_id = eng.catalog.next_id if eng.catalog is not None else 1
    if next_id >= 1 << 16:
        raise LimitError(f"{eng.path}: namespace ids are used up (65,535 created over the file's life)")
    dir_off, dir_bits = index.create(eng.allocate, lambda: eng.view, lambda: eng.words, eng.free)
    entry = Entry(next_id, dir_off, dir_bits, name)
    try:
        eng.make_durable(*index.pieces(eng, _private_view(eng, entry)))
        commit(eng, next_id + 1, entries + [entry], fresh_counts=(next_id,))
    except BaseException:
        _free_index_blocks(eng, entry)
        raise
    return eng.catalog.by_id(next_id)


def drop(eng, name: str, clear: bool) -> None:
    """Switch namespace name's index out (caller holds the lock): ``clear`` gives it a fresh
    empty index, else its entry goes (the name is free again).  The old index stays in the
    catalog marked dropped until free_dropped has freed it.
    :raises NamespaceError: no such namespace.  :raises DiskFullError: no room; nothing changed."""
    from . import index
    entries = entries_now(eng)
    entry = eng.catalog.named(name) if eng.catalog is not None else None
    if entry is None:
        raise NamespaceError(f"{eng.path}: no namespace {name!r}")
    next_id = eng.catalog.next_id
    gone = Entry(entry.id, entry.dir_off, entry.dir_bits, entry.name, DROPPED, entry.counts_at)
    new_entries = [gone if e is entry else e for e in entries]
    fresh = ()
    if clear:
        dir_off, dir_bits = index.create(eng.allocate, lambda: eng.view, lambda: eng.words, eng.free)
        fresh_entry = Entry(next_id, dir_off, dir_bits, entry.name)
        try:
            eng.make_durable(*index.pieces(eng, _private_view(eng, fresh_entry)))
            new_entries.append(fresh_entry)
            fresh = (next_id,)
            commit(eng, next_id + 1, new_entries, fresh_counts=fresh)
        except BaseException:
            _free_index_blocks(eng, fresh_entry)
            raise
    else:
        commit(eng, next_id, new_entries)


def dropped_ids(eng) -> list:
    """Ids of the catalog's dropped entries (indexes still being freed)."""
    return [e.id for e in entries_now(eng) if e.dropped]


def free_dropped(eng, ns_id: int, budget: int = FREE_STEP) -> bool:
    """Free up to budget records of the dropped index ns_id (caller holds the lock; one C call,
    mmkv_drain_index: each slot cleared, then its record freed, a damaged one left to recovery);
    when it holds none, free its blocks and remove its entry (a catalog commit).  True when it
    is gone.  Where this handle stopped is kept (``eng.drain_cursors``): nothing ever fills a
    slot of a dropped index, so the slots before it stay clear whoever else frees meanwhile.  A
    crash part way leaves records no slot names any more (leaked space recovery frees).
    :raises CorruptionError: its directory or a segment is damaged, or a record's block does
        not free (run recover(), which frees what a dropped index holds whole)."""
    entry = eng.catalog.by_id(ns_id) if eng.catalog is not None else None
    cursors = eng.drain_cursors
    if entry is None or not entry.dropped:
        cursors.pop(ns_id, None)
        return True
    v = _private_view(eng, entry)
    cursor, cleared = ffi.new("uint64_t *", cursors.get(ns_id, 0)), ffi.new("uint64_t *")
    rc = lib.mmkv_drain_index(v, cursor, budget, cleared)
    cursors[ns_id] = cursor[0]
    if rc == 0:
        return False
    if rc != errno.ENOENT:
        raise_for(rc, f"freeing dropped namespace {entry.name!r}")
    entries = [e for e in entries_now(eng) if e.id != ns_id]
    commit(eng, eng.catalog.next_id, entries)
    _free_index_blocks(eng, entry)
    cursors.pop(ns_id, None)
    return True


def _free_index_blocks(eng, entry) -> None:
    """Free the directory and segments of an index no root names any more."""
    from . import index
    for off, need in index.pieces(eng, _private_view(eng, entry)):
        eng.free(off, need)


def _private_view(eng, entry):
    """A view of entry's index (not kept: for building, freeing and auditing it)."""
    return new_view(eng.view, entry)


def new_view(main, entry):
    """A view of entry's index for a handle to keep (a copy of main's settings)."""
    v = ffi.new("struct mmkv_view *")
    v[0] = main[0]
    v.active = v.closing = v.sweep_tick = 0     # (held: as the main view's, which its handle's lock keeps)
    v.dir_off, v.dir_bits, v.counts_at = entry.dir_off, entry.dir_bits, entry.counts_at
    return v


def point_view(view, main, entry) -> None:
    """Make view (a namespace's, kept by the engine) describe entry's index in main's mapping
    as it is now (after a remap or a catalog change)."""
    view.base, view.size, view.heap_end, view.generation = main.base, main.size, main.heap_end, main.generation
    view.dir_off, view.dir_bits, view.counts_at = entry.dir_off, entry.dir_bits, entry.counts_at


#: Journal entries carry the namespace id of their record in the top bits of each word.
JOURNAL_ID_SHIFT = 48


def journal_word(ns_id: int, off: int) -> int:
    return (ns_id << JOURNAL_ID_SHIFT | off) & MASK64 if off else 0


def split_journal_word(word: int) -> tuple:
    """(namespace id, record offset) of a journal word."""
    return word >> JOURNAL_ID_SHIFT, word & SLOT_OFF_MASK


__all__ = ["NamespaceError", "Entry", "Catalog", "check_name", "parse", "commit", "create", "drop",
           "free_dropped", "dropped_ids", "new_view", "point_view", "journal_word", "split_journal_word"]


_FIELDS = {"count": 0, "live_bytes": 1, "ttl_min": 2, "sweep_at": 3, "sweep_min": 4}


class NamespaceIndex:
    """The engine as one namespace's index sees it: what the index, expiry and transaction code
    call on an Engine, with ``view`` the namespace's, the counters its catalog entry's, and the
    roots' commit (``write_meta(dir_off=, dir_bits=)``) a catalog commit.  Everything else is
    the file's Engine (``main``).  It follows the name: after a clear (here or in another
    process) it describes the name's new index.
    :raises NamespaceError: (from ``entry`` and what uses it) no namespace has the name now."""

    def __init__(self, main, name: str):
        self.main, self.name = main, name

    def __getattr__(self, attr):
        return getattr(self.main, attr)

    @property
    def entry(self):
        """The namespace's catalog entry as this handle last read it.
        :raises NamespaceError: dropped (by any process).  :raises CorruptionError: the catalog
            is unreadable."""
        main = self.main
        if main.catalog_error is not None:
            raise main.catalog_error
        entry = main.catalog.named(self.name) if main.catalog is not None else None
        if entry is None:
            raise NamespaceError(f"{main.path}: no namespace {self.name!r} (dropped?)")
        return entry

    @property
    def id(self) -> int:
        return self.entry.id

    @property
    def view(self):
        return self.main.ns_view(self.entry)

    def index_word(self, field: str) -> int:
        """Word index (into ``words``) of one of the namespace's counters."""
        return (self.entry.counts_at >> 3) + _FIELDS[field]

    def stale(self) -> bool:
        main = self.main
        return main.stale() or self.view.generation != main.view.generation

    def reload(self) -> None:
        """The main engine's reload (which re-reads the catalog and points this view again).
        :raises NamespaceError: the namespace is gone (a lockless read would retry forever)."""
        self.main.reload()
        self.entry

    def count_plausible(self) -> bool:
        return self.main.words[self.index_word("count")] <= self.main.fm.size // 32

    def poison_sweep(self) -> None:
        from .layout import SWEEP_POISON
        self.main.words[self.index_word("sweep_at")] |= SWEEP_POISON

    def write_meta(self, durable: bool = True, **changes) -> None:
        """Commit new index roots (dir_off, dir_bits) of this namespace: a catalog commit."""
        if set(changes) - {"dir_off", "dir_bits"}:
            raise ValueError(f"a namespace's index commits only its roots, not {sorted(changes)}")
        entry = self.entry
        main = self.main
        updated = Entry(entry.id, changes.get("dir_off", entry.dir_off), changes.get("dir_bits", entry.dir_bits),
                        entry.name, entry.flags, entry.counts_at)
        commit(main, main.catalog.next_id, [updated if e.id == entry.id else e for e in main.catalog.entries])


def index_of(eng, ns_id: int):
    """The engine for index ns_id: eng itself for 0 (the main index), else a NamespaceIndex of
    the live namespace with that id, or None when the catalog has none."""
    if ns_id == 0:
        return eng
    entry = eng.catalog.by_id(ns_id) if eng.catalog is not None else None
    return None if entry is None or entry.dropped else NamespaceIndex(eng, entry.name)


def live_entries(eng) -> list:
    """The catalog's entries of namespaces in use (not dropped), mmkv's own (a name with a NUL)
    included."""
    return [e for e in entries_now(eng) if not e.dropped]


def user_names(eng) -> list:
    """The names of the namespaces in use that a user made (mmkv's own hold a NUL), sorted."""
    return sorted(e.name for e in live_entries(eng) if "\0" not in e.name)


def structure_blocks(eng) -> list:
    """[(payload offset, payload bytes)] of the catalog and of every namespace index's directory and
    segments (dropped ones included): the blocks outside the main index that hold no record."""
    from . import index
    if eng.catalog is None:
        return []
    out = [(eng.catalog.off, block_bytes(eng.catalog.entries))]
    for entry in eng.catalog.entries:
        out += index.pieces(eng, _private_view(eng, entry))
    return out


def blocks_to_keep(eng) -> list:
    """[(block, size)] (the allocator's pairs) of everything the namespaces hold: the catalog,
    each index's directory and segments, and every record a slot of theirs names, each at the
    size its contents need (never a block header's word: damage there must not make the blocks
    overlap), sorted.  For the main index's clear(), which rebuilds the allocator from what stays
    (caller holds the lock; nothing is changed here).
    :raises CorruptionError: the catalog is unreadable, a record is damaged, or two blocks overlap
        (run recover() first)."""
    from . import index
    from .allocator import block_size_for
    if eng.catalog_error is not None:
        raise eng.catalog_error          # (what the namespaces hold is unknown: nothing may be freed)
    alloc = eng.alloc
    out = []
    for off, need in structure_blocks(eng):
        out.append((alloc.placement(off), block_size_for(need)))
    for entry in eng.catalog.entries if eng.catalog is not None else ():
        v = _private_view(eng, entry)
        for _, _, rec in index.entries(v):
            b = alloc.placement(rec)
            if b is None or lib.mmkv_record_verify_contents(v, rec):
                raise CorruptionError(f"{eng.path}: namespace {entry.name!r} names a damaged record at {rec}; "
                                      "run recover() first")
            out.append((b, block_size_for(v.rec_need)))
    out.sort()
    for (b, size), (after, _) in zip(out, out[1:]):
        if b + size > after:
            raise CorruptionError(f"{eng.path}: the namespaces' blocks at {b} and {after} overlap (damage); "
                                  "run recover() first")
    return out


class IndexAt(NamespaceIndex):
    """One catalog entry's index as recovery and the checker see it (dropped ones included):
    a private view of it, its counters at the entry's counts_at."""

    def __init__(self, main, entry):
        super().__init__(main, entry.name)
        self._id, self._view = entry.id, _private_view(main, entry)

    @property
    def entry(self):
        """The entry as the catalog in force has it now (a commit re-reads the catalog)."""
        entry = self.main.catalog.by_id(self._id) if self.main.catalog is not None else None
        if entry is None:
            raise NamespaceError(f"{self.main.path}: namespace id {self._id} left the catalog")
        return entry

    @property
    def view(self):
        point_view(self._view, self.main.view, self.entry)
        return self._view


def all_indexes(eng) -> list:
    """[(label, engine of the index, catalog entry or None)]: the main index, then every catalog
    entry's (dropped ones included).  :raises CorruptionError: the catalog is unreadable."""
    if eng.catalog_error is not None:
        raise eng.catalog_error
    out = [("index", eng, None)]
    for entry in entries_now(eng):
        label = f"namespace {entry.name!r}" + (" (dropped, being freed)" if entry.dropped else "")
        out.append((label, IndexAt(eng, entry), entry))
    return out


def move_catalog(eng, allocate) -> None:
    """Copy the catalog in force, unchanged, into a block from ``allocate(payload)`` (a catalog
    commit: durable copy, one meta switch, the old copy freed).  For compaction, which lowers
    the blocks above the live data.  Caller holds the lock.
    :raises CorruptionError: the catalog is unreadable."""
    entries = entries_now(eng)
    if entries:
        commit(eng, eng.catalog.next_id, entries, allocate=allocate)


def catalog_blocks(eng) -> list:
    """[(payload offset, payload bytes)] of the catalog block, [] without one."""
    return [] if eng.catalog is None else [(eng.catalog.off, block_bytes(eng.catalog.entries))]
