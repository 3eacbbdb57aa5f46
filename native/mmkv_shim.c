/*
 * mmkv native shim: see mmkv_shim.h.  Mechanisms only; the Python engine
 * decides what to lock, when to sync and where to allocate.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <semaphore.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "mmkv_layout.h"
#include "mmkv_shim.h"

_Static_assert(sizeof(pthread_mutex_t) <= MMKV_MUTEX_BYTES, "mutex does not fit its area");
_Static_assert(sizeof(sem_t) <= MMKV_SEM_BYTES, "sem_t does not fit its area");
_Static_assert(sizeof(struct mmkv_locks) == MMKV_MUTEX_BYTES + MMKV_NSEMS * MMKV_SEM_BYTES, "lock area");
_Static_assert(sizeof(struct mmkv_identity) <= MMKV_OFF_META0 - MMKV_OFF_IDENTITY, "identity sector");
_Static_assert(sizeof(struct mmkv_meta) <= MMKV_OFF_META1 - MMKV_OFF_META0, "meta sector");
_Static_assert(sizeof(struct mmkv_state) <= MMKV_OFF_LOCKS - MMKV_OFF_STATE, "state sectors");
_Static_assert(MMKV_OFF_LOCKS + sizeof(struct mmkv_locks) <= MMKV_HEADER_SIZE, "header page");
_Static_assert(sizeof(((struct mmkv_state *)0)->free_heads) == 8 * MMKV_NCLASSES, "classes");
_Static_assert(sizeof(struct mmkv_record) == 32, "record header");
_Static_assert(MMKV_HEAP_START == MMKV_HEADER_SIZE + 8, "heap start");
_Static_assert((MMKV_SEGMENT_SLOTS & (MMKV_SEGMENT_SLOTS - 1)) == 0 && MMKV_SEGMENT_SLOTS <= 65536, "segment size");
_Static_assert(MMKV_TAG_SHIFT + 16 <= 64 - MMKV_DIR_MAX_BITS, "tag bits overlap directory bits");
_Static_assert((1 << MMKV_TAG_SHIFT) >= MMKV_SEGMENT_SLOTS, "tag bits overlap slot bits");
_Static_assert(MMKV_EXACT_CLASSES == (MMKV_EXACT_MAX - MMKV_BLOCK_MIN) / 16 + 1, "exact classes");
_Static_assert(MMKV_OFF_STATE % 64 == 0 && MMKV_OFF_LOCKS % 64 == 0, "alignment");

#define REC_HDR ((uint64_t)sizeof(struct mmkv_record))
#define PAD8(n) (((n) + 7) & ~(uint64_t)7)
/* Keys for the record checksum, distinct from the key-hash keys. */
#define SUM_K0 0x6d6d6b762d726563ULL /* "mmkv-rec" */
#define SUM_K1 0x636865636b73756dULL /* "checksum" */

/* ---------------------------------------------------------------- failpoints */

static int fp_armed;
static char fp_name[64];
static int64_t fp_countdown;

int mmkv_failpoint_set(const char *name, int64_t countdown)
{
    if (!name || !name[0] || countdown < 1) {
        fp_armed = 0;
        return 0;
    }
    if (strlen(name) >= sizeof fp_name)
        return EINVAL;
    strcpy(fp_name, name);
    fp_countdown = countdown;
    fp_armed = 1;
    return 0;
}

int mmkv_failpoint_hit(const char *name)
{
    if (fp_armed && strcmp(name, fp_name) == 0 && --fp_countdown == 0)
        kill(getpid(), SIGKILL);
    return 0;
}

#define FAILPOINT(name)                                                                            \
    do {                                                                                           \
        if (__builtin_expect(fp_armed, 0))                                                         \
            mmkv_failpoint_hit(name);                                                              \
    } while (0)

/* ---------------------------------------------------------------- time */

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Timeouts longer than this (about 146 years) mean "wait forever". */
#define FOREVER_NS ((int64_t)1 << 62)

static struct timespec deadline(clockid_t clock, int64_t timeout_ns)
{
    int64_t t = now_ns(clock) + timeout_ns; /* no overflow: callers cap timeout_ns at FOREVER_NS */
    struct timespec ts = {.tv_sec = t / 1000000000, .tv_nsec = t % 1000000000};
    return ts;
}

/* ---------------------------------------------------------------- mutex */

int mmkv_mutex_init(void *mutex)
{
    pthread_mutexattr_t attr;
    int rc = pthread_mutexattr_init(&attr);
    if (rc)
        return rc;
    rc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
    if (!rc)
        rc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
    if (!rc) {
        memset(mutex, 0, MMKV_MUTEX_BYTES);
        rc = pthread_mutex_init((pthread_mutex_t *)mutex, &attr);
    }
    pthread_mutexattr_destroy(&attr);
    return rc;
}

