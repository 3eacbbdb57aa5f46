/*
 * mmkv on-disk layout: the one definition of every struct stored in the file.
 *
 * This header is read twice: by the C compiler (each native/mmkv_*.c file includes
 * it through native/mmkv_internal.h) and by cffi's cdef (native/build_ffi.py
 * feeds it, then mmkv_shim.h, to cdef), so it must stay in the subset of C that
 * cdef parses: fixed-width integer fields, plain integer #defines, no
 * expressions, no includes.  mmkv/engine/layout.py takes every offset, size and
 * constant from the compiled module, and tests/test_layout.py checks them
 * against offsetof() as the C compiler computed it.  Structs that never reach
 * the file (struct mmkv_view, struct mmkv_getbuf) live in mmkv_shim.h.
 *
 * Every integer is little-endian and naturally aligned.  The file is:
 *
 *   [0, 4096)          header page: identity, meta A, meta B, state, lock area
 *   [4096, 4104)       one padding word, always 0 (never read: the first
 *                      block's PREV_ALLOC bit is always set)
 *   [4104, size - 8)   heap: blocks managed by the allocator (records, index
 *                      segments and directories, journals), tiling it exactly
 *   [size - 8, size)   the epilogue word
 */

/* Format constants. */
#define MMKV_MAGIC 0x1a0a0d564b4d4d89      /* bytes 89 'M' 'M' 'K' 'V' \r \n 1a */
#define MMKV_VERSION 3                     /* bump on any incompatible layout change */
#define MMKV_VERSION_OLDEST 1              /* version 1: the same layout, SipHash record checksums */
/* Versions: 1, SipHash record checksums; 2, CRC32C ones; 3, the file may hold a catalog of namespaces
 * (meta.catalog_off), which an mmkv reading only versions 1 and 2 would take for leaked space and
 * free.  New files are version 3; a version 1 or 2 file becomes version 3 (identity rewritten once,
 * made durable before its first catalog is written), a version 1 one keeping its SipHash record
 * checksums with MMKV_ID_SIPHASH_SUMS in identity.flags. */
#define MMKV_ID_SIPHASH_SUMS 1             /* identity.flags (version 3): SipHash record checksums, as version 1 */
#define MMKV_ID_KNOWN_FLAGS 1              /* a version 3 file with another flag is refused (VersionError) */
#define MMKV_HEADER_SIZE 4096              /* page 0; a padding word and the heap follow it */
#define MMKV_OFF_IDENTITY 0                /* sector 0: written once at creation */
#define MMKV_OFF_META0 512                 /* sector 1: meta copy A */
#define MMKV_OFF_META1 1024                /* sector 2: meta copy B */
#define MMKV_OFF_STATE 1536                /* sectors 3-5: mutable state, a cache */
#define MMKV_OFF_LOCKS 3072                /* sectors 6-7: lock area, garbage after reboot */
#define MMKV_NCLASSES 64                   /* allocator size classes */
#define MMKV_NSEMS 16                      /* process-shared semaphores in the lock area */
#define MMKV_MUTEX_BYTES 64                /* room reserved for one pthread_mutex_t */
#define MMKV_SEM_BYTES 32                  /* room reserved for one sem_t */

