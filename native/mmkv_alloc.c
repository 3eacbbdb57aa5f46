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

#include <signal.h>

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

/* ---------------------------------------------------------------- released space */

static uint64_t page_down(const struct mmkv_view *v, uint64_t off) { return off & ~(v->page_size - 1); }
static uint64_t page_up(const struct mmkv_view *v, uint64_t off) { return page_down(v, off + v->page_size - 1); }

/* The pages of the free block [b, b + size) that may be holes: after its first MMKV_FREE_HOLES_HEAD
   bytes, before the page of its footer.  0 when there is none (too small). */
static int inner_pages(const struct mmkv_view *v, uint64_t b, uint64_t size, uint64_t *lo, uint64_t *hi)
{
    *lo = page_up(v, b + MMKV_FREE_HOLES_HEAD);
    *hi = page_down(v, footer_of(b, size));
    return *lo < *hi;
}

/* What a free block says of its released pages: from `at` on they may be holes (0: none), and
   about `unreleased` bytes of it were freed or backed since its pages were last released. */
struct holes {
    uint64_t at, unreleased;
};

static struct holes holes_of(const struct mmkv_view *v, uint64_t b, uint64_t head)
{
    struct holes h = {0, 0};
    if (head & MMKV_BLOCK_HOLES) {
        h.at = *word(v, b + MMKV_FREE_HOLES_AT);
        h.unreleased = *word(v, b + MMKV_FREE_UNRELEASED);
    }
    return h;
}

/* Bytes of the free block b (size bytes, header head) freed into it and not released since.  A
   block without holes counts whole when small (freed records); one of release_min bytes or more
   without holes is the space a growth added, kept backed for the allocations to come: 0. */
static uint64_t unreleased_of(const struct mmkv_view *v, uint64_t b, uint64_t head, uint64_t size)
{
    if (head & MMKV_BLOCK_HOLES)
        return *word(v, b + MMKV_FREE_UNRELEASED);
    return size < v->release_min ? size : 0;
}

/* The header of a free block [b, b + size) with holes h (h.at 0: none): the flag and the words
   after the links are written only when inner pages exist to be holes. */
static uint64_t free_header(const struct mmkv_view *v, uint64_t b, uint64_t size, uint64_t bits, struct holes h)
{
    uint64_t lo, hi;
    bits &= MMKV_BLOCK_PREV_ALLOC;
    if (h.at && inner_pages(v, b, size, &lo, &hi) && h.at < hi) {
        *word(v, b + MMKV_FREE_HOLES_AT) = h.at < lo ? lo : h.at;
        *word(v, b + MMKV_FREE_UNRELEASED) = h.unreleased < size ? h.unreleased : size;
        bits |= MMKV_BLOCK_HOLES;
    }
    return size | bits;
}

static const struct holes no_holes = {0, 0};

/* A compaction is running: the state names a process that is alive (or that this process may not
   signal).  Its walk fills the space it frees, so a release now would only be backed again; and a
   punch takes the file's page-cache lock while it waits for writeback, stalling every process's
   page faults behind the compaction's writes (measured: gets of 125-325 ms).  A crashed
   compaction's pid, once no process has it, counts as none. */
static int compaction_running(const struct mmkv_state *st)
{
    return mmkv_pid_alive(__atomic_load_n(&st->compacting_pid, __ATOMIC_RELAXED));
}

/* 0, or a pid beyond pid_t's range, names no process. */
int mmkv_pid_alive(uint64_t pid)
{
    if (pid == 0 || pid > (uint64_t)INT32_MAX)
        return 0;
    int saved = errno, alive = kill((pid_t)pid, 0) == 0 || errno == EPERM;
    errno = saved;
    return alive;
}

/* Make [b, b + size) one free block at the head of its list (its neighbours are in use), with
   holes h. */
static int make_free(const struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t size, uint64_t prev_alloc,
                     struct holes h)
{
    unsigned c = size_class(size);
    uint64_t head = st->free_heads[c], hs;
    if (head && (!member_ok(v, head, c, &hs) || *word(v, prev_link(head)) || (head < b + size && b < head + hs)))
        return EBADMSG;
    *word(v, b) = free_header(v, b, size, prev_alloc, h);
    *word(v, footer_of(b, size)) = size;
    *word(v, next_link(b)) = head;
    *word(v, prev_link(b)) = 0;
    if (head)
        *word(v, prev_link(head)) = b;
    st->free_heads[c] = b;
    st->free_bitmap |= 1ULL << c;
    return 0;
}

