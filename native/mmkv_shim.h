/*
 * mmkv native shim: the C core under the Python engine.
 *
 * Two kinds of function.  Mechanisms on raw mapped memory: the robust mutex and
 * semaphores, msync/madvise/fallocate, file locks, atomics, SipHash, records,
 * index probing and rebuilding, the layout table.  And the measured hot paths:
 * lookup and get, the allocator's alloc and free, and the fused writes
 * (mmkv_put, mmkv_put_many, mmkv_delete, mmkv_incr), which take the store lock
 * (with take_lock), allocate, write, switch the slot, free, and order their
 * msyncs for sync_full (record before slot).  The structural policy stays in
 * Python: when to split a segment or double the directory, when and how far to
 * grow the file, when to run recovery and what it keeps, transactions.
 *
 * Every function returns 0 or an errno value (results go through out
 * parameters); none prints, aborts or allocates process memory.  Offsets that
 * come from the file are bounds-checked against the mapping size; a bad one
 * gives EBADMSG.  Like mmkv_layout.h, this header is also parsed by cffi's
 * cdef, after mmkv_layout.h (whose constants and structs it uses); so it holds
 * only declarations cdef accepts.  The implementation is split by job over
 * native/mmkv_*.c, which share native/mmkv_internal.h (not part of the cdef).
 */

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
    int64_t fd;              /* the file, for releasing free pages (fallocate PUNCH_HOLE); < 0: never release */
    uint64_t release_min;    /* a free that makes a free block of at least this many bytes enter a larger size
                                class releases the block's inner pages; 0: never (format version 1, growth) */
    uint64_t holes_block;    /* set with MMKV_ENEEDBACK: the free block whose pages must be backed first */
    uint32_t sync_full;      /* 1: msync record, then slot, before a write returns */
    uint32_t closing;        /* set by mmkv_view_close: mmkv_lock, mmkv_get and the take_lock writes then return EBADF */
    uint64_t active;         /* threads inside mmkv_lock or mmkv_get, which run without the store lock (see mmkv_view_close) */
    uint32_t held;           /* not read by the core: 1 while the handle owning this view holds the store lock
                                (db.lock(), a transaction; kept by its StoreLock), so a binding's fast path
                                takes the general path instead of waiting for itself */
    uint32_t crc_sums;       /* 1: record checksums are CRC32C (format version 2); 0: SipHash (version 1) */
    uint32_t sweep_tick;     /* fused writes of this view: the sweep's clock check runs every MMKV_SWEEP_EVERY-th
                                (threads may race on it: a missed or extra check is harmless) */
    uint32_t lockless;       /* 1: a handle that may not write the file (mapped PROT_READ): never takes the
                                store lock (mmkv_lock*: EROFS); mmkv_get returns EAGAIN where it would lock */
    void (*sync_hook)(uint64_t off, uint64_t len);  /* tests: called after each msync barrier, or NULL */
    const int64_t *clock;    /* expiry's clock: NULL, CLOCK_REALTIME; else the time is *clock (nanoseconds since
                                the epoch), a cell the handle's owner sets (tests: a clock they control) */
    uint64_t counts_at;      /* the counters of the index this view describes (struct mmkv_index_counts): 0, the
                                state's (the main index); else their byte offset (a namespace's catalog entry) */
    /* results of the last lookup */
    uint64_t hash;           /* siphash of the key */
    uint64_t seg;            /* offset of the key's segment */
    uint64_t slot;           /* slot (in the segment) holding the key, or the first empty slot */
    uint64_t rec_off;        /* record offset, 0 when absent */
    uint64_t val_off;        /* value offset inside the mapping */
    uint64_t val_len;
    uint32_t rec_flags;
    uint32_t probes;         /* slots examined */
    int64_t deadline;        /* the record's deadline (MMKV_REC_EXPIRES), 0 when it has none */
    uint64_t rec_need;       /* bytes the record fills: header, key and padding, deadline, value */
};

