"""The bytes of the format: every offset, size and struct of the file, in one place.

All numbers come from the compiled shim, whose structs are declared once in
``native/mmkv_layout.h``; no other module holds an offset or a struct format.
Also here: building and validating the identity sector and the two meta copies.
"""
from .shim import ffi, lib
from ..errors import ChecksumError, CorruptionError, NotMmkvFileError, TruncatedError, VersionError

MAGIC = lib.MMKV_MAGIC                   #: first 8 bytes of every mmkv file, as a little-endian u64
MAGIC_BYTES = MAGIC.to_bytes(8, "little")
VERSION = lib.MMKV_VERSION               #: format version this package writes
OLDEST_VERSION = lib.MMKV_VERSION_OLDEST  #: oldest format version it reads (and writes to, keeping its version)
NAMESPACES_VERSION = 3                    #: the first format version whose files may hold a catalog of namespaces
SIPHASH_SUMS = lib.MMKV_ID_SIPHASH_SUMS   #: identity flag: version 1's SipHash record checksums in a version 3 file
HEADER_SIZE = lib.MMKV_HEADER_SIZE       #: size of page 0; the heap starts after it
OFF_IDENTITY = lib.MMKV_OFF_IDENTITY     #: identity sector: written at creation (and when raised to version 3)
OFF_META = (lib.MMKV_OFF_META0, lib.MMKV_OFF_META1)  #: the two meta copies
OFF_STATE = lib.MMKV_OFF_STATE           #: mutable state (a cache)
OFF_LOCKS = lib.MMKV_OFF_LOCKS           #: lock area
OFF_MUTEX = OFF_LOCKS + ffi.offsetof("struct mmkv_locks", "mutex")
OFF_SEMS = OFF_LOCKS + ffi.offsetof("struct mmkv_locks", "sems")
NSEMS = lib.MMKV_NSEMS
SEM_BYTES = lib.MMKV_SEM_BYTES
NCLASSES = lib.MMKV_NCLASSES

BLOCK_ALLOC = lib.MMKV_BLOCK_ALLOC
BLOCK_PREV_ALLOC = lib.MMKV_BLOCK_PREV_ALLOC
BLOCK_FLAGS = lib.MMKV_BLOCK_FLAGS
BLOCK_HOLES = lib.MMKV_BLOCK_HOLES     #: free block: pages from its holes_at word on may be holes
FREE_HOLES_AT = lib.MMKV_FREE_HOLES_AT  #: free block with BLOCK_HOLES: byte offset of holes_at
FREE_HOLES_HEAD = lib.MMKV_FREE_HOLES_HEAD  #: ... whose pages that may be holes start at or after this
BLOCK_ALIGN = lib.MMKV_BLOCK_ALIGN
BLOCK_MIN = lib.MMKV_BLOCK_MIN
#: First block header; blocks start 8 bytes below a 16-byte boundary so that payloads are 16-aligned.
HEAP_START = lib.MMKV_HEAP_START
#: The epilogue word sits in the last 8 bytes of the file.
EPILOGUE_BYTES = lib.MMKV_EPILOGUE_BYTES
#: Bytes of a block's header word (size | flags); the payload follows it, and a free block
#: repeats its size in its last word (the footer).
BLOCK_HEADER = lib.MMKV_BLOCK_HEADER
FREE_NEXT = lib.MMKV_FREE_NEXT           #: free block: byte offset of the next link (0: end of list)
FREE_PREV = lib.MMKV_FREE_PREV           #: free block: byte offset of the previous link (0: list head)
#: Words of the file are unsigned 64-bit: arithmetic on a state word wraps with this mask
#: (the state is a cache, so a damaged word must give a wrong count, never an exception).
MASK64 = (1 << 64) - 1
#: Page sizes a file may name: powers of two from the header page's size to this.
MAX_PAGE_SIZE = 1 << 20
#: Slot words hold 48-bit offsets, so no file can be larger than this.
MAX_FILE_SIZE = 1 << 48