/* The free block b (bsize bytes, header head) has holes where carving size bytes from its start
   would write: the carved bytes, or the rest's header, links and words after them. */
static int needs_back(const struct mmkv_view *v, uint64_t b, uint64_t head, uint64_t bsize, uint64_t size)
{
    uint64_t at = holes_of(v, b, head).at;
    uint64_t end = bsize - size < MMKV_BLOCK_MIN ? b + bsize : b + size + MMKV_FREE_HOLES_HEAD;
    return at && end > at;
}

/* Mark [b, b + size) in use out of the unlinked free block [b, b + bsize) with holes h (the caller
   checked that the carved bytes and the rest's head lie below h.at). */
static int carve(const struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t bsize, uint64_t size,
                 uint64_t prev_alloc, struct holes h)
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
    {
        struct holes rest = {h.at, h.unreleased > size ? h.unreleased - size : 0};
        rc = make_free(v, st, b + size, bsize - size, MMKV_BLOCK_PREV_ALLOC, rest);
    }
    st->used_bytes += size;
    st->free_bytes -= size;
    return rc;
}

/* Carve a page-aligned block of size bytes out of the checked member b (bsize bytes) if it
   fits: 0, or ENOSPC (nothing changed). */
static int take_aligned(struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t bsize, uint64_t size,
                        uint64_t *out)
{
    uint64_t page = v->page_size;
    uint64_t start = block_of((payload_of(b) + page - 1) & ~(page - 1)); /* payload on a page boundary */
    if (start > b && start - b < MMKV_BLOCK_MIN)
        start += page;
    if (start - b > bsize || size > bsize - (start - b))
        return ENOSPC;
    uint64_t lead = start - b, head = *word(v, b), prev_alloc = head & MMKV_BLOCK_PREV_ALLOC;
    struct holes h = holes_of(v, b, head);
    if (needs_back(v, b, head, bsize, lead + size)) {
        v->holes_block = b;
        return MMKV_ENEEDBACK;
    }
    int rc = unlink_free(v, st, b, bsize);
    if (rc)
        return rc;
    if (lead) {
        if ((rc = make_free(v, st, b, lead, prev_alloc, no_holes)))   /* below h.at: backed */
            return rc;
        prev_alloc = 0;
    }
    *out = start;
    return carve(v, st, start, bsize - lead, size, prev_alloc, h);
}

static int alloc_large(struct mmkv_view *v, struct mmkv_state *st, uint64_t size, uint64_t *out)
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
    uint64_t head = *word(v, b);
    if (needs_back(v, b, head, bsize, size)) {
        v->holes_block = b;
        return MMKV_ENEEDBACK;
    }
    if ((rc = unlink_free(v, st, b, bsize)))
        return rc;
    FAILPOINT("alloc.mid");                  /* unlinked, not yet marked in use */
    *out = b;
    return carve(v, st, b, bsize, size, head & MMKV_BLOCK_PREV_ALLOC, holes_of(v, b, head));
}