int mmkv_mutex_lock(void *mutex, int64_t timeout_ns)
{
    if (timeout_ns < 0 || timeout_ns >= FOREVER_NS)
        return pthread_mutex_lock((pthread_mutex_t *)mutex);
    struct timespec ts = deadline(CLOCK_MONOTONIC, timeout_ns);
    return pthread_mutex_clocklock((pthread_mutex_t *)mutex, CLOCK_MONOTONIC, &ts);
}

int mmkv_mutex_trylock(void *mutex) { return pthread_mutex_trylock((pthread_mutex_t *)mutex); }
int mmkv_mutex_unlock(void *mutex) { return pthread_mutex_unlock((pthread_mutex_t *)mutex); }
int mmkv_mutex_consistent(void *mutex) { return pthread_mutex_consistent((pthread_mutex_t *)mutex); }

/* ---------------------------------------------------------------- semaphores */

int mmkv_sem_init(void *sem, uint32_t value)
{
    memset(sem, 0, MMKV_SEM_BYTES);
    return sem_init((sem_t *)sem, 1, value) ? errno : 0;
}

int mmkv_sem_wait(void *sem) { return sem_wait((sem_t *)sem) ? errno : 0; }

int mmkv_sem_timedwait(void *sem, int64_t timeout_ns)
{
    if (timeout_ns < 0)
        timeout_ns = 0;
    if (timeout_ns >= FOREVER_NS)
        return mmkv_sem_wait(sem);
    struct timespec ts = deadline(CLOCK_MONOTONIC, timeout_ns);
    return sem_clockwait((sem_t *)sem, CLOCK_MONOTONIC, &ts) ? errno : 0;
}

int mmkv_sem_trywait(void *sem) { return sem_trywait((sem_t *)sem) ? errno : 0; }
int mmkv_sem_post(void *sem) { return sem_post((sem_t *)sem) ? errno : 0; }

int mmkv_sem_value(void *sem, int32_t *value)
{
    int v = 0;
    if (sem_getvalue((sem_t *)sem, &v))
        return errno;
    *value = v;
    return 0;
}

/* ---------------------------------------------------------------- memory and file */

static int range_ok(uint64_t size, uint64_t off, uint64_t len)
{
    return off <= size && len <= size - off;
}

static int page_range(uint64_t size, uint64_t *off, uint64_t *len)
{
    uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
    if (!range_ok(size, *off, *len))
        return EINVAL;
    uint64_t start = *off & ~(page - 1);
    *len += *off - start;
    *off = start;
    return 0;
}

int mmkv_msync(uint8_t *base, uint64_t size, uint64_t off, uint64_t len, int flags)
{
    int how = flags == MMKV_SYNC_ASYNC ? MS_ASYNC : MS_SYNC;
    int rc = page_range(size, &off, &len);
    if (rc)
        return rc;
    return msync(base + off, len, how) ? errno : 0;
}

int mmkv_madvise(uint8_t *base, uint64_t size, uint64_t off, uint64_t len, int advice)
{
    static const int table[] = {MADV_NORMAL, MADV_RANDOM, MADV_SEQUENTIAL, MADV_WILLNEED,
                                MADV_DONTNEED};
    if (advice < 0 || advice >= (int)(sizeof table / sizeof table[0]))
        return EINVAL;
    int rc = page_range(size, &off, &len);
    if (rc)
        return rc;
    return madvise(base + off, len, table[advice]) ? errno : 0;
}

int mmkv_fallocate(int fd, int64_t off, int64_t len)
{
    int rc;
    do
        rc = posix_fallocate(fd, off, len);
    while (rc == EINTR);
    return rc;
}

int mmkv_file_lock(int fd, uint64_t byte, int mode)
{
    if (mode < MMKV_FLOCK_UNLOCK || mode > MMKV_FLOCK_EXCLUSIVE || byte > INT64_MAX)
        return EINVAL;
    static const short types[] = {F_UNLCK, F_RDLCK, F_WRLCK};
    struct flock fl;
    memset(&fl, 0, sizeof fl);                    /* l_pid must be 0 for an open file description lock */
    fl.l_type = types[mode];
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)byte;
    fl.l_len = 1;
    int rc;
    do
        rc = fcntl(fd, F_OFD_SETLK, &fl) ? errno : 0;
    while (rc == EINTR);
    return rc == EACCES ? EAGAIN : rc;
}

/* ---------------------------------------------------------------- atomics */

static uint64_t *word_at(uint8_t *base, uint64_t size, uint64_t off)
{
    if (off % 8 || !range_ok(size, off, 8))
        return NULL;
    return (uint64_t *)(base + off);
}