SLOT_OFF_BITS = lib.MMKV_SLOT_OFF_BITS
SLOT_OFF_MASK = lib.MMKV_SLOT_OFF_MASK
SEGMENT_SLOTS = lib.MMKV_SEGMENT_SLOTS            #: slots per index segment
SEGMENT_HEADER = ffi.sizeof("struct mmkv_segment")
SEGMENT_BYTES = SEGMENT_HEADER + 8 * SEGMENT_SLOTS   #: a segment's payload
TAG_SHIFT = lib.MMKV_TAG_SHIFT
DIR_MAX_BITS = lib.MMKV_DIR_MAX_BITS
REC_COUNTER = lib.MMKV_REC_COUNTER
REC_EXPIRES = lib.MMKV_REC_EXPIRES                #: the value starts with the key's deadline
DEADLINE_BYTES = lib.MMKV_DEADLINE_BYTES
SWEEP_POISON = lib.MMKV_SWEEP_POISON
SWEEP_SLOT_BITS = lib.MMKV_SWEEP_SLOT_BITS
RECORD_HEADER = ffi.sizeof("struct mmkv_record")
REC_KEY_LEN_AT = ffi.offsetof("struct mmkv_record", "key_len")
REC_VAL_LEN_AT = ffi.offsetof("struct mmkv_record", "val_len")
JOURNAL_MAGIC = lib.MMKV_JOURNAL_MAGIC
JOURNAL_HEADER = ffi.sizeof("struct mmkv_journal")
CATALOG_HEADER = ffi.sizeof("struct mmkv_catalog")
CATALOG_ENTRY = ffi.sizeof("struct mmkv_catalog_entry")
#: The state's ``dirty`` word holds this while the file is closed cleanly; anything else
#: (zero from a torn sector included) means recovery must run on the next first open.
CLEAN_MARK = lib.MMKV_CLEAN_MARK   # "mkvclean"

_ID_SUM_AT = ffi.offsetof("struct mmkv_identity", "checksum")
_META_SUM_AT = ffi.offsetof("struct mmkv_meta", "checksum")
META_SIZE = ffi.sizeof("struct mmkv_meta")
IDENTITY_SIZE = ffi.sizeof("struct mmkv_identity")

#: Word offsets (byte offset // 8) of the state fields the engine touches on every call.
STATE_WORD = {
    name: (OFF_STATE + ffi.offsetof("struct mmkv_state", name)) // 8
    for name in ("generation", "dirty", "count", "live_bytes", "used_bytes", "free_bytes",
                 "free_bitmap", "lock_pid", "lock_since_ns", "recoveries", "seq", "compacting_pid", "ttl_min", "sweep_at", "sweep_min",
                 "free_heads")
}


def pad8(n: int) -> int:
    return (n + 7) & ~7


def record_size(key_len: int, val_len: int) -> int:
    """Bytes a record with these lengths occupies (header, key, padding, value)."""
    return RECORD_HEADER + pad8(key_len) + val_len


def stored_value_len(view, key_len: int) -> int:
    """The bytes of the value area of the record the view last described (mmkv_find,
    mmkv_record_verify): its value, and its deadline if it has one; what live_bytes counts."""
    return view.rec_need - RECORD_HEADER - pad8(key_len)


def deadline_value(deadline: int, value: bytes) -> bytes:
    """The value area of a record with flag REC_EXPIRES: the deadline, then the value."""
    return deadline.to_bytes(DEADLINE_BYTES, "little", signed=True) + value


def slot_word(key_hash: int, rec: int) -> int:
    """The 8-byte slot that points at record rec of a key with this hash (tag | offset)."""
    return ((key_hash >> TAG_SHIFT) & 0xFFFF) << SLOT_OFF_BITS | rec


def slot_tag(word: int) -> int:
    """The tag (hash bits 16..31) a slot word carries."""
    return word >> SLOT_OFF_BITS


def hash_tag(key_hash: int) -> int:
    """The tag a slot for a key with this hash must carry."""
    return (key_hash >> TAG_SHIFT) & 0xFFFF


def record_key_len(words, rec: int) -> int:
    """The key length word of the record at rec (words: the mapping as 64-bit words)."""
    return words[(rec + REC_KEY_LEN_AT) >> 3] & 0xFFFFFFFF


def record_key(mm, words, rec: int):
    """The key bytes (a slice of mm) of the record at rec; verify the record first."""
    start = rec + RECORD_HEADER
    return mm[start:start + record_key_len(words, rec)]


def siphash(k0: int, k1: int, data) -> int:
    out = ffi.new("uint64_t *")
    buf = ffi.from_buffer(data)
    rc = lib.mmkv_siphash(k0, k1, buf, len(buf), out)
    if rc:
        raise ValueError(f"siphash failed: errno {rc}")
    return out[0]


class _Fields(tuple):
    """A tuple with named fields, as ``collections.namedtuple`` makes them: written out here
    because namedtuple imports ``collections`` (about 2 ms of ``import mmkv``, which needs
    nothing else from it).  Subclasses name their fields in ``_fields`` and ``__new__``."""
    __slots__ = ()
    _fields = ()

    def _replace(self, **changes):
        """A copy with the named fields changed (namedtuple's ``_replace``)."""
        return self.__class__(**{**self._asdict(), **changes})

    def _asdict(self) -> dict:
        return dict(zip(self._fields, self))

    def __getnewargs__(self):      # copy and pickle through __new__(*fields)
        return tuple(self)

    def __repr__(self):
        return f"{self.__class__.__name__}({', '.join(f'{n}={v!r}' for n, v in zip(self._fields, self))})"


