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

/* The end of a fused write's lock hold: a step of the sweep when the hold did its job (0, ENOENT,
   ECANCELED) and a deadline may have passed, then (take_lock) the lock released after a result
   that changed nothing or finished the write (clean_result; take's ENOBUFS); returns rc. */
static int end_write(struct mmkv_view *v, int rc, int take_lock)
{
    if (rc == 0 || rc == ENOENT || rc == ECANCELED)
        sweep_if_due(v);
    if (take_lock && (clean_result(rc) || rc == ENOBUFS))
        mmkv_unlock(v);
    return rc;
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

/* Commit order: the README's "Commit orders" table, row "put".  deadline: 0, or when the key expires. */
static int put_locked(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
                      uint32_t flags, int64_t deadline)
{
    struct lookup l;
    struct counts_ref c;
    if (klen > UINT32_MAX || vlen > (1ULL << 47))
        return EINVAL;
    int rc = counts_of(v, &c);
    if (rc)
        return rc;
    rc = lookup(v, key, klen, &l);
    if (rc && rc != ENOENT)
        return rc;
    if (rc == ENOENT && l.segment->count + 1 > v->max_count) {
        v->seg = l.seg;
        return EAGAIN; /* split the segment first */
    }
    uint64_t need = REC_HDR + PAD8(klen) + (deadline ? MMKV_DEADLINE_BYTES : 0) + vlen, b;
    if ((rc = mmkv_alloc(v, need, &b)))
        return rc;  /* ENOSPC: nothing changed, grow the file; MMKV_ENEEDBACK: back released pages */
    uint64_t rec = payload_of(b), cap = capacity_of(*word(v, b) & SIZE_MASK);
    uint64_t old_vlen = l.rec ? l.rec->val_len : 0, *slots = seg_slots(l.segment);
    if ((rc = record_write_until(v, rec, cap, l.hash, key, klen, val, vlen, flags, deadline)) ||
        (rc = sync_range(v, b, rec + need - b))) /* 1. the record (and its block header) is durable ... */
        return mmkv_free(v, b) ? EBADMSG : rc;
    FAILPOINT("put.after_record");
    int64_t noted = deadline;                     /* a deadline the caller put in val itself (flags) counts too */
    if (!noted && flags & MMKV_REC_EXPIRES) {
        memcpy(&noted, val, sizeof noted);
        if (noted < 1)
            noted = 1;                            /* expired since forever: due now */
    }
    if (noted)
        sweep_note(v, noted);                     /* (before the record is live: a bound, never late) */
    __atomic_store_n(&slots[l.slot], slot_word(l.hash, rec), __ATOMIC_RELEASE);
    if ((rc = sync_range(v, l.seg + SEG_HDR + 8 * l.slot, 8)))  /* 2. ... before the slot that makes it live */
        return rc;
    FAILPOINT("put.after_slot");
    if (l.rec) {                                  /* 3. the old record's block is free */
        if ((rc = mmkv_free_fitting(v, block_of(l.rec_off), REC_HDR + PAD8(klen) + old_vlen)))
            return rc;
        *c.live_bytes -= klen + old_vlen;
    } else {
        l.segment->count++;
        (*c.count)++;
    }
    *c.live_bytes += need - REC_HDR - PAD8(klen) + klen;
    return 0;
}

/* mmkv_put and mmkv_put_until: put_locked in a lock hold of its own (take_lock) or the caller's. */
static int put_entered(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
                       uint32_t flags, int64_t deadline, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    return end_write(v, put_locked(v, key, klen, val, vlen, flags, deadline), take_lock);
}

int mmkv_put(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
             uint32_t flags, int take_lock)
{
    return put_entered(v, key, klen, val, vlen, flags, 0, take_lock);
}

int mmkv_put_until(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *val, uint64_t vlen,
                   int64_t deadline, int take_lock)
{
    return deadline < 0 ? EINVAL : put_entered(v, key, klen, val, vlen, 0, deadline, take_lock);
}

int mmkv_put_many(struct mmkv_view *v, const uint8_t *keys, const uint64_t *key_ends, const uint8_t *vals,
                  const uint64_t *val_ends, uint64_t n, uint64_t *done)
{
    for (uint64_t i = *done; i < n; i++) {
        uint64_t k0 = i ? key_ends[i - 1] : 0, v0 = i ? val_ends[i - 1] : 0;
        if (key_ends[i] < k0 || val_ends[i] < v0)
            return EINVAL;
        int rc = put_locked(v, keys + k0, key_ends[i] - k0, vals + v0, val_ends[i] - v0, 0, 0);
        if (rc) {
            *done = i;
            return rc;
        }
    }
    *done = n;
    return 0;
}

/* Delete the key found by l (the lock held).  Commit order: the README's "Commit orders" table,
   row "delete".  by_sweep: the sweep's own deletion, which keeps its place (see sweep_run). */
static int delete_found(struct mmkv_view *v, const struct lookup *found, uint64_t klen, int by_sweep)
{
    struct lookup l = *found;
    struct counts_ref c;
    int rc = counts_of(v, &c);
    if (!rc) {
        uint64_t first = l.slot, vlen = l.rec->val_len, slots = l.seg + SEG_HDR;
        rc = by_sweep ? slot_delete_at(v, l.seg, l.slot) : mmkv_slot_delete(v, l.seg, l.slot);
        if (!rc && v->sync_full) {                /* slots [first, v->slot] changed, maybe wrapping */
            if (v->slot >= first)
                rc = sync_range(v, slots + 8 * first, 8 * (v->slot - first + 1));
            else if (!(rc = sync_range(v, slots + 8 * first, 8 * (MMKV_SEGMENT_SLOTS - first))))
                rc = sync_range(v, slots, 8 * (v->slot + 1));
        }
        if (!rc && !(rc = mmkv_free_fitting(v, block_of(l.rec_off), REC_HDR + PAD8(klen) + vlen))) {
            (*c.count)--;
            *c.live_bytes -= klen + vlen;
        }
    }
    return rc;
}

/* Delete the key found by l, as delete_found; ENOENT (after the deletion) when its record had
   expired: the key was absent already, and only its space comes back. */
static int delete_live(struct mmkv_view *v, const struct lookup *l, uint64_t klen)
{
    int expired = found_expired(v, l);
    int rc = delete_found(v, l, klen, 0);
    return rc == 0 && expired ? ENOENT : rc;
}

int mmkv_delete(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    struct lookup l;
    rc = lookup(v, key, klen, &l);
    if (rc == 0)
        rc = delete_live(v, &l, klen);
    return end_write(v, rc, take_lock);
}

int mmkv_take(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    struct lookup l;
    rc = lookup_intact(v, key, klen, &l);
    if (rc == 0 && !found_expired(v, &l))     /* ENOBUFS: nothing changed, the caller takes the general path */
        rc = getbuf_put(g, found_value(&l), found_len(&l));
    if (rc == 0)
        rc = delete_live(v, &l, klen);        /* (an expired one: reclaimed, and ENOENT) */
    return end_write(v, rc, take_lock);
}

int mmkv_reap(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    struct lookup l;
    rc = lookup_intact(v, key, klen, &l);       /* (a damaged record is recovery's, not the reaper's) */
    if (rc == 0)
        rc = found_expired(v, &l) ? delete_found(v, &l, klen, 0) : ENOENT;   /* live again: leave it */
    if (take_lock && clean_result(rc))
        mmkv_unlock(v);
    return rc;
}

/* Compare-and-swap under the lock: a put (or a delete) that happens only when the key's value is
   the expected one.  Commit order: that of the put or the delete it becomes. */
/* The value of the counter record l found, to be updated in place (the lock held): its block must be in
   use and hold it, its value 8 bytes and its checksum (header and key) sound, or recovery would drop it
   (EBADMSG).  Commit order of the store that follows: the README's "Commit orders" table, row "incr of a
   counter record". */
static int counter_value_at(struct mmkv_view *v, const struct lookup *l, uint64_t klen, int64_t **p)
{
    uint64_t head = *word(v, block_of(l->rec_off));
    if (!(head & MMKV_BLOCK_ALLOC) || !block_holds(head & SIZE_MASK, REC_HDR + PAD8(klen) + sizeof(int64_t)) ||
        l->rec->val_len != 8 || l->rec->checksum != record_sum(v, l->rec))
        return EBADMSG;
    *p = (int64_t *)(v->base + l->rec_off + REC_HDR + PAD8(klen));
    return 0;
}

/* One aligned 8-byte store of a counter's new value (never torn), durable in sync_full. */
static int counter_store(struct mmkv_view *v, int64_t *p, int64_t value)
{
    __atomic_store_n(p, value, __ATOMIC_RELEASE);
    return sync_range(v, (uint64_t)((uint8_t *)p - v->base), 8);
}

int mmkv_cas(struct mmkv_view *v, const uint8_t *key, uint64_t klen, const uint8_t *expected, uint64_t elen,
             int has_expected, const uint8_t *val, uint64_t vlen, int has_val, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v, take_lock)))
        return rc;
    struct lookup l;
    rc = lookup_intact(v, key, klen, &l);     /* a damaged value is never compared: recovery first */
    if (rc == 0 || rc == ENOENT) {
        int absent = rc == ENOENT || found_expired(v, &l);
        int same = absent ? !has_expected   /* absent: the same only when absence was expected */
                   : has_expected && found_len(&l) == elen && (!elen || memcmp(found_value(&l), expected, elen) == 0);
        int64_t *counter, value;
        if (!same) {
            rc = ECANCELED;
        } else if (has_val && !absent && l.head.flags & MMKV_REC_COUNTER && vlen == 8) {
            memcpy(&value, val, sizeof value);            /* a counter stays one: updated in place, as incr */
            if (!(rc = counter_value_at(v, &l, klen, &counter)))
                rc = counter_store(v, counter, value);
        } else if (has_val)
            rc = put_locked(v, key, klen, val, vlen, 0, 0);   /* EAGAIN, ENOSPC: nothing changed */
        else if (rc == 0)
            rc = delete_found(v, &l, klen, 0);   /* (an expired record: reclaimed) */
        else
            rc = 0;   /* absent, expected absent, and deleted: nothing to do */
    }
    return end_write(v, rc, take_lock);
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
    int64_t *p, now;
    if (rc == 0 && !(rc = counter_value_at(v, &l, klen, &p))) {   /* updated in place */
        if (__builtin_add_overflow(__atomic_load_n(p, __ATOMIC_ACQUIRE), delta, &now)) {
            rc = ERANGE;
        } else {
            FAILPOINT("incr.before_store");
            *result = now;
            rc = counter_store(v, p, now);
        }
    }
    return end_write(v, rc, take_lock);
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

