/*
 * mmkv native shim: records (write, verify), the index (lookup, slots,
 * segments, the directory, rebuild and audit), and the lock with the read
 * path that uses it (mmkv_lock, mmkv_get, mmkv_view_close).
 */
#define _GNU_SOURCE
#include "mmkv_internal.h"

#include <sched.h>
#include <stdlib.h>

/* ---------------------------------------------------------------- records */

/* The record at off, if its header and body lie inside the mapping; its header, read once, in
   *h (every length a caller uses must come from *h: see struct rec_head). */
const struct mmkv_record *record_head_at(const struct mmkv_view *v, uint64_t off, struct rec_head *h)
{
    if (off % 8 || off < MMKV_HEADER_SIZE || !range_ok(v->size, off, REC_HDR))
        return NULL;
    const struct mmkv_record *r = (const struct mmkv_record *)(v->base + off);
    rec_head_read(r, h);
    uint64_t body = PAD8((uint64_t)h->key_len);
    if (!range_ok(v->size, off + REC_HDR, body) || !range_ok(v->size, off + REC_HDR + body, h->val_len) ||
        h->val_len < deadline_bytes(h))    /* a deadline needs its 8 bytes */
        return NULL;
    return r;
}

/* record_head_at for callers that hold the lock and read only the key hash (nothing changes). */
static const struct mmkv_record *record_at(const struct mmkv_view *v, uint64_t off)
{
    struct rec_head h;
    return record_head_at(v, off, &h);
}

uint64_t record_sum_of(const struct mmkv_view *v, const struct mmkv_record *r, const struct rec_head *h)
{
    uint64_t len = REC_HDR - REC_SUM_FROM + PAD8((uint64_t)h->key_len);
    if (!(h->flags & MMKV_REC_COUNTER))
        len += h->val_len;
    if (v->crc_sums)
        return crc32c((uint32_t)(v->seed0 ^ MMKV_REC_SUM_K0), (const uint8_t *)r + REC_SUM_FROM, len);
    return siphash24(v->seed0 ^ MMKV_REC_SUM_K0, v->seed1 ^ MMKV_REC_SUM_K1, (const uint8_t *)r + REC_SUM_FROM, len);
}

uint64_t record_sum(const struct mmkv_view *v, const struct mmkv_record *r)
{
    struct rec_head h;
    rec_head_read(r, &h);
    return record_sum_of(v, r, &h);
}

static void fill_result(struct mmkv_view *v, uint64_t off, const struct rec_head *h)
{
    const struct mmkv_record *r = (const struct mmkv_record *)(v->base + off);
    uint64_t skip = deadline_bytes(h);
    v->rec_off = off;
    v->hash = h->key_hash;
    v->val_off = off + REC_HDR + PAD8((uint64_t)h->key_len) + skip;
    v->val_len = h->val_len - skip;
    v->rec_flags = h->flags;
    v->deadline = deadline_of(r, h);
    v->rec_need = REC_HDR + PAD8((uint64_t)h->key_len) + h->val_len;
}

/* Flags a record may carry: a counter, or a deadline, or neither. */
static int flags_ok(uint32_t flags)
{
    return !(flags & ~(uint32_t)(MMKV_REC_COUNTER | MMKV_REC_EXPIRES)) &&
           (flags & (MMKV_REC_COUNTER | MMKV_REC_EXPIRES)) != (MMKV_REC_COUNTER | MMKV_REC_EXPIRES);
}

/* mmkv_record_write, with a deadline (0: none) written before the value. */
int record_write_until(struct mmkv_view *v, uint64_t off, uint64_t cap, uint64_t hash, const uint8_t *key,
                       uint64_t klen, const uint8_t *val, uint64_t vlen, uint32_t flags, int64_t deadline)
{
    uint64_t kpad = PAD8(klen), dlen = deadline ? MMKV_DEADLINE_BYTES : 0;
    if (deadline)
        flags |= MMKV_REC_EXPIRES;
    if (klen > UINT32_MAX || off % 8 || off < MMKV_HEADER_SIZE || !flags_ok(flags) ||
        (flags & MMKV_REC_COUNTER && vlen != 8) || (flags & MMKV_REC_EXPIRES && !deadline && vlen < 8))
        return EINVAL;
    if (kpad < klen || vlen > UINT64_MAX - REC_HDR - kpad - dlen || REC_HDR + kpad + dlen + vlen > cap ||
        !range_ok(v->size, off, cap))
        return EINVAL;
    struct mmkv_record *r = (struct mmkv_record *)(v->base + off);
    uint8_t *body = v->base + off + REC_HDR;
    r->key_hash = hash;
    r->key_len = (uint32_t)klen;
    r->flags = flags;
    r->val_len = dlen + vlen;
    if (klen)
        memcpy(body, key, klen);
    memset(body + klen, 0, kpad - klen);
    if (dlen)
        memcpy(body + kpad, &deadline, dlen);
    if (vlen)
        memcpy(body + kpad + dlen, val, vlen);
    r->checksum = record_sum(v, r);
    struct rec_head h;
    rec_head_read(r, &h);
    fill_result(v, off, &h);
    return 0;
}

/* A record whose value (flags MMKV_REC_EXPIRES: deadline and value) is val[:vlen]. */
int mmkv_record_write(struct mmkv_view *v, uint64_t off, uint64_t cap, uint64_t hash, const uint8_t *key,
                      uint64_t klen, const uint8_t *val, uint64_t vlen, uint32_t flags)
{
    return record_write_until(v, off, cap, hash, key, klen, val, vlen, flags, 0);
}

/* The record at off, whatever its block header says: bounds, flags, checksum, and (with
   key_hash) that its key hashes to the hash it carries (the checksum covers that word: a
   mismatch is a writer's bug, not damage; scans, which only order by it, skip the SipHash). */