static int release_free_block(const struct mmkv_view *v, uint64_t b, uint64_t size, uint64_t from, uint64_t to,
                              uint64_t *released);

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
    struct holes h = {0, size};
    if (nsize) {
        struct holes nh = holes_of(v, nxt, nhead);
        h.at = nh.at;
        h.unreleased += unreleased_of(v, nxt, nhead, nsize);
        if ((rc = unlink_free(v, st, nxt, nsize)))
            return rc;
        size += nsize;
        FAILPOINT("free.mid");               /* a neighbour unlinked, the block not yet listed */
    }
    if (!prev_alloc) {
        uint64_t phead = *word(v, p);
        prev_alloc = phead & MMKV_BLOCK_PREV_ALLOC;
        if (phead & MMKV_BLOCK_HOLES)
            h.at = holes_of(v, p, phead).at;   /* the lower one: p lies before nxt */
        h.unreleased += unreleased_of(v, p, phead, psize);
        if ((rc = unlink_free(v, st, p, psize)))
            return rc;
        b = p;
        size += psize;
    }
    if ((rc = make_free(v, st, b, size, prev_alloc, h)))
        return rc;
    *word(v, b + size) &= ~(uint64_t)MMKV_BLOCK_PREV_ALLOC;
    st->used_bytes -= freed;
    st->free_bytes += freed;
    /* a free block of at least release_min bytes gives its inner pages back once release_min
       bytes have been freed into it since it last did: a punch per that many bytes freed */
    if (v->release_min && size >= v->release_min && h.unreleased >= v->release_min && !compaction_running(st)) {
        uint64_t released;
        release_free_block(v, b, size, 0, UINT64_MAX, &released);   /* a failed punch leaves them backed */
    }
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


/* ---------------------------------------------------------------- released space (see mmkv_layout.h) */

/* Give back the inner pages of the free block [b, b + size) that lie in [from, to): first the
   header says they may be holes (a crash after it only costs a later fallocate), then the punch.
   *released: bytes punched. */
static int release_free_block(const struct mmkv_view *v, uint64_t b, uint64_t size, uint64_t from, uint64_t to,
                              uint64_t *released)
{
    uint64_t lo, hi, head = *word(v, b);
    *released = 0;
    if (v->fd < 0 || !inner_pages(v, b, size, &lo, &hi))
        return 0;
    uint64_t start = page_up(v, from) > lo ? page_up(v, from) : lo, end = page_down(v, to) < hi ? page_down(v, to) : hi;
    if (start >= end)
        return 0;
    struct holes h = holes_of(v, b, head);
    h.at = h.at && h.at < lo ? h.at : lo;
    h.unreleased = 0;
    *word(v, b) = free_header(v, b, size, head, h);
    FAILPOINT("release.before_punch");
    int rc = mmkv_punch((int)v->fd, start, end - start);
    FAILPOINT("release.after_punch");
    if (!rc)
        *released = end - start;
    return rc;
}

/* b is a free block (any list): its size goes to *size. */
static int free_block_at(const struct mmkv_view *v, uint64_t b, uint64_t *size)
{
    if (!heap_ok(v) || !block_ok(v, b))
        return 0;
    uint64_t head = *word(v, b), s = head & SIZE_MASK;
    if (head & MMKV_BLOCK_ALLOC || !size_ok(v, b, s) || *word(v, footer_of(b, s)) != s)
        return 0;
    *size = s;
    return 1;
}

int mmkv_release_block(struct mmkv_view *v, uint64_t b, uint64_t from, uint64_t len, uint64_t *released)
{
    uint64_t size;
    *released = 0;
    if (!free_block_at(v, b, &size))
        return EBADMSG;
    return release_free_block(v, b, size, from, len > UINT64_MAX - from ? UINT64_MAX : from + len, released);
}

int mmkv_holes_span(struct mmkv_view *v, uint64_t b, uint64_t *holes_at, uint64_t *holes_end)
{
    uint64_t size, lo, hi;
    if (!free_block_at(v, b, &size))
        return EBADMSG;
    uint64_t at = holes_of(v, b, *word(v, b)).at;
    if (!at)
        return EINVAL;
    if (!inner_pages(v, b, size, &lo, &hi) || at < lo || at >= hi || at & (v->page_size - 1))
        return EBADMSG;
    *holes_at = at;
    *holes_end = hi;
    return 0;
}

int mmkv_holes_backed(struct mmkv_view *v, uint64_t b, uint64_t backed_to)
{
    uint64_t at, end, size;
    int rc = mmkv_holes_span(v, b, &at, &end);
    if (rc)
        return rc;
    if (backed_to <= at || backed_to & (v->page_size - 1))
        return EINVAL;
    free_block_at(v, b, &size);
    uint64_t head = *word(v, b);
    struct holes h = holes_of(v, b, head);
    h.unreleased += backed_to - at;
    h.at = backed_to;
    *word(v, b) = backed_to >= end ? head & ~(uint64_t)MMKV_BLOCK_HOLES : free_header(v, b, size, head, h);
    return 0;
}

