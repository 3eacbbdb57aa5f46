/*
 * mmkv native shim: the free-list allocator's hot paths.  mmkv_layout.h
 * declares the blocks and their invariants, mmkv_internal.h holds the only
 * arithmetic on their parts, and mmkv/engine/allocator.py documents the design
 * and keeps the rare paths: formatting, growth, rebuild and audit.  Every
 * offset and size read from the file is checked; a bad one gives EBADMSG and
 * the Python side runs recovery, which rebuilds the lists from the index.
 *
 * The lists are followed, never trusted.  Before a listed block is handed out
 * or written through, it must be a member of its list (member_ok): a block in
 * the heap, free, of a size that fits the heap and belongs to the list's
 * class, with a footer equal to that size, followed by a block in use (free
 * neighbours are always merged) whose PREV_ALLOC bit is clear; and its back
 * link must name the block it was reached from (0 for a head).  So a damaged
 * link into a live record, into the header page or into another list is found
 * before anything is written, and so is a cycle: a block reached a second time
 * has a back link that disagrees.  Every walk is also bounded by the number of
 * blocks the heap can hold.  Checks come before changes where one call makes
 * several, so that a detected error mostly leaves the heap as it was; where it
 * cannot (a second unlink), recovery rebuilds the lists anyway.
 */
#define _GNU_SOURCE
#include "mmkv_internal.h"

static unsigned size_class(uint64_t size)
{
    if (size <= MMKV_EXACT_MAX)
        return (unsigned)((size - MMKV_BLOCK_MIN) >> 4);
    unsigned c = MMKV_EXACT_CLASSES + (unsigned)(64 - __builtin_clzll(size - 1)) - 10;
    return c < MMKV_NCLASSES ? c : MMKV_NCLASSES - 1;
}

int mmkv_size_class(uint64_t size, uint32_t *cls)
{
    if (size < MMKV_BLOCK_MIN || size & ALIGN_MASK)
        return EINVAL;
    *cls = size_class(size);
    return 0;
}

static int heap_ok(const struct mmkv_view *v)
{
    return v->size >= MMKV_HEADER_SIZE && v->heap_end >= MMKV_HEAP_START && v->heap_end <= epilogue_of(v->size) &&
           ((v->heap_end - MMKV_HEAP_START) & ALIGN_MASK) == 0;
}

static int block_ok(const struct mmkv_view *v, uint64_t b)
{
    return b >= MMKV_HEAP_START && b < v->heap_end && ((b - MMKV_HEAP_START) & ALIGN_MASK) == 0;
}

static int size_ok(const struct mmkv_view *v, uint64_t b, uint64_t size)
{
    return size >= MMKV_BLOCK_MIN && !(size & ALIGN_MASK) && size <= v->heap_end - b;
}

/* More steps than any walk of the free lists can take: every block holds MMKV_BLOCK_MIN bytes. */
static uint64_t walk_limit(const struct mmkv_view *v)
{
    return (v->heap_end - MMKV_HEAP_START) / MMKV_BLOCK_MIN + 1;
}

/* b may be on free list c (see above); its size goes to *size. */
static int member_ok(const struct mmkv_view *v, uint64_t b, unsigned c, uint64_t *size)
{
    if (!block_ok(v, b))
        return 0;
    uint64_t head = *word(v, b), s = head & SIZE_MASK;
    if (head & MMKV_BLOCK_ALLOC || !size_ok(v, b, s) || size_class(s) != c || *word(v, footer_of(b, s)) != s)
        return 0;
    if ((*word(v, b + s) & (MMKV_BLOCK_ALLOC | MMKV_BLOCK_PREV_ALLOC)) != MMKV_BLOCK_ALLOC)
        return 0;
    *size = s;
    return 1;
}

/* The head of list c, checked (0 for an empty list, whose bitmap bit is then cleared). */
static int list_head(const struct mmkv_view *v, struct mmkv_state *st, unsigned c, uint64_t *b, uint64_t *size)
{
    *b = st->free_heads[c];
    if (!*b) {
        st->free_bitmap &= ~(1ULL << c); /* the bitmap is a cache of "non-empty": a stale bit is dropped */
        return 0;
    }
    return member_ok(v, *b, c, size) && *word(v, prev_link(*b)) == 0 ? 0 : EBADMSG;
}