static int record_contents_check(struct mmkv_view *v, uint64_t off, uint64_t room, int key_hash,
                                 struct rec_head *out)
{
    struct rec_head h;
    const struct mmkv_record *r = record_head_at(v, off, &h);
    if (!r)
        return EBADMSG;
    uint64_t need = REC_HDR + PAD8((uint64_t)h.key_len) + h.val_len;
    if (need > room || !flags_ok(h.flags) || (h.flags & MMKV_REC_COUNTER && h.val_len != 8))
        return EBADMSG;
    if (h.checksum != record_sum_of(v, r, &h))
        return EBADMSG;
    if (key_hash && siphash24(v->seed0, v->seed1, (const uint8_t *)r + REC_HDR, h.key_len) != h.key_hash)
        return EBADMSG;
    fill_result(v, off, &h);
    if (out)
        *out = h;
    return 0;
}

static int record_contents_ok(struct mmkv_view *v, uint64_t off, uint64_t room)
{
    return record_contents_check(v, off, room, 1, NULL);
}

/* The record at off in a block in use that holds it: the checks of mmkv_record_verify; its
   header as checked in *out (if not NULL). */
static int record_check(struct mmkv_view *v, uint64_t off, int key_hash, struct rec_head *out)
{
    if (off < payload_of(MMKV_HEADER_SIZE) || off % 8 || !range_ok(v->size, block_of(off), MMKV_BLOCK_HEADER))
        return EBADMSG;
    uint64_t head = *word(v, block_of(off));
    uint64_t bsize = head & SIZE_MASK;
    if (!(head & MMKV_BLOCK_ALLOC) || bsize < MMKV_BLOCK_MIN || !range_ok(v->size, block_of(off), bsize))
        return EBADMSG;
    return record_contents_check(v, off, capacity_of(bsize), key_hash, out);
}

int mmkv_record_verify(struct mmkv_view *v, uint64_t off)
{
    return record_check(v, off, 1, NULL);
}

int mmkv_record_verify_contents(struct mmkv_view *v, uint64_t off)
{
    if (off < payload_of(MMKV_HEADER_SIZE) || off % 8 || off >= v->size)
        return EBADMSG;
    return record_contents_ok(v, off, v->size - off);
}

int mmkv_record_verify_sum(struct mmkv_view *v, uint64_t off)
{
    if (off < payload_of(MMKV_HEADER_SIZE) || off % 8 || off >= v->size)
        return EBADMSG;
    return record_contents_check(v, off, v->size - off, 0, NULL);
}

/* ---------------------------------------------------------------- index */

/* SEG_HDR, SEG_BYTES, tag_of, slot_word and seg_slots are in mmkv_internal.h (the fused writes use them). */

/* The directory, if its root lies inside the mapping. */
const uint64_t *directory(const struct mmkv_view *v)
{
    if (v->dir_bits > MMKV_DIR_MAX_BITS || v->dir_off % 8 || v->dir_off < MMKV_HEADER_SIZE ||
        v->dir_off > v->size || (1ULL << v->dir_bits) > (v->size - v->dir_off) / 8)
        return NULL;
    return (const uint64_t *)(v->base + v->dir_off);
}

static uint64_t dir_index(const struct mmkv_view *v, uint64_t hash)
{
    return v->dir_bits ? hash >> (64 - v->dir_bits) : 0;
}

/* The segment at off, if it lies inside the mapping and its header is plausible. */
struct mmkv_segment *segment_at(const struct mmkv_view *v, uint64_t off)
{
    if (off % 8 || off < MMKV_HEADER_SIZE || !range_ok(v->size, off, SEG_BYTES))
        return NULL;
    /* a segment is the payload of a block in use that holds it: a directory entry pointing
       anywhere else (into another segment, a record) is damage, not a segment */
    uint64_t head = *word(v, block_of(off)), bsize = head & SIZE_MASK;
    if (!(head & MMKV_BLOCK_ALLOC) || !block_holds(bsize, SEG_BYTES) || bsize > v->size - block_of(off))
        return NULL;
    struct mmkv_segment *s = (struct mmkv_segment *)(v->base + off);
    if (s->depth > v->dir_bits || s->count > MMKV_SEGMENT_SLOTS || s->prefix >> s->depth)
        return NULL;
    return s;
}

/* struct lookup is declared in mmkv_internal.h (the fused writes look up too). */
/* lookup, for a key whose hash the caller has computed. */
static int lookup_hashed(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, uint64_t h,
                         struct lookup *out)
{
    const uint64_t *dir = directory(v);
    if (!dir)
        return EBADMSG;
    out->hash = h;
    out->rec_off = 0;
    out->rec = NULL;
    out->seg = dir[dir_index(v, h)];
    struct mmkv_segment *seg = out->segment = segment_at(v, out->seg);
    if (!seg)
        return EBADMSG;
    uint64_t *slots = seg_slots(seg), tag = tag_of(h), i = h & SEG_MASK;
    for (out->probes = 1; out->probes <= MMKV_SEGMENT_SLOTS; out->probes++, i = (i + 1) & SEG_MASK) {
        uint64_t w = __atomic_load_n(&slots[i], __ATOMIC_ACQUIRE);
        if (w == 0) {
            out->slot = i;
            return ENOENT;
        }
        if (w >> MMKV_SLOT_OFF_BITS != tag)
            continue;
        uint64_t off = w & MMKV_SLOT_OFF_MASK;
        const struct mmkv_record *r = record_head_at(v, off, &out->head);
        if (!r)
            return EBADMSG;
        if (out->head.key_hash == h && out->head.key_len == klen && memcmp((const uint8_t *)r + REC_HDR, key, klen) == 0) {
            out->slot = i;
            out->rec_off = off;
            out->rec = r;
            return 0;
        }
    }
    return EBADMSG; /* a full segment never happens: the engine splits it first */
}

int lookup(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct lookup *out)
{
    return lookup_hashed(v, key, klen, siphash24(v->seed0, v->seed1, key, klen), out);
}

/* rc of a lookup that filled l, or EBADMSG when it found a record that fails its checksum. */
static int intact_or_damaged(const struct mmkv_view *v, int rc, const struct lookup *l)
{
    return rc == 0 && l->head.checksum != record_sum_of(v, l->rec, &l->head) ? EBADMSG : rc;
}

