"""Damage fuzzer: every word of the file is input.  ``mmkv torture fuzz DIR --cases N``.

It builds a few real stores first (the seeds: a small one, one with index splits,
one with values of 64 KiB and more, counters, committed transactions, a journal
left named by a writer killed after its commit point, a free list of many blocks,
a copy taken while a handle had the file open and locked, and records with deadlines,
half of them passed), then runs cases.
A case damages a copy of one seed, either at random (bit flips, random words,
0xFF or 0x00 sectors, truncation, extension) or aimed at one field of the
layout: the identity (its checksum recomputed so the damage gets past it),
either meta copy (resealed with the file's key), every state word, the
free-list heads and links (into a live record, into the header, cycles, self
loops), free blocks' headers and footers, block headers, the epilogue, segment
headers and slots, directory entries, record headers and bytes, the journal.
Aimed values are the extremes (0, 1, 2^63, 2^64-1, the file size, the file size
- 8, HEAP_START - 8) and offsets of other structures.  Every number comes from
``mmkv.engine.layout``.

Each case runs in a child forked from the fuzzer (which has mmkv imported: a
fork costs about a millisecond, a fresh interpreter fifty) under a timeout and
RLIMIT_FSIZE / RLIMIT_AS, so a runaway growth ends in SIGXFSZ instead of
filling the disk.  The child opens the damaged copy (flag "w" or "r", sometimes
recovering first), reads every key, runs check(), a few writes (put, a put of
64 KiB or more, delete, incr, a transaction, update, setdefault, stats, clear),
reads again, check(), close, reopen, reads, check().  Outcomes:

* ok: everything ran and every answer was allowed;
* mmkv error: the damage was detected: an ``mmkv.Error`` (or the OverflowError
  ``incr`` documents, for a counter damaged to near its limit);
* other exception: anything else (a bug: the traceback is kept);
* signal: the child died of a signal (SIGSEGV, SIGBUS, ...);
* hang: no answer within the timeout (the child is killed);
* wrong: a silent wrong answer.  A get (or items()) returned bytes that are
  not the seed's value of that key (nor what the case wrote since), a key that
  was never written, or nothing for a key whose record, index path and header
  the damage did not touch ("intact": it must survive any damage elsewhere and
  any recovery); or a store that passed check() before the writes fails it
  after them (the writes followed damage check() cannot see); or a store
  that passed check() and closed cleanly cannot be reopened; or the file
  grew past twice the larger of its size and what the case wrote (SIGXFSZ).

Not counted as wrong: a counter's value after damage to its 8 value bytes
(counters are updated in place and their checksum covers the header and the
key only, by design).

Every case is a function of (--seed, case number): ``--case I`` replays one.
Every case that ends other than ok or mmkv error is saved to DIR/findings/
(the damaged file and a text file with the damage, the plan, the traceback
and a one-line reproducer).
"""
import json
import os
import random
import resource
import select
import shutil
import signal
import struct
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field

from ..engine import failpoints, opening, tunables
from ..errors import Error, NamespaceError
from ..engine.allocator import block_of, footer_of, payload_of
from ..engine.layout import (BLOCK_ALLOC, BLOCK_FLAGS, BLOCK_MIN, BLOCK_PREV_ALLOC, EPILOGUE_BYTES,
                     FREE_NEXT, FREE_PREV, HEADER_SIZE, HEAP_START, JOURNAL_HEADER, MASK64, NCLASSES, OFF_IDENTITY,
                     OFF_LOCKS, OFF_META, OFF_STATE, REC_COUNTER, RECORD_HEADER, SEGMENT_HEADER, SEGMENT_SLOTS,
                     SLOT_OFF_BITS, SLOT_OFF_MASK, Identity, pad8, parse_identity, parse_meta, siphash,
                     struct_fields)

OUTCOMES = ("ok", "mmkv error", "other exception", "signal", "hang", "wrong")
SECTOR = 512
BIG_VALUE = 70_000               # a put of this size takes the allocator's large-block path
LOW_LOAD = 0.01                  # split threshold for seeds and some cases: 163 keys per segment
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_ANY8 = "any 8 bytes"            # allowed-value marker: a counter whose value bytes were damaged
UNVERIFIED = "unverified read: the record fails its checksum or its block"

_ID = {name: (off, size) for name, off, size in struct_fields("mmkv_identity")}
_META = {name: (off, size) for name, off, size in struct_fields("mmkv_meta")}
_STATE = {name: (off, size) for name, off, size in struct_fields("mmkv_state")}
_REC = {name: (off, size) for name, off, size in struct_fields("mmkv_record")}
_SEG = {name: (off, size) for name, off, size in struct_fields("mmkv_segment")}
_JRN = {name: (off, size) for name, off, size in struct_fields("mmkv_journal")}
_LOCKS_SIZE = sum(size for _, _, size in struct_fields("mmkv_locks"))


def u64(img, off: int) -> int:
    return _U64.unpack_from(img, off)[0] if 0 <= off <= len(img) - 8 else 0


def u32(img, off: int) -> int:
    return _U32.unpack_from(img, off)[0] if 0 <= off <= len(img) - 4 else 0


# ====================================================================== seeds
@dataclass
class Seed:
    """A real store to damage: its bytes, what every key must read, and its anatomy."""
    name: str
    image: bytes
    #: key -> (allowed values, absent allowed even when intact); usually ({value}, False)
    model: dict
    counters: set = field(default_factory=set)
    anatomy: "Anatomy" = None
    #: key -> [(start, end)] byte ranges whose damage may legitimately lose the key
    ranges: dict = field(default_factory=dict)


@contextmanager
def _pinned_identity(rnd, max_load=None):
    """New files get their hash key from rnd (not os.urandom), so seeds are reproducible."""
    saved = opening.new_identity
    opening.new_identity = lambda page: Identity(page, rnd.getrandbits(64), rnd.getrandbits(64), 0)
    load = tunables.set_max_load(max_load) if max_load is not None else None
    try:
        yield
    finally:
        opening.new_identity = saved
        if load is not None:
            tunables.set_max_load(load)


def _value(rnd, sizes):
    return rnd.randbytes(rnd.choice(sizes))


def _normalise(img: bytearray, lock_pid: int = 0) -> bytes:
    """Zero what a run leaves that is not a function of the seed: the lock area (mutex internals,
    reinitialised by the first opener anyway), the lock holder's pid and time."""
    img[OFF_LOCKS:OFF_LOCKS + _LOCKS_SIZE] = bytes(_LOCKS_SIZE)
    _U64.pack_into(img, OFF_STATE + _STATE["lock_since_ns"][0], 0)
    _U64.pack_into(img, OFF_STATE + _STATE["lock_pid"][0], lock_pid)
    return bytes(img)


def _read(path) -> bytearray:
    with open(path, "rb") as f:
        return bytearray(f.read())


