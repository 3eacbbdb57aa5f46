/*
 * mmkv native shim: system mechanisms (see mmkv_shim.h): failpoints, time,
 * the robust process-shared mutex, semaphores, msync/madvise/fallocate, OFD
 * file locks and 64-bit atomics on the mapping.
 */
#define _GNU_SOURCE
#include "mmkv_internal.h"

#include <fcntl.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---------------------------------------------------------------- failpoints */

int mmkv_fp_armed;
static char fp_name[64];
static int64_t fp_countdown;

int mmkv_failpoint_set(const char *name, int64_t countdown)
{
    if (!name || !name[0] || countdown < 1) {
        mmkv_fp_armed = 0;
        return 0;
    }
    if (strlen(name) >= sizeof fp_name)
        return EINVAL;
    strcpy(fp_name, name);
    fp_countdown = countdown;
    mmkv_fp_armed = 1;
    return 0;
}

int mmkv_failpoint_hit(const char *name)
{
    if (mmkv_fp_armed && strcmp(name, fp_name) == 0 && --fp_countdown == 0)
        kill(getpid(), SIGKILL);
    return 0;
}

/* ---------------------------------------------------------------- time */

/* now_ns() is in mmkv_internal.h: the lock records its holder's start time too. */

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

int mmkv_punch(int fd, uint64_t off, uint64_t len)
{
    if (off > INT64_MAX || len > INT64_MAX - off)
        return EINVAL;
    int rc;
    do
        rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (off_t)off, (off_t)len) ? errno : 0;
    while (rc == EINTR);
    return rc;
}

int mmkv_map_zero(uint8_t *base, uint64_t size, uint64_t off, uint64_t len)
{
    if (!base || off > size || len > size - off || (uintptr_t)(base + off) % (uintptr_t)sysconf(_SC_PAGESIZE))
        return EINVAL;
    if (!len)
        return 0;
    void *p = mmap(base + off, len, PROT_READ | PROT_WRITE, MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? errno : 0;
}

int mmkv_writeback(int fd, int64_t off, int64_t len)
{
    if (off < 0 || len < 0)
        return EINVAL;
    int rc;
    do
        rc = sync_file_range(fd, off, len, SYNC_FILE_RANGE_WRITE) ? errno : 0;
    while (rc == EINTR);
    return rc;
}

int mmkv_writeback_wait(int fd, int64_t off, int64_t len)
{
    if (off < 0 || len < 0)
        return EINVAL;
    int rc;
    do
        rc = sync_file_range(fd, off, len,
                             SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER) ? errno : 0;
    while (rc == EINTR);
    return rc;
}

int mmkv_file_lock(int fd, uint64_t byte, int mode)
{
    if (mode < MMKV_FLOCK_UNLOCK || mode > MMKV_FLOCK_TEST || byte > INT64_MAX)
        return EINVAL;
    static const short types[] = {F_UNLCK, F_RDLCK, F_WRLCK, F_WRLCK};
    struct flock fl;
    memset(&fl, 0, sizeof fl);                    /* l_pid must be 0 for an open file description lock */
    fl.l_type = types[mode];
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)byte;
    fl.l_len = 1;
    int rc;
    if (mode == MMKV_FLOCK_TEST) {                /* F_GETLK needs no write access, unlike a write lock */
        do
            rc = fcntl(fd, F_OFD_GETLK, &fl) ? errno : 0;
        while (rc == EINTR);
        return rc ? rc : fl.l_type == F_UNLCK ? 0 : EAGAIN;
    }
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

