/*
 * mmkv on-disk layout: the one definition of every struct stored in the file.
 *
 * This header is read twice: by the C compiler (through mmkv_shim.c) and by
 * cffi's cdef (through native/build_ffi.py), so it must stay in the subset of C
 * that cdef parses: fixed-width integer fields, plain integer #defines, no
 * expressions, no includes.  mmkv/layout.py takes every offset and size from
 * the compiled module, and tests/test_layout.py checks them against offsetof()
 * as the C compiler computed it.
 *
 * Every integer is little-endian and naturally aligned.  The file is:
 *
 *   [0, 4096)       header page: identity, meta A, meta B, state, lock area
 *   [4096, size)    heap: blocks managed by the allocator (records, index
 *                   tables, journal), ending with an 8-byte epilogue word
 */

/* Format constants. */
#define MMKV_MAGIC 0x1a0a0d564b4d4d89      /* bytes 89 'M' 'M' 'K' 'V' \r \n 1a */
#define MMKV_VERSION 1                     /* bump on any incompatible layout change */
#define MMKV_HEADER_SIZE 4096              /* page 0; the heap starts here */
#define MMKV_OFF_IDENTITY 0                /* sector 0: written once at creation */
#define MMKV_OFF_META0 512                 /* sector 1: meta copy A */
#define MMKV_OFF_META1 1024                /* sector 2: meta copy B */
#define MMKV_OFF_STATE 1536                /* sectors 3-5: mutable state, a cache */
#define MMKV_OFF_LOCKS 3072                /* sectors 6-7: lock area, garbage after reboot */
#define MMKV_NCLASSES 64                   /* allocator size classes */
#define MMKV_NSEMS 16                      /* process-shared semaphores in the lock area */
#define MMKV_MUTEX_BYTES 64                /* room reserved for one pthread_mutex_t */
#define MMKV_SEM_BYTES 32                  /* room reserved for one sem_t */

/* Block header word: size in bytes (multiple of 16) | flag bits. */
#define MMKV_BLOCK_ALLOC 1                 /* block is in use */
#define MMKV_BLOCK_PREV_ALLOC 2            /* the block before this one is in use */
#define MMKV_BLOCK_FLAGS 15                /* low bits that are not part of the size */
#define MMKV_BLOCK_ALIGN 16                /* every block size is a multiple of this */
#define MMKV_BLOCK_MIN 32                  /* header + two links + footer */
#define MMKV_EXACT_CLASSES 31              /* classes 0..30 hold blocks of exactly 32, 48, ..., 512 bytes */
#define MMKV_EXACT_MAX 512                 /* classes from 31 on hold one power of two each: (2^(c-22), 2^(c-21)] */
#define MMKV_FREE_NEXT 8                   /* free block: byte offset of the next link (0: end of list) */
#define MMKV_FREE_PREV 16                  /* free block: byte offset of the previous link (0: list head) */

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

/*
 * Identity: written once when the file is created, never again.
 * Invariants: magic == MMKV_MAGIC, version == MMKV_VERSION, page_size is the
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
    uint64_t reserved[2];
    uint64_t checksum;
};

/*
 * Meta: the durable roots.  Two copies in two sectors; a change writes the
 * copy not in force with seq + 1, so a torn write leaves the other intact.
 * Invariants: checksum == siphash of the bytes before it (file seed),
 * file_size is a multiple of page_size and <= the real file size,
 * the directory lies inside the heap, journal_off is 0 or inside the heap.
 */
struct mmkv_meta {
    uint64_t seq;
    uint64_t file_size;
    uint64_t dir_off;        /* offset of the index directory: 2^dir_bits segment offsets */
    uint64_t dir_bits;       /* the directory's depth, at most MMKV_DIR_MAX_BITS */
    uint64_t journal_off;    /* offset of a committed transaction's journal, 0 if none */
    uint64_t journal_txn;    /* that transaction's number, also in the journal's header */
    uint64_t reserved[2];
    uint64_t checksum;
};

/*
 * State: counters and allocator roots, changed on every write under the lock.
 * It is a cache: recovery recomputes every field from the index and the heap.
 */
