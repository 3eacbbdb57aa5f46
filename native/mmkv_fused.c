/*
 * mmkv native shim: the fused writes, one C call per put, delete or counter
 * increment on the hot path.  Each one looks the key up, allocates, writes the record, switches the
 * slot, frees the old block and keeps the state's counters; with take_lock it
 * also takes and releases the store lock.  With sync_full its msyncs follow
 * the commit order of put_locked: the record, then the slot that makes it live.
 * What they cannot do alone (split a segment: EAGAIN; grow the file: ENOSPC;
 * repair: EBADMSG, EOWNERDEAD) they hand back to the Python engine.
 */
#define _GNU_SOURCE
#include "mmkv_internal.h"

/* Take the lock (take_lock MMKV_TRY_LOCK: only if it is free now, else EBUSY) and check the view
   is current; MMKV_ESTALE (unlocked) when it is not. */
static int lock_current(struct mmkv_view *v, int take_lock)
{
    int rc = take_lock == MMKV_TRY_LOCK ? mmkv_lock_try(v) : mmkv_lock(v);
    if (rc)
        return rc;
    if (__atomic_load_n(&state_of(v)->generation, __ATOMIC_ACQUIRE) != v->generation) {
        mmkv_unlock(v);
        return MMKV_ESTALE;
    }
    return 0;
}

/* Results after which a fused call has changed nothing and released the lock. */
static int clean_result(int rc)
{
    return rc == 0 || rc == ENOENT || rc == EAGAIN || rc == ENOSPC || rc == ERANGE || rc == MMKV_ENEEDBACK ||
           rc == ECANCELED;
}

static int sync_range(const struct mmkv_view *v, uint64_t off, uint64_t len)
{
    if (!v->sync_full)
        return 0;
    FAILPOINT("sync.before");
    int rc = mmkv_msync(v->base, v->size, off, len, MMKV_SYNC_SYNC);
    if (!rc && v->sync_hook)
        v->sync_hook(off, len);
    FAILPOINT("sync.after");
    return rc;
}

/* Commit order: the README's "Commit orders" table, row "put". */
static int put_locked(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
                      uint32_t flags)
{
    struct lookup l;
    struct mmkv_state *st = state_of(v);
    if (klen > UINT32_MAX || vlen > (1ULL << 47))
        return EINVAL;
    int rc = lookup(v, key, klen, &l);
    if (rc && rc != ENOENT)
        return rc;
    if (rc == ENOENT && l.segment->count + 1 > v->max_count) {
        v->seg = l.seg;
        return EAGAIN; /* split the segment first */
    }
    uint64_t need = REC_HDR + PAD8(klen) + vlen, b;
    if ((rc = mmkv_alloc(v, need, &b)))
        return rc;  /* ENOSPC: nothing changed, grow the file; MMKV_ENEEDBACK: back released pages */
    uint64_t rec = payload_of(b), cap = capacity_of(*word(v, b) & SIZE_MASK);
    uint64_t old_vlen = l.rec ? l.rec->val_len : 0, *slots = seg_slots(l.segment);
    if ((rc = mmkv_record_write(v, rec, cap, l.hash, key, klen, val, vlen, flags)) ||
        (rc = sync_range(v, b, rec + need - b))) /* 1. the record (and its block header) is durable ... */
        return mmkv_free(v, b) ? EBADMSG : rc;
    FAILPOINT("put.after_record");
    __atomic_store_n(&slots[l.slot], slot_word(l.hash, rec), __ATOMIC_RELEASE);
    if ((rc = sync_range(v, l.seg + SEG_HDR + 8 * l.slot, 8)))  /* 2. ... before the slot that makes it live */
        return rc;
    FAILPOINT("put.after_slot");
    if (l.rec) {                                  /* 3. the old record's block is free */
        if ((rc = mmkv_free_fitting(v, block_of(l.rec_off), REC_HDR + PAD8(klen) + old_vlen)))
            return rc;
        st->live_bytes -= klen + old_vlen;
    } else {
        l.segment->count++;
        st->count++;
    }
    st->live_bytes += klen + vlen;
    return 0;
}

int mmkv_put(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
             uint32_t flags, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    rc = put_locked(v, key, klen, val, vlen, flags);
    if (take_lock && clean_result(rc))
        mmkv_unlock(v);
    return rc;
}

int mmkv_put_many(struct mmkv_view *v, const uint8_t *keys, const uint64_t *key_ends, const uint8_t *vals,
                  const uint64_t *val_ends, uint64_t n, uint64_t *done)
{
    for (uint64_t i = *done; i < n; i++) {
        uint64_t k0 = i ? key_ends[i - 1] : 0, v0 = i ? val_ends[i - 1] : 0;
        if (key_ends[i] < k0 || val_ends[i] < v0)
            return EINVAL;
        int rc = put_locked(v, keys + k0, key_ends[i] - k0, vals + v0, val_ends[i] - v0, 0);
        if (rc) {
            *done = i;
            return rc;
        }
    }
    *done = n;
    return 0;
}

/* Delete the key found by l (the lock held).  Commit order: the README's "Commit orders" table,
   row "delete". */
static int delete_found(struct mmkv_view *v, const struct lookup *found, uint64_t klen)
{
    struct lookup l = *found;
    struct mmkv_state *st = state_of(v);
    int rc;
    {
        uint64_t first = l.slot, vlen = l.rec->val_len, slots = l.seg + SEG_HDR;
        rc = mmkv_slot_delete(v, l.seg, l.slot);
        if (!rc && v->sync_full) {                /* slots [first, v->slot] changed, maybe wrapping */
            if (v->slot >= first)
                rc = sync_range(v, slots + 8 * first, 8 * (v->slot - first + 1));
            else if (!(rc = sync_range(v, slots + 8 * first, 8 * (MMKV_SEGMENT_SLOTS - first))))
                rc = sync_range(v, slots, 8 * (v->slot + 1));
        }
        if (!rc && !(rc = mmkv_free_fitting(v, block_of(l.rec_off), REC_HDR + PAD8(klen) + vlen))) {
            st->count--;
            st->live_bytes -= klen + vlen;
        }
    }
    return rc;
}