int lookup_intact(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct lookup *out)
{
    return intact_or_damaged(v, lookup(v, key, klen, out), out);
}

int mmkv_now(struct mmkv_view *v, int64_t *now)
{
    *now = clock_now(v);
    return 0;
}

int mmkv_find(struct mmkv_view *v, const uint8_t *key, uint64_t klen)
{
    struct lookup l;
    int rc = lookup(v, key, klen, &l);
    v->hash = l.hash;
    v->probes = (uint32_t)l.probes;
    if (rc == ENOENT || rc == 0) {
        v->seg = l.seg;
        v->slot = l.slot;
        v->rec_off = 0;
        if (rc == 0)
            fill_result(v, l.rec_off, &l.head);
    }
    return rc;
}

int mmkv_slot_set(struct mmkv_view *v, uint64_t seg_off, uint64_t slot, uint64_t word)
{
    struct mmkv_segment *seg = segment_at(v, seg_off);
    if (!seg || slot >= MMKV_SEGMENT_SLOTS || (word & MMKV_SLOT_OFF_MASK) % 8)
        return EINVAL;
    __atomic_store_n(&seg_slots(seg)[slot], word, __ATOMIC_RELEASE);
    return 0;
}

/* Home slot of the entry w, from the hash stored in its record. */
static int home_of(const struct mmkv_view *v, uint64_t w, uint64_t *home)
{
    const struct mmkv_record *r = record_at(v, w & MMKV_SLOT_OFF_MASK);
    if (!r)
        return EBADMSG;
    *home = r->key_hash & SEG_MASK;
    return 0;
}

/*
 * Backward-shift deletion inside one segment.  Every store is one aligned
 * 8-byte write and no slot becomes empty before the last one, so a process
 * killed half way leaves each live entry reachable, some of them twice
 * (recovery dedups).  v->slot is left at the last slot changed.
 */
int mmkv_slot_delete(struct mmkv_view *v, uint64_t seg_off, uint64_t slot)
{
    sweep_spoil(v, seg_off);
    return slot_delete_at(v, seg_off, slot);
}

int slot_delete_at(struct mmkv_view *v, uint64_t seg_off, uint64_t slot)
{
    struct mmkv_segment *seg = segment_at(v, seg_off);
    if (!seg || slot >= MMKV_SEGMENT_SLOTS)
        return EINVAL;
    uint64_t *slots = seg_slots(seg), hole = slot, j = slot;
    for (uint64_t n = 1; n < MMKV_SEGMENT_SLOTS; n++) {
        j = (j + 1) & SEG_MASK;
        uint64_t w = __atomic_load_n(&slots[j], __ATOMIC_ACQUIRE);
        if (w == 0)
            break;
        uint64_t home;
        if (home_of(v, w, &home))
            return EBADMSG;
        /* the entry at j may fill the hole unless its home lies cyclically in (hole, j] */
        int stays = hole <= j ? (hole < home && home <= j) : (hole < home || home <= j);
        if (stays)
            continue;
        __atomic_store_n(&slots[hole], w, __ATOMIC_RELEASE);
        hole = j;
        FAILPOINT("delete.mid_shift");
    }
    __atomic_store_n(&slots[hole], 0, __ATOMIC_RELEASE);
    if (seg->count)
        seg->count--;
    v->slot = hole;
    return 0;
}

/*
 * Next slot in use at or after the cursor (directory entry * MMKV_SEGMENT_SLOTS
 * + slot), visiting each segment once (its directory entries are contiguous).
 */
int mmkv_slot_next(struct mmkv_view *v, uint64_t cursor, uint64_t *found, uint64_t *seg_off, uint64_t *word)
{
    const uint64_t *dir = directory(v);
    if (!dir)
        return EBADMSG;
    uint64_t entries = 1ULL << v->dir_bits;
    for (uint64_t d = cursor / MMKV_SEGMENT_SLOTS; d < entries; d++, cursor = d * MMKV_SEGMENT_SLOTS) {
        if (d > 0 && dir[d - 1] == dir[d])
            continue;
        struct mmkv_segment *seg = segment_at(v, dir[d]);
        if (!seg)
            return EBADMSG;
        for (uint64_t i = cursor % MMKV_SEGMENT_SLOTS; i < MMKV_SEGMENT_SLOTS; i++) {
            uint64_t w = __atomic_load_n(&seg_slots(seg)[i], __ATOMIC_ACQUIRE);
            if (w) {
                *found = d * MMKV_SEGMENT_SLOTS + i;
                *seg_off = dir[d];
                *word = w;
                return 0;
            }
        }
    }
    return ENOENT;
}

int mmkv_drain_index(struct mmkv_view *v, uint64_t *cursor, uint64_t budget, uint64_t *cleared)
{
    /* bounded: mmkv_slot_next visits each directory entry once and the cursor only moves on */
    for (*cleared = 0; *cleared < budget; ++*cleared) {
        uint64_t found, seg_off, w;
        int rc = mmkv_slot_next(v, *cursor, &found, &seg_off, &w);
        if (rc)
            return rc;                       /* ENOENT: none left; EBADMSG: a damaged directory or segment */
        *cursor = found + 1;
        if ((rc = mmkv_slot_set(v, seg_off, found % MMKV_SEGMENT_SLOTS, 0)))
            return rc;
        uint64_t rec = w & MMKV_SLOT_OFF_MASK;
        if (mmkv_record_verify_contents(v, rec) == 0 && mmkv_free_fitting(v, block_of(rec), v->rec_need))
            return EBADMSG;
    }
    return 0;
}

/* One entry of mmkv_scan's output: sorted by hash. */
struct scan_entry {
    uint64_t hash, rec, key_len, val_len;
};

/* Sort n entries by hash, all of whose top `depth` bits are equal (one segment's): a counting
   sort on the 14 bits below those (the hashes are uniform, so each bucket holds about one
   entry), then an insertion sort, which has almost nothing left to do.  ENOMEM: no scratch. */