/* The first block of at least `want` bytes among the first `limit` members of list c, or 0. */
static int first_fit(const struct mmkv_view *v, struct mmkv_state *st, unsigned c, uint64_t want, uint64_t limit,
                     uint64_t *found, uint64_t *found_size)
{
    uint64_t b, s, prev = 0, max = walk_limit(v);
    int rc = list_head(v, st, c, &b, &s);
    *found = 0;
    for (uint64_t steps = 0; !rc && b && steps < limit; steps++) {
        if (steps >= max)
            return EBADMSG; /* more members than blocks: a cycle */
        if (steps && (!member_ok(v, b, c, &s) || *word(v, prev_link(b)) != prev))
            return EBADMSG;
        if (s >= want) {
            *found = b;
            *found_size = s;
            return 0;
        }
        prev = b;
        b = *word(v, next_link(b));
    }
    return rc;
}

/* Take b (size bytes, a member its caller checked) off its list, after checking both its neighbours. */
static int unlink_free(const struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t size)
{
    unsigned c = size_class(size);
    uint64_t s, nxt = *word(v, next_link(b)), prv = *word(v, prev_link(b));
    if (nxt && (nxt == b || !member_ok(v, nxt, c, &s) || *word(v, prev_link(nxt)) != b))
        return EBADMSG;
    if (prv ? prv == b || !member_ok(v, prv, c, &s) || *word(v, next_link(prv)) != b : st->free_heads[c] != b)
        return EBADMSG;
    if (prv)
        *word(v, next_link(prv)) = nxt;
    else
        st->free_heads[c] = nxt;
    if (nxt)
        *word(v, prev_link(nxt)) = prv;
    if (!st->free_heads[c])
        st->free_bitmap &= ~(1ULL << c);
    return 0;
}

/* Make [b, b + size) one free block at the head of its list (its neighbours are in use). */
static int make_free(const struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t size, uint64_t prev_alloc)
{
    unsigned c = size_class(size);
    uint64_t head = st->free_heads[c], hs;
    if (head && (!member_ok(v, head, c, &hs) || *word(v, prev_link(head)) || (head < b + size && b < head + hs)))
        return EBADMSG;
    *word(v, b) = size | prev_alloc;
    *word(v, footer_of(b, size)) = size;
    *word(v, next_link(b)) = head;
    *word(v, prev_link(b)) = 0;
    if (head)
        *word(v, prev_link(head)) = b;
    st->free_heads[c] = b;
    st->free_bitmap |= 1ULL << c;
    return 0;
}

/* Mark [b, b + size) in use out of the unlinked free block [b, b + bsize). */
static int carve(const struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t bsize, uint64_t size,
                 uint64_t prev_alloc)
{
    int rc = 0;
    if (bsize - size < MMKV_BLOCK_MIN) {
        size = bsize;
        *word(v, b + size) |= MMKV_BLOCK_PREV_ALLOC;
    }
    /* b's header first: a lead block carved off before b (take_aligned) may head the list the
       rest goes to, and as a member it must be followed by a block in use */
    *word(v, b) = size | MMKV_BLOCK_ALLOC | prev_alloc;
    if (size < bsize)
        rc = make_free(v, st, b + size, bsize - size, MMKV_BLOCK_PREV_ALLOC);
    st->used_bytes += size;
    st->free_bytes -= size;
    return rc;
}

/* Carve a page-aligned block of size bytes out of the checked member b (bsize bytes) if it
   fits: 0, or ENOSPC (nothing changed). */
