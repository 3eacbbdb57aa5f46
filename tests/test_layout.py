"""The one layout, seen three ways, must agree.

* the C compiler's offsetof()/sizeof() table, exported by the shim
  (``mmkv.engine.layout.layout_table()``);
* cffi's view of the same structs (``ffi.offsetof`` / ``ffi.sizeof``), which is
  what the Python engine reads and writes through;
* the constants ``mmkv/layout.py`` derives (OFF_*, STATE_WORD, RECORD_HEADER, ...),
  and the bytes of a real file on disk.
"""
import os
import struct

import pytest

import mmkv
from mmkv.engine import layout
from mmkv.engine.shim import ffi, lib

#: Structs that live in the file (at a fixed offset of the header page, or in the heap).
FILE_STRUCTS = ("mmkv_identity", "mmkv_meta", "mmkv_state", "mmkv_locks", "mmkv_record", "mmkv_segment")
#: Every struct the shim's headers declare, as cffi parsed them.
ALL_STRUCTS = tuple(sorted(ffi.list_types()[1]))
SECTOR = 512


@pytest.fixture(scope="module")
def table():
    t = layout.layout_table()
    assert t, "layout_table() returned nothing"
    return t


def _fields(struct_name):
    return ffi.typeof("struct " + struct_name).fields


def _elem_align(ctype):
    """Natural alignment of a field: that of its element type for arrays."""
    while ctype.kind == "array":
        ctype = ctype.item
    return ffi.alignof(ctype)


# ---------------------------------------------------------------- C table == cffi view

def test_table_is_well_formed(table):
    for name, value in table.items():
        assert isinstance(name, str) and name.startswith("mmkv_"), name
        assert isinstance(value, int) and value >= 0, (name, value)
        assert name.count(".") <= 1, name
    # every struct has its size entry and no entry names an unknown struct
    assert set(FILE_STRUCTS) <= set(ALL_STRUCTS) and "mmkv_view" in ALL_STRUCTS
    assert {n.split(".")[0] for n in table} == set(ALL_STRUCTS)
    for s in ALL_STRUCTS:
        assert s in table, f"no sizeof entry for {s}"


def test_every_c_entry_matches_cffi(table):
    mismatches = []
    for name, c_value in table.items():
        if "." in name:
            struct_name, field = name.split(".")
            py_value = ffi.offsetof("struct " + struct_name, field)
        else:
            py_value = ffi.sizeof("struct " + name)
        if py_value != c_value:
            mismatches.append((name, c_value, py_value))
    assert not mismatches, f"C vs cffi disagree (name, C, cffi): {mismatches}"


@pytest.mark.parametrize("struct_name", ALL_STRUCTS)
def test_table_covers_every_cffi_field(table, struct_name):
    """No field may escape the comparison: the C table lists every field cffi knows."""
    names = [n for n, _ in _fields(struct_name)]
    assert names, struct_name
    missing = [n for n in names if f"{struct_name}.{n}" not in table]
    assert not missing, f"{struct_name}: fields absent from the C table: {missing}"
    extra = [k for k in table if k.startswith(struct_name + ".") and k.split(".")[1] not in names]
    assert not extra, f"{struct_name}: C table names fields cffi does not know: {extra}"


@pytest.mark.parametrize("struct_name", ALL_STRUCTS)
def test_fields_naturally_aligned_and_packed(table, struct_name):
    fields = _fields(struct_name)
    end = 0
    for name, f in fields:
        off = f.offset                     # equal to the C offset where the table lists it (tested above)
        size = ffi.sizeof(f.type)
        assert off % _elem_align(f.type) == 0, f"{struct_name}.{name} at {off} is not naturally aligned"
        assert off >= end, f"{struct_name}.{name} overlaps the field before it"
        if struct_name in FILE_STRUCTS:
            # on-disk structs carry no hidden padding: the format is exactly the fields
            assert off == end, f"{struct_name}.{name}: {off - end} bytes of implicit padding before it"
        end = off + size
    total = table[struct_name]
    assert end <= total
    if struct_name in FILE_STRUCTS:
        assert end == total, f"{struct_name}: {total - end} bytes of tail padding"
        assert total % 8 == 0, f"sizeof {struct_name} = {total} is not a multiple of 8"