#define SCAN_BUCKET_BITS 14
/* Slots ahead whose records a scan prefetches (about 3/4 of slots are in use). */
#define SCAN_AHEAD 16
static int sort_entries(struct scan_entry *e, uint64_t n, uint64_t depth)
{
    if (n < 2)
        return 0;
    uint32_t *count = calloc((size_t)1 << SCAN_BUCKET_BITS, sizeof *count);
    struct scan_entry *tmp = malloc(n * sizeof *tmp);
    if (!count || !tmp) {
        free(count);
        free(tmp);
        return ENOMEM;
    }
#define BUCKET(h) ((uint32_t)(((h) << depth) >> (64 - SCAN_BUCKET_BITS)))
    for (uint64_t i = 0; i < n; i++)
        count[BUCKET(e[i].hash)]++;
    uint32_t at = 0;
    for (uint32_t b = 0; b < (1u << SCAN_BUCKET_BITS); b++) {
        uint32_t c = count[b];
        count[b] = at;
        at += c;
    }
    for (uint64_t i = 0; i < n; i++)
        tmp[count[BUCKET(e[i].hash)]++] = e[i];
#undef BUCKET
    for (uint64_t i = 1; i < n; i++) {
        struct scan_entry x = tmp[i];
        uint64_t j = i;
        for (; j > 0 && tmp[j - 1].hash > x.hash; j--)
            tmp[j] = tmp[j - 1];
        tmp[j] = x;
    }
    memcpy(e, tmp, n * sizeof *e);
    free(count);
    free(tmp);
    return 0;
}

/*
 * Iteration in hash order, one segment per call.  The segment whose hash range holds `from`
 * gives every key with a hash in [from, the end of that range], verified (the record's block,
 * lengths, checksum and key hash; the slot's tag; the hash inside the segment's range), as
 * entries (hash, record offset, key length, value length) sorted by hash in out[4 * cap]
 * (verified as mmkv_record_verify does but for the SipHash of the key: the checksum covers the
 * hash word, and the order is all the scan takes from it);
 * *n entries, *range_end the range's last hash (UINT64_MAX: the last segment).  Two slots
 * naming one key are damage.  The caller holds the lock, or reads lock-free and checks the
 * sequence word after: the walk is bounded (one segment's slots) and every offset checked, so
 * a racing writer can make the result wrong, never unsafe.
 * EBADMSG: damage (v->rec_off: the record at fault, 0 for the directory or segment);
 * ENOBUFS: more than cap entries (*n: how many).
 */
int mmkv_scan(struct mmkv_view *v, uint64_t from, uint64_t *out, uint64_t cap, uint64_t *n, uint64_t *range_end)
{
    v->rec_off = 0;
    const uint64_t *dir = directory(v);
    if (!dir)
        return EBADMSG;
    uint64_t d = dir_index(v, from), seg_off = dir[d];
    struct mmkv_segment *seg = segment_at(v, seg_off);
    if (!seg)
        return EBADMSG;
    uint64_t depth = seg->depth;
    /* the directory entry must lie in the segment's own range: entries of one segment are
       those whose top `depth` bits are its prefix */
    if (depth > v->dir_bits || (depth && (d >> (v->dir_bits - depth)) != seg->prefix))
        return EBADMSG;
    uint64_t lo = depth ? seg->prefix << (64 - depth) : 0;
    uint64_t hi = depth ? lo | (UINT64_MAX >> depth) : UINT64_MAX;
    *range_end = hi;
    struct scan_entry *e = (struct scan_entry *)out;
    uint64_t count = 0, *slots = seg_slots(seg);
    int64_t now = 0;        /* read when the first record with a deadline is met */
    for (uint64_t i = 0; i < MMKV_SEGMENT_SLOTS; i++) {
        /* the records lie anywhere: fetch a few slots ahead, so their cache misses overlap */
        uint64_t ahead = __atomic_load_n(&slots[(i + SCAN_AHEAD) & SEG_MASK], __ATOMIC_RELAXED) & MMKV_SLOT_OFF_MASK;
        if (ahead && ahead < v->size - 128) {
            __builtin_prefetch(v->base + ahead);          /* header and key */
            __builtin_prefetch(v->base + ahead + 64);     /* the value the checksum reads */
            __builtin_prefetch(v->base + ahead + 128);
        }
        uint64_t w = __atomic_load_n(&slots[i], __ATOMIC_ACQUIRE);
        if (!w)
            continue;
        uint64_t off = w & MMKV_SLOT_OFF_MASK;
        struct rec_head head;
        if (!record_head_at(v, off, &head)) {
            v->rec_off = off;
            return EBADMSG;
        }
        uint64_t h = head.key_hash;
        if (h < from)
            continue;                      /* before the cursor (or damage the verify below would see) */
        /* the entry takes its lengths from the header the verify checked (a racing writer may
           have changed the record since the first read: then the hashes differ) */
        if (h > hi || h < lo || w >> MMKV_SLOT_OFF_BITS != tag_of(h) || record_check(v, off, 0, &head) ||
            head.key_hash != h) {
            v->rec_off = off;
            return EBADMSG;
        }
        if (head.flags & MMKV_REC_EXPIRES) {
            if (!now)
                now = clock_now(v);
            if (deadline_of((const struct mmkv_record *)(v->base + off), &head) <= now)
                continue;                  /* expired: invisible */
        }
        /* key_len's word carries, above bit 32, the bytes between the key's padding and the value */
        uint64_t skip = deadline_bytes(&head);
        if (count < cap)
            e[count] = (struct scan_entry){h, off, head.key_len | skip << 32, head.val_len - skip};
        count++;
    }
    *n = count;
    if (count > cap)
        return ENOBUFS;
    int rc = sort_entries(e, count, depth);
    if (rc)
        return rc;
    for (uint64_t i = 1; i < count; i++)   /* a key in two slots: equal hashes, equal keys */
        for (uint64_t j = i; j-- > 0 && e[j].hash == e[i].hash;)
            if ((uint32_t)e[j].key_len == (uint32_t)e[i].key_len &&
                memcmp(v->base + e[j].rec + REC_HDR, v->base + e[i].rec + REC_HDR, (uint32_t)e[i].key_len) == 0) {
                v->rec_off = e[i].rec;
                return EBADMSG;
            }
    return 0;
}