static int take_aligned(const struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t bsize, uint64_t size,
                        uint64_t *out)
{
    uint64_t page = v->page_size;
    uint64_t start = block_of((payload_of(b) + page - 1) & ~(page - 1)); /* payload on a page boundary */
    if (start > b && start - b < MMKV_BLOCK_MIN)
        start += page;
    if (start - b > bsize || size > bsize - (start - b))
        return ENOSPC;
    uint64_t lead = start - b, prev_alloc = *word(v, b) & MMKV_BLOCK_PREV_ALLOC;
    int rc = unlink_free(v, st, b, bsize);
    if (rc)
        return rc;
    if (lead) {
        if ((rc = make_free(v, st, b, lead, prev_alloc)))
            return rc;
        prev_alloc = 0;
    }
    *out = start;
    return carve(v, st, start, bsize - lead, size, prev_alloc);
}

static int alloc_large(const struct mmkv_view *v, struct mmkv_state *st, uint64_t size, uint64_t *out)
{
    uint64_t page = v->page_size, b, s;
    if (!page || (page & (page - 1)) || page % MMKV_BLOCK_ALIGN)
        return EINVAL;
    size = (size + page - 1) & ~(page - 1);
    /* any block of a class above that of size + page + MIN fits whatever its alignment: O(1) */
    unsigned sure = size_class(size + page + MMKV_BLOCK_MIN) + 1, c;
    for (c = sure; c < MMKV_NCLASSES; c++) {
        if (!(st->free_bitmap >> c & 1))
            continue;
        int rc = list_head(v, st, c, &b, &s);
        if (rc || (b && (rc = take_aligned(v, st, b, s, size, out)) != ENOSPC))
            return rc;
    }
    /* below that, first fit over a bounded number of blocks, then (before the caller grows
       the file: rare) over all of them, so that free space that fits is never passed over */
    uint64_t limits[2] = {4 * v->fit_scan, walk_limit(v)};
    for (int pass = 0; pass < 2; pass++) {
        uint64_t scanned = 0;
        for (c = size_class(size); c < sure && c < MMKV_NCLASSES; c++) {
            if (!(st->free_bitmap >> c & 1))
                continue;
            uint64_t prev = 0;
            int rc = list_head(v, st, c, &b, &s);
            for (; !rc && b && scanned < limits[pass]; scanned++) {
                if (prev && (!member_ok(v, b, c, &s) || *word(v, prev_link(b)) != prev))
                    return EBADMSG;
                if ((rc = take_aligned(v, st, b, s, size, out)) != ENOSPC)
                    return rc;
                rc = 0;
                prev = b;
                b = *word(v, next_link(b));
            }
            if (rc)
                return rc;
        }
        if (scanned < limits[pass])
            return ENOSPC; /* this pass saw every block */
    }
    return EBADMSG; /* more listed blocks than the heap holds: a cycle */
}

int mmkv_alloc(struct mmkv_view *v, uint64_t payload, uint64_t *out)
{
    if (!heap_ok(v) || payload > (1ULL << 48))
        return EINVAL;
    struct mmkv_state *st = state_of(v);
    uint64_t size = block_size_for(payload), b = 0, bsize = 0;
    if (size >= v->large_block)
        return alloc_large(v, st, size, out);
    unsigned c = size_class(size);
    int rc = 0;
    /* an exact class: its head fits; a range class: first fit among its first fit_scan blocks */
    if (st->free_bitmap >> c & 1)
        rc = first_fit(v, st, c, size, c < MMKV_EXACT_CLASSES ? 1 : v->fit_scan, &b, &bsize);
    /* else the head of the next non-empty class up */
    uint64_t higher = c + 1 < MMKV_NCLASSES ? st->free_bitmap >> (c + 1) << (c + 1) : 0;
    while (!rc && !b && higher) {
        unsigned h = (unsigned)__builtin_ctzll(higher);
        higher &= higher - 1;
        rc = list_head(v, st, h, &b, &bsize);
    }
    /* nothing larger: before the caller grows the file (rare), fit anywhere in the list */
    if (!rc && !b && c >= MMKV_EXACT_CLASSES && st->free_bitmap >> c & 1)
        rc = first_fit(v, st, c, size, UINT64_MAX, &b, &bsize);
    if (rc)
        return rc;
    if (!b)
        return ENOSPC;
    if (bsize < size)
        return EBADMSG;
    if ((rc = unlink_free(v, st, b, bsize)))
        return rc;
    FAILPOINT("alloc.mid");                  /* unlinked, not yet marked in use */
    *out = b;
    return carve(v, st, b, bsize, size, *word(v, b) & MMKV_BLOCK_PREV_ALLOC);
}