def test_file_integers_are_fixed_width():
    """Only fixed-width unsigned integers (or arrays of them) may be stored in the file."""
    allowed = {"uint8_t", "uint32_t", "uint64_t"}
    for s in FILE_STRUCTS:
        for name, f in _fields(s):
            t = f.type
            while t.kind == "array":
                t = t.item
            assert t.kind == "primitive" and t.cname in allowed, f"{s}.{name} has type {f.type.cname}"


# ---------------------------------------------------------------- layout.py constants

def test_header_sector_constants():
    assert layout.HEADER_SIZE == lib.MMKV_HEADER_SIZE == 4096
    assert layout.OFF_IDENTITY == lib.MMKV_OFF_IDENTITY == 0
    assert layout.OFF_META == (lib.MMKV_OFF_META0, lib.MMKV_OFF_META1)
    assert layout.OFF_STATE == lib.MMKV_OFF_STATE
    assert layout.OFF_LOCKS == lib.MMKV_OFF_LOCKS
    assert layout.MAGIC == lib.MMKV_MAGIC
    # the magic's bytes, as documented in mmkv_layout.h
    assert layout.MAGIC.to_bytes(8, "little") == b"\x89MMKV\r\n\x1a"
    assert layout.VERSION == lib.MMKV_VERSION >= 1
    assert layout.NSEMS == lib.MMKV_NSEMS and layout.SEM_BYTES == lib.MMKV_SEM_BYTES
    assert layout.NCLASSES == lib.MMKV_NCLASSES


def test_sectors_do_not_overlap(table):
    ident_end = layout.OFF_IDENTITY + table["mmkv_identity"]
    assert ident_end <= SECTOR, "identity must fit in sector 0"
    metas = layout.OFF_META
    assert len(set(metas)) == 2
    for off in metas:
        assert off % SECTOR == 0, f"meta copy at {off} does not start a sector"
        assert table["mmkv_meta"] <= SECTOR, "a meta copy must fit in one sector"
        assert off // SECTOR != layout.OFF_IDENTITY // SECTOR, "meta shares the identity's sector"
    assert metas[0] // SECTOR != metas[1] // SECTOR, "the two meta copies share a sector"
    assert layout.OFF_STATE % SECTOR == 0
    assert layout.OFF_STATE >= max(metas) + SECTOR, "state shares a sector with a meta copy"
    state_end = layout.OFF_STATE + table["mmkv_state"]
    assert state_end <= layout.OFF_LOCKS, "state runs into the lock area"
    assert layout.OFF_LOCKS % SECTOR == 0
    locks_end = layout.OFF_LOCKS + table["mmkv_locks"]
    assert locks_end <= layout.HEADER_SIZE == 4096, "lock area leaves the header page"
    # the regions, in file order, strictly increasing
    regions = sorted([(layout.OFF_IDENTITY, ident_end), (metas[0], metas[0] + table["mmkv_meta"]),
                      (metas[1], metas[1] + table["mmkv_meta"]), (layout.OFF_STATE, state_end),
                      (layout.OFF_LOCKS, locks_end)])
    for (a0, a1), (b0, _) in zip(regions, regions[1:]):
        assert a1 <= b0, f"region [{a0}, {a1}) overlaps the one at {b0}"


def test_lock_area_constants(table):
    assert layout.OFF_MUTEX == layout.OFF_LOCKS + table["mmkv_locks.mutex"]
    assert layout.OFF_SEMS == layout.OFF_LOCKS + table["mmkv_locks.sems"]
    assert ffi.sizeof(ffi.typeof("struct mmkv_locks").fields[0][1].type) == lib.MMKV_MUTEX_BYTES
    assert table["mmkv_locks"] == lib.MMKV_MUTEX_BYTES + layout.NSEMS * layout.SEM_BYTES
    assert layout.OFF_SEMS + layout.NSEMS * layout.SEM_BYTES <= layout.OFF_LOCKS + table["mmkv_locks"]
    # the mutex and every semaphore sit on 8-byte (futex-friendly) boundaries
    assert layout.OFF_MUTEX % 64 == 0
    for i in range(layout.NSEMS):
        assert (layout.OFF_SEMS + i * layout.SEM_BYTES) % 8 == 0