/* Per-thread output of mmkv_get and mmkv_take: the value is copied into buf when it fits, else,
   when alloc is set and the value is at most alloc_max bytes, into alloc(alloc_ctx, length), a
   buffer of exactly its length (NULL: ENOBUFS).  A lock-free read may call alloc more than once
   (a read that raced a writer is thrown away and done again); the last call's buffer holds the
   value when the result is 0. */
struct mmkv_getbuf {
    uint8_t *buf;
    uint64_t cap;
    uint64_t val_len;        /* length of the value found (also when it did not fit) */
    uint8_t *(*alloc)(void *alloc_ctx, uint64_t len);
    void *alloc_ctx;
    uint64_t alloc_max;
    uint32_t expired;        /* set with ENOENT when the key's record was there but expired: the caller
                                may reclaim it (mmkv_reap) */
};

/* Error codes the Python side needs by name (values from <errno.h>). */
#define MMKV_ENEEDBACK 61      /* ENODATA: the free block that fits has holes where the allocation would go */
#define MMKV_ESTALE 116        /* the mapping is older than the header says: remap */
#define MMKV_SYNC_ASYNC 1      /* mmkv_msync: schedule write-back */
#define MMKV_SYNC_SYNC 4       /* mmkv_msync: wait for write-back */

/* Advice values for mmkv_madvise. */
#define MMKV_ADV_NORMAL 0
#define MMKV_ADV_RANDOM 1
#define MMKV_ADV_SEQUENTIAL 2
#define MMKV_ADV_WILLNEED 3
#define MMKV_ADV_DONTNEED 4

/* Robust, process-shared mutex placed in shared memory (MMKV_MUTEX_BYTES). */
int mmkv_mutex_init(void *mutex);
int mmkv_mutex_lock(void *mutex, int64_t timeout_ns);   /* < 0: wait forever; EOWNERDEAD, ETIMEDOUT, ENOTRECOVERABLE */
int mmkv_mutex_trylock(void *mutex);                    /* EBUSY when held */
int mmkv_mutex_unlock(void *mutex);
int mmkv_mutex_consistent(void *mutex);

/* Process-shared POSIX semaphore placed in shared memory (MMKV_SEM_BYTES). */
int mmkv_sem_init(void *sem, uint32_t value);
int mmkv_sem_wait(void *sem);                           /* EINTR on a signal */
int mmkv_sem_timedwait(void *sem, int64_t timeout_ns);  /* ETIMEDOUT, EINTR */
int mmkv_sem_trywait(void *sem);                        /* EAGAIN when zero */
int mmkv_sem_post(void *sem);
int mmkv_sem_value(void *sem, int32_t *value);

/* Memory and file. */
int mmkv_msync(uint8_t *base, uint64_t size, uint64_t off, uint64_t len, int flags);
int mmkv_madvise(uint8_t *base, uint64_t size, uint64_t off, uint64_t len, int advice);
int mmkv_fallocate(int fd, int64_t off, int64_t len);
int mmkv_writeback(int fd, int64_t off, int64_t len);  /* start writing the range's dirty pages back (no wait):
                                        the msyncs that follow overlap their waits instead of queueing them */
int mmkv_writeback_wait(int fd, int64_t off, int64_t len);  /* write the range's dirty pages back and wait (no
                                                            metadata, no barrier: pacing, not durability) */

/* Open-file-description (OFD) byte locks on a file: owned by the open file description, not the
   process, so two opens in one process conflict, fork shares them, and closing an unrelated
   descriptor of the same file releases nothing.  Never waits: EAGAIN while another description
   holds a conflicting lock.  Changing the mode of a lock already held is atomic. */
#define MMKV_FLOCK_UNLOCK 0
#define MMKV_FLOCK_SHARED 1
#define MMKV_FLOCK_EXCLUSIVE 2
#define MMKV_FLOCK_TEST 3        /* take nothing: 0 when no other description holds any lock on the byte,
                                    EAGAIN when one does (works on a read-only descriptor) */