int mmkv_atomic_load(uint8_t *base, uint64_t size, uint64_t off, uint64_t *value)
{
    uint64_t *p = word_at(base, size, off);
    if (!p)
        return EINVAL;
    *value = __atomic_load_n(p, __ATOMIC_ACQUIRE);
    return 0;
}

int mmkv_atomic_store(uint8_t *base, uint64_t size, uint64_t off, uint64_t value)
{
    uint64_t *p = word_at(base, size, off);
    if (!p)
        return EINVAL;
    __atomic_store_n(p, value, __ATOMIC_RELEASE);
    return 0;
}

int mmkv_atomic_fetch_add(uint8_t *base, uint64_t size, uint64_t off, int64_t delta, int64_t *old)
{
    uint64_t *p = word_at(base, size, off);
    if (!p)
        return EINVAL;
    *old = (int64_t)__atomic_fetch_add(p, (uint64_t)delta, __ATOMIC_ACQ_REL);
    return 0;
}

int mmkv_atomic_cas(uint8_t *base, uint64_t size, uint64_t off, uint64_t *expected, uint64_t desired)
{
    uint64_t *p = word_at(base, size, off);
    if (!p)
        return EINVAL;
    return __atomic_compare_exchange_n(p, expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)
               ? 0
               : EAGAIN;
}

/* ---------------------------------------------------------------- SipHash-2-4 */

#define ROTL(x, b) (((x) << (b)) | ((x) >> (64 - (b))))
#define SIPROUND                                                                                   \
    do {                                                                                           \
        v0 += v1; v1 = ROTL(v1, 13); v1 ^= v0; v0 = ROTL(v0, 32);                                  \
        v2 += v3; v3 = ROTL(v3, 16); v3 ^= v2;                                                     \
        v0 += v3; v3 = ROTL(v3, 21); v3 ^= v0;                                                     \
        v2 += v1; v1 = ROTL(v1, 17); v1 ^= v2; v2 = ROTL(v2, 32);                                  \
    } while (0)

static uint64_t load_le64(const uint8_t *p)
{
    uint64_t x;
    memcpy(&x, p, 8); /* little-endian host, checked at import by the Python side */
    return x;
}