/* Put the entry w (whose record has hash h) into seg by linear probing. */
static int seg_insert(struct mmkv_segment *seg, uint64_t h, uint64_t w)
{
    uint64_t *slots = seg_slots(seg), i = h & SEG_MASK;
    for (uint64_t n = 0; n < MMKV_SEGMENT_SLOTS; n++, i = (i + 1) & SEG_MASK)
        if (!slots[i]) {
            slots[i] = w;
            seg->count++;
            return 0;
        }
    return ENOSPC;
}

int mmkv_segment_init(struct mmkv_view *v, uint64_t off, uint64_t depth, uint64_t prefix)
{
    if (off % 8 || off < MMKV_HEADER_SIZE || !range_ok(v->size, off, SEG_BYTES) || depth > MMKV_DIR_MAX_BITS ||
        (depth < 64 && prefix >> depth))
        return EINVAL;
    memset(v->base + off, 0, SEG_BYTES);
    struct mmkv_segment *s = (struct mmkv_segment *)(v->base + off);
    s->depth = depth;
    s->prefix = prefix;
    return 0;
}

int mmkv_segment_split(struct mmkv_view *v, uint64_t old_off, uint64_t a_off, uint64_t b_off)
{
    struct mmkv_segment *old = segment_at(v, old_off);
    sweep_spoil(v, old_off);      /* its entries move to two new segments, the sweep's place with them */
    if (!old || old->depth >= MMKV_DIR_MAX_BITS)
        return old ? E2BIG : EBADMSG;
    uint64_t d = old->depth;
    int rc = mmkv_segment_init(v, a_off, d + 1, old->prefix << 1);
    if (!rc)
        rc = mmkv_segment_init(v, b_off, d + 1, old->prefix << 1 | 1);
    if (rc)
        return rc;
    struct mmkv_segment *half[2] = {(struct mmkv_segment *)(v->base + a_off),
                                    (struct mmkv_segment *)(v->base + b_off)};
    for (uint64_t i = 0; i < MMKV_SEGMENT_SLOTS; i++) {
        uint64_t w = seg_slots(old)[i];
        if (!w)
            continue;
        const struct mmkv_record *r = record_at(v, w & MMKV_SLOT_OFF_MASK);
        if (!r)
            return EBADMSG;
        if ((rc = seg_insert(half[(r->key_hash >> (63 - d)) & 1], r->key_hash, w)))
            return rc;
    }
    return 0;
}

int mmkv_dir_build(struct mmkv_view *v, uint64_t new_off, uint64_t new_bits, uint64_t old_seg, uint64_t a_off,
                   uint64_t b_off)
{
    const uint64_t *dir = directory(v);
    struct mmkv_segment *old = segment_at(v, old_seg);
    if (!dir || !old || new_bits > MMKV_DIR_MAX_BITS || (new_bits != v->dir_bits && new_bits != v->dir_bits + 1) ||
        old->depth >= new_bits || new_off % 8 || new_off < MMKV_HEADER_SIZE || new_off > v->size ||
        (1ULL << new_bits) > (v->size - new_off) / 8)
        return EINVAL;
    uint64_t *out = (uint64_t *)(v->base + new_off), shift = new_bits - 1 - old->depth;
    for (uint64_t i = 0; i < (1ULL << new_bits); i++) {
        uint64_t e = dir[new_bits == v->dir_bits ? i : i >> 1];
        out[i] = e == old_seg ? ((i >> shift) & 1 ? b_off : a_off) : e;
    }
    return 0;
}

int mmkv_index_insert(struct mmkv_view *v, uint64_t word)
{
    const uint64_t *dir = directory(v);
    const struct mmkv_record *r = record_at(v, word & MMKV_SLOT_OFF_MASK);
    if (!dir || !r)
        return EBADMSG;
    v->seg = dir[dir_index(v, r->key_hash)];
    struct mmkv_segment *seg = segment_at(v, v->seg);
    if (!seg)
        return EBADMSG;
    if (seg->count + 1 > v->max_count)
        return EAGAIN;
    return seg_insert(seg, r->key_hash, word);
}

/* Check one segment: header, counts, tags, prefixes and the probe invariant (depth: its depth as
   the caller read and checked it, at most dir_bits). */
static int audit_segment(const struct mmkv_view *v, struct mmkv_segment *seg, uint64_t depth, uint64_t *bad_slot)
{
    uint64_t *slots = seg_slots(seg), start = MMKV_SEGMENT_SLOTS, used = 0;
    for (uint64_t i = 0; i < MMKV_SEGMENT_SLOTS; i++)
        if (!slots[i]) {
            start = i;
            break;
        }
    *bad_slot = 0;
    if (start == MMKV_SEGMENT_SLOTS)
        return EBADMSG; /* no empty slot: probing would never end */
    uint64_t run_start = 1;
    for (uint64_t k = 1; k <= MMKV_SEGMENT_SLOTS; k++) {
        uint64_t i = (start + k) & SEG_MASK, w = slots[i];
        if (!w) {
            run_start = k + 1;
            continue;
        }
        used++;
        *bad_slot = i;
        const struct mmkv_record *r = record_at(v, w & MMKV_SLOT_OFF_MASK);
        if (!r || tag_of(r->key_hash) != w >> MMKV_SLOT_OFF_BITS)
            return EBADMSG;
        if (depth && r->key_hash >> (64 - depth) != seg->prefix)
            return EBADMSG; /* the key belongs to another segment */
        uint64_t dist = (i - (r->key_hash & SEG_MASK)) & SEG_MASK;
        if (dist > k - run_start)
            return EBADMSG; /* unreachable: an empty slot lies between its home and it */
    }
    *bad_slot = MMKV_SEGMENT_SLOTS;
    return used == seg->count ? 0 : EBADMSG;
}