int mmkv_file_lock(int fd, uint64_t byte, int mode);

/* 64-bit atomics on an 8-aligned offset inside [base, base + size). */
int mmkv_atomic_load(uint8_t *base, uint64_t size, uint64_t off, uint64_t *value);
int mmkv_atomic_store(uint8_t *base, uint64_t size, uint64_t off, uint64_t value);
int mmkv_atomic_fetch_add(uint8_t *base, uint64_t size, uint64_t off, int64_t delta, int64_t *old);
int mmkv_atomic_cas(uint8_t *base, uint64_t size, uint64_t off, uint64_t *expected, uint64_t desired);  /* EAGAIN on mismatch */

/* SipHash-2-4 of data keyed with (k0, k1). */
int mmkv_siphash(uint64_t k0, uint64_t k1, const uint8_t *data, uint64_t len, uint64_t *out);
int mmkv_crc32c(uint32_t crc, const uint8_t *data, uint64_t len, uint32_t *out);       /* CRC32C, the fastest way this CPU has */
int mmkv_crc32c_soft(uint32_t crc, const uint8_t *data, uint64_t len, uint32_t *out);  /* the same, bytewise table (tests compare) */

/* Index and records: the hot loops, all bounds-checked against view->size.  A record's offset
   (off below, a slot's low bits) is the payload offset of the block that holds it. */
int mmkv_lock(struct mmkv_view *v);     /* robust lock + holder bookkeeping; 0, EOWNERDEAD, ETIMEDOUT, ...;
                                           EBADF once mmkv_view_close has begun */
int mmkv_lock_try(struct mmkv_view *v);  /* mmkv_lock that never waits: EBUSY while another holds the lock */
int mmkv_lock_final(struct mmkv_view *v);  /* mmkv_lock for the closer itself (ignores closing) */
int mmkv_view_close(struct mmkv_view *v);  /* refuse new unlocked calls on v (EBADF), wait for those running */
int mmkv_unlock(struct mmkv_view *v);
int mmkv_lock_holder_dead(struct mmkv_view *v);  /* 1: a writer holds the lock (seq odd) and its pid is gone */
int mmkv_find(struct mmkv_view *v, const uint8_t *key, uint64_t klen);   /* 0 found, ENOENT absent; an expired
                                           record is found (v->deadline: the caller compares it with mmkv_now) */
int mmkv_now(struct mmkv_view *v, int64_t *now);  /* expiry's clock: *v->clock, else CLOCK_REALTIME, in ns */
int mmkv_get(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g);
                                        /* find and copy, writing only *g (so threads sharing v are safe):
                                           without the lock when no holder is active before or after the read
                                           (state.seq even and unchanged), else under the lock; 0, ENOENT,
                                           ENOBUFS (g->val_len set), MMKV_ESTALE (remap), EBADF (closing) or
                                           a lock error; on EOWNERDEAD the lock is held.  A lockless view
                                           (read-only mapping) never locks: EAGAIN where a writer was active
                                           (retry later), EOWNERDEAD where the lock's holder is dead */
int mmkv_get_nowait(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g);
                                        /* mmkv_get that never waits: EBUSY where mmkv_get would wait for
                                           the lock (another holder has it); for a caller that must not
                                           block here (the CPython binding, which holds the GIL) */
int mmkv_count_nowait(struct mmkv_view *v, uint64_t *count);
                                        /* the key count without the lock, when no holder is active before
                                           or after the read: 0, EBUSY (a holder is active: take the lock, or
                                           a deadline has passed since the last whole sweep: sweep first),
                                           MMKV_ESTALE (remap) or EBADF (closing) */
int mmkv_record_write(struct mmkv_view *v, uint64_t off, uint64_t cap, uint64_t hash,
                      const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen, uint32_t flags);
