"""Engine: the mapped file and its roots, and the steps every structure is built from.

One ``Engine`` per open handle owns the file descriptor, the mapping, the process-local
view the shim reads (``struct mmkv_view``), the allocator, the identity, the meta in force
and the sync mode.  The index, the journal, recovery and the checker are handed the engine
(never the ``Store``) and call only downward: allocate, free, grow, write the meta, make a
range durable.  ``Store`` adds the API, the lock and the transaction buffer on top.

Concurrency: every method that reads or writes the heap or the meta runs with the store
lock held by the caller (``Store`` takes it); the engine itself never locks, never waits and
never calls back up.  A growth or a new meta bumps the file's generation word; other handles
compare it with ``view.generation`` when they lock and ``reload`` then.

Commit orders: the table "Commit orders" in the README lists every ordering protocol (put,
delete, incr, transaction, split, index rebuild, growth, clear) with its steps; each
function here that is a step of one says so.
"""
import os

from . import failpoints
from .layout import (OFF_IDENTITY, CLEAN_MARK, EPILOGUE_BYTES, HEADER_SIZE, HEAP_START, MASK64, NCLASSES, OFF_META, RECORD_HEADER,
                     SEGMENT_SLOTS, SLOT_OFF_MASK, STATE_WORD, SWEEP_POISON, Meta, build_identity, build_meta, parse_identity,
                     parse_meta, record_key, siphash)
from .mapping import FileMap, grow_file, next_size, prefill
from .shim import ffi, lib
from . import tunables
from .tunables import FIT_SCAN, LARGE_BLOCK
from ..errors import CorruptionError, TruncatedError

_GEN = STATE_WORD["generation"]
_COUNT = STATE_WORD["count"]
_LIVE = STATE_WORD["live_bytes"]
_DIRTY = STATE_WORD["dirty"]


def timeout_ns(seconds) -> int:
    """Nanoseconds for the shim: -1 (wait forever) for None or inf.

    :raises ValueError: negative or NaN.  :raises TypeError: not a number.
    """
    if seconds is None:
        return -1
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        raise TypeError(f"lock_timeout must be a number of seconds or None, not {type(seconds).__name__}")
    if seconds != seconds or seconds < 0:
        raise ValueError(f"lock_timeout must be >= 0 seconds or None, not {seconds}")
    return -1 if seconds >= 1 << 32 else int(seconds * 1e9)   # 136 years: forever


def new_view(fm, ident, sync_full: bool, lock_timeout):
    """A process-local view of a mapping for the shim (index fields are set from the meta);
    lockless (never takes the store lock) when the mapping is read-only."""
    v = ffi.new("struct mmkv_view *")
    v.lockless = int(not fm.writable)
    v.base, v.size = fm.base, fm.size
    v.seed0, v.seed1 = ident.seed0, ident.seed1
    v.crc_sums = int(ident.crc_sums)
    v.pid = os.getpid()
    v.lock_timeout_ns = timeout_ns(lock_timeout)
    v.page_size = ident.page_size
    v.large_block = LARGE_BLOCK
    v.fit_scan = FIT_SCAN
    v.max_count = int(SEGMENT_SLOTS * tunables.MAX_LOAD)   # read at each open: see tunables.testing_load
    v.fd = fm.fd
    v.release_min = tunables.RELEASE_MIN if ident.version >= 2 else 0   # version 1 readers know no holes
    v.sync_full = int(sync_full)
    return v


def reextension_limit(real_size: int, page: int) -> int:
    """The largest file size a first opener may restore for a file shorter than its header says.

    After a power loss the header can name a size whose growth never reached the disk (sync
    "none" grows without syncing).  Three growth steps past the real size cover what such a
    window can lose; a header that asks for more is damage, and an open must never
    pre-allocate disk on the word of a damaged header.
    """
    size = real_size
    for _ in range(3):
        size = next_size(size, size, page)
    return size