/* ---------------------------------------------------------------- the sweep */
/*
 * Expired records are invisible at once (every read compares the deadline with the clock); their
 * space comes back when a write meets the key (put, delete, pop, cas) and through the sweep, which
 * walks the index in hash order a few slots at a time, removing the expired records it meets.
 *
 * state.ttl_min lets a reader skip all this: while the clock is below it, nothing has expired.
 * It is lowered by every write of a deadline (sweep_note) and set by the end of a sweep pass to
 * the least deadline the pass saw or a write added (state.sweep_min) -- unless the pass was
 * spoiled: a pass's steps run in separate lock holds, and between them another write may move
 * an entry from ahead of the sweep's place to behind it without it being seen (the backward
 * shift of a deletion in the segment the sweep is in; a split of that segment).  Entries move
 * only inside their segment (or into the halves of a split one, which cover the same hashes),
 * so changes elsewhere cannot hide one.  The sweep's own deletions do not spoil: after one it
 * looks at the same slot again, and a backward shift only moves entries from after the hole to
 * it, or between slots it has seen.  A whole pass in one lock hold (mmkv_sweep with budget 0:
 * len() past ttl_min, db.sweep()) cannot be spoiled and leaves ttl_min exact.
 */

/* The directory entry the position `at` lies in (the directory has 2^bits entries). */
static uint64_t sweep_entry(uint64_t bits, uint64_t at)
{
    uint64_t prefix = (at >> MMKV_SWEEP_SLOT_BITS) & 0xffffffff;
    return bits ? prefix >> (32 - bits) : 0;
}