/*
 * The heap: blocks, owned by the allocator (native/mmkv_alloc.c for the hot
 * paths, mmkv/engine/allocator.py for formatting, growth, rebuild and audit).
 *
 * Blocks tile [MMKV_HEAP_START, epilogue) with no gap.  A block at offset b of
 * `size` bytes is:
 *
 *   b                          header word: size | flags
 *   b + MMKV_BLOCK_HEADER      payload (16-aligned: b is 8 below a multiple of 16)
 *
 * Header word invariants: size = word & ~MMKV_BLOCK_FLAGS is a multiple of
 * MMKV_BLOCK_ALIGN, at least MMKV_BLOCK_MIN, and b + size <= the epilogue;
 * MMKV_BLOCK_ALLOC is set when the block is in use; MMKV_BLOCK_PREV_ALLOC is
 * set exactly when the block before b is in use (always set on the first block);
 * MMKV_BLOCK_HOLES only on a free block (see "Released space" below); no other
 * flag bit is set.
 *
 * A free block (ALLOC clear) is laid out as struct mmkv_free_block: the header,
 * then the links of the doubly linked free list of its size class (byte offsets
 * of other free blocks: next, 0 at the end of the list; prev, 0 at the head,
 * which state.free_heads[class] names), and a footer: a copy of its size in its
 * last word, at b + size - MMKV_FREE_FOOTER, so that a block freed after it can
 * find its start.  Two free blocks are never neighbours (freeing merges them),
 * so the block after a free one is in use and has PREV_ALLOC clear.  Blocks in
 * use have no footer: their last word belongs to the payload.
 *
 * The epilogue word (MMKV_EPILOGUE_BYTES, at file size - MMKV_EPILOGUE_BYTES,
 * which the engine calls heap_end) is a header of size 0 with MMKV_BLOCK_ALLOC
 * set and MMKV_BLOCK_PREV_ALLOC telling whether the last block is in use: the
 * heap's walks stop there, and a free last block never merges past it.
 * Growing the file turns the old epilogue into a block and writes a new one.
 *
 * Released space (format version 2).  The pages inside a large free block can be
 * given back to the filesystem (fallocate PUNCH_HOLE, KEEP_SIZE: the file's size,
 * and so every mapping, is unchanged).  Such a block has MMKV_BLOCK_HOLES set and
 * a word at b + MMKV_FREE_HOLES_AT, holes_at: a page-aligned file offset with
 * b + MMKV_FREE_HOLES_HEAD <= holes_at < the start of the page holding its footer.  Pages
 * in [holes_at, that footer page) may be holes; every other byte of the block (its
 * header, links, holes_at and unreleased words, its footer) is backed by disk blocks, so the
 * allocator can write them on a full disk without SIGBUS.  Carving from such a
 * block requires the carved bytes and the remainder's header below holes_at: the
 * engine backs them first (posix_fallocate, then holes_at moves up; once it reaches
 * the footer's page the flag is cleared).  Merging keeps the lower holes_at.  The word
 * at b + MMKV_FREE_UNRELEASED counts (roughly) the bytes freed into the block or backed
 * again since its pages were last released: the allocator releases them again when it
 * reaches the view's release_min (a hint: any value is safe).
 */
#define MMKV_HEAP_START 4104               /* first block header: MMKV_HEADER_SIZE + MMKV_BLOCK_HEADER, so payloads are 16-aligned */
#define MMKV_BLOCK_HEADER 8                /* bytes of a block's header word; the payload follows it */
#define MMKV_BLOCK_ALLOC 1                 /* header flag: block is in use */
#define MMKV_BLOCK_PREV_ALLOC 2            /* header flag: the block before this one is in use */
#define MMKV_BLOCK_HOLES 4                 /* header flag of a free block: pages from its holes_at word on may be holes */
#define MMKV_BLOCK_FLAGS 15                /* low bits of the header that are not part of the size */
#define MMKV_BLOCK_ALIGN 16                /* every block size is a multiple of this */
#define MMKV_BLOCK_MIN 32                  /* header + two links + footer */
#define MMKV_FREE_NEXT 8                   /* free block: byte offset of the next link (0: end of list) */
#define MMKV_FREE_PREV 16                  /* free block: byte offset of the previous link (0: list head) */
#define MMKV_FREE_HOLES_AT 24              /* free block with MMKV_BLOCK_HOLES: byte offset of its holes_at word */
#define MMKV_FREE_UNRELEASED 32            /* ... and of its unreleased word (bytes freed into it since its last release) */
#define MMKV_FREE_HOLES_HEAD 40            /* ... whose inner pages (the ones that may be holes) start at or after this */
#define MMKV_FREE_FOOTER 8                 /* free block: its footer (size copy) starts this many bytes before its end */
#define MMKV_EPILOGUE_BYTES 8              /* the epilogue word, the last bytes of the file */
#define MMKV_EXACT_CLASSES 31              /* classes 0..30 hold blocks of exactly 32, 48, ..., 512 bytes */
#define MMKV_EXACT_MAX 512                 /* classes from 31 on hold one power of two each: (2^(c-22), 2^(c-21)] */