static uint64_t siphash24(uint64_t k0, uint64_t k1, const uint8_t *data, uint64_t len)
{
    uint64_t v0 = k0 ^ 0x736f6d6570736575ULL;
    uint64_t v1 = k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = k0 ^ 0x6c7967656e657261ULL;
    uint64_t v3 = k1 ^ 0x7465646279746573ULL;
    const uint8_t *end = data + (len & ~(uint64_t)7);
    for (; data != end; data += 8) {
        uint64_t m = load_le64(data);
        v3 ^= m;
        SIPROUND;
        SIPROUND;
        v0 ^= m;
    }
    uint64_t b = len << 56;
    switch (len & 7) {
    case 7: b |= (uint64_t)data[6] << 48; /* fall through */
    case 6: b |= (uint64_t)data[5] << 40; /* fall through */
    case 5: b |= (uint64_t)data[4] << 32; /* fall through */
    case 4: b |= (uint64_t)data[3] << 24; /* fall through */
    case 3: b |= (uint64_t)data[2] << 16; /* fall through */
    case 2: b |= (uint64_t)data[1] << 8;  /* fall through */
    case 1: b |= (uint64_t)data[0]; break;
    default: break;
    }
    v3 ^= b;
    SIPROUND;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

int mmkv_siphash(uint64_t k0, uint64_t k1, const uint8_t *data, uint64_t len, uint64_t *out)
{
    if (!data && len)
        return EINVAL;
    *out = siphash24(k0, k1, data, len);
    return 0;
}

/* ---------------------------------------------------------------- records */

/* The record at off, if its header and body lie inside the mapping. */
static const struct mmkv_record *record_at(const struct mmkv_view *v, uint64_t off)
{
    if (off % 8 || off < MMKV_HEADER_SIZE || !range_ok(v->size, off, REC_HDR))
        return NULL;
    const struct mmkv_record *r = (const struct mmkv_record *)(v->base + off);
    uint64_t body = PAD8((uint64_t)r->key_len);
    if (!range_ok(v->size, off + REC_HDR, body) || !range_ok(v->size, off + REC_HDR + body, r->val_len))
        return NULL;
    return r;
}

static uint64_t record_sum(const struct mmkv_view *v, const struct mmkv_record *r)
{
    uint64_t len = REC_HDR - 8 + PAD8((uint64_t)r->key_len);
    if (!(r->flags & MMKV_REC_COUNTER))
        len += r->val_len;
    return siphash24(v->seed0 ^ SUM_K0, v->seed1 ^ SUM_K1, (const uint8_t *)r + 8, len);
}

static void fill_result(struct mmkv_view *v, uint64_t off, const struct mmkv_record *r)
{
    v->rec_off = off;
    v->hash = r->key_hash;
    v->val_off = off + REC_HDR + PAD8((uint64_t)r->key_len);
    v->val_len = r->val_len;
    v->rec_flags = r->flags;
}

int mmkv_record_write(struct mmkv_view *v, uint64_t off, uint64_t cap, uint64_t hash, const uint8_t *key,
                      uint64_t klen, const uint8_t *val, uint64_t vlen, uint32_t flags)
{
    uint64_t kpad = PAD8(klen);
    if (klen > UINT32_MAX || off % 8 || off < MMKV_HEADER_SIZE || (flags & MMKV_REC_COUNTER && vlen != 8))
        return EINVAL;
    if (kpad < klen || vlen > UINT64_MAX - REC_HDR - kpad || REC_HDR + kpad + vlen > cap ||
        !range_ok(v->size, off, cap))
        return EINVAL;
    struct mmkv_record *r = (struct mmkv_record *)(v->base + off);
    uint8_t *body = v->base + off + REC_HDR;
    r->key_hash = hash;
    r->key_len = (uint32_t)klen;
    r->flags = flags;
    r->val_len = vlen;
    if (klen)
        memcpy(body, key, klen);
    memset(body + klen, 0, kpad - klen);
    if (vlen)
        memcpy(body + kpad, val, vlen);
    r->checksum = record_sum(v, r);
    fill_result(v, off, r);
    return 0;
}

/* The record at off, whatever its block header says: bounds, flags, checksum, key hash. */
static int record_contents_ok(struct mmkv_view *v, uint64_t off, uint64_t room)
{
    const struct mmkv_record *r = record_at(v, off);
    if (!r)
        return EBADMSG;
    uint64_t need = REC_HDR + PAD8((uint64_t)r->key_len) + r->val_len;
    if (need > room || (r->flags & ~(uint32_t)MMKV_REC_COUNTER) ||
        (r->flags & MMKV_REC_COUNTER && r->val_len != 8))
        return EBADMSG;
    if (r->checksum != record_sum(v, r))
        return EBADMSG;
    uint64_t h = siphash24(v->seed0, v->seed1, (const uint8_t *)r + REC_HDR, r->key_len);
    if (h != r->key_hash)
        return EBADMSG;
    fill_result(v, off, r);
    return 0;
}

int mmkv_record_verify(struct mmkv_view *v, uint64_t off)
{
    if (off < MMKV_HEADER_SIZE + 8 || off % 8 || !range_ok(v->size, off - 8, 8))
        return EBADMSG;
    uint64_t head = *(const uint64_t *)(v->base + off - 8);
    uint64_t bsize = head & ~(uint64_t)MMKV_BLOCK_FLAGS;
    if (!(head & MMKV_BLOCK_ALLOC) || bsize < MMKV_BLOCK_MIN || !range_ok(v->size, off - 8, bsize))
        return EBADMSG;
    return record_contents_ok(v, off, bsize - 8);
}

int mmkv_record_verify_contents(struct mmkv_view *v, uint64_t off)
{
    if (off < MMKV_HEADER_SIZE + 8 || off % 8 || off >= v->size)
        return EBADMSG;
    return record_contents_ok(v, off, v->size - off);
}

/* ---------------------------------------------------------------- index */

#define SEG_HDR ((uint64_t)sizeof(struct mmkv_segment))
#define SEG_MASK ((uint64_t)MMKV_SEGMENT_SLOTS - 1)
#define SEG_BYTES (SEG_HDR + 8 * (uint64_t)MMKV_SEGMENT_SLOTS)

static uint64_t tag_of(uint64_t hash) { return (hash >> MMKV_TAG_SHIFT) & 0xffff; }
static uint64_t slot_word(uint64_t hash, uint64_t off) { return tag_of(hash) << MMKV_SLOT_OFF_BITS | off; }
static uint64_t *seg_slots(struct mmkv_segment *s) { return (uint64_t *)(s + 1); }

/* The directory, if its root lies inside the mapping. */
static const uint64_t *directory(const struct mmkv_view *v)
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
static struct mmkv_segment *segment_at(const struct mmkv_view *v, uint64_t off)
{
    if (off % 8 || off < MMKV_HEADER_SIZE || !range_ok(v->size, off, SEG_BYTES))
        return NULL;
    /* a segment is the payload of a block in use that holds it: a directory entry pointing
       anywhere else (into another segment, a record) is damage, not a segment */
    uint64_t head = *(const uint64_t *)(v->base + off - 8), bsize = head & ~(uint64_t)MMKV_BLOCK_FLAGS;
    if (!(head & MMKV_BLOCK_ALLOC) || bsize < SEG_BYTES + 8 || bsize > v->size - (off - 8))
        return NULL;
    struct mmkv_segment *s = (struct mmkv_segment *)(v->base + off);
    if (s->depth > v->dir_bits || s->count > MMKV_SEGMENT_SLOTS || s->prefix >> s->depth)
        return NULL;
    return s;
}

/* Result of a lookup, kept off the shared view so that concurrent readers do not race. */
struct lookup {
    uint64_t hash, seg, slot, rec_off, probes;
    struct mmkv_segment *segment;
    const struct mmkv_record *rec;
};

static int lookup(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct lookup *out)
{
    const uint64_t *dir = directory(v);
    if (!dir)
        return EBADMSG;
    uint64_t h = siphash24(v->seed0, v->seed1, key, klen);
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
        const struct mmkv_record *r = record_at(v, off);
        if (!r)
            return EBADMSG;
        if (r->key_hash == h && r->key_len == klen && memcmp((const uint8_t *)r + REC_HDR, key, klen) == 0) {
            out->slot = i;
            out->rec_off = off;
            out->rec = r;
            return 0;
        }
    }
    return EBADMSG; /* a full segment never happens: the engine splits it first */
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
            fill_result(v, l.rec_off, l.rec);
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

/* Check one segment: header, counts, tags, prefixes and the probe invariant. */
static int audit_segment(const struct mmkv_view *v, struct mmkv_segment *seg, uint64_t *bad_slot)
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
        if (seg->depth && r->key_hash >> (64 - seg->depth) != seg->prefix)
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
        uint64_t span = 1ULL << (v->dir_bits - seg->depth); /* entries that must point here */
        if (d != seg->prefix * span)
            return EBADMSG;
        for (uint64_t k = 1; k < span; k++)
            if (dir[d + k] != dir[d])
                return EBADMSG;
        if (d + span < entries && dir[d + span] == dir[d])
            return EBADMSG;
        int rc = audit_segment(v, seg, bad_slot);
        if (rc)
            return rc;
        d += span;
    }
    return 0;
}