class Identity(_Fields):
    """The identity sector's fields (struct mmkv_identity), as Python values."""
    __slots__ = ()
    _fields = ("page_size", "seed0", "seed1", "created_ns", "version", "flags")

    def __new__(cls, page_size, seed0, seed1, created_ns, version=VERSION, flags=0):
        return tuple.__new__(cls, (page_size, seed0, seed1, created_ns, version, flags))

    page_size = property(lambda self: self[0])
    seed0 = property(lambda self: self[1])
    seed1 = property(lambda self: self[2])
    created_ns = property(lambda self: self[3])
    version = property(lambda self: self[4])     # 1: SipHash record checksums; 2: CRC32C; 3: and namespaces
    flags = property(lambda self: self[5])       # version 3: SIPHASH_SUMS or 0

    @property
    def crc_sums(self) -> bool:
        """Records carry CRC32C checksums (else SipHash ones: version 1, or 3 raised from 1)."""
        return self.version >= 2 and not self.flags & SIPHASH_SUMS

    def raised(self) -> "Identity":
        """This identity at NAMESPACES_VERSION, keeping its record checksums (see native/mmkv_layout.h)."""
        if self.version >= NAMESPACES_VERSION:
            return self
        return self._replace(version=NAMESPACES_VERSION, flags=0 if self.crc_sums else SIPHASH_SUMS)


class Meta(_Fields):
    """A meta copy's fields (struct mmkv_meta); change one with meta._replace(...)."""
    __slots__ = ()
    _fields = ("seq", "file_size", "dir_off", "dir_bits", "journal_off", "journal_txn", "catalog_off")

    def __new__(cls, seq, file_size, dir_off, dir_bits, journal_off=0, journal_txn=0, catalog_off=0):
        return tuple.__new__(cls, (seq, file_size, dir_off, dir_bits, journal_off, journal_txn, catalog_off))

    seq = property(lambda self: self[0])
    file_size = property(lambda self: self[1])
    dir_off = property(lambda self: self[2])
    dir_bits = property(lambda self: self[3])
    journal_off = property(lambda self: self[4])
    journal_txn = property(lambda self: self[5])
    catalog_off = property(lambda self: self[6])      # the namespaces' catalog (engine/namespaces.py), 0: none


def build_identity(ident: Identity) -> bytes:
    """The identity sector's bytes (a new file's, or a raised one's), checksum included."""
    p = ffi.new("struct mmkv_identity *")
    p.magic, p.version, p.page_size = MAGIC, ident.version, ident.page_size
    p.seed0, p.seed1, p.created_ns, p.flags = ident.seed0, ident.seed1, ident.created_ns, ident.flags
    raw = ffi.buffer(p)
    p.checksum = siphash(0, 0, raw[:_ID_SUM_AT])
    return bytes(raw)


def parse_identity(page: bytes, file_size: int) -> Identity:
    """Validate the identity sector of a file's first page.

    :raises TruncatedError: the file is shorter than one header page.
    :raises NotMmkvFileError: bad magic.  :raises VersionError: other format version.
    :raises ChecksumError: the identity sector is damaged.
    """
    if file_size < HEADER_SIZE or len(page) < HEADER_SIZE:
        head = bytes(page[:8])
        if head != MAGIC_BYTES[:len(head)]:
            raise NotMmkvFileError(f"not an mmkv file: bad magic {head!r}")
        raise TruncatedError(f"file is {file_size} bytes, shorter than the {HEADER_SIZE}-byte header")
    p = ffi.cast("struct mmkv_identity *", ffi.from_buffer(page))
    if p.magic != MAGIC:
        raise NotMmkvFileError(f"not an mmkv file: bad magic {bytes(page[:8])!r}")
    if not OLDEST_VERSION <= p.version <= VERSION:
        raise VersionError(f"file has format version {p.version}; this mmkv reads versions "
                           f"{OLDEST_VERSION} to {VERSION}")
    if p.checksum != siphash(0, 0, page[:_ID_SUM_AT]):
        raise ChecksumError("header checksum mismatch: the identity sector is damaged")
    page_size = p.page_size
    if not HEADER_SIZE <= page_size <= MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise CorruptionError(f"header names a page size of {page_size} bytes (a power of two from "
                              f"{HEADER_SIZE} to {MAX_PAGE_SIZE} expected): the identity sector is damaged")
    flags = p.flags if p.version >= NAMESPACES_VERSION else 0
    if flags & ~lib.MMKV_ID_KNOWN_FLAGS:
        raise VersionError(f"file has format version {p.version} with features this mmkv does not know "
                           f"(identity flags {flags:#x}); use the mmkv that wrote it")
    return Identity(page_size, p.seed0, p.seed1, p.created_ns, p.version, flags)