int mmkv_index_audit(struct mmkv_view *v, uint64_t *bad_entry, uint64_t *bad_slot)
{
    const uint64_t *dir = directory(v);
    *bad_entry = *bad_slot = 0;
    if (!dir)
        return EBADMSG;
    uint64_t entries = 1ULL << v->dir_bits;
    for (uint64_t d = 0; d < entries;) {
        *bad_entry = d;
        struct mmkv_segment *seg = segment_at(v, dir[d]);
        if (!seg)
            return EBADMSG;
        /* the depth read once and checked again: a lockless audit races writers that free and
           reuse a segment's block (a depth re-read past dir_bits would make span anything) */
        uint64_t depth = __atomic_load_n(&seg->depth, __ATOMIC_RELAXED);
        if (depth > v->dir_bits)
            return EBADMSG;
        uint64_t span = 1ULL << (v->dir_bits - depth); /* entries that must point here */
        if (span > entries - d || d != seg->prefix * span)
            return EBADMSG;
        for (uint64_t k = 1; k < span; k++)
            if (dir[d + k] != dir[d])
                return EBADMSG;
        if (d + span < entries && dir[d + span] == dir[d])
            return EBADMSG;
        int rc = audit_segment(v, seg, depth, bad_slot);
        if (rc)
            return rc;
        d += span;
    }
    return 0;
}

/* ---------------------------------------------------------------- lock + get */

/*
 * The sequence word makes a lock-free read path safe: whoever holds the lock
 * keeps state->seq odd (set on lock, even again on unlock), so a reader that
 * saw the same even value before and after its read saw no change at all.
 * After a holder died the word is still odd; the next locker keeps it odd
 * (and different) until its repair is done.
 */
static void seq_enter(struct mmkv_state *s)
{
    uint64_t q = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&s->seq, (q + 1) | 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST); /* the odd value is visible before any change */
}

static void seq_leave(struct mmkv_state *s)
{
    uint64_t q = __atomic_load_n(&s->seq, __ATOMIC_RELAXED);
    __atomic_store_n(&s->seq, (q + 1) & ~(uint64_t)1, __ATOMIC_RELEASE); /* after every change */
}

/*
 * Closing a handle while other threads use it.  The calls that may touch the mapping without
 * holding the store lock (mmkv_lock while it waits, mmkv_get) count themselves in v->active for
 * their whole duration and refuse (EBADF) once v->closing is set; the fused writes with take_lock
 * take the lock through mmkv_lock, so they refuse likewise.  Every other call runs with the store
 * lock held, which the closer takes (mmkv_lock_final) before it unmaps.  Both sides use
 * sequentially consistent operations: a caller that incremented active before closing was set
 * is waited for, one that comes later sees closing.
 */
static int enter(struct mmkv_view *v)
{
    __atomic_add_fetch(&v->active, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&v->closing, __ATOMIC_SEQ_CST)) {
        __atomic_sub_fetch(&v->active, 1, __ATOMIC_SEQ_CST);
        return 0;
    }
    return 1;
}

static void leave(struct mmkv_view *v) { __atomic_sub_fetch(&v->active, 1, __ATOMIC_SEQ_CST); }

int mmkv_view_close(struct mmkv_view *v)
{
    __atomic_store_n(&v->closing, 1, __ATOMIC_SEQ_CST);
    struct timespec nap = {0, 50000};
    while (__atomic_load_n(&v->active, __ATOMIC_SEQ_CST))
        nanosleep(&nap, NULL); /* each such call ends within its lock timeout */
    return 0;
}

/* Take the store mutex (wait: up to the view's timeout; else only if it is free now, EBUSY
   otherwise) and record this process as the holder. */
static int lock_holder(struct mmkv_view *v, int wait)
{
    if (v->size < MMKV_HEADER_SIZE)
        return EINVAL;
    if (v->lockless)
        return EROFS; /* the mutex lives in a mapping this handle may not write */
    int rc = wait ? mmkv_mutex_lock(v->base + MMKV_OFF_LOCKS, v->lock_timeout_ns)
                  : mmkv_mutex_trylock(v->base + MMKV_OFF_LOCKS);
    if (rc == 0 || rc == EOWNERDEAD) {
        struct mmkv_state *s = state_of(v);
        seq_enter(s);
        __atomic_store_n(&s->lock_pid, (uint64_t)v->pid, __ATOMIC_RELAXED);
        /* the coarse clock (a few ms behind CLOCK_MONOTONIC, never ahead) costs a fraction of the
           fine one on every lock; the reports that read it count in tenths of a second */
        __atomic_store_n(&s->lock_since_ns, (uint64_t)now_ns(CLOCK_MONOTONIC_COARSE), __ATOMIC_RELAXED);
    }
    return rc;
}

/* lock_holder for a caller that does not hold the lock yet: counted in v->active (see above). */
static int lock_entered(struct mmkv_view *v, int wait)
{
    if (!enter(v))
        return EBADF;
    int rc = lock_holder(v, wait);
    leave(v);
    return rc;
}

int mmkv_lock(struct mmkv_view *v) { return lock_entered(v, 1); }

int mmkv_lock_try(struct mmkv_view *v) { return lock_entered(v, 0); }

int mmkv_lock_final(struct mmkv_view *v) { return lock_holder(v, 1); }

int mmkv_unlock(struct mmkv_view *v)
{
    if (v->size < MMKV_HEADER_SIZE)
        return EINVAL;
    struct mmkv_state *s = state_of(v);
    __atomic_store_n(&s->lock_pid, 0, __ATOMIC_RELAXED);
    seq_leave(s);
    return mmkv_mutex_unlock(v->base + MMKV_OFF_LOCKS);
}

/* 1 when a writer holds the lock (the sequence word odd) and the process it names is gone: its
   work is unfinished until a process that may write takes the lock and repairs it.  (Between a
   holder's seq_enter and its pid store the pid is 0: not dead, only early.) */