def test_state_word_offsets(table):
    declared = [n for n, _ in _fields("mmkv_state") if n != "reserved"]
    assert set(layout.STATE_WORD) == set(declared), "STATE_WORD must name every live state field"
    for name, word in layout.STATE_WORD.items():
        byte = layout.OFF_STATE + table[f"mmkv_state.{name}"]
        assert byte % 8 == 0
        assert word * 8 == byte, f"STATE_WORD[{name!r}] = {word} but the field is at byte {byte}"
        assert word * 8 == layout.OFF_STATE + ffi.offsetof("struct mmkv_state", name)
    heads = ffi.typeof("struct mmkv_state").fields[-1]
    assert heads[0] == "free_heads" and ffi.sizeof(heads[1].type) == 8 * layout.NCLASSES
    # distinct words, all inside the state sectors
    assert len(set(layout.STATE_WORD.values())) == len(layout.STATE_WORD)
    assert all(layout.OFF_STATE // 8 <= w < (layout.OFF_STATE + table["mmkv_state"]) // 8
               for w in layout.STATE_WORD.values())


def test_record_constants(table):
    assert layout.RECORD_HEADER == table["mmkv_record"] == ffi.sizeof("struct mmkv_record") == 32
    assert layout.REC_KEY_LEN_AT == table["mmkv_record.key_len"] == ffi.offsetof("struct mmkv_record", "key_len")
    # the engine reads key_len as the low half of the 8-byte word at REC_KEY_LEN_AT
    assert layout.REC_KEY_LEN_AT % 8 == 0
    assert table["mmkv_record.flags"] == layout.REC_KEY_LEN_AT + 4
    assert layout.record_size(0, 0) == 32
    assert layout.record_size(1, 1) == 32 + 8 + 1
    assert layout.record_size(8, 5) == 32 + 8 + 5
    assert layout.record_size(9, 0) == 32 + 16
    assert [layout.pad8(n) for n in (0, 1, 7, 8, 9, 16)] == [0, 8, 8, 8, 16, 16]


def test_meta_and_identity_constants(table):
    assert layout.META_SIZE == table["mmkv_meta"]
    assert layout.IDENTITY_SIZE == table["mmkv_identity"]
    # the checksum is the last field: it covers every byte before it
    assert layout._META_SUM_AT == table["mmkv_meta.checksum"] == table["mmkv_meta"] - 8
    assert layout._ID_SUM_AT == table["mmkv_identity.checksum"] == table["mmkv_identity"] - 8


def test_slot_and_block_constants():
    assert layout.SLOT_OFF_MASK == (1 << layout.SLOT_OFF_BITS) - 1
    assert layout.SLOT_OFF_BITS == 48
    assert layout.BLOCK_FLAGS == layout.BLOCK_ALIGN - 1
    assert layout.BLOCK_ALLOC & layout.BLOCK_FLAGS and layout.BLOCK_PREV_ALLOC & layout.BLOCK_FLAGS
    assert layout.BLOCK_ALLOC != layout.BLOCK_PREV_ALLOC
    assert layout.BLOCK_MIN % layout.BLOCK_ALIGN == 0
    # the first block header is 8 below a 16-byte boundary, so payloads are 16-aligned
    assert layout.HEAP_START >= layout.HEADER_SIZE and (layout.HEAP_START + 8) % 16 == 0
    assert layout.HEAP_START == lib.MMKV_HEAP_START


def test_segment_constants(table):
    assert layout.SEGMENT_SLOTS == lib.MMKV_SEGMENT_SLOTS == 16384
    assert layout.SEGMENT_SLOTS & (layout.SEGMENT_SLOTS - 1) == 0     # home slot = hash bits masked
    assert layout.SEGMENT_HEADER == table["mmkv_segment"] == ffi.sizeof("struct mmkv_segment") == 32
    assert [name for name, _ in _fields("mmkv_segment")] == ["depth", "prefix", "count", "reserved"]
    assert layout.SEGMENT_BYTES == layout.SEGMENT_HEADER + 8 * layout.SEGMENT_SLOTS
    assert layout.DIR_MAX_BITS == lib.MMKV_DIR_MAX_BITS == 32
    assert layout.TAG_SHIFT == lib.MMKV_TAG_SHIFT
    # the tag (16 hash bits) fills the slot word above the record offset
    assert layout.SLOT_OFF_BITS + 16 == 64


