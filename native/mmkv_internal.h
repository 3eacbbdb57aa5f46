/*
 * mmkv native shim, internal: what the native/mmkv_*.c files share with each
 * other and nobody else.  Not part of cffi's cdef (that is mmkv_layout.h +
 * mmkv_shim.h only), so it may use the whole of C.
 *
 * The files, one job each:
 *   mmkv_sys.c     failpoints, time, mutex, semaphores, memory and file, atomics
 *   mmkv_hash.c    SipHash-2-4
 *   mmkv_index.c   records, the index (lookup, slots, segments, directory), lock + get
 *   mmkv_alloc.c   the free-list allocator's hot paths
 *   mmkv_fused.c   the fused writes (put, put_many, delete, incr)
 *   mmkv_shim.c    compile-time checks of the layout, the layout table
 *
 * Every file defines _GNU_SOURCE and includes this header first.  Functions
 * shared between files are declared here with MMKV_INTERNAL (hidden: not
 * exported from the compiled module); small helpers are static inline here.
 */
#ifndef MMKV_INTERNAL_H
#define MMKV_INTERNAL_H

#ifndef _GNU_SOURCE
#error "define _GNU_SOURCE before including mmkv_internal.h"
#endif

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "mmkv_layout.h"
#include "mmkv_shim.h"

#define MMKV_INTERNAL __attribute__((visibility("hidden")))

/* ---------------------------------------------------------------- failpoints (mmkv_sys.c) */

MMKV_INTERNAL extern int mmkv_fp_armed;   /* 1 while a failpoint is armed */

/* A named crash point (see mmkv_failpoint_set); unarmed, one predictable branch. */
#define FAILPOINT(name)                                                                            \
    do {                                                                                           \
        if (__builtin_expect(mmkv_fp_armed, 0))                                                    \
            mmkv_failpoint_hit(name);                                                              \
    } while (0)

/* ---------------------------------------------------------------- time, bounds */

static inline int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* [off, off + len) lies inside [0, size), without overflow. */
static inline int range_ok(uint64_t size, uint64_t off, uint64_t len)
{
    return off <= size && len <= size - off;
}

/* ---------------------------------------------------------------- SipHash (mmkv_hash.c) */

MMKV_INTERNAL uint64_t siphash24(uint64_t k0, uint64_t k1, const uint8_t *data, uint64_t len);
/* CRC32C of len bytes, continuing from crc (0 to start): hardware on x86-64 with SSE4.2. */
/* fallocate(PUNCH_HOLE | KEEP_SIZE) of [off, off + len), EINTR retried: 0 or an errno (mmkv_sys.c). */
MMKV_INTERNAL int mmkv_punch(int fd, uint64_t off, uint64_t len);
MMKV_INTERNAL uint32_t crc32c(uint32_t crc, const uint8_t *data, uint64_t len);
/* 1 when pid (a word read from the file: any value) names a live process (mmkv_alloc.c). */
MMKV_INTERNAL int mmkv_pid_alive(uint64_t pid);

/* ---------------------------------------------------------------- records (mmkv_index.c) */

#define REC_HDR ((uint64_t)sizeof(struct mmkv_record))
#define PAD8(n) (((n) + 7) & ~(uint64_t)7)
/* The record checksum covers the record from key_hash on (the checksum word itself excluded). */
#define REC_SUM_FROM ((uint64_t)offsetof(struct mmkv_record, key_hash))

/* A record's header, each field read from the file once.  A lock-free reader races writers that
   reuse the record's block: a field read twice may differ between the reads, so a reader checks
   bounds on, and takes every length from, this copy only (never from the record again). */
struct rec_head {
    uint64_t checksum, key_hash, val_len;
    uint32_t key_len, flags;
};

static inline void rec_head_read(const struct mmkv_record *r, struct rec_head *h)
{
    h->checksum = __atomic_load_n(&r->checksum, __ATOMIC_RELAXED);
    h->key_hash = __atomic_load_n(&r->key_hash, __ATOMIC_RELAXED);
    h->key_len = __atomic_load_n(&r->key_len, __ATOMIC_RELAXED);
    h->flags = __atomic_load_n(&r->flags, __ATOMIC_RELAXED);
    h->val_len = __atomic_load_n(&r->val_len, __ATOMIC_RELAXED);
}

/* The record at off, if its header and body lie inside the mapping (and a deadline's 8 bytes are
   there if its flags say it has one); its header, read once, in *h. */
MMKV_INTERNAL const struct mmkv_record *record_head_at(const struct mmkv_view *v, uint64_t off, struct rec_head *h);
/* mmkv_record_write, with a deadline (0: none) written before the value. */
MMKV_INTERNAL int record_write_until(struct mmkv_view *v, uint64_t off, uint64_t cap, uint64_t hash,
                                     const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
                                     uint32_t flags, int64_t deadline);