int mmkv_record_verify(struct mmkv_view *v, uint64_t off);  /* block + record + checksum; fills hash, val_off,
                                        val_len (the value proper: after a deadline), rec_flags, deadline, rec_need */
int mmkv_record_verify_contents(struct mmkv_view *v, uint64_t off);  /* the record alone, its block header
                                        unread (recovery rebuilds headers); fills the same */
int mmkv_record_verify_sum(struct mmkv_view *v, uint64_t off);  /* mmkv_record_verify_contents but for the key
                                        hash, which is not recomputed (the open's check of the file's seed) */
int mmkv_slot_set(struct mmkv_view *v, uint64_t seg, uint64_t slot, uint64_t word);
int mmkv_slot_delete(struct mmkv_view *v, uint64_t seg, uint64_t slot);  /* backward shift; v->slot = last changed */
int mmkv_slot_next(struct mmkv_view *v, uint64_t cursor, uint64_t *found, uint64_t *seg, uint64_t *word);
int mmkv_drain_index(struct mmkv_view *v, uint64_t *cursor, uint64_t budget, uint64_t *cleared);
                                     /* an index no root names (a dropped namespace's): from *cursor (as
                                        mmkv_slot_next's) clear up to budget slots in use, freeing the record
                                        each names when it verifies (a damaged one is left to recovery);
                                        *cursor moves past them.  0: budget spent; ENOENT: none left at or
                                        after *cursor; EBADMSG: a damaged directory or segment, or a record
                                        whose block does not free (its slot is then already clear) */
int mmkv_scan(struct mmkv_view *v, uint64_t from, uint64_t *out, uint64_t cap, uint64_t *n,
              uint64_t *range_end);  /* iteration in hash order: one segment's keys from `from`, 4 words each
                                           (hash, record, key length | bytes before the value << 32, value
                                           length); expired records are left out */
                                        /* next slot in use at or after cursor (dir entry * slots + slot),
                                           each segment once; ENOENT past the end */
int mmkv_segment_init(struct mmkv_view *v, uint64_t off, uint64_t depth, uint64_t prefix);  /* empty segment */
int mmkv_segment_split(struct mmkv_view *v, uint64_t old_seg, uint64_t a, uint64_t b);
                                        /* fill new segments a (next hash bit 0) and b (bit 1) from old_seg */
int mmkv_dir_build(struct mmkv_view *v, uint64_t new_off, uint64_t new_bits, uint64_t old_seg, uint64_t a,
                   uint64_t b);        /* the current directory, doubled if new_bits says so, old_seg -> a|b */
int mmkv_index_insert(struct mmkv_view *v, uint64_t word);  /* rebuild: EAGAIN when v->seg must split first */
int mmkv_index_audit(struct mmkv_view *v, uint64_t *bad_entry, uint64_t *bad_slot);  /* EBADMSG at the first fault */

/* Allocator hot paths (the caller holds the lock): EBADMSG on a damaged heap.  Offsets named off
   or out are block offsets (the block's header word; its payload starts MMKV_BLOCK_HEADER later). */
int mmkv_alloc(struct mmkv_view *v, uint64_t payload, uint64_t *out);   /* ENOSPC: nothing fits, grow;
                                           MMKV_ENEEDBACK: the block that fits (v->holes_block) has holes where
                                           the allocation would go: back them (mmkv_holes_backed), retry */
/* Released space (mmkv_release.c; see "Released space" in mmkv_layout.h). */
int mmkv_holes_span(struct mmkv_view *v, uint64_t b, uint64_t *holes_at, uint64_t *holes_end);
                                        /* the free block b's may-be-holes range; EINVAL: b has none */
int mmkv_holes_backed(struct mmkv_view *v, uint64_t b, uint64_t backed_to);
                                        /* the caller backed [holes_at, backed_to) of free block b: move holes_at */