int mmkv_free(struct mmkv_view *v, uint64_t b)
{
    if (!heap_ok(v))
        return EINVAL;
    struct mmkv_state *st = state_of(v);
    if (!block_ok(v, b))
        return EBADMSG;
    uint64_t head = *word(v, b), size = head & SIZE_MASK;
    if (!(head & MMKV_BLOCK_ALLOC) || !size_ok(v, b, size))
        return EBADMSG; /* a double free or a damaged header */
    /* check both neighbours before changing anything, so a detected error leaves the heap as it
       was: the block after b knows b is in use, and is a plausible block or a list member */
    uint64_t nxt = b + size, nhead = *word(v, nxt), nsize = 0;
    if (!(nhead & MMKV_BLOCK_PREV_ALLOC))
        return EBADMSG;
    if (!(nhead & MMKV_BLOCK_ALLOC)) {
        if (!member_ok(v, nxt, size_class(nhead & SIZE_MASK), &nsize))
            return EBADMSG;
    } else if (nxt != v->heap_end && !size_ok(v, nxt, nhead & SIZE_MASK)) {
        return EBADMSG;
    }
    uint64_t prev_alloc = head & MMKV_BLOCK_PREV_ALLOC, p = 0, psize = 0;
    if (!prev_alloc) {
        psize = *word(v, footer_before(b));
        if (psize > b - MMKV_HEAP_START || psize < MMKV_BLOCK_MIN || psize & ALIGN_MASK)
            return EBADMSG;
        p = b - psize;
        uint64_t s;
        if (!member_ok(v, p, size_class(psize), &s) || s != psize)
            return EBADMSG;
    }
    int rc;
    uint64_t freed = size;
    if (nsize) {
        if ((rc = unlink_free(v, st, nxt, nsize)))
            return rc;
        size += nsize;
        FAILPOINT("free.mid");               /* a neighbour unlinked, the block not yet listed */
    }
    if (!prev_alloc) {
        prev_alloc = *word(v, p) & MMKV_BLOCK_PREV_ALLOC;
        if ((rc = unlink_free(v, st, p, psize)))
            return rc;
        b = p;
        size += psize;
    }
    if ((rc = make_free(v, st, b, size, prev_alloc)))
        return rc;
    *word(v, b + size) &= ~(uint64_t)MMKV_BLOCK_PREV_ALLOC;
    st->used_bytes -= freed;
    st->free_bytes += freed;
    return 0;
}

/* The largest block an allocation of payload bytes at b can be: its size class rounding, pages
   when the payload is page-aligned (the large-block path, whatever threshold was in force), an
   unsplit remainder and a gap recovery added (each under MMKV_BLOCK_MIN). */
static uint64_t most_for(const struct mmkv_view *v, uint64_t b, uint64_t payload)
{
    uint64_t size = block_size_for(payload), page = v->page_size;
    if (page && !(page & (page - 1)) && !(payload_of(b) & (page - 1)))
        size = (size + page - 1) & ~(page - 1);
    return size + 2 * (MMKV_BLOCK_MIN - MMKV_BLOCK_ALIGN);
}

int mmkv_alloc_bound(struct mmkv_view *v, uint64_t b, uint64_t payload, uint64_t *most)
{
    if (payload > (1ULL << 48))
        return EINVAL;
    *most = most_for(v, b, payload);
    return 0;
}

int mmkv_free_fitting(struct mmkv_view *v, uint64_t b, uint64_t payload)
{
    if (!heap_ok(v) || payload > (1ULL << 48))
        return EINVAL;
    if (!block_ok(v, b) || (*word(v, b) & SIZE_MASK) > most_for(v, b, payload))
        return EBADMSG; /* a header claiming more than was allocated would free its neighbours */
    return mmkv_free(v, b);
}