/* The checksum of record r over the lengths in h (which the caller bounds-checked). */
MMKV_INTERNAL uint64_t record_sum_of(const struct mmkv_view *v, const struct mmkv_record *r,
                                     const struct rec_head *h);
/* The same over the lengths in r itself: for a writer holding the lock. */
MMKV_INTERNAL uint64_t record_sum(const struct mmkv_view *v, const struct mmkv_record *r);

/* ---------------------------------------------------------------- index (mmkv_index.c) */

#define SEG_HDR ((uint64_t)sizeof(struct mmkv_segment))
#define SEG_MASK ((uint64_t)MMKV_SEGMENT_SLOTS - 1)
#define SEG_BYTES (SEG_HDR + 8 * (uint64_t)MMKV_SEGMENT_SLOTS)

static inline uint64_t tag_of(uint64_t hash) { return (hash >> MMKV_TAG_SHIFT) & 0xffff; }
static inline uint64_t slot_word(uint64_t hash, uint64_t off) { return tag_of(hash) << MMKV_SLOT_OFF_BITS | off; }
static inline uint64_t *seg_slots(struct mmkv_segment *s) { return (uint64_t *)(s + 1); }

/* The directory, if its root lies inside the mapping; the segment at off, if it lies inside the
   mapping and its header is plausible (else NULL). */
MMKV_INTERNAL const uint64_t *directory(const struct mmkv_view *v);
MMKV_INTERNAL struct mmkv_segment *segment_at(const struct mmkv_view *v, uint64_t off);

/* Result of a lookup, kept off the shared view so that concurrent readers do not race. */
struct lookup {
    uint64_t hash, seg, slot, rec_off, probes;
    struct mmkv_segment *segment;
    const struct mmkv_record *rec;
    struct rec_head head;   /* rec's header as read and bounds-checked: use its lengths, not rec's */
};

/* Find key: 0 (found: rec, head, rec_off, slot), ENOENT (absent: slot is the first empty one) or
   EBADMSG; hash, seg and segment are set whenever the key's segment was reached. */
MMKV_INTERNAL int lookup(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct lookup *out);
/* lookup, and EBADMSG when the record found fails its checksum: damaged bytes are never returned,
   compared or replaced as a value. */
MMKV_INTERNAL int lookup_intact(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct lookup *out);

/* ---------------------------------------------------------------- expiry */

/* Bytes of a record's value area before the value proper: its deadline, if it has one. */
static inline uint64_t deadline_bytes(const struct rec_head *h)
{
    return h->flags & MMKV_REC_EXPIRES ? MMKV_DEADLINE_BYTES : 0;
}

/* The deadline of record r (header h, bounds-checked: val_len >= 8 when it has one), 0 if none. */
static inline int64_t deadline_of(const struct mmkv_record *r, const struct rec_head *h)
{
    if (!(h->flags & MMKV_REC_EXPIRES))
        return 0;
    const int64_t *d = (const int64_t *)((const uint8_t *)r + REC_HDR + PAD8((uint64_t)h->key_len));
    return __atomic_load_n(d, __ATOMIC_RELAXED);
}

/* Expiry's clock (see struct mmkv_view's clock). */
static inline int64_t clock_now(const struct mmkv_view *v)
{
    return v->clock ? __atomic_load_n(v->clock, __ATOMIC_RELAXED) : now_ns(CLOCK_REALTIME);
}

/* Record r (header h) has a deadline the clock has reached: no read may see it. */
static inline int record_expired(const struct mmkv_view *v, const struct mmkv_record *r, const struct rec_head *h)
{
    return (h->flags & MMKV_REC_EXPIRES) && deadline_of(r, h) <= clock_now(v);
}

/* The value of the record a lookup found, after its deadline if it has one ... */
static inline const uint8_t *found_value(const struct lookup *l)
{
    return (const uint8_t *)l->rec + REC_HDR + PAD8((uint64_t)l->head.key_len) + deadline_bytes(&l->head);
}

/* ... and its length. */
static inline uint64_t found_len(const struct lookup *l)
{
    return l->head.val_len - deadline_bytes(&l->head);
}

/* A lookup found a record whose deadline has passed: for readers the key is absent. */
static inline int found_expired(const struct mmkv_view *v, const struct lookup *l)
{
    return record_expired(v, l->rec, &l->head);
}

/* The sweep (mmkv_index.c): after a write that left the lock held, a step of it when a deadline may
   have passed; a record with a deadline about to become live keeps its bounds below that deadline;
   a change that may move index entries behind the sweep's position (a deletion's backward shift in
   its segment, a split) spoils the pass's count. */
MMKV_INTERNAL void sweep_if_due(struct mmkv_view *v);
MMKV_INTERNAL void sweep_note(struct mmkv_view *v, int64_t deadline);
MMKV_INTERNAL void sweep_spoil(struct mmkv_view *v, uint64_t seg_off);
/* Backward-shift deletion of a slot without spoiling the sweep (the sweep's own). */
MMKV_INTERNAL int slot_delete_at(struct mmkv_view *v, uint64_t seg_off, uint64_t slot);