/* ---------------------------------------------------------------- lock + get */

static struct mmkv_state *state_of(const struct mmkv_view *v)
{
    return (struct mmkv_state *)(v->base + MMKV_OFF_STATE);
}

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
 * holding the store lock (mmkv_lock, mmkv_get, the fused writes with take_lock) count themselves
 * in v->active for their whole duration and refuse (EBADF) once v->closing is set; every other
 * call runs with the store lock held, which the closer takes before it unmaps.  Both sides use
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

static int lock_holder(struct mmkv_view *v)
{
    if (v->size < MMKV_HEADER_SIZE)
        return EINVAL;
    int rc = mmkv_mutex_lock(v->base + MMKV_OFF_LOCKS, v->lock_timeout_ns);
    if (rc == 0 || rc == EOWNERDEAD) {
        struct mmkv_state *s = state_of(v);
        seq_enter(s);
        __atomic_store_n(&s->lock_pid, (uint64_t)v->pid, __ATOMIC_RELAXED);
        __atomic_store_n(&s->lock_since_ns, (uint64_t)now_ns(CLOCK_MONOTONIC), __ATOMIC_RELAXED);
    }
    return rc;
}

int mmkv_lock(struct mmkv_view *v)
{
    if (!enter(v))
        return EBADF;
    int rc = lock_holder(v);
    leave(v);
    return rc;
}

int mmkv_lock_final(struct mmkv_view *v) { return lock_holder(v); }

int mmkv_unlock(struct mmkv_view *v)
{
    if (v->size < MMKV_HEADER_SIZE)
        return EINVAL;
    struct mmkv_state *s = state_of(v);
    __atomic_store_n(&s->lock_pid, 0, __ATOMIC_RELAXED);
    seq_leave(s);
    return mmkv_mutex_unlock(v->base + MMKV_OFF_LOCKS);
}

/* Look key up and copy its value into g; the caller makes sure nothing changes meanwhile. */
static int get_into(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g)
{
    struct lookup l;
    int rc = lookup(v, key, klen, &l);
    if (rc == 0 && l.rec->checksum != record_sum(v, l.rec))
        rc = EBADMSG; /* damaged bytes are never returned as a value */
    if (rc == 0) {
        uint64_t n = l.rec->val_len;
        g->val_len = n;
        if (n <= g->cap)
            memcpy(g->buf, (const uint8_t *)l.rec + REC_HDR + PAD8((uint64_t)l.rec->key_len), n);
        else
            rc = ENOBUFS;
    }
    return rc;
}