int mmkv_holes_mark(struct mmkv_view *v, uint64_t b);
                                        /* free block b: every page inside it may be a hole (recovery) */
int mmkv_release_block(struct mmkv_view *v, uint64_t b, uint64_t from, uint64_t len, uint64_t *released);
                                        /* give back the inner pages of free block b that lie in [from, from + len)
                                           (needs v->fd): *released bytes; EBADMSG: b is no free block */
/* Compaction (engine/compaction.py). */
int mmkv_alloc_at(struct mmkv_view *v, uint64_t b, uint64_t payload, uint64_t *out);
                                        /* carve payload bytes from the start of free block b: ENOENT (b is no
                                           longer a free block), ENOSPC (too small), MMKV_ENEEDBACK */
int mmkv_move_record(struct mmkv_view *v, uint64_t rec_off, uint64_t dest);
                                        /* copy the live record at rec_off into the allocated block whose payload
                                           is dest, switch its slot, free the old block; ENOENT: not live */
int mmkv_is_free_block(struct mmkv_view *v, uint64_t b);   /* 0: b starts a listed free block; ENOENT */
int mmkv_heap_tail(struct mmkv_view *v, uint64_t *start);   /* start of the free last block (heap_end: none) */
int mmkv_heap_shrink(struct mmkv_view *v, uint64_t new_end);
                                        /* move the epilogue down to new_end, inside the free last block */
int mmkv_map_zero(uint8_t *base, uint64_t size, uint64_t off, uint64_t len);
                                        /* replace [off, off + len) of a mapping with private zero pages */
int mmkv_free(struct mmkv_view *v, uint64_t off);
int mmkv_free_fitting(struct mmkv_view *v, uint64_t off, uint64_t payload);
                                        /* mmkv_free of a block allocated for payload bytes: EBADMSG when
                                           its header claims more than such a block can hold (damage that
                                           would free the blocks after it) */
int mmkv_alloc_bound(struct mmkv_view *v, uint64_t off, uint64_t payload, uint64_t *most);
                                        /* the largest size a block at off allocated for payload bytes has */
int mmkv_size_class(uint64_t size, uint32_t *cls);   /* the free list a block of this size belongs on */

/*
 * Fused writes: lookup, allocate, write, switch the slot, free, count, with the
 * msyncs of sync_full in commit order (the record, then the slot that makes it
 * live).  Without take_lock (0) the caller holds the lock and keeps it whatever
 * the result.  With take_lock MMKV_TAKE_LOCK they also lock (waiting up to the
 * view's timeout; checking the view is current) and unlock; with MMKV_TRY_LOCK
 * likewise, but they never wait: EBUSY while another holds the lock (for a
 * caller that must not block there, the CPython binding holding the GIL).
 * After 0 (done) or ENOENT, EAGAIN (split the key's segment first: v->seg
 * names it), ENOSPC (grow the file first), ERANGE (counter overflow),
 * MMKV_ESTALE (remap) or a lock error other than EOWNERDEAD (nothing
 * changed), the lock is released.  After EOWNERDEAD or any other error
 * (EBADMSG, an msync failure) the lock is still held: the caller repairs
 * (recovery) and unlocks.
 */
#define MMKV_TAKE_LOCK 1
#define MMKV_TRY_LOCK 2
int mmkv_put(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
             uint32_t flags, int take_lock);
int mmkv_put_many(struct mmkv_view *v, const uint8_t *keys, const uint64_t *key_ends, const uint8_t *vals,
                  const uint64_t *val_ends, uint64_t n, uint64_t *done);
                                        /* the caller holds the lock: put pairs *done..n-1 (key i is
                                           keys[key_ends[i-1]:key_ends[i]]), stopping at the first
                                           error (EAGAIN, ENOSPC: split or grow, then call again) */