/* ---------------------------------------------------------------- lock + get (mmkv_index.c) */

/* Copy the n value bytes at src to g's buffer, or to one its alloc hook gives; ENOBUFS when neither
   can take them. */
static inline int getbuf_put(struct mmkv_getbuf *g, const uint8_t *src, uint64_t n)
{
    g->val_len = n;
    uint8_t *dst = n <= g->cap ? g->buf : g->alloc && n <= g->alloc_max ? g->alloc(g->alloc_ctx, n) : NULL;
    if (!dst)
        return ENOBUFS;
    if (n)
        memcpy(dst, src, n);
    return 0;
}

static inline struct mmkv_state *state_of(const struct mmkv_view *v)
{
    return (struct mmkv_state *)(v->base + MMKV_OFF_STATE);
}

/* The counters of the index v describes (see mmkv_view.counts_at), as pointers into the mapping. */
struct counts_ref {
    uint64_t *count, *live_bytes, *ttl_min, *sweep_at, *sweep_min;
};

/* Point c at v's index counters: the state's for the main index, else a catalog entry's (an offset
   the engine took from the file: checked here, EBADMSG when it does not lie in the heap). */
static inline int counts_of(const struct mmkv_view *v, struct counts_ref *c)
{
    if (!v->counts_at) {
        struct mmkv_state *st = state_of(v);
        *c = (struct counts_ref){&st->count, &st->live_bytes, &st->ttl_min, &st->sweep_at, &st->sweep_min};
        return 0;
    }
    if (v->counts_at % 8 || v->counts_at < MMKV_HEAP_START || v->size < sizeof(struct mmkv_index_counts) ||
        v->counts_at > v->size - sizeof(struct mmkv_index_counts))
        return EBADMSG;
    struct mmkv_index_counts *ic = (struct mmkv_index_counts *)(v->base + v->counts_at);
    *c = (struct counts_ref){&ic->count, &ic->live_bytes, &ic->ttl_min, &ic->sweep_at, &ic->sweep_min};
    return 0;
}

/* ---------------------------------------------------------------- heap blocks (mmkv_alloc.c) */
/*
 * The one place that knows where a block's parts lie (mmkv_layout.h describes
 * them): no other code adds or subtracts a block header, a footer or a link
 * offset by hand.  Offsets are byte offsets into the mapping.
 */

#define SIZE_MASK (~(uint64_t)MMKV_BLOCK_FLAGS)         /* header word -> block size */
#define ALIGN_MASK ((uint64_t)MMKV_BLOCK_ALIGN - 1)     /* bits that are 0 in a block size and in b - MMKV_HEAP_START */

/* The 8-byte word at off; the caller has checked off. */
static inline uint64_t *word(const struct mmkv_view *v, uint64_t off) { return (uint64_t *)(v->base + off); }

/* The payload of the block at b. */
static inline uint64_t payload_of(uint64_t b) { return b + MMKV_BLOCK_HEADER; }
/* The block whose payload starts at p (p >= MMKV_BLOCK_HEADER, checked by the caller). */
static inline uint64_t block_of(uint64_t p) { return p - MMKV_BLOCK_HEADER; }
/* Bytes of payload in a block of size bytes (size >= MMKV_BLOCK_HEADER). */
static inline uint64_t capacity_of(uint64_t size) { return size - MMKV_BLOCK_HEADER; }
/* A block of size bytes has room for payload bytes. */
static inline int block_holds(uint64_t size, uint64_t payload) { return size >= payload + MMKV_BLOCK_HEADER; }
/* The size of the block that holds payload bytes: header added, rounded up to the alignment,
   at least MMKV_BLOCK_MIN. */
static inline uint64_t block_size_for(uint64_t payload)
{
    uint64_t size = (payload + MMKV_BLOCK_HEADER + MMKV_BLOCK_ALIGN - 1) & ~(uint64_t)(MMKV_BLOCK_ALIGN - 1);
    return size < MMKV_BLOCK_MIN ? MMKV_BLOCK_MIN : size;
}
/* The footer word of the free block [b, b + size). */
static inline uint64_t footer_of(uint64_t b, uint64_t size) { return b + size - MMKV_FREE_FOOTER; }
/* The footer of the block that ends where b starts (meaningful when it is free). */
static inline uint64_t footer_before(uint64_t b) { return b - MMKV_FREE_FOOTER; }
/* The next and previous links of the free block at b. */
static inline uint64_t next_link(uint64_t b) { return b + MMKV_FREE_NEXT; }
static inline uint64_t prev_link(uint64_t b) { return b + MMKV_FREE_PREV; }
/* The epilogue word of a mapping of size bytes (size >= MMKV_EPILOGUE_BYTES). */
static inline uint64_t epilogue_of(uint64_t size) { return size - MMKV_EPILOGUE_BYTES; }

#endif /* MMKV_INTERNAL_H */