/* The fixed start of a free block (see above); its footer follows at its end. */
struct mmkv_free_block {
    uint64_t header;         /* size | flags, MMKV_BLOCK_ALLOC clear */
    uint64_t next;           /* MMKV_FREE_NEXT: next block of the same list, 0 at the end */
    uint64_t prev;           /* MMKV_FREE_PREV: previous block of the same list, 0 at the head */
};

/* State.dirty after a clean close by the last handle ("mkvclean" as little-endian bytes). */
#define MMKV_CLEAN_MARK 0x6e61656c63766b6d

/*
 * The index: extendible hashing.  A directory of 2^dir_bits segment offsets;
 * the top dir_bits bits of a key's hash pick the entry.  A segment holds
 * MMKV_SEGMENT_SLOTS slots, linear probing from hash bits 0..13 (wrapping
 * inside the segment).  A full segment is split into two new ones and a new
 * directory is switched in by one meta write; the rest of the index is untouched.
 * Slot word: record offset in the low 48 bits, hash bits 16..31 (the tag) in
 * the high 16; 0 is an empty slot.
 */
#define MMKV_SLOT_OFF_BITS 48
#define MMKV_SLOT_OFF_MASK 0xffffffffffff
#define MMKV_SEGMENT_SLOTS 16384
#define MMKV_TAG_SHIFT 16
#define MMKV_DIR_MAX_BITS 32

/* Record flags. */
#define MMKV_REC_COUNTER 1                 /* value is an 8-byte signed counter, updated in place;
                                              the checksum then covers header and key only */
#define MMKV_REC_EXPIRES 2                 /* the value starts with the key's deadline: an int64, nanoseconds since
                                              the epoch (CLOCK_REALTIME); the record is invisible to every read once
                                              the clock reaches it.  val_len counts those 8 bytes (so val_len >= 8);
                                              never with MMKV_REC_COUNTER */
#define MMKV_DEADLINE_BYTES 8              /* bytes of that deadline, before the value proper */
#define MMKV_SWEEP_POISON 0x8000000000000000  /* state.sweep_at: this pass of the sweep may have missed a record */
#define MMKV_SWEEP_SLOT_BITS 14            /* state.sweep_at: (a hash's top 32 bits) << this | a slot */
/* The record checksum's key is the file's seed xor these (distinct from the key-hash key): version 2,
 * CRC32C from initial value (uint32)(seed0 ^ K0), stored zero-extended; version 1, SipHash keyed
 * with (seed0 ^ K0, seed1 ^ K1). */
#define MMKV_REC_SUM_K0 0x6d6d6b762d726563  /* "mmkv-rec" as a big-endian word */
#define MMKV_REC_SUM_K1 0x636865636b73756d  /* "checksum" as a big-endian word */

/*
 * Identity: written when the file is created, and once more if a version 1 or 2 file is raised to
 * version 3 (one sector: it is written whole or not at all).
 * Invariants: magic == MMKV_MAGIC, MMKV_VERSION_OLDEST <= version <= MMKV_VERSION, page_size is the
 * page size of the machine that created it, checksum == siphash of the bytes
 * before it keyed with the zero key.
 */
struct mmkv_identity {
    uint64_t magic;
    uint32_t version;
    uint32_t page_size;
    uint64_t seed0;          /* per-file random SipHash key, half 1 */
    uint64_t seed1;          /* per-file random SipHash key, half 2 */
    uint64_t created_ns;     /* creation time, informational */
    uint64_t flags;          /* version 3: MMKV_ID_SIPHASH_SUMS or 0; versions 1 and 2: 0, never read */
    uint64_t reserved[1];
    uint64_t checksum;
};

/*
 * Meta: the durable roots.  Two copies in two sectors; a change writes the
 * copy not in force with seq + 1, so a torn write leaves the other intact.
 * Invariants: checksum == siphash of the bytes before it (file seed),
 * file_size is a multiple of page_size and <= the real file size,
 * the directory lies inside the heap, journal_off and catalog_off are 0 or inside the heap.
 */