static int get_entered(const struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g)
{
    if (v->size < MMKV_HEADER_SIZE)
        return EINVAL;
    struct mmkv_state *st = state_of(v);
    /* lock-free first: valid when no lock holder was active before, during or after the read.
       Every offset is bounds-checked, so a read racing a writer can only be wrong, never unsafe,
       and a wrong one is thrown away by the sequence check. */
    uint64_t s1 = __atomic_load_n(&st->seq, __ATOMIC_ACQUIRE);
    if (!(s1 & 1) && __atomic_load_n(&st->generation, __ATOMIC_ACQUIRE) == v->generation) {
        int rc = get_into(v, key, klen, g);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (__atomic_load_n(&st->seq, __ATOMIC_RELAXED) == s1 && rc != EBADMSG)
            return rc;
    }
    /* a writer was active: take the lock (no holder bookkeeping: a reader holds it briefly) */
    int rc = mmkv_mutex_lock(v->base + MMKV_OFF_LOCKS, v->lock_timeout_ns);
    if (rc)
        return rc; /* EOWNERDEAD: still held, the caller recovers */
    if (__atomic_load_n(&st->generation, __ATOMIC_ACQUIRE) != v->generation)
        rc = MMKV_ESTALE;
    else
        rc = get_into(v, key, klen, g);
    mmkv_mutex_unlock(v->base + MMKV_OFF_LOCKS);
    return rc;
}

int mmkv_get(struct mmkv_view *v, const uint8_t *key, uint64_t klen, struct mmkv_getbuf *g)
{
    if (!enter(v))
        return EBADF;
    int rc = get_entered(v, key, klen, g);
    leave(v);
    return rc;
}

/* ---------------------------------------------------------------- allocator */
/*
 * The free-list allocator's hot paths (mmkv/allocator.py documents the design
 * and keeps the rare paths: formatting, growth, rebuild and audit).  Every
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
#define SIZE_MASK (~(uint64_t)MMKV_BLOCK_FLAGS)
#define NEXT(b) ((b) + MMKV_FREE_NEXT)
#define PREV(b) ((b) + MMKV_FREE_PREV)

static uint64_t *word(const struct mmkv_view *v, uint64_t off) { return (uint64_t *)(v->base + off); }

static unsigned size_class(uint64_t size)
{
    if (size <= MMKV_EXACT_MAX)
        return (unsigned)((size - MMKV_BLOCK_MIN) >> 4);
    unsigned c = MMKV_EXACT_CLASSES + (unsigned)(64 - __builtin_clzll(size - 1)) - 10;
    return c < MMKV_NCLASSES ? c : MMKV_NCLASSES - 1;
}

int mmkv_size_class(uint64_t size, uint32_t *cls)
{
    if (size < MMKV_BLOCK_MIN || size & 15)
        return EINVAL;
    *cls = size_class(size);
    return 0;
}

static int heap_ok(const struct mmkv_view *v)
{
    return v->size >= MMKV_HEADER_SIZE && v->heap_end >= MMKV_HEAP_START && v->heap_end <= v->size - 8 &&
           ((v->heap_end - MMKV_HEAP_START) & 15) == 0;
}

static int block_ok(const struct mmkv_view *v, uint64_t b)
{
    return b >= MMKV_HEAP_START && b < v->heap_end && ((b - MMKV_HEAP_START) & 15) == 0;
}

static int size_ok(const struct mmkv_view *v, uint64_t b, uint64_t size)
{
    return size >= MMKV_BLOCK_MIN && !(size & 15) && size <= v->heap_end - b;
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
    if (head & MMKV_BLOCK_ALLOC || !size_ok(v, b, s) || size_class(s) != c || *word(v, b + s - 8) != s)
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
    return member_ok(v, *b, c, size) && *word(v, PREV(*b)) == 0 ? 0 : EBADMSG;
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
        if (steps && (!member_ok(v, b, c, &s) || *word(v, PREV(b)) != prev))
            return EBADMSG;
        if (s >= want) {
            *found = b;
            *found_size = s;
            return 0;
        }
        prev = b;
        b = *word(v, NEXT(b));
    }
    return rc;
}

/* Take b (size bytes, a member its caller checked) off its list, after checking both its neighbours. */
static int unlink_free(const struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t size)
{
    unsigned c = size_class(size);
    uint64_t s, nxt = *word(v, NEXT(b)), prv = *word(v, PREV(b));
    if (nxt && (nxt == b || !member_ok(v, nxt, c, &s) || *word(v, PREV(nxt)) != b))
        return EBADMSG;
    if (prv ? prv == b || !member_ok(v, prv, c, &s) || *word(v, NEXT(prv)) != b : st->free_heads[c] != b)
        return EBADMSG;
    if (prv)
        *word(v, NEXT(prv)) = nxt;
    else
        st->free_heads[c] = nxt;
    if (nxt)
        *word(v, PREV(nxt)) = prv;
    if (!st->free_heads[c])
        st->free_bitmap &= ~(1ULL << c);
    return 0;
}