static int lock_holder_dead(const struct mmkv_state *st)
{
    uint64_t pid = __atomic_load_n(&st->lock_pid, __ATOMIC_ACQUIRE);
    return (__atomic_load_n(&st->seq, __ATOMIC_ACQUIRE) & 1) && pid != 0 && !mmkv_pid_alive(pid);
}

int mmkv_lock_holder_dead(struct mmkv_view *v)
{
    return v->size >= MMKV_HEADER_SIZE && lock_holder_dead(state_of(v));
}

/* Look key up and copy its value into g; the caller makes sure nothing changes meanwhile. */
static int get_into(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g)
{
    struct lookup l;
    int rc = lookup_intact(v, key, klen, &l);
    g->expired = rc == 0 && found_expired(v, &l);
    if (g->expired)
        rc = ENOENT;
    if (rc == 0)    /* lengths from the checked header only: a racing writer may change the record's */
        rc = getbuf_put(g, found_value(&l), found_len(&l));
    return rc;
}

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#else
    __asm__ __volatile__("" ::: "memory");
#endif
}

/* Lock-free attempts a lockless view makes before it answers EAGAIN: a busy writer leaves the
   lock free for a microsecond or so between its calls, and a read must land in such a gap.
   Without wait (the caller holds the GIL) a few microseconds of spinning; with wait, yielding
   the CPU now and then, up to about a millisecond. */
#define LOCKLESS_SPINS 64
#define LOCKLESS_SPINS_WAIT 4096

/* A read a caller wants as of one moment: fills the caller's output from the view; a result code. */
typedef int read_fn(const struct mmkv_view *v, void *job);

/* run(v, job) as of a moment when no lock holder was active before, during or after it (the
   sequence word even and unchanged): up to `runs` tries within `polls` polls of the word,
   yielding the CPU now and then.  Every offset a read takes from the file is bounds-checked, so
   a read racing a writer can only be wrong, never unsafe, and a wrong one is thrown away.  Then a
   lockless view answers why it could not (MMKV_ESTALE, EOWNERDEAD, EAGAIN: the caller waits and
   calls again); any other view runs it under the lock (no holder bookkeeping: a reader holds it
   briefly), waiting for it with wait, else only if it is free now (EBUSY: the caller may wait).
   Inlined into each caller, so that run is a direct call. */
static inline __attribute__((always_inline)) int read_consistently(const struct mmkv_view *v, int polls, int runs,
                                                                    int wait, read_fn *run, void *job)
{
    if (v->size < MMKV_HEADER_SIZE)
        return EINVAL;
    struct mmkv_state *st = state_of(v);
    for (int i = 0; i < polls && runs > 0; i++) {
        uint64_t s1 = __atomic_load_n(&st->seq, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&st->generation, __ATOMIC_ACQUIRE) != v->generation)
            break;
        if (!(s1 & 1)) {
            runs--;
            int rc = run(v, job);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            if (__atomic_load_n(&st->seq, __ATOMIC_RELAXED) == s1 && (rc != EBADMSG || v->lockless))
                return rc;
        }
        if (i % 64 == 63)
            sched_yield();
        else
            cpu_relax();
    }
    if (v->lockless) /* no lock to fall back on: the caller retries (or finds the holder dead) */
        return __atomic_load_n(&st->generation, __ATOMIC_ACQUIRE) != v->generation ? MMKV_ESTALE
               : lock_holder_dead(st) ? EOWNERDEAD : EAGAIN;
    int rc = wait ? mmkv_mutex_lock(v->base + MMKV_OFF_LOCKS, v->lock_timeout_ns)
                  : mmkv_mutex_trylock(v->base + MMKV_OFF_LOCKS);
    if (rc)
        return rc; /* EOWNERDEAD: still held, the caller recovers */
    if (__atomic_load_n(&st->generation, __ATOMIC_ACQUIRE) != v->generation)
        rc = MMKV_ESTALE;
    else
        rc = run(v, job);
    mmkv_mutex_unlock(v->base + MMKV_OFF_LOCKS);
    return rc;
}

struct get_job {
    const uint8_t *key;
    uint64_t klen;
    struct mmkv_getbuf *g;
};

static int run_get(const struct mmkv_view *v, void *job)
{
    struct get_job *j = job;
    return get_into(v, j->key, j->klen, j->g);
}

/* A view that may take the lock reads lock-free once, then under the lock; a lockless view polls
   as LOCKLESS_SPINS says. */
static int get_entered(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g,
                       int wait)
{
    struct get_job job = {key, klen, g};
    int spins = !v->lockless ? 1 : wait ? LOCKLESS_SPINS_WAIT : LOCKLESS_SPINS;
    return read_consistently(v, spins, spins, wait, run_get, &job);
}

int mmkv_get(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g)
{
    if (!enter(v))
        return EBADF;
    int rc = get_entered(v, key, klen, g, 1);
    leave(v);
    return rc;
}

int mmkv_get_nowait(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g)
{
    if (!enter(v))
        return EBADF;
    int rc = get_entered(v, key, klen, g, 0);
    leave(v);
    return rc;
}


/* Keys a batch read looks ahead: a key's home slot is fetched MANY_AHEAD keys before its lookup,
   and the record that slot names MANY_AHEAD / 2 keys before, so the cache misses of many keys
   overlap (a random key of a big store costs two or three misses of ~100 ns in a row). */
#define MANY_AHEAD 16

/* The slots of the segment the directory names for hash h now, or NULL (an offset out of
   bounds: the lookup will say what is wrong).  Only a hint for prefetching: read unchecked. */
static const uint64_t *slots_hint(const struct mmkv_view *v, const uint64_t *dir, uint64_t h)
{
    uint64_t seg_off = __atomic_load_n(&dir[dir_index(v, h)], __ATOMIC_RELAXED);
    if (seg_off % 8 || seg_off < MMKV_HEADER_SIZE || !range_ok(v->size, seg_off, SEG_BYTES))
        return NULL;
    return (const uint64_t *)(v->base + seg_off + SEG_HDR);
}