int mmkv_delete(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int take_lock);   /* ENOENT: absent */
int mmkv_take(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g, int take_lock);
                                        /* pop: copy the value into g and delete the key; ENOENT: absent;
                                           ENOBUFS: the value is bigger than g->cap (g->val_len set; nothing
                                           changed, the lock released like ENOENT) */
int mmkv_incr(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int64_t delta, int64_t *result,
              int take_lock);   /* ENOENT: absent or not a counter record (take the general path) */
int mmkv_get_many(struct mmkv_view *v, const uint8_t *keys, const uint64_t *key_ends, uint64_t n,
                  struct mmkv_getbuf *g, uint64_t *val_ends, uint8_t *found, int wait);
                                        /* the values of n keys (key i is keys[key_ends[i-1]:key_ends[i]]) as of
                                           one moment, one after the other in g->buf: value i (found[i] 1) is
                                           buf[val_ends[i-1]:val_ends[i]]; found[i] 0: absent.  Lock-free when no
                                           writer is active around the batch, else under the lock (wait 0: EBUSY
                                           if it is taken); a lockless view: EAGAIN.  ENOBUFS: g->val_len bytes
                                           are needed (nothing else is wrong); ESTALE, EOWNERDEAD, EBADMSG as get */
int mmkv_cas(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *expected, uint64_t elen,
             int has_expected, const uint8_t *val, uint64_t vlen, int has_val, int take_lock);
                                        /* compare-and-swap: when key's value is expected[:elen] (has_expected
                                           0: when key is absent), put val[:vlen] (has_val 0: delete key);
                                           0: done; ECANCELED: the value differed, nothing changed (the lock
                                           released); EAGAIN, ENOSPC, MMKV_ENEEDBACK as mmkv_put */
int mmkv_put_until(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
                   int64_t deadline, int take_lock);
                                        /* mmkv_put of a record that expires at deadline (> 0, nanoseconds since
                                           the epoch); 0 as mmkv_put: an ordinary record */
int mmkv_reap(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int take_lock);
                                        /* delete key if its record has expired (a read found it so: space back
                                           on access); 0: reclaimed; ENOENT: absent or live (nothing changed);
                                           take_lock and results as mmkv_delete */
int mmkv_note_deadline(struct mmkv_view *v, int64_t deadline);
                                        /* a record with this deadline is about to become live by another path
                                           (a transaction): keep the sweep's bounds below it (the lock held) */
int mmkv_sweep(struct mmkv_view *v, uint64_t budget, uint64_t *removed, int64_t *next);
                                        /* the lock held: remove expired records, examining at most budget slots
                                           from where the sweep stopped (budget 0: a whole pass from the start,
                                           which leaves ttl_min exact); *removed: how many; *next: ttl_min after */

/* Every expired key is invisible to reads (get, get_many, in, iteration, len); the writes above see
   an expired key as absent (a cas expecting it fails, incr counts from 0, delete and pop say
   ENOENT) and reclaim its record.  Every MMKV_SWEEP_EVERY-th fused write of a view (while some
   record has a deadline) reads the clock, and when ttl_min has passed runs a step of the sweep
   (MMKV_SWEEP_STEP slots) in the same lock hold: 32 slots per write on average, and the clock
   read (~25 ns) paid by one write in four. */
#define MMKV_SWEEP_EVERY 4
#define MMKV_SWEEP_STEP 128

/*
 * Failpoints, for crash tests: the countdown-th time the named point is
 * reached (1 = the next), the process kills itself with SIGKILL.  An empty
 * name disarms.  Unarmed, a failpoint costs one predictable branch.
 */
int mmkv_failpoint_set(const char *name, int64_t countdown);
int mmkv_failpoint_hit(const char *name);  /* a failpoint on the Python side */

int mmkv_layout_entry(int which, const char **name, uint64_t *value);  /* the C compiler's sizeof/offsetof
                                        table, "struct.field" or "struct", for the layout test; ENOENT past the end */
