"""check(): the full audit of a store file.  Read-only; the caller holds the lock.

Covers the header (identity, both meta copies, sizes), the catalog of namespaces (magic, checksum,
bounds, names), every index, the main one and each namespace's (probe
invariant, tags, every record: bounds, block in use, checksum, key hash, no
record or key twice), the heap (every block, boundary tags, free lists,
bitmap) and the accounting (every block in use is a record or the index;
counters match; used + free + overhead == file size).  Cost: one pass over the
index and one over the heap, about a second per million keys.
"""
import os
from dataclasses import dataclass, field

from ..errors import CorruptionError
from .layout import (EPILOGUE_BYTES, HEADER_SIZE, HEAP_START, SLOT_OFF_MASK, STATE_WORD, SWEEP_POISON,
                     SWEEP_SLOT_BITS, parse_identity, parse_meta)
from .shim import ffi, lib
from . import index
from .recovery import live_records


@dataclass
class Report:
    path: str
    ok: bool = True
    problems: list = field(default_factory=list)
    keys: int = 0
    file_size: int = 0
    used_bytes: int = 0
    free_bytes: int = 0
    index_slots: int = 0
    expiring: int = 0        # keys in the index with a deadline ...
    expired: int = 0         # ... of which this many have passed it (invisible, not yet swept)
    namespaces: int = 0      # namespaces in the catalog (mmkv's own included; dropped ones not), ...
    namespace_keys: int = 0  # ... and the keys in them (counted in keys too)

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def __str__(self):
        lines = [f"{self.path}: {'OK' if self.ok else 'DAMAGED'}",
                 f"  keys {self.keys}, index slots {self.index_slots}, file {self.file_size} bytes, "
                 f"used {self.used_bytes}, free {self.free_bytes}"]
        if self.namespaces:
            lines.append(f"  namespaces {self.namespaces}, holding {self.namespace_keys} of the keys")
        if self.expiring:
            lines.append(f"  with a deadline {self.expiring}, expired and not yet swept {self.expired}")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def unbacked_outside(fd: int, size: int, allowed: list) -> list:
    """The parts of the file's holes (mapping.unbacked_ranges) that no (start, end) of ``allowed``
    (sorted, not overlapping) covers: at most 10; none where the filesystem cannot tell."""
    from .mapping import unbacked_ranges
    holes = unbacked_ranges(fd, size) or []
    bad, i = [], 0
    for start, end in holes:
        while start < end and len(bad) < 10:
            while i < len(allowed) and allowed[i][1] <= start:
                i += 1
            if i == len(allowed) or allowed[i][0] >= end:
                bad.append((start, end))
                break
            if allowed[i][0] > start:
                bad.append((start, allowed[i][0]))
            start = allowed[i][1]
    return bad