/* Fetch the record of hash h's first slot with its tag (within a few probes of its home): the
   one its lookup will most likely read. */
static void prefetch_record(const struct mmkv_view *v, const uint64_t *dir, uint64_t h)
{
    const uint64_t *slots = slots_hint(v, dir, h);
    if (!slots)
        return;
    for (uint64_t k = 0, i = h & SEG_MASK; k < 8; k++, i = (i + 1) & SEG_MASK) {
        uint64_t w = __atomic_load_n(&slots[i], __ATOMIC_RELAXED), off = w & MMKV_SLOT_OFF_MASK;
        if (!w)
            return;
        if (w >> MMKV_SLOT_OFF_BITS == tag_of(h)) {
            if (range_ok(v->size, off, 3 * 64)) {     /* header, key and a small value */
                __builtin_prefetch(v->base + off);
                __builtin_prefetch(v->base + off + 64);
                __builtin_prefetch(v->base + off + 128);
            }
            return;
        }
    }
}

/* Look up keys[i] (the n keys of a batch: key_ends as in mmkv_put_many) and copy every value
   found into g's buffer, one after the other; the caller makes sure nothing changes meanwhile
   (or checks the sequence word after).  ENOBUFS: they do not all fit (g->val_len: the bytes
   they need). */
static int many_into(const struct mmkv_view *v, const uint8_t *keys, const uint64_t *key_ends, uint64_t n,
                     struct mmkv_getbuf *g, uint64_t *val_ends, uint8_t *found)
{
    const uint64_t *dir = directory(v);
    if (!dir)
        return EBADMSG;
    uint64_t used = 0, hashes[2 * MANY_AHEAD];   /* key i's at i % (2 * MANY_AHEAD): no stage overwrites another's */
    for (uint64_t i = 0; i < n + MANY_AHEAD; i++) {
        if (i < n) {            /* MANY_AHEAD keys ahead: hash, fetch the home slot */
            uint64_t k0 = i ? key_ends[i - 1] : 0;
            if (key_ends[i] < k0)
                return EINVAL;
            uint64_t h = hashes[i % (2 * MANY_AHEAD)] = siphash24(v->seed0, v->seed1, keys + k0, key_ends[i] - k0);
            const uint64_t *slots = slots_hint(v, dir, h);
            if (slots)
                __builtin_prefetch(slots + (h & SEG_MASK));
        }
        if (i >= MANY_AHEAD / 2 && i - MANY_AHEAD / 2 < n)    /* halfway: fetch the record its slot names */
            prefetch_record(v, dir, hashes[(i - MANY_AHEAD / 2) % (2 * MANY_AHEAD)]);
        if (i < MANY_AHEAD)
            continue;
        uint64_t j = i - MANY_AHEAD, k0 = j ? key_ends[j - 1] : 0;
        struct lookup l;
        int rc = intact_or_damaged(v, lookup_hashed(v, keys + k0, key_ends[j] - k0, hashes[j % (2 * MANY_AHEAD)], &l),
                                   &l);
        if (rc == 0 && found_expired(v, &l))
            rc = ENOENT;
        if (rc == ENOENT) {
            found[j] = 0;
            val_ends[j] = used;
            continue;
        }
        if (rc)
            return rc;
        uint64_t len = found_len(&l);
        if (len && used + len <= g->cap)
            memcpy(g->buf + used, found_value(&l), len);
        used += len;
        found[j] = 1;
        val_ends[j] = used;
    }
    g->val_len = used;
    return used <= g->cap ? 0 : ENOBUFS;
}

struct many_job {
    const uint8_t *keys;
    const uint64_t *key_ends;
    uint64_t n;
    struct mmkv_getbuf *g;
    uint64_t *val_ends;
    uint8_t *found;
};

static int run_many(const struct mmkv_view *v, void *job)
{
    struct many_job *j = job;
    return many_into(v, j->keys, j->key_ends, j->n, j->g, j->val_ends, j->found);
}

/* A view that may take the lock tries twice lock-free, then takes it.  A lockless view polls the
   sequence word (cheap) as a get does and runs the batch only when no writer is active, as often
   as a small batch can afford (a big one, a few times: each run costs). */
int mmkv_get_many(struct mmkv_view *v, const uint8_t *keys, const uint64_t *key_ends, uint64_t n,
                  struct mmkv_getbuf *g, uint64_t *val_ends, uint8_t *found, int wait)
{
    if (!enter(v))
        return EBADF;
    struct many_job job = {keys, key_ends, n, g, val_ends, found};
    int polls = !v->lockless ? 2 : wait ? LOCKLESS_SPINS_WAIT : LOCKLESS_SPINS;
    int rc = read_consistently(v, polls, !v->lockless ? 2 : n > 256 ? 4 : 64, wait, run_many, &job);
    leave(v);
    return rc;
}

int mmkv_count_nowait(struct mmkv_view *v, uint64_t *count)
{
    if (!enter(v))
        return EBADF;
    int rc = EBUSY;
    if (v->size >= MMKV_HEADER_SIZE) {
        struct mmkv_state *st = state_of(v);
        struct counts_ref c;
        uint64_t s1 = __atomic_load_n(&st->seq, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&st->generation, __ATOMIC_ACQUIRE) != v->generation) {
            rc = MMKV_ESTALE;
        } else if (counts_of(v, &c)) {
            rc = EBADMSG;
        } else if (!(s1 & 1)) {
            uint64_t n = __atomic_load_n(c.count, __ATOMIC_RELAXED);
            uint64_t ttl_min = __atomic_load_n(c.ttl_min, __ATOMIC_RELAXED);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            /* past ttl_min the count may include expired keys: the caller sweeps (or counts) first */
            if (__atomic_load_n(&st->seq, __ATOMIC_RELAXED) == s1 && (!ttl_min || clock_now(v) < (int64_t)ttl_min)) {
                *count = n;
                rc = 0;
            }
        }
    } else {
        rc = EINVAL;
    }
    leave(v);
    return rc;
}