/* Make [b, b + size) one free block at the head of its list (its neighbours are in use). */
static int make_free(const struct mmkv_view *v, struct mmkv_state *st, uint64_t b, uint64_t size, uint64_t prev_alloc)
{
    unsigned c = size_class(size);
    uint64_t head = st->free_heads[c], hs;
    if (head && (!member_ok(v, head, c, &hs) || *word(v, PREV(head)) || (head < b + size && b < head + hs)))
        return EBADMSG;
    *word(v, b) = size | prev_alloc;
    *word(v, b + size - 8) = size;
    *word(v, NEXT(b)) = head;
    *word(v, PREV(b)) = 0;
    if (head)
        *word(v, PREV(head)) = b;
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
    uint64_t start = ((b + 8 + page - 1) & ~(page - 1)) - 8; /* payload on a page boundary */
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
    if (!page || (page & (page - 1)) || page % 16)
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
                if (prev && (!member_ok(v, b, c, &s) || *word(v, PREV(b)) != prev))
                    return EBADMSG;
                if ((rc = take_aligned(v, st, b, s, size, out)) != ENOSPC)
                    return rc;
                rc = 0;
                prev = b;
                b = *word(v, NEXT(b));
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
    uint64_t size = (payload + 8 + 15) & ~(uint64_t)15, b = 0, bsize = 0;
    if (size < MMKV_BLOCK_MIN)
        size = MMKV_BLOCK_MIN;
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
        psize = *word(v, b - 8);
        if (psize > b - MMKV_HEAP_START || psize < MMKV_BLOCK_MIN || psize & 15)
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
    uint64_t size = (payload + 8 + 15) & ~(uint64_t)15, page = v->page_size;
    if (size < MMKV_BLOCK_MIN)
        size = MMKV_BLOCK_MIN;
    if (page && !(page & (page - 1)) && !((b + 8) & (page - 1)))
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

/* ---------------------------------------------------------------- fused writes */

/* Take the lock and check the view is current; MMKV_ESTALE (unlocked) when it is not. */
static int lock_current(struct mmkv_view *v)
{
    int rc = mmkv_lock(v);
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
    return rc == 0 || rc == ENOENT || rc == EAGAIN || rc == ENOSPC || rc == ERANGE;
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
        return rc;  /* ENOSPC: nothing changed, grow the file */
    uint64_t rec = b + 8, cap = (*word(v, b) & SIZE_MASK) - 8;
    uint64_t old_vlen = l.rec ? l.rec->val_len : 0, *slots = seg_slots(l.segment);
    if ((rc = mmkv_record_write(v, rec, cap, l.hash, key, klen, val, vlen, flags)) ||
        (rc = sync_range(v, b, need + 8)))       /* 1. the record is durable ... */
        return mmkv_free(v, b) ? EBADMSG : rc;
    FAILPOINT("put.after_record");
    __atomic_store_n(&slots[l.slot], slot_word(l.hash, rec), __ATOMIC_RELEASE);
    if ((rc = sync_range(v, l.seg + SEG_HDR + 8 * l.slot, 8)))  /* 2. ... before the slot that makes it live */
        return rc;
    FAILPOINT("put.after_slot");
    if (l.rec) {                                  /* 3. the old record's block is free */
        if ((rc = mmkv_free_fitting(v, l.rec_off - 8, REC_HDR + PAD8(klen) + old_vlen)))
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
    if (take_lock && (rc = lock_current(v)))
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

int mmkv_delete(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v)))
        return rc;
    struct lookup l;
    struct mmkv_state *st = state_of(v);
    rc = lookup(v, key, klen, &l);
    if (rc == 0) {
        uint64_t first = l.slot, vlen = l.rec->val_len, slots = l.seg + SEG_HDR;
        rc = mmkv_slot_delete(v, l.seg, l.slot);
        if (!rc && v->sync_full) {                /* slots [first, v->slot] changed, maybe wrapping */
            if (v->slot >= first)
                rc = sync_range(v, slots + 8 * first, 8 * (v->slot - first + 1));
            else if (!(rc = sync_range(v, slots + 8 * first, 8 * (MMKV_SEGMENT_SLOTS - first))))
                rc = sync_range(v, slots, 8 * (v->slot + 1));
        }
        if (!rc && !(rc = mmkv_free_fitting(v, l.rec_off - 8, REC_HDR + PAD8(klen) + vlen))) {
            st->count--;
            st->live_bytes -= klen + vlen;
        }
    }
    if (take_lock && clean_result(rc))
        mmkv_unlock(v);
    return rc;
}