def audit(eng) -> Report:
    """Audit the engine's file (lock held) and return the Report (never raises for damage:
    every problem found is in ``report.problems``)."""
    v, w, fm, alloc = eng.view, eng.words, eng.fm, eng.alloc
    report = Report(eng.path, file_size=fm.size)
    # header
    try:
        page0 = fm.mm[:HEADER_SIZE]
        parse_identity(page0, fm.size)
        meta, _ = parse_meta(page0, eng.ident, os.fstat(eng.fd).st_size)
        if meta.file_size != fm.size or meta.dir_off != v.dir_off or meta.dir_bits != v.dir_bits:
            report.problem("meta in force differs from the mapping in use")
    except CorruptionError as exc:
        report.problem(f"header: {exc}")
        return report
    # indexes: the main one and each namespace's (dropped ones, being freed, included)
    from . import namespaces
    try:
        indexes = namespaces.all_indexes(eng)
    except CorruptionError as exc:
        report.problem(f"catalog: {exc}")
        return report
    from .allocator import block_size_for
    structure = [(alloc.placement(off), alloc.claimed(alloc.placement(off), block_size_for(need)))
                 for off, need in namespaces.catalog_blocks(eng)]
    keep, per_index = [], []
    for label, ieng, entry in indexes:
        iv = ieng.view
        fault = index.audit(iv)
        if fault is not None:
            report.problem(f"{label}: directory entry {fault[0]}, slot {fault[1]}: a segment breaks its "
                           "invariants (prefix, count, tag or probe order) or holds a bad record")
        try:
            structure += index.blocks(ieng, iv)
            if entry is None or not entry.dropped:
                report.index_slots += index.shape(ieng)["index_slots"]
            deadlines = {}
            kept, drop = live_records(ieng, deadlines=deadlines)
        except CorruptionError as exc:
            report.problem(f"{label}: {exc}")
            return report
        for seg, slot in drop:
            report.problem(f"{label}: segment {seg} slot {slot} points at a bad, duplicate or out-of-heap record")
        keep += kept
        if entry is None or not entry.dropped:
            per_index.append((label, ieng, kept, deadlines))
    report.keys = sum(len(kept) for _, _, kept, _ in per_index)
    report.namespaces = len(per_index) - 1
    report.namespace_keys = report.keys - len(per_index[0][2])
    # heap
    for p in alloc.audit():
        report.problem(f"heap: {p}")
    if report.ok:
        in_use = {b: s for b, s, used in alloc.blocks() if used}
        referenced = {b for b, *_ in keep} | {b for b, _ in structure}
        for b in sorted(set(in_use) - referenced)[:10]:
            report.problem(f"heap: block {b} ({in_use[b]} bytes) is in use but nothing refers to it (leak)")
        for b in sorted(referenced - set(in_use))[:10]:
            report.problem(f"heap: block {b} is referenced but is not a block in use")
        for b, s, *_ in keep:
            if b in in_use and in_use[b] != s:
                report.problem(f"heap: record block {b} size disagrees with the heap walk")
    # released space: a hole anywhere but inside a free block that says it may have one would
    # turn a write there on a full disk into SIGBUS
    try:
        allowed = alloc.released_ranges()
    except CorruptionError:
        allowed = None                       # the heap walk's own problem is reported above
    if allowed is not None:
        for start, end in unbacked_outside(fm.fd, fm.size, allowed):
            report.problem(f"file: [{start}, {end}) is a hole (no disk blocks) outside released free space")
    # accounting
    used, free = w[STATE_WORD["used_bytes"]], w[STATE_WORD["free_bytes"]]
    report.used_bytes, report.free_bytes = used, free
    for label, ieng, kept, deadlines in per_index:
        count, live_word = ieng.index_word("count"), ieng.index_word("live_bytes")
        where = "" if ieng is eng else f"{label}: "
        if w[count] != len(kept):
            report.problem(f"{where}count says {w[count]} keys, the index holds {len(kept)}")
        live = sum(item[3] for item in kept)
        if w[live_word] != live:
            report.problem(f"{where}live_bytes says {w[live_word]}, the records hold {live}")
        audit_expiry(ieng, report, [deadlines[rec] for *_, word, _ in kept for rec in (word & SLOT_OFF_MASK,)],
                     label)
    if used + free + HEAP_START + EPILOGUE_BYTES != fm.size:
        report.problem(f"used {used} + free {free} + overhead {HEAP_START + EPILOGUE_BYTES} != file size {fm.size}")
    return report


def audit_expiry(eng, report: Report, deadlines: list, label: str = "index") -> None:
    """The expiry words against the records' deadlines (one per live record, 0: none): ttl_min
    must be 0 only when no record has a deadline, and otherwise at most every deadline (else a
    read or len() past it would trust that nothing expired); sweep_at must name a place in the
    index."""
    w = eng.words
    timed = [d for d in deadlines if d]
    now = ffi.new("int64_t *")
    lib.mmkv_now(eng.view, now)
    report.expiring += len(timed)
    report.expired += sum(d <= now[0] for d in timed)
    where = "" if label == "index" else f" ({label})"
    ttl_min, at = w[eng.index_word("ttl_min")], w[eng.index_word("sweep_at")] & ~SWEEP_POISON
    if timed and not 0 < ttl_min <= max(min(timed), 1):       # (a deadline <= 0 is due from the start)
        report.problem(f"expiry{where}: ttl_min is {ttl_min}, but a record's deadline is {min(timed)}: "
                       "expired keys could be counted")
    if at >> (32 + SWEEP_SLOT_BITS):
        report.problem(f"expiry{where}: sweep_at {w[eng.index_word('sweep_at')]:#x} names no place in the index")