void sweep_note(struct mmkv_view *v, int64_t deadline)
{
    struct counts_ref c;
    uint64_t d = (uint64_t)deadline;
    if (counts_of(v, &c))
        return;                 /* (the write that called this finds the same fault and fails) */
    if (!*c.ttl_min || d < *c.ttl_min)
        *c.ttl_min = d;
    if (!*c.sweep_min || d < *c.sweep_min)
        *c.sweep_min = d;
}

void sweep_spoil(struct mmkv_view *v, uint64_t seg_off)
{
    struct counts_ref c;
    if (counts_of(v, &c) || !*c.ttl_min || *c.sweep_at & MMKV_SWEEP_POISON)
        return;      /* no record has a deadline (nothing to hide), or spoiled already */
    const uint64_t *dir = directory(v);
    uint64_t d = sweep_entry(v->dir_bits, *c.sweep_at);
    if (!dir || d >> v->dir_bits || dir[d] == seg_off)
        *c.sweep_at |= MMKV_SWEEP_POISON;
}

/* Examine up to budget slots from the sweep's place, removing the expired records (those whose
   deadline is at most now); at the end of the index, end the pass.  The lock held. */
static int sweep_run(struct mmkv_view *v, uint64_t budget, int64_t now, uint64_t *removed)
{
    struct counts_ref c;
    const uint64_t *dir = directory(v);
    if (!dir || counts_of(v, &c))
        return EBADMSG;
    uint64_t bits = v->dir_bits, entries = 1ULL << bits, at = *c.sweep_at & ~(uint64_t)MMKV_SWEEP_POISON;
    uint64_t d = sweep_entry(bits, at), slot = at & SEG_MASK;
    while (budget) {
        if (d >= entries) {   /* the pass is over: what it saw bounds every deadline, unless spoiled */
            if (!(*c.sweep_at & MMKV_SWEEP_POISON))
                *c.ttl_min = *c.sweep_min;
            *c.sweep_min = 0;
            *c.sweep_at = 0;
            return 0;
        }
        struct mmkv_segment *seg = segment_at(v, dir[d]);
        if (!seg)
            return EBADMSG;
        if (slot >= MMKV_SEGMENT_SLOTS) {     /* on to the next segment (its entries are contiguous) */
            uint64_t span = 1ULL << (bits - seg->depth);
            d = (d / span + 1) * span;
            slot = 0;
            continue;
        }
        budget--;
        uint64_t w = __atomic_load_n(&seg_slots(seg)[slot], __ATOMIC_ACQUIRE);
        if (w) {
            struct rec_head h;
            uint64_t off = w & MMKV_SLOT_OFF_MASK;
            const struct mmkv_record *r = record_head_at(v, off, &h);
            if (!r)
                return EBADMSG;
            int64_t deadline = deadline_of(r, &h);
            if (h.flags & MMKV_REC_EXPIRES && deadline <= now) {
                if (h.checksum != record_sum_of(v, r, &h))
                    return EBADMSG;   /* damage, not an expired key: recovery decides, the sweep stops */
                struct lookup l = {.hash = h.key_hash, .seg = dir[d], .slot = slot, .rec_off = off,
                                   .segment = seg, .rec = r, .head = h};
                int rc = delete_found(v, &l, h.key_len, 1);
                if (rc)
                    return rc;
                (*removed)++;
                FAILPOINT("sweep.after_delete");
                continue;     /* the slot may hold an entry shifted back into it: look again */
            }
            if (h.flags & MMKV_REC_EXPIRES && (!*c.sweep_min || (uint64_t)deadline < *c.sweep_min))
                *c.sweep_min = (uint64_t)deadline;
        }
        slot++;
    }
    if (slot >= MMKV_SEGMENT_SLOTS)
        slot = MMKV_SEGMENT_SLOTS - 1;        /* (seen already: looked at once more next time) */
    *c.sweep_at = (*c.sweep_at & MMKV_SWEEP_POISON) | (d << (32 - bits)) << MMKV_SWEEP_SLOT_BITS | slot;
    return 0;
}

void sweep_if_due(struct mmkv_view *v)
{
    struct counts_ref c;
    if (counts_of(v, &c))
        return;
    uint64_t ttl_min = *c.ttl_min, removed = 0;
    if (!ttl_min || ++v->sweep_tick % MMKV_SWEEP_EVERY)
        return;
    int64_t now = clock_now(v);
    if (now >= (int64_t)ttl_min)
        (void)sweep_run(v, MMKV_SWEEP_STEP, now, &removed);   /* best effort: damage is found by reads and check() */
}

int mmkv_note_deadline(struct mmkv_view *v, int64_t deadline)
{
    if (deadline <= 0)
        return EINVAL;
    sweep_note(v, deadline);
    return 0;
}

int mmkv_sweep(struct mmkv_view *v, uint64_t budget, uint64_t *removed, int64_t *next)
{
    struct counts_ref c;
    *removed = 0;
    if (counts_of(v, &c))
        return EBADMSG;
    if (!budget) {                 /* a whole pass from the start, which nothing can spoil */
        *c.sweep_at = 0;
        *c.sweep_min = 0;
        budget = UINT64_MAX;
    }
    int rc = sweep_run(v, budget, clock_now(v), removed);
    *next = (int64_t)*c.ttl_min;
    return rc;
}