int mmkv_incr(struct mmkv_view *v, const uint8_t *key, uint64_t klen, int64_t delta, int64_t *result, int take_lock)
{
    int rc;
    if (take_lock && (rc = lock_current(v)))
        return rc;
    struct lookup l;
    rc = lookup(v, key, klen, &l);
    if (rc == 0 && !(l.rec->flags & MMKV_REC_COUNTER))
        rc = ENOENT; /* a plain 8-byte value or another type: the general path decides */
    if (rc == 0) {   /* updated in place: its block and checksum must hold, or recovery drops it */
        uint64_t head = *(const uint64_t *)(v->base + l.rec_off - 8);
        if (!(head & MMKV_BLOCK_ALLOC) || (head & ~(uint64_t)MMKV_BLOCK_FLAGS) < REC_HDR + PAD8(klen) + 16 ||
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

/* ---------------------------------------------------------------- layout table */

#define SZ(s) {#s, sizeof(struct s)},
#define OF(s, f) {#s "." #f, offsetof(struct s, f)},
static const struct {
    const char *name;
    uint64_t value;
} layout_table[] = {
    SZ(mmkv_identity) OF(mmkv_identity, magic) OF(mmkv_identity, version) OF(mmkv_identity, page_size)
    OF(mmkv_identity, seed0) OF(mmkv_identity, seed1) OF(mmkv_identity, created_ns)
    OF(mmkv_identity, reserved) OF(mmkv_identity, checksum)
    SZ(mmkv_meta) OF(mmkv_meta, seq) OF(mmkv_meta, file_size) OF(mmkv_meta, dir_off)
    OF(mmkv_meta, dir_bits) OF(mmkv_meta, journal_off) OF(mmkv_meta, journal_txn)
    OF(mmkv_meta, reserved) OF(mmkv_meta, checksum)
    SZ(mmkv_state) OF(mmkv_state, generation) OF(mmkv_state, dirty) OF(mmkv_state, count)
    OF(mmkv_state, live_bytes) OF(mmkv_state, used_bytes) OF(mmkv_state, free_bytes)
    OF(mmkv_state, free_bitmap) OF(mmkv_state, lock_pid) OF(mmkv_state, lock_since_ns)
    OF(mmkv_state, recoveries) OF(mmkv_state, seq) OF(mmkv_state, reserved) OF(mmkv_state, free_heads)
    SZ(mmkv_locks) OF(mmkv_locks, mutex) OF(mmkv_locks, sems)
    SZ(mmkv_record) OF(mmkv_record, checksum) OF(mmkv_record, key_hash) OF(mmkv_record, key_len)
    OF(mmkv_record, flags) OF(mmkv_record, val_len)
    SZ(mmkv_segment) OF(mmkv_segment, depth) OF(mmkv_segment, prefix) OF(mmkv_segment, count)
    OF(mmkv_segment, reserved)
    SZ(mmkv_view) OF(mmkv_view, base) OF(mmkv_view, size) OF(mmkv_view, dir_off)
    OF(mmkv_view, dir_bits) OF(mmkv_view, seed0) OF(mmkv_view, seed1) OF(mmkv_view, generation)
    OF(mmkv_view, lock_timeout_ns) OF(mmkv_view, pid) OF(mmkv_view, heap_end) OF(mmkv_view, page_size)
    OF(mmkv_view, large_block) OF(mmkv_view, fit_scan) OF(mmkv_view, max_count) OF(mmkv_view, sync_full)
    OF(mmkv_view, closing) OF(mmkv_view, active) OF(mmkv_view, sync_hook)
    SZ(mmkv_journal) OF(mmkv_journal, magic) OF(mmkv_journal, txn) OF(mmkv_journal, count) OF(mmkv_journal, checksum)
    OF(mmkv_view, hash) OF(mmkv_view, seg) OF(mmkv_view, slot)
    OF(mmkv_view, rec_off) OF(mmkv_view, val_off) OF(mmkv_view, val_len) OF(mmkv_view, rec_flags)
    OF(mmkv_view, probes)
    SZ(mmkv_getbuf) OF(mmkv_getbuf, buf) OF(mmkv_getbuf, cap) OF(mmkv_getbuf, val_len)
};

int mmkv_layout_entry(int which, const char **name, uint64_t *value)
{
    if (which < 0 || which >= (int)(sizeof layout_table / sizeof layout_table[0]))
        return ENOENT;
    *name = layout_table[which].name;
    *value = layout_table[which].value;
    return 0;
}