struct mmkv_state {
    uint64_t generation;     /* bumped when meta changes: readers remap / reload */
    uint64_t dirty;          /* MMKV clean mark (mmkv/layout.py CLEAN_MARK) after a clean last close;
                                0 while the file is open or after a crash: recovery runs on the next first open */
    uint64_t count;          /* live keys */
    uint64_t live_bytes;     /* sum of key and value lengths of live records */
    uint64_t used_bytes;     /* bytes in allocated blocks, headers included */
    uint64_t free_bytes;     /* bytes in free blocks */
    uint64_t free_bitmap;    /* bit c set when free_heads[c] may be non-empty */
    uint64_t lock_pid;       /* pid of the current lock holder, 0 if none */
    uint64_t lock_since_ns;  /* CLOCK_MONOTONIC time the holder took the lock */
    uint64_t recoveries;     /* times recovery has run on this file */
    uint64_t seq;            /* odd while a process holds the lock: lock-free readers retry */
    uint64_t reserved[5];
    uint64_t free_heads[64]; /* MMKV_NCLASSES heads of doubly linked free lists */
};

/*
 * Index segment header, followed by MMKV_SEGMENT_SLOTS 8-byte slots.
 * Invariants: the segment holds exactly the keys whose top `depth` hash bits
 * equal `prefix`; the directory entries [prefix << (dir_bits - depth),
 * (prefix + 1) << (dir_bits - depth)) and no others point at it; `count` is
 * the number of slots in use; every entry is reachable by probing from its home.
 */
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

struct mmkv_segment {
    uint64_t depth;
    uint64_t prefix;
    uint64_t count;
    uint64_t reserved;
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
 * Invariants: 32 + pad8(key_len) + val_len fits in the block's payload,
 * key_hash == siphash(file seed, key), checksum == siphash over the record
 * from key_hash to the end of the value (to the end of the key for counters).
 */
struct mmkv_record {
    uint64_t checksum;
    uint64_t key_hash;
    uint32_t key_len;
    uint32_t flags;
    uint64_t val_len;
};

/*
 * Process-local description of one mapping, passed to the shim's hot paths.
 * Never stored in the file.  The shim bounds-checks every offset it reads
 * from the file against size.
 */
struct mmkv_view {
    uint8_t *base;           /* start of the mapping */
    uint64_t size;           /* bytes mapped */
    uint64_t dir_off;        /* the index directory ... */
    uint64_t dir_bits;       /* ... of 2^dir_bits entries */
    uint64_t seed0;
    uint64_t seed1;
    uint64_t generation;     /* state.generation when this view was loaded */
    int64_t lock_timeout_ns; /* < 0: wait forever */
    int64_t pid;             /* this process, recorded as lock holder */
    uint64_t heap_end;       /* offset of the epilogue word: blocks lie in [MMKV_HEAP_START, heap_end) */
    uint64_t page_size;
    uint64_t large_block;    /* allocations of at least this many bytes are page-aligned */
    uint64_t fit_scan;       /* blocks a first-fit scan of one free list may inspect */
    uint64_t max_count;      /* an insert that would take a segment's count above this returns EAGAIN (split it) */
    uint32_t sync_full;      /* 1: msync record, then slot, before a write returns */
    uint32_t closing;        /* set by mmkv_view_close: calls that would touch the mapping return EBADF */
    uint64_t active;         /* threads inside a call that may run without the store lock (see mmkv_view_close) */
    void (*sync_hook)(uint64_t off, uint64_t len);  /* tests: called after each msync barrier, or NULL */
    /* results of the last lookup */
    uint64_t hash;           /* siphash of the key */
    uint64_t seg;            /* offset of the key's segment */
    uint64_t slot;           /* slot (in the segment) holding the key, or the first empty slot */
    uint64_t rec_off;        /* record offset, 0 when absent */
    uint64_t val_off;        /* value offset inside the mapping */
    uint64_t val_len;
    uint32_t rec_flags;
    uint32_t probes;         /* slots examined */
};

#define MMKV_HEAP_START 4104              /* first block header: MMKV_HEADER_SIZE + 8, so payloads are 16-aligned */

/* Per-thread output of mmkv_get: the value is copied into buf when it fits. */
struct mmkv_getbuf {
    uint8_t *buf;
    uint64_t cap;
    uint64_t val_len;        /* length of the value found (also when it did not fit) */
};