class Engine:
    """The mapped file of one handle: mapping, view, allocator, identity, meta in force.

    Attributes the layers above read: ``path``, ``fd``, ``fm`` (the mapping), ``words``
    (the mapping as 64-bit words), ``view``, ``alloc``, ``ident``, ``meta``, ``full``
    (sync="full"), ``last_recovery`` (what the last recovery found, or None), ``catalog`` and
    ``catalog_error`` (the namespaces' catalog in force, or why it is unreadable), ``ns_views``.
    """

    def __init__(self, path: str, fd: int, full: bool, writable: bool = True):
        self.path, self.fd, self.full, self.writable = path, fd, full, writable
        self.fm = self.view = self.words = self._alloc = None
        self.ident = self.meta = None
        self.meta_slot = 0
        self.last_recovery = None
        self.catalog = None          # the namespaces' catalog in force (namespaces.Catalog), None: none
        self.catalog_error = None    # why the catalog the meta names could not be read (it is then None)
        self.ns_views = {}           # namespace name -> the view this handle keeps of its index
        self.drain_cursors = {}      # dropped namespace id -> the slot its freeing goes on from (free_dropped)

    # ------------------------------------------------------------ attach, meta
    def attach(self, view_timeout, first: bool, readonly: bool) -> None:
        """Validate the header and map the file.  ``first``: no other handle is open (the
        caller holds the open protocol's exclusive lock), so a file cut short by a power
        loss after a growth may be re-extended.

        :raises NotMmkvFileError, VersionError, ChecksumError, CorruptionError, TruncatedError:
            the header is not a sound mmkv header for a file of this size.
        """
        fd = self.fd
        # Without the store lock a writer may switch the meta while we read it: it writes the
        # meta, then bumps the generation.  Reading the generation first, the meta second, the
        # view can only be older than its generation says: reloaded at the first lock.  (Read
        # the other way round, an old meta could pass for current and writes would go through
        # a freed index: found by the kill harness with bystanders opening during writes.)
        generation = int.from_bytes(os.pread(fd, 8, _GEN * 8), "little")
        page0 = os.pread(fd, HEADER_SIZE, 0)
        real = os.fstat(fd).st_size     # after the meta: a growth extends the file before its meta names it
        self.ident = parse_identity(page0, real)
        try:
            meta, which = parse_meta(page0, self.ident, real)
        except TruncatedError:
            if not first or self.closed_cleanly(page0) or readonly:
                raise
            # power loss after a growth: the header reached the disk, the new file size did
            # not.  The missing tail was never durable: put it back (zeros) for recovery to
            # drop whatever pointed into it.  A cleanly closed short file is real damage.
            meta, which = parse_meta(page0, self.ident, 1 << 62)
            if meta.file_size > reextension_limit(real, self.ident.page_size):
                raise TruncatedError(f"file is {real} bytes but its header says {meta.file_size}: more than a "
                                     "power loss can cut off; the file was cut short or its header is damaged")
            grow_file(fd, meta.file_size)
        self.fm = FileMap(fd, meta.file_size, self.writable)
        self.view = new_view(self.fm, self.ident, self.full, view_timeout)
        self.set_meta(meta, which)
        self.view.generation = generation
        if first:
            self.check_seed()

    #: Records check_seed looks at.
    SEED_SAMPLE = 4

    def check_seed(self) -> None:
        """The identity's hash seed must be the one the records were written with.  An identity
        damaged and resealed (its checksum recomputed) with another seed passes its own checks,
        but then no key hashes to the hash its record carries: every lookup misses, a put adds a
        second record of a key beside the stale one, and iteration (which does not recompute
        key hashes) yields both.  So the first opener looks at the first few records whose
        checksum holds (the checksum does not depend on seed1): if every one of them disagrees
        with the seed, the identity is wrong, and nothing in the file can repair it.
        :raises CorruptionError: so."""
        v, found, seg, word = self.view, ffi.new("uint64_t *"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        cursor = checked = wrong = 0
        while checked < self.SEED_SAMPLE and lib.mmkv_slot_next(v, cursor, found, seg, word) == 0:
            cursor = found[0] + 1
            rec = word[0] & SLOT_OFF_MASK
            if lib.mmkv_record_verify_sum(v, rec):
                continue                # damage of one record: recovery's business
            checked += 1
            wrong += siphash(self.ident.seed0, self.ident.seed1, self.record_key(rec)) != v.hash
        if checked and wrong == checked:
            raise CorruptionError(f"{self.path}: the identity's hash seed does not match any of the {checked} records "
                                  "looked at: the identity sector is damaged (its checksum was rewritten), and the "
                                  "records cannot be found through it; restore the file from a backup")

    @property
    def alloc(self):
        """The heap's allocator (mmkv.engine.allocator.Allocator over this mapping and view),
        made at its first use: opening a store and reading need none, and its module is about
        0.3 ms of ``import mmkv`` (the shim's fused writes allocate in C)."""
        alloc = self._alloc
        if alloc is None:
            from .allocator import Allocator
            alloc = self._alloc = Allocator(self.fm, self.view)
        return alloc

    @staticmethod
    def closed_cleanly(page0: bytes) -> bool:
        dirty = STATE_WORD["dirty"] * 8
        return int.from_bytes(page0[dirty:dirty + 8], "little") == CLEAN_MARK

    def marked_clean(self) -> bool:
        """The state's dirty word holds the clean mark: nothing changed the file since the
        last clean close (only read-only handles have had it open since)."""
        return self.words[_DIRTY] == CLEAN_MARK

    def mark_dirty(self, always: bool = False) -> None:
        """Before a change: clear the clean mark and make that durable (msync of the header),
        so that a crash from here on makes the next first opener recover.  Nothing is written
        when the file is not marked clean already, unless ``always``."""
        if always or self.words[_DIRTY] == CLEAN_MARK:
            self.words[_DIRTY] = 0
            self.fm.sync(0, HEADER_SIZE)

    def set_meta(self, meta: Meta, which: int) -> None:
        """Adopt meta as current: remap if the file size changed, point the view at the index."""
        fm, v = self.fm, self.view
        if meta.file_size != fm.size:
            fm.remap(meta.file_size)
        self.meta, self.meta_slot = meta, which
        v.heap_end = meta.file_size - EPILOGUE_BYTES       # the allocator's end: the epilogue's offset
        self.words = fm.words
        v.base, v.size = fm.base, fm.size
        v.dir_off, v.dir_bits = meta.dir_off, meta.dir_bits
        v.generation = fm.words[_GEN]
        self.load_catalog()

    def load_catalog(self) -> None:
        """Read the catalog the meta names and point the namespace views at their indexes (a view
        whose namespace is gone, or unreadable, gets a generation that never matches: every
        call through it takes the general path, which says why).  A catalog that fails its
        checks is kept in ``catalog_error``: without the lock a writer may be switching it, so
        only a read under the lock (or a lockless read no writer disturbed) may report it."""
        self.catalog = self.catalog_error = None
        if self.meta.catalog_off:
            from . import namespaces
            try:
                self.catalog = namespaces.parse(self, self.meta.catalog_off)
            except CorruptionError as exc:
                self.catalog_error = exc
        if self.ns_views:
            from .namespaces import point_view
            for name, view in self.ns_views.items():
                entry = self.catalog.named(name) if self.catalog is not None else None
                if entry is not None:
                    point_view(view, self.view, entry)
            self.follow_generation()

    def follow_generation(self) -> None:
        """Give the namespace views the main view's generation (the view of a name no namespace
        has now, one that never matches)."""
        gen, catalog = self.view.generation, self.catalog
        for name, view in self.ns_views.items():
            entry = catalog.named(name) if catalog is not None else None
            view.generation = gen if entry is not None else ~gen & MASK64

    def index_word(self, field: str) -> int:
        """Word index (into ``words``) of one of the main index's counters (count, live_bytes,
        ttl_min, sweep_at, sweep_min): the state's.  (A namespace's: namespaces.NamespaceIndex.)"""
        return STATE_WORD[field]

    def poison_sweep(self) -> None:
        """The main index's sweep pass may have missed entries (they moved): its end must not
        tighten ttl_min."""
        self.words[STATE_WORD["sweep_at"]] |= SWEEP_POISON

    def ns_view(self, entry):
        """The view this handle keeps of the index of namespace entry's name (made at first use;
        after a clear, the same view describes the name's new index)."""
        view = self.ns_views.get(entry.name)
        if view is None:
            from .namespaces import new_view
            view = self.ns_views[entry.name] = new_view(self.view, entry)
        return view

    def set_held(self, held: int) -> None:
        """Mark every view of this handle as held (1) or not by its lock (see mmkv_view.held)."""
        self.view.held = held
        for view in self.ns_views.values():
            view.held = held

    def stale(self) -> bool:
        """Another handle changed the meta since this one last loaded it (lock held)."""
        return self.words[_GEN] != self.view.generation

    def reload(self) -> None:
        """Another process changed the meta (growth, new index): load it (lock held, or inside
        a lockless read, which checks the sequence word after it).
        :raises CorruptionError: neither meta copy is sound."""
        # the generation first, the meta second (a writer writes the meta, then bumps the
        # generation): without the lock the view can then only be older than its generation
        # says (reloaded again), never newer (a stale view taken for current: found by lockless
        # readers beside a growing writer, as lookups past the old mapping's end)
        generation = self.words[_GEN]
        page0 = self.fm.mm[:HEADER_SIZE]
        meta, which = parse_meta(page0, self.ident, os.fstat(self.fd).st_size)
        self.set_meta(meta, which)
        self.view.generation = generation
        self.follow_generation()

    def write_meta(self, durable: bool = True, **changes) -> None:
        """Write the meta copy not in force (seq + 1), sync it (unless durable is false: a
        sync="none" step), and bump the generation so other processes reload it.

        The one commit point of every structural change (growth, split, rebuild, clear,
        a transaction): see "Commit orders" in the README.
        """
        new = self.meta._replace(seq=(self.meta.seq + 1) & MASK64, **changes)
        which = 1 - self.meta_slot
        raw = build_meta(new, self.ident)
        self.fm.mm[OFF_META[which]:OFF_META[which] + len(raw)] = raw
        if failpoints.armed:
            failpoints.hit(b"meta.before_sync")
        if durable:
            self.fm.sync(0, HEADER_SIZE)
        self.words[_GEN] = (self.words[_GEN] + 1) & MASK64   # any change will do: wrap at 2^64
        self.set_meta(new, which)

    def raise_version(self) -> None:
        """Make this file format version 3 (NAMESPACES_VERSION) if it is older, before its first
        catalog of namespaces is written: an mmkv reading only versions 1 and 2 then refuses it
        (VersionError) instead of freeing the namespaces' blocks as leaked space.  One rewrite of
        the identity sector, synced in both sync modes (a sector is written whole or not at all;
        a crash after it leaves a version 3 file without a catalog, which is sound).  Record
        checksums stay as they were (version 1's SipHash ones: the SIPHASH_SUMS flag).  Caller
        holds the lock; other handles keep their parsed identity, which differs only in the
        version.  :raises OSError: the sync failed (the file is then version 2 or 3, both sound)."""
        new = self.ident.raised()
        if new is self.ident:
            return
        raw = build_identity(new)
        self.fm.mm[OFF_IDENTITY:OFF_IDENTITY + len(raw)] = raw
        self.fm.sync(0, HEADER_SIZE)
        self.ident = new
        if failpoints.armed:
            failpoints.hit(b"version.after_raise")

    def state_plausible(self) -> bool:
        """The state's counters (a cache) add up with the file size: trusted after a clean close."""
        w, size = self.words, self.fm.size
        used, free = w[STATE_WORD["used_bytes"]], w[STATE_WORD["free_bytes"]]
        heads, bitmap = STATE_WORD["free_heads"], w[STATE_WORD["free_bitmap"]]
        return (used + free + HEAP_START + EPILOGUE_BYTES == size and w[_COUNT] <= size // RECORD_HEADER
                and w[_LIVE] <= size and all(bool(bitmap >> c & 1) == bool(w[heads + c]) for c in range(NCLASSES)))

    def count_plausible(self) -> bool:
        """The key count could be true of a file this size (else recovery recounts)."""
        return self.words[_COUNT] <= self.fm.size // RECORD_HEADER

    # ------------------------------------------------------------ space
    def allocate(self, payload: int) -> int:
        """Payload offset of a new block of payload bytes, growing the file once if none fits.

        Growth may remap: a caller holding a private view copies ``follow`` afterwards.
        :raises DiskFullError: the file cannot grow; nothing changed.  :raises CorruptionError:
            none fits even after the growth (damaged free lists).
        """
        off = self.alloc.alloc(payload)
        if not off:
            self.grow(payload)          # grows by at least payload + 2 pages: a block must fit
            off = self.alloc.alloc(payload)
            if not off:
                raise self.no_fit(payload)
        return off

    def free(self, off: int, payload: int) -> None:
        """Give back the block at payload offset off, allocated for payload bytes.
        :raises CorruptionError: its header claims more (damage): nothing is freed."""
        self.alloc.free(off, payload)

    def grow(self, payload: int) -> None:
        """Grow the file so a block of payload bytes fits, and tell the other processes.

        Asks for the geometric step first and, on a full disk, for less, down to what the
        block needs (see mapping.next_size).  Order ("growth" in the README's commit orders):
        fallocate, then the meta naming the new size, then the heap's new free block.
        :raises DiskFullError: not even the block's bytes are free on the disk; nothing changed.
        """
        fm = self.fm
        page = self.ident.page_size
        need = fm.size + payload + 2 * page + 64     # room for the page alignment of a large block
        old_end = self.alloc.end
        new_size = grow_file(self.fd, next_size(fm.size, need, page), minimum=need, page=page)
        prefill(self.fd, fm.size, new_size)
        if failpoints.armed:
            failpoints.hit(b"grow.after_fallocate")
        # sync="full": the meta's msync (datasync of the header page) also makes the new file
        # size durable (metadata needed to read the data is committed with it); an fdatasync
        # would flush every dirty page of the file instead.  sync="none": no sync at all (it
        # cost up to 150 ms at 1.3 GB: the journal commit waits for other dirty data); after a
        # power loss the first opener re-extends a file shorter than its header (see attach).
        self.write_meta(durable=self.full, file_size=new_size)   # remaps; others remap on their next call
        self.alloc.end = old_end
        self.alloc.extend(new_size - EPILOGUE_BYTES)

    @staticmethod
    def no_fit(payload: int) -> CorruptionError:
        return CorruptionError(f"allocator: no block of {payload} bytes right after the file grew to hold "
                               "one: the free lists are damaged (recovery rebuilds them)")

    def follow(self, view) -> None:
        """Point a private view (an index under construction) at the current mapping: an
        allocation may have grown and remapped the file."""
        live = self.view
        view.base, view.size, view.heap_end = live.base, live.size, live.heap_end

    # ------------------------------------------------------------ durability, decoding
    def make_durable(self, *pieces) -> None:
        """msync the blocks at these (payload offset, payload bytes) pieces (headers and payloads):
        a barrier before the meta names them.  Synchronous in both sync modes (structural steps
        are rare).  Every piece's write-back is started first, so the waits overlap."""
        from .allocator import span
        spans = [span(off, payload) for off, payload in pieces]
        if len(spans) > 1:
            for start, length in spans:
                lib.mmkv_writeback(self.fd, start, length)    # a hint: a failure shows in the msync
        for start, length in spans:
            self.fm.sync(start, length)

    def barrier(self) -> None:
        """sync="full": everything written so far is on disk before the next step."""
        if self.full:
            self.fm.sync_file()

    def record_key(self, rec: int):
        """Key bytes (a memoryview) of the verified record at rec."""
        return record_key(self.fm.mm, self.words, rec)

    def close(self) -> None:
        """Drop the mapping (the descriptor is the caller's)."""
        if self.fm is not None:
            self.fm.close()
        self.fm = self.view = self.words = self._alloc = None