int mmkv_holes_mark(struct mmkv_view *v, uint64_t b)
{
    uint64_t size, lo, hi;
    if (!free_block_at(v, b, &size))
        return EBADMSG;
    if (inner_pages(v, b, size, &lo, &hi)) {
        struct holes h = {lo, size};
        *word(v, b) = free_header(v, b, size, *word(v, b), h);
    }
    return 0;
}

/* ---------------------------------------------------------------- compaction */

/* b starts a free block on its list, reached from its back link (or the list head): a stale
   offset from an earlier walk, now inside another block, fails here before anything is written.
   Its header goes to *head and its size to *bsize. */
static int listed_free(const struct mmkv_view *v, uint64_t b, uint64_t *head, uint64_t *bsize)
{
    uint64_t s;
    if (!block_ok(v, b) || (*head = *word(v, b)) & MMKV_BLOCK_ALLOC)
        return 0;
    unsigned c = size_class(*head & SIZE_MASK);
    if (!member_ok(v, b, c, bsize))
        return 0;
    uint64_t prv = *word(v, prev_link(b));
    return prv ? member_ok(v, prv, c, &s) && *word(v, next_link(prv)) == b : state_of(v)->free_heads[c] == b;
}

int mmkv_alloc_at(struct mmkv_view *v, uint64_t b, uint64_t payload, uint64_t *out)
{
    if (!heap_ok(v) || payload > (1ULL << 48))
        return EINVAL;
    struct mmkv_state *st = state_of(v);
    uint64_t size = block_size_for(payload), bsize, head;
    if (!listed_free(v, b, &head, &bsize))
        return ENOENT;
    if (bsize < size)
        return ENOSPC;
    if (needs_back(v, b, head, bsize, size)) {
        v->holes_block = b;
        return MMKV_ENEEDBACK;
    }
    int rc = unlink_free(v, st, b, bsize);
    if (rc)
        return rc;
    *out = b;
    return carve(v, st, b, bsize, size, head & MMKV_BLOCK_PREV_ALLOC, holes_of(v, b, head));
}

int mmkv_is_free_block(struct mmkv_view *v, uint64_t b)
{
    uint64_t head, bsize;
    return heap_ok(v) && listed_free(v, b, &head, &bsize) ? 0 : ENOENT;
}

int mmkv_heap_tail(struct mmkv_view *v, uint64_t *start)
{
    if (!heap_ok(v))
        return EINVAL;
    uint64_t end = v->heap_end, ep = *word(v, end);
    *start = end;
    if (ep & MMKV_BLOCK_PREV_ALLOC || end == MMKV_HEAP_START)
        return 0;   /* the last block is in use: no free tail */
    uint64_t size = *word(v, footer_before(end)), s;
    if (size < MMKV_BLOCK_MIN || size & ALIGN_MASK || size > end - MMKV_HEAP_START ||
        !member_ok(v, end - size, size_class(size), &s))
        return EBADMSG;
    *start = end - size;
    return 0;
}

int mmkv_heap_shrink(struct mmkv_view *v, uint64_t new_end)
{
    uint64_t start;
    int rc = mmkv_heap_tail(v, &start);
    if (rc)
        return rc;
    uint64_t end = v->heap_end;
    if (new_end > end || new_end < start || (new_end > start && new_end - start < MMKV_BLOCK_MIN) ||
        (new_end - MMKV_HEAP_START) & ALIGN_MASK)
        return EINVAL;
    if (new_end == end)
        return 0;
    struct mmkv_state *st = state_of(v);
    uint64_t head = *word(v, start), prev_alloc = head & MMKV_BLOCK_PREV_ALLOC;
    if ((rc = unlink_free(v, st, start, end - start)))
        return rc;
    FAILPOINT("shrink.mid");                 /* the tail unlinked, the epilogue not yet moved */
    *word(v, new_end) = MMKV_BLOCK_ALLOC | (new_end > start ? 0 : prev_alloc);
    st->free_bytes -= end - new_end;
    v->heap_end = new_end;
    if (new_end > start)
        return make_free(v, st, start, new_end - start, prev_alloc, holes_of(v, start, head));
    return 0;
}