def build_meta(meta: Meta, ident: Identity) -> bytes:
    p = ffi.new("struct mmkv_meta *")
    # seq and journal_txn count meta writes modulo 2^64 (see parse_meta): seq + 1 never overflows
    p.seq, p.file_size, p.dir_off, p.dir_bits = meta.seq & MASK64, meta.file_size, meta.dir_off, meta.dir_bits
    p.journal_off, p.journal_txn = meta.journal_off, meta.journal_txn & MASK64
    p.catalog_off = meta.catalog_off
    raw = ffi.buffer(p)
    p.checksum = siphash(ident.seed0, ident.seed1, raw[:_META_SUM_AT])
    return bytes(raw)


def _meta_copy(page, at: int, ident: Identity):
    raw = bytes(page[at:at + META_SIZE])
    p = ffi.cast("struct mmkv_meta *", ffi.from_buffer(raw))
    if p.checksum != siphash(ident.seed0, ident.seed1, raw[:_META_SUM_AT]):
        return None
    return Meta(p.seq, p.file_size, p.dir_off, p.dir_bits, p.journal_off, p.journal_txn, p.catalog_off)


def parse_meta(page, ident: Identity, real_size: int) -> tuple:
    """The meta copy in force and its slot (0 or 1): the valid copy that is ahead.

    A write goes to the copy not in force with seq + 1 modulo 2^64, so of two valid copies
    the one ahead is the one whose seq is 1 to 2^63 - 1 steps after the other's, counting
    modulo 2^64 (serial-number order): 0 follows 2^64 - 1, and no seq value is invalid.

    :raises ChecksumError: neither copy verifies.
    :raises TruncatedError: the file is shorter than the meta says.
    :raises CorruptionError: the roots point outside the file.
    """
    copies = [(m, i) for i in (0, 1) if (m := _meta_copy(page, OFF_META[i], ident)) is not None]
    if not copies:
        raise ChecksumError("both meta copies fail their checksum: the header is damaged")
    meta, which = copies[0]
    if len(copies) == 2:
        ahead = (copies[1][0].seq - copies[0][0].seq) & MASK64
        if 0 < ahead < 1 << 63 or (ahead == 1 << 63 and copies[1][0].seq > copies[0][0].seq):
            meta, which = copies[1]
    validate_meta(meta, ident, real_size)
    return meta, which


def _payload_ok(off: int, length: int, file_size: int) -> bool:
    """[off, off + length) is 8-aligned, lies in the heap and leaves room for a block header."""
    return off % 8 == 0 and off >= HEAP_START + BLOCK_HEADER and off + length <= file_size - EPILOGUE_BYTES


def validate_meta(meta: Meta, ident: Identity, real_size: int) -> None:
    """Check every root the meta copy names against the file (see parse_meta for what it raises)."""
    if meta.file_size > real_size:
        raise TruncatedError(f"file is {real_size} bytes but its header says {meta.file_size}: it was cut short")
    if meta.file_size < HEADER_SIZE + ident.page_size or meta.file_size % ident.page_size \
            or meta.file_size > MAX_FILE_SIZE:
        raise CorruptionError(f"header file size {meta.file_size} is not a page multiple past the header")
    if meta.dir_bits > DIR_MAX_BITS or not _payload_ok(meta.dir_off, 8 << meta.dir_bits, meta.file_size):
        raise CorruptionError(f"index root out of bounds: directory at {meta.dir_off}, {meta.dir_bits} bits")
    if meta.journal_off and not _payload_ok(meta.journal_off, JOURNAL_HEADER, meta.file_size):
        raise CorruptionError(f"journal root out of bounds: offset {meta.journal_off}")
    if meta.catalog_off and not _payload_ok(meta.catalog_off, CATALOG_HEADER, meta.file_size):
        raise CorruptionError(f"catalog root out of bounds: offset {meta.catalog_off}")


def struct_fields(name: str) -> list:
    """[(field, byte offset, byte size)] of ``struct name`` as the shim lays it out.

    For tools that address single fields of the file (the damage fuzzer); the engine
    itself reads structs through cffi.
    """
    return [(field, f.offset, ffi.sizeof(f.type)) for field, f in ffi.typeof(f"struct {name}").fields]


def layout_table() -> dict:
    """{'struct.field' or 'struct': value} as the C compiler laid the structs out."""
    name, value, out, i = ffi.new("char **"), ffi.new("uint64_t *"), {}, 0
    while lib.mmkv_layout_entry(i, name, value) == 0:
        out[ffi.string(name[0]).decode()] = value[0]
        i += 1
    return out