int mmkv_delete(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    struct lookup l;
    rc = lookup(v, key, klen, &l);
    if (rc == 0)
        rc = delete_found(v, &l, klen);
    if (take_lock && clean_result(rc))
        mmkv_unlock(v);
    return rc;
}

int mmkv_take(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    struct lookup l;
    rc = lookup_intact(v, key, klen, &l);
    if (rc == 0)   /* ENOBUFS: nothing changed, the caller takes the general path */
        rc = getbuf_put(g, found_value(&l), l.head.val_len);
    if (rc == 0)
        rc = delete_found(v, &l, klen);
    if (take_lock && (clean_result(rc) || rc == ENOBUFS))
        mmkv_unlock(v);
    return rc;
}

/* Compare-and-swap under the lock: a put (or a delete) that happens only when the key's value is
   the expected one.  Commit order: that of the put or the delete it becomes. */
int mmkv_cas(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *expected, uint64_t elen,
             int has_expected, const uint8_t *val, uint64_t vlen, int has_val, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    struct lookup l;
    rc = lookup_intact(v, key, klen, &l);     /* a damaged value is never compared: recovery first */
    if (rc == 0 || rc == ENOENT) {
        int same = rc == ENOENT ? !has_expected   /* absent: the same only when absence was expected */
                   : has_expected && l.head.val_len == elen && (!elen || memcmp(found_value(&l), expected, elen) == 0);
        if (!same)
            rc = ECANCELED;
        else if (has_val)
            rc = put_locked(v, key, klen, val, vlen, 0);   /* EAGAIN, ENOSPC: nothing changed */
        else if (rc == 0)
            rc = delete_found(v, &l, klen);
        else
            rc = 0;   /* absent, expected absent, and deleted: nothing to do */
    }
    if (take_lock && clean_result(rc))
        mmkv_unlock(v);
    return rc;
}

/* Commit order: the README's "Commit orders" table, row "incr of a counter record". */
int mmkv_incr(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int64_t delta, int64_t *result, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    struct lookup l;
    rc = lookup(v, key, klen, &l);
    if (rc == 0 && !(l.rec->flags & MMKV_REC_COUNTER))
        rc = ENOENT; /* a plain 8-byte value or another type: the general path decides */
    if (rc == 0) {   /* updated in place: its block and checksum must hold, or recovery drops it */
        uint64_t head = *word(v, block_of(l.rec_off));
        if (!(head & MMKV_BLOCK_ALLOC) || !block_holds(head & SIZE_MASK, REC_HDR + PAD8(klen) + sizeof(int64_t)) ||
            l.rec->val_len != 8 || l.rec->checksum != record_sum(v, l.rec))
            rc = EBADMSG;
    }
    if (rc == 0) {
        uint64_t off = l.rec_off + REC_HDR + PAD8((uint64_t)l.rec->key_len);
        int64_t *p = (int64_t *)(v->base + off), now;
        if (__builtin_add_overflow(__atomic_load_n(p, __ATOMIC_ACQUIRE), delta, &now)) {
            rc = ERANGE;
        } else {
            FAILPOINT("incr.before_store");
            __atomic_store_n(p, now, __ATOMIC_RELEASE); /* one aligned 8-byte store: never torn */
            *result = now;
            rc = sync_range(v, off, 8);
        }
    }
    if (take_lock && clean_result(rc))
        mmkv_unlock(v);
    return rc;
}


/* Commit order: the README's "Commit orders" table, row "compaction move" (that of a put). */
int mmkv_move_record(struct mmkv_view *v, uint64_t rec_off, uint64_t dest)
{
    int rc = mmkv_record_verify(v, rec_off);
    if (rc)
        return rc;
    const struct mmkv_record *r = (const struct mmkv_record *)(v->base + rec_off);
    uint64_t klen = r->key_len, need = REC_HDR + PAD8(klen) + r->val_len;
    struct lookup l;
    rc = lookup(v, (const uint8_t *)r + REC_HDR, klen, &l);
    if (rc || l.rec_off != rec_off)
        return rc == EBADMSG ? rc : ENOENT;   /* no slot names this record: nothing to move */
    if (dest < payload_of(MMKV_HEAP_START) || dest % 8 || !range_ok(v->size, block_of(dest), MMKV_BLOCK_HEADER))
        return EINVAL;
    uint64_t head = *word(v, block_of(dest));
    if (!(head & MMKV_BLOCK_ALLOC) || !range_ok(v->size, block_of(dest), head & SIZE_MASK) ||
        !block_holds(head & SIZE_MASK, need) || (dest < rec_off + need && rec_off < dest + need))
        return EINVAL;
    memcpy(v->base + dest, r, need);
    if ((rc = sync_range(v, block_of(dest), need + MMKV_BLOCK_HEADER)))  /* 1. the copy is durable ... */
        return rc;
    FAILPOINT("compact.after_copy");
    uint64_t *slots = seg_slots(l.segment);
    __atomic_store_n(&slots[l.slot], slot_word(l.hash, dest), __ATOMIC_RELEASE);
    if ((rc = sync_range(v, l.seg + SEG_HDR + 8 * l.slot, 8)))      /* 2. ... before the slot names it */
        return rc;
    FAILPOINT("compact.after_switch");
    return mmkv_free_fitting(v, block_of(rec_off), need) ? EBADMSG : 0;  /* 3. the old block is free */
}