struct mmkv_meta {
    uint64_t seq;
    uint64_t file_size;
    uint64_t dir_off;        /* offset of the index directory: 2^dir_bits segment offsets */
    uint64_t dir_bits;       /* the directory's depth, at most MMKV_DIR_MAX_BITS */
    uint64_t journal_off;    /* offset of a committed transaction's journal, 0 if none */
    uint64_t journal_txn;    /* that transaction's number, also in the journal's header */
    uint64_t catalog_off;    /* offset of the catalog of namespaces (struct mmkv_catalog), 0 if none */
    uint64_t reserved[1];
    uint64_t checksum;
};

/*
 * State: counters and allocator roots, changed on every write under the lock.
 * It is a cache: recovery recomputes every field from the index and the heap.
 */
struct mmkv_state {
    uint64_t generation;     /* bumped when meta changes: readers remap / reload */
    uint64_t dirty;          /* MMKV_CLEAN_MARK after a clean close by the last handle; 0 while the file is
                                open; anything but the mark (a crash, a torn sector) makes the next first
                                open run recovery */
    uint64_t count;          /* live keys */
    uint64_t live_bytes;     /* sum of key and value lengths of live records */
    uint64_t used_bytes;     /* bytes in allocated blocks, headers included */
    uint64_t free_bytes;     /* bytes in free blocks; used + free + MMKV_HEAP_START + MMKV_EPILOGUE_BYTES = file size */
    uint64_t free_bitmap;    /* bit c set when free_heads[c] may be non-empty */
    uint64_t lock_pid;       /* pid of the current lock holder, 0 if none */
    uint64_t lock_since_ns;  /* CLOCK_MONOTONIC time the holder took the lock */
    uint64_t recoveries;     /* times recovery has run on this file */
    uint64_t seq;            /* odd while a process holds the lock: lock-free readers retry */
    uint64_t compacting_pid; /* pid of a process running compact(), 0 if none: while it lives, frees
                                release no pages (the compaction fills the space it frees, and
                                releases at its end); a dead one's pid is ignored */
    /* Expiry (see "The sweep" in native/mmkv_index.c).  ttl_min: 0 when no live record has a
       deadline, else at most every live record's deadline (so a read or len() that finds the clock
       below it knows nothing has expired).  sweep_at: where the sweep goes on, as a position in
       hash order (the top 32 bits of a hash << 14 | a slot) with MMKV_SWEEP_POISON set when slots
       may have moved behind it since its pass began; sweep_min: 0, or the least deadline the
       pass has seen or a write has added since it began (at the pass's end it becomes ttl_min
       unless poisoned).  All three are a cache: recovery recomputes ttl_min and restarts the pass. */
    uint64_t ttl_min;
    uint64_t sweep_at;
    uint64_t sweep_min;
    uint64_t reserved[1];
    uint64_t free_heads[64]; /* MMKV_NCLASSES heads of doubly linked free lists */
};

/*
 * Transaction journal, in a block of its own: a header and `count` entries of
 * (new record, old record).  An entry with new != 0 makes new's key point at
 * new; one with new == 0 removes old's key if it still points at old.
 * Invariants: magic == MMKV_JOURNAL_MAGIC, txn == the meta's journal_txn,
 * checksum == siphash (file seed) of the entries.  Replaying it is idempotent.
 */
#define MMKV_JOURNAL_MAGIC 0x6c6e726a766b6d6d   /* "mmkvjrnl" */
struct mmkv_journal {
    uint64_t magic;
    uint64_t txn;
    uint64_t count;
    uint64_t checksum;
};

/*
 * Index segment header, followed by MMKV_SEGMENT_SLOTS 8-byte slots.
 * Invariants: the segment holds exactly the keys whose top `depth` hash bits
 * equal `prefix`; the directory entries [prefix << (dir_bits - depth),
 * (prefix + 1) << (dir_bits - depth)) and no others point at it; `count` is
 * the number of slots in use; every entry is reachable by probing from its home.
 */