def build_seed(folder: str, name: str, rnd: random.Random) -> Seed:
    """Build the seed store `name` in folder (deterministic in rnd)."""
    import mmkv
    path = os.path.join(folder, f"seed-{name}.mmkv")
    for p in (path, path + ".lock"):
        if os.path.exists(p):
            os.unlink(p)
    model, alt, counters, lock_pid = {}, {}, set(), 0
    low = name == "splits"
    with _pinned_identity(rnd, LOW_LOAD if low else None):
        db = mmkv.open(path)
        try:
            if name == "small":
                for i in range(12):
                    model[b"s%d" % i] = _value(rnd, (0, 1, 7, 8, 40, 100))
                model[b""] = b"the empty key"
                model[b"empty value"] = b""
            elif name == "splits":
                for i in range(600):
                    model[b"split:%04d" % i] = _value(rnd, (5, 20, 60))
            elif name == "large":
                for i, n in enumerate((65_536, 70_000, 131_072, 200_000)):
                    model[b"large%d" % i] = rnd.randbytes(n)
                for i in range(10):
                    model[b"small%d" % i] = _value(rnd, (3, 30, 300))
            elif name in ("counters", "txn", "journal", "freelist", "unclean", "expiring", "namespaces"):
                n = {"counters": 8, "txn": 40, "journal": 40, "freelist": 400, "unclean": 150, "expiring": 30,
                     "namespaces": 60}[name]
                for i in range(n):
                    model[b"%s:%d" % (name.encode(), i)] = _value(rnd, (8, 24, 40, 100, 300, 600, 1500, 5000))
            for k, v in model.items():
                db[k] = v
            if name == "expiring":      # records with a deadline: ten years away, or already passed
                for i in range(60):
                    k, v = b"exp:%d" % i, _value(rnd, (0, 8, 40, 300))
                    if i % 2:
                        db.set(k, v, ttl=10 * 365 * 86400)
                        model[k] = v
                    else:
                        db.set(k, v, ttl=0.001)         # absent by the time it is read: not in the model
                time.sleep(0.002)
            if name == "namespaces":       # two namespaces beside the main keys (model keys: ns_key)
                from .torture import ns_key
                for ns_name, n in (("n1", 300), ("n2", 40)):
                    ns = db.namespace(ns_name)
                    for i in range(n):
                        k, v = b"%s:%d" % (ns_name.encode(), i), _value(rnd, (0, 8, 40, 300, 1500))
                        ns[k] = v
                        model[ns_key(ns_name, k)] = v
                db.namespace("n1").set(b"n1:ttl", b"v", ttl=10 * 365 * 86400)
                model[ns_key("n1", b"n1:ttl")] = b"v"
            if name == "large":
                del db[b"large1"], model[b"large1"]
                model[b"large2"] = rnd.randbytes(90_000)
                db[b"large2"] = model[b"large2"]
            if name == "counters":
                for i in range(24):
                    k = b"counter:%d" % i
                    for _ in range(rnd.randint(1, 4)):
                        n = db.incr(k, rnd.choice((1, 5, -3, 1 << 40, -(1 << 41))))
                    model[k] = n.to_bytes(8, "little", signed=True)
                    counters.add(k)
            if name in ("freelist", "unclean"):
                for k in rnd.sample(sorted(model), len(model) * 2 // 3):
                    del db[k], model[k]
            if name == "txn":
                for _ in range(3):
                    with db.transaction():
                        for k in rnd.sample(sorted(model), 6):
                            if rnd.random() < 0.3:
                                del db[k], model[k]
                            else:
                                model[k] = _value(rnd, (10, 100, 1000))
                                db[k] = model[k]
            if name == "journal":
                db.close()
                alt = _killed_transaction(path, rnd, model)
            if name == "unclean":
                with db.lock():            # copied while open and locked: dirty, seq odd, a holder pid
                    image = _normalise(_read(path), lock_pid=4242)
        finally:
            db.close()
    if name != "unclean":
        image = _normalise(_read(path), lock_pid)
    full = {k: (frozenset([v]), False) for k, v in model.items()}
    for k, values in alt.items():
        full[k] = (frozenset(v for v in values if v is not None), None in values)
    seed = Seed(name, image, full, counters)
    seed.anatomy = Anatomy(image)
    seed.ranges = seed.anatomy.key_ranges(list(full))
    return seed


def _killed_transaction(path, rnd, model) -> dict:
    """A writer commits a transaction and is killed right after its commit point, so the
    file names the journal.  Returns key -> (old, new) of the keys it wrote."""
    import mmkv
    writes = []
    for k in rnd.sample(sorted(model), 6):
        writes.append((k, None if rnd.random() < 0.3 else _value(rnd, (10, 100, 1000))))
    writes.append((b"journal:new", b"written by the transaction"))
    pid = os.fork()
    if pid == 0:                                   # pragma: no cover - the killed writer
        try:
            db = mmkv.open(path)
            failpoints.arm("txn.after_commit", 1)
            with db.transaction():
                for k, v in writes:
                    if v is None:
                        del db[k]
                    else:
                        db[k] = v
        finally:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
        raise RuntimeError(f"the journal seed's writer was not killed at its failpoint (status {status})")
    alt = {}
    for k, v in writes:
        alt[k] = {model.get(k), v}
        model.pop(k, None)
    return alt


SEED_NAMES = ("small", "splits", "large", "counters", "txn", "journal", "freelist", "unclean", "expiring",
              "namespaces")


def build_seeds(folder: str, seed: int) -> list:
    os.makedirs(folder, exist_ok=True)
    rnd = random.Random(f"mmkv-fuzz-seeds/{seed}")
    return [build_seed(folder, name, rnd) for name in SEED_NAMES]


# ====================================================================== anatomy
class Anatomy:
    """Where every structure of a (sound) store image lies, read from its bytes."""

    def __init__(self, img: bytes):
        self.img = img
        self.size = len(img)
        self.ident = parse_identity(img[:HEADER_SIZE], len(img))
        self.meta, self.which = parse_meta(img[:HEADER_SIZE], self.ident, len(img))
        self.page = self.ident.page_size
        self.end = self.meta.file_size - EPILOGUE_BYTES
        self.blocks, pos = [], HEAP_START            # (offset, size, in use)
        while pos < self.end:
            head = u64(img, pos)
            size = head & ~BLOCK_FLAGS
            if size < BLOCK_MIN:
                raise ValueError(f"seed image has a bad block at {pos}")
            self.blocks.append((pos, size, bool(head & BLOCK_ALLOC)))
            pos += size
        self.free = [(b, s) for b, s, used in self.blocks if not used]
        self.used = [(b, s) for b, s, used in self.blocks if used]
        self.heads = {c: u64(img, OFF_STATE + _STATE["free_heads"][0] + 8 * c) for c in range(NCLASSES)}
        self.lists = {}                                # class -> members in list order
        for c, b in self.heads.items():
            members = []
            while b and len(members) < 100_000:
                members.append(b)
                b = u64(img, b + FREE_NEXT)
            if members:
                self.lists[c] = members
        self.dir_off, self.dir_bits = self.meta.dir_off, self.meta.dir_bits
        self.dir_entries = [u64(img, self.dir_off + 8 * i) for i in range(1 << self.dir_bits)]
        self.segments = sorted(set(self.dir_entries))
        self.slots = []                                # (segment, slot index, word)
        for seg in self.segments:
            base = seg + SEGMENT_HEADER
            for i in range(SEGMENT_SLOTS):
                w = u64(img, base + 8 * i)
                if w:
                    self.slots.append((seg, i, w))
        self.records = {}                              # record offset -> (key, segment, slot)
        for seg, i, w in self.slots:
            rec = w & SLOT_OFF_MASK
            klen = u32(img, rec + _REC["key_len"][0])
            self.records[rec] = (bytes(img[rec + RECORD_HEADER:rec + RECORD_HEADER + klen]), seg, i)
        self.journal = self.meta.journal_off
        self.journal_count = u64(img, self.journal + _JRN["count"][0]) if self.journal else 0

    def block_of(self, off: int):
        """(block, size) of the block holding off."""
        for b, s, _ in self.blocks:
            if b <= off < b + s:
                return b, s
        return off, 8

    def key_ranges(self, keys) -> dict:
        """Byte ranges whose damage may lose each key: its block, its segment's header and the
        slots from its home to its slot, the directory, the identity and meta sectors, the journal."""
        common = [(OFF_IDENTITY, OFF_STATE), (self.dir_off, self.dir_off + (8 << self.dir_bits))]
        if self.journal:
            b, s = self.block_of(self.journal)
            common.append((b, b + s))
        by_key = {key: (rec, seg, i) for rec, (key, seg, i) in self.records.items()}
        out = {}
        for k in keys:
            if k not in by_key:
                out[k] = None                      # not in the index (a journal's new key): never intact
                continue
            rec, seg, i = by_key[k]
            b, s = self.block_of(block_of(rec))
            home = u64(self.img, rec + _REC["key_hash"][0]) & (SEGMENT_SLOTS - 1)
            ranges = list(common) + [(b, b + s), (seg, seg + SEGMENT_HEADER)]
            slots = seg + SEGMENT_HEADER
            if home == i:
                ranges.append((slots + 8 * i, slots + 8 * i + 8))
            elif home < i:
                ranges.append((slots + 8 * home, slots + 8 * i + 8))
            else:                                  # the probe wrapped around the segment's end
                ranges += [(slots + 8 * home, slots + 8 * SEGMENT_SLOTS), (slots, slots + 8 * i + 8)]
            out[k] = ranges
        return out


def _overlaps(touched, ranges) -> bool:
    return any(a < e and s < b for a, b in touched for s, e in ranges)


# ====================================================================== mutations
class Damage:
    """Mutations of one image: each changes img in place (or its length) and records what it touched."""

    def __init__(self, rnd: random.Random, seed: Seed, img: bytearray):
        self.rnd, self.seed, self.an, self.img = rnd, seed, seed.anatomy, img
        self.touched = []

    # ---------------------------------------------------------------- helpers
    def put64(self, off: int, value: int) -> None:
        if 0 <= off <= len(self.img) - 8:
            _U64.pack_into(self.img, off, value & MASK64)
            self.touched.append((off, off + 8))

    def put32(self, off: int, value: int) -> None:
        if 0 <= off <= len(self.img) - 4:
            _U32.pack_into(self.img, off, value & 0xFFFFFFFF)
            self.touched.append((off, off + 4))

    def put(self, off: int, size: int, value: int) -> None:
        (self.put64 if size == 8 else self.put32)(off, value)

    def pick_live_block(self):
        return self.rnd.choice(self.an.used)[0]

    def extreme(self, current: int = 0, width: int = 64) -> int:
        """An extreme or structural value, or a small change of the current one."""
        rnd, an = self.rnd, self.an
        if width == 32:
            return rnd.choice((0, 1, 2, 1 << 31, (1 << 32) - 1, current + 1, current - 1, current + 8,
                               current ^ (1 << rnd.randrange(32)), rnd.getrandbits(32), an.size))
        pool = (0, 1, 1 << 63, MASK64, an.size, an.size - 8, HEAP_START - 8, HEAP_START, an.end,
                an.end + 8, OFF_STATE, OFF_META[0], self.pick_live_block(), payload_of(self.pick_live_block()),
                rnd.choice(an.free)[0] if an.free else 0, rnd.choice(an.segments), an.dir_off,
                current + 8, current - 8, current + 16, current - 16, current * 2,
                current ^ (1 << rnd.randrange(64)), rnd.getrandbits(64), (1 << 32) - 1, 1 << 48,
                rnd.randrange(HEAP_START, an.end) & ~7)
        return rnd.choice(pool) & MASK64

    def reseal_identity(self) -> None:
        at = _ID["checksum"][0]
        _U64.pack_into(self.img, OFF_IDENTITY + at, siphash(0, 0, bytes(self.img[OFF_IDENTITY:OFF_IDENTITY + at])))

    def reseal_meta(self, which: int) -> None:
        ident = parse_identity(bytes(self.img[:HEADER_SIZE]), HEADER_SIZE) if self._identity_ok() else self.an.ident
        at, base = _META["checksum"][0], OFF_META[which]
        _U64.pack_into(self.img, base + at, siphash(ident.seed0, ident.seed1, bytes(self.img[base:base + at])))

    def _identity_ok(self) -> bool:
        try:
            parse_identity(bytes(self.img[:HEADER_SIZE]), HEADER_SIZE)
            return True
        except Error:
            return False

    # ---------------------------------------------------------------- random damage
    def bitflip(self):
        n = self.rnd.choice((1, 1, 2, 4, 16))
        where = "header" if self.rnd.random() < 0.4 else "heap"
        for _ in range(n):
            pos = self.rnd.randrange(HEADER_SIZE) if where == "header" else self.rnd.randrange(len(self.img))
            self.img[pos] ^= 1 << self.rnd.randrange(8)
            self.touched.append((pos, pos + 1))
        return f"bitflip.{where}", f"{n} bit(s)"

    def randword(self):
        off = self.rnd.randrange(0, len(self.img) - 8) & ~7
        value = self.extreme(u64(self.img, off))
        self.put64(off, value)
        return "randword", f"word at {off} = {value:#x}"

    def sector(self):
        fill = self.rnd.choice((0x00, 0xFF))
        if self.rnd.random() < 0.4:
            s = self.rnd.randrange(HEADER_SIZE // SECTOR)
        else:
            s = self.rnd.randrange(len(self.img) // SECTOR)
        self.img[s * SECTOR:(s + 1) * SECTOR] = bytes([fill]) * SECTOR
        self.touched.append((s * SECTOR, (s + 1) * SECTOR))
        return f"sector-{fill:02x}", f"sector {s} ({s * SECTOR})"

    def truncate(self):
        n = len(self.img)
        cut = self.rnd.choice((0, 7, HEADER_SIZE - 1, HEADER_SIZE, HEAP_START, n // 2, n - self.an.page, n - 8,
                               n - 1, self.rnd.randrange(n)))
        cut = max(0, min(cut, n - 1))
        del self.img[cut:]
        self.touched.append((cut, n))
        return "truncate", f"to {cut} of {n} bytes"

    def extend(self):
        n = self.rnd.choice((1, 8, self.an.page, 1 << 20))
        self.img.extend(bytes(n) if self.rnd.random() < 0.5 else self.rnd.randbytes(n))
        return "extend", f"by {n} bytes"

    # ---------------------------------------------------------------- aimed: header page
    def identity(self):
        name = self.rnd.choice([f for f in _ID])
        off, size = _ID[name]
        if size > 8:
            off += 8 * self.rnd.randrange(size // 8)
            size = 8
        value = self.rnd.choice((0, 1, 512, 1 << 16, 1 << 31, (1 << 32) - 1, 3 * 4096)) if name == "page_size" \
            else self.extreme(u64(self.img, OFF_IDENTITY + off) if size == 8 else u32(self.img, OFF_IDENTITY + off),
                              width=8 * size)
        self.put(OFF_IDENTITY + off, size, value)
        sealed = name != "checksum" and self.rnd.random() < 0.85
        if sealed:
            self.reseal_identity()
            if name in ("seed0", "seed1") and self.rnd.random() < 0.5:
                self.reseal_meta(0)
                self.reseal_meta(1)
        return f"identity.{name}", f"= {value:#x}{' (resealed)' if sealed else ''}"

    def meta(self):
        name = self.rnd.choice([f for f in _META])
        off, size = _META[name]
        if size > 8:
            off += 8 * self.rnd.randrange(size // 8)
            size = 8
        r = self.rnd.random()
        which = [self.an.which] if r < 0.7 else [1 - self.an.which] if r < 0.9 else [0, 1]
        cur = u64(self.img, OFF_META[which[0]] + off)
        if name == "file_size":
            page = self.an.page
            value = self.rnd.choice((0, page, self.an.size + page, self.an.size * 2, 84 << 30, 1 << 47, MASK64,
                                     self.an.size - page, self.extreme(cur)))
        elif name == "seq":
            value = self.rnd.choice((MASK64, 1 << 63, (1 << 63) - 1, 0, cur + 1, cur + 2, self.extreme(cur)))
        elif name == "dir_bits":
            value = self.rnd.choice((0, 1, cur + 1, 31, 32, 33, 64, MASK64))
        else:
            value = self.extreme(cur)
        sealed = name != "checksum" and self.rnd.random() < 0.85
        for w in which:
            self.put64(OFF_META[w] + off, value)
            if sealed:
                self.reseal_meta(w)
        label = "in-force" if which == [self.an.which] else "other" if len(which) == 1 else "both"
        return f"meta.{name}", f"{label} copy = {value:#x}{' (resealed)' if sealed else ''}"

    def state(self):
        r = self.rnd.random()
        if r < 0.15:                                 # a whole state sector (the 0xFF sector)
            s = self.rnd.randrange(3)
            fill = self.rnd.choice((0xFF, 0xFF, 0x00))
            start = OFF_STATE + s * SECTOR
            self.img[start:start + SECTOR] = bytes([fill]) * SECTOR
            self.touched.append((start, start + SECTOR))
            return f"state.sector-{fill:02x}", f"state sector {s}"
        name = self.rnd.choice([f for f in _STATE if f != "free_heads"])
        off, size = _STATE[name]
        if size > 8:
            off += 8 * self.rnd.randrange(size // 8)
        cur = u64(self.img, OFF_STATE + off)
        value = self.extreme(cur)
        self.put64(OFF_STATE + off, value)
        return f"state.{name}", f"= {value:#x}"

    def locks(self):
        n = self.rnd.choice((8, 64, _LOCKS_SIZE))
        start = OFF_LOCKS + self.rnd.randrange(0, _LOCKS_SIZE - n + 1)
        self.img[start:start + n] = self.rnd.randbytes(n)
        self.touched.append((start, start + n))
        return "locks.garbage", f"{n} bytes at {start}"

    # ---------------------------------------------------------------- aimed: allocator
    def _target(self, members=()):
        """(label, offset) for a link: a live block, the header, a cycle, another class, an extreme."""
        rnd, an = self.rnd, self.an
        r = rnd.random()
        if r < 0.3:
            b = self.pick_live_block()
            return "live", b
        if r < 0.4:
            return "header", rnd.choice((HEAP_START - 8, OFF_STATE, OFF_META[0], 8, HEAP_START - 24))
        if r < 0.6 and members:
            return "cycle", rnd.choice(members)
        if r < 0.7 and an.free:
            return "other-free", rnd.choice(an.free)[0]
        if r < 0.8:
            return "live-interior", self.pick_live_block() + 16 * rnd.randrange(1, 4)
        return "extreme", self.extreme()

    def freelist(self):
        rnd, an = self.rnd, self.an
        heads_at = OFF_STATE + _STATE["free_heads"][0]
        if not an.lists or rnd.random() < 0.2:     # a head (of a list or an empty class)
            c = rnd.choice(list(an.lists) or [0]) if rnd.random() < 0.7 else rnd.randrange(NCLASSES)
            what, target = self._target(an.lists.get(c, ()))
            self.put64(heads_at + 8 * c, target)
            if rnd.random() < 0.5:
                bm = OFF_STATE + _STATE["free_bitmap"][0]
                self.put64(bm, u64(self.img, bm) | 1 << c)
            return f"freelist.head->{what}", f"class {c} head = {target:#x}"
        c = rnd.choice(list(an.lists))
        members = an.lists[c]
        i = rnd.randrange(len(members))
        b = members[i]
        size = u64(self.img, b) & ~BLOCK_FLAGS
        r = rnd.random()
        if r < 0.45:
            what, target = self._target(members[:i + 1])
            if what == "cycle" and rnd.random() < 0.3:
                what, target = "self", b
            self.put64(b + FREE_NEXT, target)
            return f"freelist.next->{what}", f"block {b} (class {c}, #{i}) next = {target:#x}"
        if r < 0.65:
            what, target = self._target(members[i:])
            self.put64(b + FREE_PREV, target)
            return f"freelist.prev->{what}", f"block {b} (class {c}, #{i}) prev = {target:#x}"
        if r < 0.8:
            value = rnd.choice((0, size + 16, size - 16, MASK64, self.extreme(size)))
            self.put64(footer_of(b, size), value)
            return "freeblock.footer", f"block {b} footer = {value:#x}"
        nxt = b + size
        nsize = u64(self.img, nxt) & ~BLOCK_FLAGS if nxt < an.end else 0
        choice = rnd.randrange(5)
        head = u64(self.img, b)
        if choice == 0 and nsize:                  # swallow the next (live) block, footer kept coherent
            self.put64(b, (size + nsize) | (head & BLOCK_PREV_ALLOC))
            self.put64(footer_of(b, size + nsize), size + nsize)
            return "freeblock.swallow-next", f"block {b} grows over {nxt} ({nsize} bytes)"
        if choice == 1:
            self.put64(b, head | BLOCK_ALLOC)
            return "freeblock.alloc-bit", f"block {b} marked in use"
        if choice == 2:
            self.put64(b, head ^ BLOCK_PREV_ALLOC)
            return "freeblock.prev-alloc-bit", f"block {b}"
        value = rnd.choice((0, size + 16, size - 16, size * 2, MASK64 & ~15, self.extreme(head)))
        self.put64(b, value)
        return "freeblock.header", f"block {b} header = {value:#x}"

    def block(self):
        rnd, an = self.rnd, self.an
        if rnd.random() < 0.1:
            off = an.end
            value = rnd.choice((0, BLOCK_ALLOC, u64(self.img, off) ^ BLOCK_PREV_ALLOC, MASK64, self.extreme()))
            self.put64(off, value)
            return "epilogue", f"= {value:#x}"
        b, size = rnd.choice(an.used)
        head = u64(self.img, b)
        nxt = b + size
        nsize = u64(self.img, nxt) & ~BLOCK_FLAGS if nxt < an.end else 0
        value = rnd.choice((head & ~BLOCK_ALLOC, head ^ BLOCK_PREV_ALLOC, (size + nsize) | (head & BLOCK_FLAGS),
                            (size - 16) | (head & BLOCK_FLAGS), (size * 2) | (head & BLOCK_FLAGS), 0, MASK64,
                            self.extreme(head)))
        self.put64(b, value)
        p = payload_of(b)
        kind = "segment" if p in an.segments else "directory" if p == an.dir_off else \
            "record" if p in an.records else "other"
        return f"block.header.{kind}", f"block {b} header {head:#x} -> {value:#x}"

    # ---------------------------------------------------------------- aimed: index
    def segment(self):
        rnd, an = self.rnd, self.an
        seg = rnd.choice(an.segments)
        name = rnd.choice([f for f in _SEG])
        off, _ = _SEG[name]
        cur = u64(self.img, seg + off)
        value = rnd.choice((0, 1, cur + 1, cur - 1, 31, 32, 33, 64, SEGMENT_SLOTS, SEGMENT_SLOTS + 1, MASK64,
                            self.extreme(cur)))
        self.put64(seg + off, value)
        return f"segment.{name}", f"segment {seg} {name} {cur} -> {value:#x}"

    def slot(self):
        rnd, an = self.rnd, self.an
        if not an.slots or rnd.random() < 0.15:      # an empty slot gets a word
            seg = rnd.choice(an.segments)
            i = rnd.randrange(SEGMENT_SLOTS)
            value = rnd.choice([w for _, _, w in an.slots] or [0]) if rnd.random() < 0.6 else self.extreme()
            self.put64(seg + SEGMENT_HEADER + 8 * i, value)
            return "slot.fill", f"segment {seg} slot {i} = {value:#x}"
        seg, i, w = rnd.choice(an.slots)
        at = seg + SEGMENT_HEADER + 8 * i
        tag = w & ~SLOT_OFF_MASK
        r = rnd.randrange(6)
        if r == 0:
            value, what = 0, "zero"
        elif r == 1:
            value, what = w ^ (1 << (SLOT_OFF_BITS + rnd.randrange(64 - SLOT_OFF_BITS))), "tag"
        elif r == 2:
            value, what = tag | rnd.choice(list(an.records)), "other-record"
        elif r == 3:
            value, what = tag | (self.extreme() & SLOT_OFF_MASK), "offset"
        elif r == 4:
            value, what = tag | rnd.choice((HEAP_START - 8, OFF_STATE, 8, an.end, an.size - 8)), "header"
        else:
            value, what = self.extreme(w), "extreme"
        self.put64(at, value)
        return f"slot.{what}", f"segment {seg} slot {i} {w:#x} -> {value:#x}"

    def directory(self):
        rnd, an = self.rnd, self.an
        i = rnd.randrange(len(an.dir_entries))
        value = rnd.choice((0, rnd.choice(an.segments), rnd.choice(list(an.records) or [0]), an.dir_off,
                            self.extreme(an.dir_entries[i])))
        self.put64(an.dir_off + 8 * i, value)
        return "directory.entry", f"entry {i} of {len(an.dir_entries)} = {value:#x}"

    def record(self):
        rnd, an = self.rnd, self.an
        rec = rnd.choice(list(an.records))
        key = an.records[rec][0]
        klen = u32(self.img, rec + _REC["key_len"][0])
        vlen = u64(self.img, rec + _REC["val_len"][0])
        r = rnd.random()
        if r < 0.15:
            start = rec + RECORD_HEADER + pad8(klen)
            if vlen:
                pos = start + rnd.randrange(vlen)
                self.img[pos] ^= 1 << rnd.randrange(8)
                self.touched.append((pos, pos + 1))
                return "record.value-bytes", f"record {rec} ({key[:20]!r}) value byte {pos - start}"
        if r < 0.25 and klen:
            pos = rec + RECORD_HEADER + rnd.randrange(klen)
            self.img[pos] ^= 1 << rnd.randrange(8)
            self.touched.append((pos, pos + 1))
            return "record.key-bytes", f"record {rec} ({key[:20]!r}) key byte {pos - rec - RECORD_HEADER}"
        name = rnd.choice([f for f in _REC])
        off, size = _REC[name]
        cur = u64(self.img, rec + off) if size == 8 else u32(self.img, rec + off)
        if name == "val_len":
            value = rnd.choice((0, 8, vlen + 1, vlen - 1, vlen + 16, vlen + 4096, an.size, MASK64, 1 << 47,
                                self.extreme(cur)))
        elif name == "flags":
            value = rnd.choice((0, REC_COUNTER, 2, (1 << 32) - 1, cur ^ REC_COUNTER))
        else:
            value = self.extreme(cur, width=8 * size)
        self.put(rec + off, size, value)
        return f"record.{name}", f"record {rec} ({key[:20]!r}) {name} {cur:#x} -> {value:#x}"

    def journal(self):
        rnd, an = self.rnd, self.an
        j = an.journal
        if not j:
            return self.record()
        if rnd.random() < 0.5:
            name = rnd.choice([f for f in _JRN])
            off, _ = _JRN[name]
            cur = u64(self.img, j + off)
            value = rnd.choice((0, 1, cur + 1, cur - 1, MASK64, 1 << 63, an.size, self.extreme(cur)))
            self.put64(j + off, value)
            return f"journal.{name}", f"{cur:#x} -> {value:#x}"
        n = max(1, an.journal_count)
        i, side = rnd.randrange(n), rnd.randrange(2)
        at = j + JOURNAL_HEADER + 16 * i + 8 * side
        value = rnd.choice((0, rnd.choice(list(an.records)), HEAP_START - 8, OFF_STATE, self.extreme(u64(self.img, at))))
        self.put64(at, value)
        sealed = rnd.random() < 0.7
        if sealed:
            body = bytes(self.img[j + JOURNAL_HEADER:j + JOURNAL_HEADER + 16 * n])
            ident = an.ident
            self.put64(j + _JRN["checksum"][0], siphash(ident.seed0, ident.seed1, body))
        return "journal.entry", f"entry {i} {'new' if side == 0 else 'old'} = {value:#x}" \
                                f"{' (resealed)' if sealed else ''}"


    # ---------------------------------------------------------------- aimed: the namespaces' catalog
    _CATALOG_HEAD = ("magic", "count", "next_id", "checksum")
    _CATALOG_ENTRY = ("id", "dir_off", "dir_bits", "name_at", "flags",
                      "count", "live_bytes", "ttl_min", "sweep_at", "sweep_min")   # word by word

    def catalog(self):
        """A word of the catalog (its header, or an entry's roots or counters); an entry's root
        is sometimes resealed (the checksum recomputed), so the checks behind the checksum meet it."""
        rnd, an = self.rnd, self.an
        c = an.meta.catalog_off
        if not c:
            return self.record()
        from ..engine.layout import CATALOG_ENTRY, CATALOG_HEADER
        from ..engine.namespaces import _sum
        n = u64(self.img, c + 8)
        if not n or rnd.random() < 0.3:
            name = rnd.choice(self._CATALOG_HEAD)
            at = c + 8 * self._CATALOG_HEAD.index(name)
        else:
            i = rnd.randrange(n)
            name = rnd.choice(self._CATALOG_ENTRY)
            at = c + CATALOG_HEADER + i * CATALOG_ENTRY + 8 * self._CATALOG_ENTRY.index(name)
        cur = u64(self.img, at)
        value = rnd.choice((0, 1, cur + 1, cur - 1, MASK64, an.size, rnd.choice(an.segments), self.extreme(cur)))
        self.put64(at, value)
        sealed = name in ("id", "dir_off", "dir_bits", "flags") and rnd.random() < 0.5
        if sealed:
            entries = c + CATALOG_HEADER
            end = max((u64(self.img, entries + j * CATALOG_ENTRY + 24) & ((1 << 48) - 1))
                      + (u64(self.img, entries + j * CATALOG_ENTRY + 24) >> 48) for j in range(n))
            self.put64(c + 24, _sum(an.ident, bytes(self.img[c:c + end]), n))
        return f"catalog.{name}", f"{cur:#x} -> {value:#x}{' (resealed)' if sealed else ''}"


RANDOM_KINDS = ("bitflip", "randword", "sector", "truncate", "extend")
AIMED_KINDS = ("identity", "meta", "meta", "state", "state", "locks", "freelist", "freelist", "freelist",
               "block", "block", "segment", "slot", "slot", "directory", "record", "record", "journal", "catalog")


def damage(rnd: random.Random, seed: Seed):
    """(damaged image, [(kind, detail)], touched ranges) for one case."""
    img = bytearray(seed.image)
    d = Damage(rnd, seed, img)
    steps = 1 if rnd.random() < 0.85 else rnd.randint(2, 3)
    done = []
    for _ in range(steps):
        pool = RANDOM_KINDS if rnd.random() < 0.3 else AIMED_KINDS
        kind = rnd.choice(pool)
        if kind == "journal" and not seed.anatomy.journal:
            kind = "record"
        done.append(getattr(d, kind)())
        if len(img) < HEADER_SIZE:
            break
    return bytes(img), done, d.touched


# ====================================================================== a case
@dataclass
class Plan:
    """What the child does with one damaged file (all drawn from the case's random stream)."""
    flag: str
    recover_first: bool
    low_load: bool
    ops: list
    probes: list
    op_bytes: int


def make_plan(rnd: random.Random, seed: Seed) -> Plan:
    from .torture import NS_PREFIX
    keys = sorted(k for k in seed.model if not k.startswith(NS_PREFIX))     # the ops write the main key space
    counters = sorted(seed.counters) or [b"fz:counter"]

    def key():
        r = rnd.random()
        return rnd.choice(keys) if keys and r < 0.6 else b"fz:new:%d" % rnd.randrange(8)

    def small():
        return rnd.randbytes(rnd.choice((0, 5, 40, 300, 2000)))

    flag = "w" if rnd.random() < 0.75 else "r"
    ops = []
    if flag == "w":
        for _ in range(rnd.randint(3, 8)):
            r = rnd.random()
            if r < 0.22:
                ops.append(("put", key(), small()))
            elif r < 0.34:
                ops.append(("put", key(), rnd.randbytes(BIG_VALUE + rnd.randrange(70_000))))
            elif r < 0.48:
                ops.append(("del", key()))
            elif r < 0.60:
                ops.append(("incr", rnd.choice(counters) if rnd.random() < 0.6 else key(),
                            rnd.choice((1, -1, 1000, 1 << 40))))
            elif r < 0.72:
                ops.append(("txn", [(key(), None if rnd.random() < 0.3 else small()) for _ in range(3)]))
            elif r < 0.82:
                ops.append(("update", [(key(), small()) for _ in range(3)]))
            elif r < 0.88:
                ops.append(("setdefault", key(), small()))
            elif r < 0.96:
                ops.append(("stats",))
            else:
                ops.append(("clear",))
    op_bytes = sum(len(repr(op)) for op in ops)
    return Plan(flag, flag == "w" and rnd.random() < 0.2, rnd.random() < 0.3, ops,
                [b"fz:never:%d" % i for i in range(3)], op_bytes)


class Wrong(Exception):
    """A silent wrong answer (the child's verdict)."""


class Model:
    """What each key may read as now: (allowed values, absent allowed)."""

    def __init__(self, seed: Seed, intact: set, any8: set):
        self.allowed = {}
        for k, (values, absent) in seed.model.items():
            vals = set(values)
            if k in any8:
                vals.add(_ANY8)
            self.allowed[k] = (vals, absent or k not in intact)
        self.written = set(seed.model)
        self.why = dict.fromkeys(seed.model, "its record, index path and header are intact")

    def check(self, k, got, where: str) -> None:
        if k not in self.allowed:
            if got is not None:
                raise Wrong(f"{where}: key {k[:40]!r} was never written but reads {bytes(got[:40])!r}")
            return
        values, absent = self.allowed[k]
        if got is None:
            if not absent:
                raise Wrong(f"{where}: key {k[:40]!r} reads as absent ({self.why.get(k)})")
            return
        got = bytes(got)
        if got in values or (_ANY8 in values and len(got) == 8):
            return
        raise Wrong(f"{where}: key {k[:40]!r} reads {got[:40]!r} ({len(got)} bytes), allowed: "
                    f"{sorted(repr(v)[:40] for v in values)[:4]}")

    def set(self, k, value) -> None:
        """A write of k succeeded: it now reads value (None: absent)."""
        self.written.add(k)
        self.allowed[k] = (set() if value is None else {value}, value is None)
        self.why[k] = "a write of it returned"

    def maybe(self, k, value) -> None:
        """A write of k failed part way: the old value, the new one or nothing."""
        self.written.add(k)
        values, _ = self.allowed.get(k, (set(), True))
        values = set(values)
        if value is not None:
            values.add(value)
        self.allowed[k] = (values, True)


def _child_case(path: str, seed: Seed, plan: Plan, model: Model, say) -> dict:
    """Body of the forked child: returns {"outcome", "stage", "detail"}; raises nothing."""
    import mmkv
    stage = "open"
    notes = []

    def mark(name):
        nonlocal stage
        stage = name
        say(f"S {name}")

    def read_all(db, where):
        for k in sorted(model.allowed):
            try:
                got = _get_routed(db, k)
            except Error as exc:
                error(f"{where}: get {k[:20]!r}: {type(exc).__name__}")
                continue
            try:
                model.check(k, got, where)
            except Wrong as exc:
                raise Wrong(f"{exc}{_diagnose(db, k)}") from None
        for k in plan.probes:
            try:
                model.check(k, db.get(k), where)
            except Error:
                pass
        try:
            items = list(db.items())
        except Error as exc:
            error(f"{where}: items: {type(exc).__name__}")
            return
        for k, v in items:
            model.check(k, v, where + " (items)")
        try:
            names = db.namespaces()
            spaces = [(name, list(db.namespace(name, create=False).items())) for name in names]
        except Error as exc:
            error(f"{where}: namespaces: {type(exc).__name__}")
            return
        from .torture import ns_key
        for name, pairs in spaces:
            for k, v in pairs:
                model.check(ns_key(name, k), v, where + f" (namespace {name})")

    def checked(db) -> bool:
        try:
            db.check()
            return True
        except Error as exc:
            error(f"{stage}: {str(exc)[:200]}")
            return False

    first_error = []

    def error(note):
        notes.append(note)
        if not first_error:
            first_error.append(stage)

    try:
        if plan.low_load:
            tunables.set_max_load(LOW_LOAD)
        mark("open")
        db = mmkv.open(path, plan.flag, lock_timeout=2.0, open_timeout=2.0)
        if plan.recover_first:
            mark("recover")
            try:
                db.recover()
            except Error as exc:
                error(f"recover: {exc}")
        mark("read")
        read_all(db, "read after open")
        mark("check")
        sound = checked(db)
        for n, op in enumerate(plan.ops):
            mark(f"op {n} {op[0]}")
            try:
                _perform(db, op, model)
            except (Error, OverflowError) as exc:
                if isinstance(exc, OverflowError) and op[0] != "incr":
                    raise
                error(f"op {n} {op[0]}: {type(exc).__name__}: {str(exc)[:120]}")
                _op_failed(op, model)
        mark("read again")
        read_all(db, "read after the writes")
        mark("check again")
        sound_after = checked(db)
        if sound and plan.ops and not sound_after:
            raise Wrong("check() passed before the writes and fails after them: " + notes[-1])
        mark("close")
        db.close()
        mark("reopen")
        try:
            db = mmkv.open(path, plan.flag, lock_timeout=2.0, open_timeout=2.0)
        except Error:
            if sound_after:
                raise Wrong("a store that passed check() and closed cleanly cannot be reopened: "
                            + traceback.format_exc(limit=1).strip().splitlines()[-1])
            raise
        mark("read after reopen")
        read_all(db, "read after reopen")
        mark("check after reopen")
        if not checked(db) and sound_after:
            raise Wrong("check() passed before close and fails after reopen: " + notes[-1])
        db.close()
    except Wrong as exc:
        return {"outcome": "wrong", "stage": stage, "detail": str(exc), "notes": notes}
    except Error as exc:
        error(f"{type(exc).__name__}: {str(exc)[:300]}")
        return {"outcome": "mmkv error", "stage": first_error[0], "detail": notes[-1], "notes": notes}
    except BaseException as exc:          # noqa: BLE001 - every other exception is the finding
        return {"outcome": "other exception", "stage": stage, "detail": f"{type(exc).__name__}: {exc}"[:500],
                "traceback": traceback.format_exc(), "notes": notes}
    if first_error:
        return {"outcome": "mmkv error", "stage": first_error[0], "detail": notes[0], "notes": notes}
    return {"outcome": "ok", "stage": stage, "detail": "", "notes": notes}


def _diagnose(db, k) -> str:
    """Why a read was wrong, when the record it came from fails its own checks."""
    from ..engine.shim import lib
    try:
        with db.lock():
            v = db.engine.view
            if lib.mmkv_find(v, k, len(k)) == 0 and lib.mmkv_record_verify(v, v.rec_off):
                return f" [{UNVERIFIED}]"
    except Exception:                     # noqa: BLE001 - a diagnosis only
        pass
    return ""


def _get_routed(db, k: bytes):
    """db.get(k), or for a model key of a namespace (torture.ns_key) that namespace's get."""
    from .torture import NS_PREFIX
    if not k.startswith(NS_PREFIX):
        return db.get(k)
    name, _, key = k[len(NS_PREFIX):].partition(b"\0")
    try:
        return db.namespace(name.decode(), create=False).get(key)
    except NamespaceError:
        return None                  # gone: the model says whether absent is allowed


def _perform(db, op, model: Model) -> None:
    kind = op[0]
    if kind == "put":
        db[op[1]] = op[2]
        model.set(op[1], op[2])
    elif kind == "del":
        try:
            del db[op[1]]
        except KeyError:
            model.check(op[1], None, "del")      # the store says absent: allowed?
            return
        model.set(op[1], None)
    elif kind == "incr":
        now = db.incr(op[1], op[2])
        model.set(op[1], now.to_bytes(8, "little", signed=True))
    elif kind == "txn":
        from .torture import perform as perform_on_store      # the crash harness's transaction
        perform_on_store(db, op)
        for k, v in op[1]:
            model.set(k, v)
    elif kind == "update":
        db.update(op[1])
        for k, v in op[1]:
            model.set(k, v)
    elif kind == "setdefault":
        got = bytes(db.setdefault(op[1], op[2]))
        values, _ = model.allowed.get(op[1], (set(), True))
        # the old value, or the default when the store found none (then absent must be allowed)
        model.check(op[1], None if got == op[2] and got not in values else got, "setdefault")
        model.set(op[1], got)
    elif kind == "stats":
        db.stats()
    elif kind == "clear":                 # the main key space: namespaces keep theirs
        from .torture import NS_PREFIX
        db.clear()
        for k in [k for k in model.allowed if not k.startswith(NS_PREFIX)]:
            model.set(k, None)


def _op_failed(op, model: Model) -> None:
    kind = op[0]
    if kind in ("put", "setdefault"):
        model.maybe(op[1], op[2])
    elif kind == "del":
        model.maybe(op[1], None)
    elif kind == "incr":
        values, _ = model.allowed.get(op[1], (set(), True))
        model.allowed[op[1]] = (set(values) | {_ANY8}, True)   # it may or may not have been applied
        model.written.add(op[1])
    elif kind in ("txn", "update"):
        for k, v in op[1]:
            model.maybe(k, v)
    elif kind == "clear":
        from .torture import NS_PREFIX
        for k in [k for k in model.allowed if not k.startswith(NS_PREFIX)]:
            model.maybe(k, None)


@dataclass
class Case:
    number: int
    seed: Seed
    image: bytes
    steps: list
    touched: list
    plan: Plan
    intact: set
    limit: int

    @property
    def kind(self) -> str:
        return self.steps[0][0] if len(self.steps) == 1 else "stacked"


    def describe(self) -> str:
        return f"seed {self.seed.name}; " + "; ".join(f"{k} {d}" for k, d in self.steps)


def make_case(seeds: list, fuzz_seed: int, number: int) -> Case:
    rnd = random.Random(f"mmkv-fuzz/{fuzz_seed}/{number}")
    seed = rnd.choice(seeds)
    image, steps, touched = damage(rnd, seed)
    plan = make_plan(rnd, seed)
    intact = {k for k, r in seed.ranges.items() if r is not None and not _overlaps(touched, r)}
    if len(image) < len(seed.image):           # truncated: the cut-off tail counts as touched
        intact = {k for k in intact if not _overlaps([(len(image), len(seed.image))], seed.ranges[k])}
    limit = 2 * max(len(image), len(seed.image), plan.op_bytes) + (4 << 20)
    return Case(number, seed, image, steps, touched, plan, intact, limit)


def _any8(case: Case) -> set:
    """Counters whose (unchecksummed) value bytes the damage touched."""
    an, out = case.seed.anatomy, set()
    for rec, (key, _, _) in an.records.items():
        if key in case.seed.counters:
            start = rec + RECORD_HEADER + pad8(len(key))
            if _overlaps(case.touched, [(start, start + 8)]):
                out.add(key)
    return out


def run_case(case: Case, workdir: str, timeout: float) -> dict:
    """Run one case in a forked child; returns its result dict (outcome, stage, detail, ...)."""
    path = os.path.join(workdir, "case.mmkv")
    for p in (path, path + ".lock"):
        if os.path.exists(p):
            os.unlink(p)
    for p in os.listdir(workdir):              # leftovers of a killed create (".new-PID")
        if p.startswith("case.mmkv.new-"):
            os.unlink(os.path.join(workdir, p))
    with open(path, "wb") as f:
        f.write(case.image)
    model = Model(case.seed, case.intact, _any8(case))
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:                               # pragma: no cover - the child; reports on the pipe
        code = 0
        try:
            os.close(rfd)
            _limit_child(case.limit)

            def say(line):
                os.write(wfd, (line + "\n").encode())

            result = _child_case(path, case.seed, case.plan, model, say)
            say("R " + json.dumps(result))
        except BaseException:
            code = 4
        finally:
            os._exit(code)
    os.close(wfd)
    data, deadline, hung = b"", time.monotonic() + timeout, False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            hung = True
            os.kill(pid, signal.SIGKILL)
            break
        ready, _, _ = select.select([rfd], [], [], left)
        if ready:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            data += chunk
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    lines = data.decode(errors="replace").splitlines()
    stages = [line[2:] for line in lines if line.startswith("S ")]
    stage = stages[-1] if stages else "start"
    if hung:
        return {"outcome": "hang", "stage": stage, "detail": f"no answer in {timeout}s (killed)"}
    results = [line[2:] for line in lines if line.startswith("R ")]
    if results:
        result = json.loads(results[-1])
    elif os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        name = signal.Signals(sig).name
        if sig == signal.SIGXFSZ:
            result = {"outcome": "wrong", "stage": stage,
                      "detail": f"the file grew past {case.limit} bytes (SIGXFSZ)"}
        else:
            result = {"outcome": "signal", "stage": stage, "detail": name}
    else:
        result = {"outcome": "other exception", "stage": stage, "detail": f"child exited with status {status}"}
    try:
        size = os.path.getsize(path)
    except OSError:
        size = 0
    if size > case.limit and result["outcome"] in ("ok", "mmkv error"):
        result = {"outcome": "wrong", "stage": stage, "detail": f"the file grew to {size} bytes"}
    return result


def _limit_child(file_limit: int) -> None:
    """No core files; a write or fallocate past file_limit raises SIGXFSZ; address space capped."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))
    try:
        with open("/proc/self/statm") as f:
            vm = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        cap = vm + (4 << 30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    except (OSError, ValueError):
        pass


def _workdir(folder: str) -> str:
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else folder
    return tempfile.mkdtemp(prefix="mmkv-fuzz-", dir=base)


def save_finding(folder: str, case: Case, result: dict, fuzz_seed: int, argv0: str = "mmkv torture fuzz") -> str:
    out = os.path.join(folder, "findings")
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"case-{case.number:07d}")
    with open(stem + ".mmkv.bad", "wb") as f:
        f.write(case.image)
    p = case.plan
    with open(stem + ".txt", "w", encoding="utf-8") as f:
        f.write(f"reproduce: {argv0} {folder} --seed {fuzz_seed} --case {case.number}\n")
        f.write(f"outcome: {result['outcome']} at stage {result.get('stage')}: {result.get('detail')}\n")
        f.write(f"damage: {case.describe()}\n")
        f.write(f"plan: flag {p.flag}, recover first {p.recover_first}, low load {p.low_load}, "
                f"ops {[op[0] for op in p.ops]}\n")
        f.write(f"intact keys: {len(case.intact)} of {len(case.seed.model)}\n")
        for note in result.get("notes", []):
            f.write(f"note: {note}\n")
        if result.get("traceback"):
            f.write(result["traceback"])
    return stem


# ====================================================================== the run
@dataclass
class Summary:
    cases: int = 0
    seconds: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict = field(default_factory=lambda: defaultdict(Counter))
    by_seed: dict = field(default_factory=lambda: defaultdict(Counter))
    detected_at: Counter = field(default_factory=Counter)
    findings: list = field(default_factory=list)

    @property
    def bad(self) -> int:
        return sum(self.outcomes[o] for o in ("other exception", "signal", "hang", "wrong"))

    def table(self) -> str:
        rate = self.cases / self.seconds if self.seconds else 0
        lines = [f"{self.cases} cases in {self.seconds:.1f}s ({rate:.1f}/s)"]
        for o in OUTCOMES:
            lines.append(f"  {o:16} {self.outcomes[o]:>9,}")
        lines.append("mmkv errors by stage: " + ", ".join(f"{s} {n}" for s, n in self.detected_at.most_common()))
        unverified = sum(1 for *_, result, _ in self.findings if UNVERIFIED in result.get("detail", ""))
        if unverified:
            lines.append(f"wrong values read from records that fail their checksum (reads do not verify "
                         f"them): {unverified} of {self.outcomes['wrong']}")
        head = "".join(f"{o[:10]:>11}" for o in OUTCOMES)
        lines.append(f"{'per seed':32}{head}")
        for name, c in sorted(self.by_seed.items()):
            lines.append(f"  {name:30}" + "".join(f"{c[o]:>11,}" for o in OUTCOMES))
        lines.append(f"{'per mutation kind':32}{head}")
        for name, c in sorted(self.by_kind.items()):
            lines.append(f"  {name[:30]:30}" + "".join(f"{c[o]:>11,}" for o in OUTCOMES))
        return "\n".join(lines)


def run(folder: str, cases: int, seed: int = 1, timeout: float = 10.0, first: int = 0, only=None,
        log=None, save: bool = True) -> Summary:
    """Run cases [first, first + cases) (or just the case numbers in only) and count outcomes.

    Findings (outcomes other than ok and mmkv error) are saved under folder/findings.
    """
    os.makedirs(folder, exist_ok=True)
    seeds = build_seeds(os.path.join(folder, "seeds"), seed)
    work = _workdir(folder)
    summary = Summary()
    started = time.monotonic()
    try:
        for s in seeds:                        # the seeds themselves must come out clean
            case = Case(-1, s, s.image, [("none", "")], [], make_plan(random.Random(0), s), set(s.model),
                        4 * len(s.image) + (4 << 20))
            result = run_case(case, work, timeout)
            if result["outcome"] != "ok":
                raise RuntimeError(f"fuzz: the undamaged seed {s.name!r} fails: {result}")
        numbers = only if only is not None else range(first, first + cases)
        for n, number in enumerate(numbers, 1):
            case = make_case(seeds, seed, number)
            result = run_case(case, work, timeout)
            o = result["outcome"]
            summary.cases += 1
            summary.outcomes[o] += 1
            summary.by_kind[case.kind][o] += 1
            summary.by_seed[case.seed.name][o] += 1
            if o == "mmkv error":
                summary.detected_at[" ".join(result.get("stage", "?").split(" ")[::2])] += 1
            if o not in ("ok", "mmkv error"):
                stem = save_finding(folder, case, result, seed) if save else None
                summary.findings.append((number, o, case.describe(), result, stem))
                if log:
                    log(f"  case {number}: {o} at {result.get('stage')}: {result.get('detail', '')[:200]}"
                        f"  [{case.describe()[:160]}]")
            if log and n % 1000 == 0:
                el = time.monotonic() - started
                log(f"  {n} cases, {el:.0f}s: " + ", ".join(f"{o} {summary.outcomes[o]}" for o in OUTCOMES))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary.seconds = time.monotonic() - started
    return summary


def replay(folder: str, seed: int, number: int, timeout: float = 10.0) -> dict:
    """Run one case again and return its result (with the traceback, if any)."""
    seeds = build_seeds(os.path.join(folder, "seeds"), seed)
    case = make_case(seeds, seed, number)
    work = _workdir(folder)
    try:
        result = run_case(case, work, timeout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["damage"] = case.describe()
    result["plan"] = repr(case.plan)[:2000]
    return result


def main(args) -> int:
    """The ``mmkv torture fuzz`` command (arguments parsed by torture.main)."""
    if args.case is not None:
        result = replay(args.folder, args.seed, args.case, args.timeout)
        print(f"case {args.case}: {result['outcome']} at {result.get('stage')}: {result.get('detail')}")
        print(f"  damage: {result['damage']}")
        for note in result.get("notes", []):
            print(f"  note: {note}")
        if result.get("traceback"):
            print(result["traceback"])
        return 0 if result["outcome"] in ("ok", "mmkv error") else 1
    summary = run(args.folder, args.cases, args.seed, args.timeout, first=args.first, log=print)
    print(f"mmkv torture fuzz: seed {args.seed}, cases {args.first}..{args.first + args.cases - 1}")
    print(summary.table())
    if summary.findings:
        print(f"{len(summary.findings)} finding(s) saved in {os.path.join(args.folder, 'findings')}")
    return 1 if summary.bad else 0