def test_meta_index_root_is_validated():
    """A meta whose directory does not fit in the file, or is deeper than DIR_MAX_BITS, is refused."""
    ident = layout.Identity(4096, 1, 2, 3)
    size = 1 << 20
    page = bytearray(layout.build_identity(ident) + bytes(layout.HEADER_SIZE - layout.IDENTITY_SIZE))

    def parse(dir_off, dir_bits):
        raw = layout.build_meta(layout.Meta(1, size, dir_off, dir_bits), ident)
        page[layout.OFF_META[0]:layout.OFF_META[0] + len(raw)] = raw
        return layout.parse_meta(bytes(page), ident, size)[0]

    fits = size - layout.EPILOGUE_BYTES - (8 << 10)            # the last offset a 2^10-entry directory fits at
    assert parse(fits, 10).dir_off == fits
    assert parse(layout.HEAP_START + 8, 0).dir_bits == 0
    for dir_off, dir_bits in [(fits + 8, 10), (layout.HEAP_START + 16, 17), (layout.HEAP_START + 16, 33),
                              (layout.HEAP_START + 12, 0), (layout.HEAP_START, 0)]:
        with pytest.raises(mmkv.CorruptionError, match="index root"):
            parse(dir_off, dir_bits)


def test_build_and_parse_round_trip():
    ident = layout.Identity(4096, 0x0123456789ABCDEF, 0xFEDCBA9876543210, 42)
    raw = layout.build_identity(ident)
    assert len(raw) == layout.IDENTITY_SIZE
    magic, version, page_size, s0, s1, created = struct.unpack_from("<QIIQQQ", raw, 0)
    assert (magic, version, page_size, s0, s1, created) == (layout.MAGIC, layout.VERSION, 4096,
                                                            ident.seed0, ident.seed1, 42)
    checksum, = struct.unpack_from("<Q", raw, layout._ID_SUM_AT)
    assert checksum == layout.siphash(0, 0, raw[:layout._ID_SUM_AT])
    page = raw + bytes(layout.HEADER_SIZE - len(raw))
    assert layout.parse_identity(page, 1 << 20) == ident

    meta = layout.Meta(7, 1 << 20, layout.HEAP_START + 8 + 8, 10, 0, 0)     # a directory of 2^10 entries
    mraw = layout.build_meta(meta, ident)
    assert len(mraw) == layout.META_SIZE
    assert struct.unpack_from("<6Q", mraw, 0) == (7, 1 << 20, meta.dir_off, 10, 0, 0)
    assert ffi.offsetof("struct mmkv_meta", "dir_off") == 16 and ffi.offsetof("struct mmkv_meta", "dir_bits") == 24
    page = bytearray(page)
    page[layout.OFF_META[1]:layout.OFF_META[1] + len(mraw)] = mraw
    got, which = layout.parse_meta(bytes(page), ident, 1 << 20)
    assert (got, which) == (meta, 1)


def test_real_file_matches_layout(path):
    """The header of a file the engine wrote, read with struct at the documented offsets."""
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
        words = db.stats()
    with open(path, "rb") as f:
        page = f.read(layout.HEADER_SIZE)
    assert page[:8] == b"\x89MMKV\r\n\x1a"
    version, page_size = struct.unpack_from("<II", page, 8)
    assert version == layout.VERSION
    assert page_size == os.sysconf("SC_PAGE_SIZE")
    seq_a, size_a = struct.unpack_from("<QQ", page, layout.OFF_META[0])
    seq_b, size_b = struct.unpack_from("<QQ", page, layout.OFF_META[1])
    # the copy with the higher seq is in force and names the real file size
    assert max(seq_a, seq_b) >= 1
    in_force = size_a if seq_a >= seq_b else size_b
    assert in_force == os.path.getsize(path) == words["file_size"]
    count, = struct.unpack_from("<Q", page, layout.STATE_WORD["count"] * 8)
    dirty, = struct.unpack_from("<Q", page, layout.STATE_WORD["dirty"] * 8)
    assert count == 1
    assert dirty == layout.CLEAN_MARK, "a cleanly closed file must be marked clean"