struct mmkv_segment {
    uint64_t depth;
    uint64_t prefix;
    uint64_t count;
    uint64_t reserved;
};

/*
 * Catalog of named sub-stores (namespaces), in a block of its own named by the meta's
 * catalog_off (0: the file has none).  Each namespace is an index of its own (a directory and
 * segments, exactly as the main index, which the meta names) over the one heap.  The catalog
 * is copied on every change (a namespace created, dropped or cleared, an index split or
 * rebuilt in one): the new copy is made durable, then the meta names it (one meta write, the
 * commit point), then the old copy is freed.
 * Layout: struct mmkv_catalog, `count` struct mmkv_catalog_entry, then the names (each entry's
 * name_at is the byte offset of its name from the catalog's start).
 * Invariants: magic == MMKV_CATALOG_MAGIC, count <= MMKV_CATALOG_MAX, every entry's id is
 * below next_id and distinct, names distinct and 1..MMKV_NAME_MAX bytes, inside the block;
 * checksum == siphash (file seed) of the header's first three words, each entry's first five
 * words (its roots) and the names.  The counters of each entry (struct mmkv_index_counts) are
 * not covered: a cache, as the state's, changed on every write and recomputed by recovery.
 * An entry with MMKV_NS_DROPPED is an index being freed after a drop or a clear: no name
 * reaches it; its blocks are freed a bounded number at a time, and recovery frees the rest.
 */
#define MMKV_CATALOG_MAGIC 0x676c74636b6d6d   /* "mmkctlg" */
#define MMKV_CATALOG_MAX 4096              /* namespaces in one file */
#define MMKV_NAME_MAX 255                  /* bytes of a namespace's name (UTF-8) */
#define MMKV_NS_DROPPED 1                  /* entry flag: the index of a dropped or cleared namespace, being freed */
struct mmkv_catalog {
    uint64_t magic;
    uint64_t count;          /* entries */
    uint64_t next_id;        /* the id the next namespace gets (ids are never reused) */
    uint64_t checksum;
};

/* The counters of one index: the main index keeps them in the state; a namespace, in its entry. */
struct mmkv_index_counts {
    uint64_t count;          /* live keys */
    uint64_t live_bytes;     /* key and value bytes of live records */
    uint64_t ttl_min;        /* expiry: as the state's (see struct mmkv_state) */
    uint64_t sweep_at;
    uint64_t sweep_min;
};

struct mmkv_catalog_entry {
    uint64_t id;             /* 1.. (0 is the main index); carried by journal entries (top 16 bits) */
    uint64_t dir_off;        /* the namespace's index directory ... */
    uint64_t dir_bits;       /* ... of 2^dir_bits entries */
    uint64_t name_at;        /* its name: byte offset from the catalog's start (low 48 bits), length << 48 */
    uint64_t flags;          /* MMKV_NS_DROPPED */
    struct mmkv_index_counts counts;
    uint64_t reserved[3];
};

/* Lock area: reinitialised by the first process to open the file. */
struct mmkv_locks {
    uint8_t mutex[64];       /* MMKV_MUTEX_BYTES: the writer mutex, robust, pshared */
    uint8_t sems[512];       /* MMKV_NSEMS * MMKV_SEM_BYTES: pshared semaphores */
};

/*
 * Record: stored in the payload of an allocated block, followed by the key,
 * padding to 8 bytes, then the value.  Never overwritten while live, except
 * the 8-byte value of a MMKV_REC_COUNTER record.
 * With MMKV_REC_EXPIRES the value's first MMKV_DEADLINE_BYTES are the deadline (covered by
 * the checksum), and the value a reader sees is the rest.
 * Invariants: 32 + pad8(key_len) + val_len fits in the block's payload,
 * key_hash == siphash(file seed, key), checksum == CRC32C (version 2; SipHash
 * in version 1 files, see MMKV_REC_SUM_K0) over the record from key_hash to the
 * end of the value (to the end of the key and its padding for counters).
 */
struct mmkv_record {
    uint64_t checksum;
    uint64_t key_hash;
    uint32_t key_len;
    uint32_t flags;
    uint64_t val_len;
};
