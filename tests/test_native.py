"""The native shim's mechanisms, called directly: SipHash, atomics, msync/madvise,
the robust process-shared mutex and the process-shared semaphores.

Multi-process tests place the mutex / semaphore in an anonymous shared mapping
and fork (multiprocessing "fork" context), so the child sees the same memory.
Every child is joined with a timeout and killed if it is still alive.
"""
import errno
import mmap
import multiprocessing
import os
import random
import select
import signal
import time

import pytest

from mmkv.engine import layout
from mmkv.engine.shim import ffi, lib

FORK = multiprocessing.get_context("fork")
JOIN = 20            # seconds: the most any child may take
M64 = (1 << 64) - 1


# ---------------------------------------------------------------- helpers

def _reap(p, timeout=JOIN):
    """Join p; kill it if it is still alive; return its exit code."""
    p.join(timeout)
    alive = p.is_alive()
    if alive:
        p.kill()
        p.join(5)
    assert not alive, "child process hung"
    return p.exitcode


@pytest.fixture
def shm():
    """A page of anonymous shared memory and a uint8_t * to it (survives fork)."""
    mm = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    buf = ffi.from_buffer("uint8_t[]", mm)
    ptr = ffi.cast("uint8_t *", buf)
    yield ptr
    ffi.release(buf)
    mm.close()


def _read_nowait(fd, wait=0.0):
    r, _, _ = select.select([fd], [], [], wait)
    return os.read(fd, 100) if r else b""


def _read_line(fd, timeout=JOIN):
    """Bytes from fd up to a newline, or whatever came before the timeout."""
    out, end = b"", time.monotonic() + timeout
    while not out.endswith(b"\n"):
        left = end - time.monotonic()
        if left <= 0:
            break
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            break
        chunk = os.read(fd, 1)
        if not chunk:
            break
        out += chunk
    return out


# ---------------------------------------------------------------- SipHash-2-4

def _rotl(x, b):
    return ((x << b) | (x >> (64 - b))) & M64


def _sipround(v0, v1, v2, v3):
    v0 = (v0 + v1) & M64
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & M64
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & M64
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & M64
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash24_ref(k0, k1, data):
    """SipHash-2-4 as the paper (Aumasson & Bernstein, 2012) specifies it."""
    v0 = k0 ^ 0x736F6D6570736575
    v1 = k1 ^ 0x646F72616E646F6D
    v2 = k0 ^ 0x6C7967656E657261
    v3 = k1 ^ 0x7465646279746573
    n = len(data)
    # the final block: the trailing bytes, zero padded, with n mod 256 in the top byte
    padded = bytes(data) + bytes(7 - n % 8) + bytes([n & 0xFF])
    for i in range(0, len(padded), 8):
        m = int.from_bytes(padded[i:i + 8], "little")
        v3 ^= m
        for _ in range(2):
            v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
        v0 ^= m
    v2 ^= 0xFF
    for _ in range(4):
        v0, v1, v2, v3 = _sipround(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


KEY0 = int.from_bytes(bytes(range(8)), "little")
KEY1 = int.from_bytes(bytes(range(8, 16)), "little")


def test_siphash_reference_is_right():
    """The pure-Python reference against the paper's published vectors."""
    assert siphash24_ref(KEY0, KEY1, bytes(range(15))) == 0xA129CA6149BE45E5
    assert siphash24_ref(KEY0, KEY1, b"") == 0x726FDB47DD0E0E31


def test_siphash_published_vectors():
    assert layout.siphash(KEY0, KEY1, bytes(range(15))) == 0xA129CA6149BE45E5
    assert layout.siphash(KEY0, KEY1, b"") == 0x726FDB47DD0E0E31


def test_siphash_matches_reference_on_random_inputs():
    rng = random.Random(1234)
    checked = 0
    for n in range(0, 101):
        for _ in range(4):
            k0, k1 = rng.getrandbits(64), rng.getrandbits(64)
            data = rng.randbytes(n)
            assert layout.siphash(k0, k1, data) == siphash24_ref(k0, k1, data), (n, k0, k1, data)
            checked += 1
    # edge keys
    for k0, k1 in ((0, 0), (M64, M64), (M64, 0), (1, 1 << 63)):
        for n in (0, 1, 7, 8, 9, 63, 64, 65):
            data = bytes((i * 37) & 0xFF for i in range(n))
            assert layout.siphash(k0, k1, data) == siphash24_ref(k0, k1, data)
            checked += 1
    assert checked == 101 * 4 + 4 * 8


def test_siphash_accepts_any_buffer():
    data = b"hello, mmkv"
    want = siphash24_ref(5, 6, data)
    assert layout.siphash(5, 6, bytearray(data)) == want
    assert layout.siphash(5, 6, memoryview(data)) == want
    # a slice of a larger buffer: only the slice is hashed
    assert layout.siphash(5, 6, memoryview(b"xx" + data + b"yy")[2:-2]) == want


def test_siphash_c_entry_point():
    out = ffi.new("uint64_t *")
    assert lib.mmkv_siphash(KEY0, KEY1, bytes(range(15)), 15, out) == 0
    assert out[0] == 0xA129CA6149BE45E5
    assert lib.mmkv_siphash(KEY0, KEY1, ffi.NULL, 0, out) == 0
    assert out[0] == 0x726FDB47DD0E0E31
    assert lib.mmkv_siphash(KEY0, KEY1, ffi.NULL, 1, out) == errno.EINVAL


# ---------------------------------------------------------------- atomics

@pytest.fixture
def abuf():
    buf = ffi.new("uint8_t[]", 64)
    return buf


def _load(buf, off, size=64):
    v = ffi.new("uint64_t *")
    rc = lib.mmkv_atomic_load(buf, size, off, v)
    return rc, v[0]


def test_atomic_store_load(abuf):
    for off in range(0, 64, 8):
        assert lib.mmkv_atomic_store(abuf, 64, off, 0x0102030405060708 + off) == 0
    for off in range(0, 64, 8):
        assert _load(abuf, off) == (0, 0x0102030405060708 + off)
        # stored little-endian, in place
        assert bytes(ffi.buffer(abuf + off, 8)) == (0x0102030405060708 + off).to_bytes(8, "little")
    assert lib.mmkv_atomic_store(abuf, 64, 56, M64) == 0
    assert _load(abuf, 56) == (0, M64)
    assert lib.mmkv_atomic_store(abuf, 64, 0, 0) == 0
    assert _load(abuf, 0) == (0, 0)


def test_atomic_fetch_add(abuf):
    old = ffi.new("int64_t *")
    assert lib.mmkv_atomic_fetch_add(abuf, 64, 8, 5, old) == 0 and old[0] == 0
    assert lib.mmkv_atomic_fetch_add(abuf, 64, 8, 10, old) == 0 and old[0] == 5
    assert _load(abuf, 8) == (0, 15)
    assert lib.mmkv_atomic_fetch_add(abuf, 64, 8, -16, old) == 0 and old[0] == 15
    assert _load(abuf, 8) == (0, M64)             # wraps as unsigned
    assert lib.mmkv_atomic_fetch_add(abuf, 64, 8, 0, old) == 0 and old[0] == -1   # reads back signed
    assert _load(abuf, 0) == (0, 0) and _load(abuf, 16) == (0, 0), "neighbours must be untouched"


def test_atomic_cas(abuf):
    lib.mmkv_atomic_store(abuf, 64, 24, 7)
    expected = ffi.new("uint64_t *", 7)
    assert lib.mmkv_atomic_cas(abuf, 64, 24, expected, 9) == 0
    assert _load(abuf, 24) == (0, 9)
    expected[0] = 7                                # stale expectation
    assert lib.mmkv_atomic_cas(abuf, 64, 24, expected, 11) == errno.EAGAIN
    assert expected[0] == 9, "a failed CAS reports the current value"
    assert _load(abuf, 24) == (0, 9)
    assert lib.mmkv_atomic_cas(abuf, 64, 24, expected, M64) == 0
    assert _load(abuf, 24) == (0, M64)


@pytest.mark.parametrize("off", [1, 4, 7, 60, 63, 64, 65, 72, 1 << 20, M64 - 7, M64 - 6, M64])
def test_atomics_reject_bad_offsets(abuf, off):
    for i in range(64):
        abuf[i] = 0xAB
    before = bytes(ffi.buffer(abuf, 64))
    v = ffi.new("uint64_t *", 0x5555)
    old = ffi.new("int64_t *", 0x6666)
    assert lib.mmkv_atomic_load(abuf, 64, off, v) == errno.EINVAL
    assert v[0] == 0x5555
    assert lib.mmkv_atomic_store(abuf, 64, off, 1) == errno.EINVAL
    assert lib.mmkv_atomic_fetch_add(abuf, 64, off, 1, old) == errno.EINVAL
    assert old[0] == 0x6666
    assert lib.mmkv_atomic_cas(abuf, 64, off, v, 1) == errno.EINVAL
    assert bytes(ffi.buffer(abuf, 64)) == before, "a rejected call must not write"


def test_atomics_respect_the_size_argument(abuf):
    """Bounds come from the size passed, not from the buffer: the last word of a 16-byte view."""
    assert lib.mmkv_atomic_store(abuf, 16, 8, 3) == 0
    assert lib.mmkv_atomic_store(abuf, 16, 16, 3) == errno.EINVAL
    assert lib.mmkv_atomic_store(abuf, 12, 8, 3) == errno.EINVAL
    assert lib.mmkv_atomic_store(abuf, 0, 0, 3) == errno.EINVAL


def _adder(ptr, n):
    old = ffi.new("int64_t *")
    for _ in range(n):
        if lib.mmkv_atomic_fetch_add(ptr, 4096, 128, 1, old):
            os._exit(3)
    os._exit(0)


def test_fetch_add_is_atomic_across_processes(shm):
    n = 20000
    procs = [FORK.Process(target=_adder, args=(shm, n)) for _ in range(2)]
    for p in procs:
        p.start()
    _adder_parent = ffi.new("int64_t *")
    for _ in range(n):
        lib.mmkv_atomic_fetch_add(shm, 4096, 128, 1, _adder_parent)
    assert [_reap(p) for p in procs] == [0, 0]
    v = ffi.new("uint64_t *")
    assert lib.mmkv_atomic_load(shm, 4096, 128, v) == 0
    assert v[0] == 3 * n, "lost increments"


# ---------------------------------------------------------------- msync / madvise

@pytest.fixture
def region():
    mm = mmap.mmap(-1, 4 * mmap.PAGESIZE, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
    buf = ffi.from_buffer("uint8_t[]", mm)
    yield ffi.cast("uint8_t *", buf), len(mm)
    ffi.release(buf)
    mm.close()


def test_msync_madvise_valid_ranges(region):
    base, size = region
    assert lib.mmkv_msync(base, size, 0, size, lib.MMKV_SYNC_SYNC) == 0
    assert lib.mmkv_msync(base, size, 100, 10, lib.MMKV_SYNC_ASYNC) == 0   # unaligned: rounded to the page
    assert lib.mmkv_msync(base, size, size, 0, lib.MMKV_SYNC_SYNC) == 0
    for adv in (lib.MMKV_ADV_NORMAL, lib.MMKV_ADV_RANDOM, lib.MMKV_ADV_SEQUENTIAL, lib.MMKV_ADV_WILLNEED):
        assert lib.mmkv_madvise(base, size, 0, size, adv) == 0
    assert lib.mmkv_madvise(base, size, mmap.PAGESIZE + 5, 10, lib.MMKV_ADV_RANDOM) == 0


@pytest.mark.parametrize("off,length", [
    ("size", 1), ("size+1", 0), (0, "size+1"), (1, "size"), ("size-8", 16),
    (1, M64), (M64, 1), (M64, M64), ("page", M64 - 100),
])
def test_msync_madvise_reject_out_of_range(region, off, length):
    base, size = region
    env = {"size": size, "size+1": size + 1, "size-8": size - 8, "page": mmap.PAGESIZE}
    off = env.get(off, off)
    length = env.get(length, length)
    assert lib.mmkv_msync(base, size, off, length, lib.MMKV_SYNC_SYNC) == errno.EINVAL
    assert lib.mmkv_msync(base, size, off, length, lib.MMKV_SYNC_ASYNC) == errno.EINVAL
    assert lib.mmkv_madvise(base, size, off, length, lib.MMKV_ADV_NORMAL) == errno.EINVAL


def test_madvise_rejects_unknown_advice(region):
    base, size = region
    for adv in (-1, 5, 100):
        assert lib.mmkv_madvise(base, size, 0, size, adv) == errno.EINVAL


def test_madvise_dontneed_on_shared_memory_keeps_contents(region):
    """MADV_DONTNEED on a shared mapping drops the pages from this mapping only; the data stays."""
    base, size = region
    base[mmap.PAGESIZE + 3] = 0x5A
    assert lib.mmkv_madvise(base, size, mmap.PAGESIZE, mmap.PAGESIZE, lib.MMKV_ADV_DONTNEED) == 0
    assert base[mmap.PAGESIZE + 3] == 0x5A


# ---------------------------------------------------------------- robust mutex

def test_mutex_single_process(shm):
    m = shm
    assert lib.mmkv_mutex_init(m) == 0
    assert lib.mmkv_mutex_lock(m, -1) == 0
    assert lib.mmkv_mutex_unlock(m) == 0
    assert lib.mmkv_mutex_trylock(m) == 0
    assert lib.mmkv_mutex_unlock(m) == 0
    assert lib.mmkv_mutex_lock(m, 10_000_000) == 0
    assert lib.mmkv_mutex_unlock(m) == 0
    # consistent() on a mutex that is not inconsistent is refused (EINVAL), not a crash
    assert lib.mmkv_mutex_consistent(m) == errno.EINVAL


def test_mutex_init_clears_its_whole_area(shm):
    """init wipes the 64 reserved bytes: garbage left by a previous boot is gone."""
    for i in range(lib.MMKV_MUTEX_BYTES):
        shm[i] = 0xFF
    shm[lib.MMKV_MUTEX_BYTES] = 0x77                     # the byte after the area is not touched
    assert lib.mmkv_mutex_init(shm) == 0
    assert lib.mmkv_mutex_trylock(shm) == 0
    assert lib.mmkv_mutex_unlock(shm) == 0
    assert shm[lib.MMKV_MUTEX_BYTES] == 0x77


def _hold_mutex(m, wfd, rfd, die):
    """Child: lock, report "L", then either die holding it or wait for "go" and unlock."""
    rc = lib.mmkv_mutex_lock(m, -1)
    os.write(wfd, b"L%d\n" % rc)
    if die:
        os.kill(os.getpid(), signal.SIGKILL)
    _read_line(rfd)                                       # wait for the parent's go
    rc = lib.mmkv_mutex_unlock(m)
    os._exit(0 if rc == 0 else 10 + rc)


def _start_holder(m, die):
    to_parent_r, to_parent_w = os.pipe()
    to_child_r, to_child_w = os.pipe()
    p = FORK.Process(target=_hold_mutex, args=(m, to_parent_w, to_child_r, die))
    p.start()
    os.close(to_parent_w)
    os.close(to_child_r)
    line = _read_line(to_parent_r)
    return p, to_parent_r, to_child_w, line


def test_mutex_contention_between_processes(shm):
    m = shm
    assert lib.mmkv_mutex_init(m) == 0
    p, rfd, wfd, line = _start_holder(m, die=False)
    try:
        assert line == b"L0\n", line
        assert lib.mmkv_mutex_trylock(m) == errno.EBUSY
        t0 = time.monotonic()
        rc = lib.mmkv_mutex_lock(m, 200_000_000)          # 0.2 s
        waited = time.monotonic() - t0
        assert rc == errno.ETIMEDOUT
        assert 0.19 <= waited < 10, waited
        assert lib.mmkv_mutex_lock(m, 0) == errno.ETIMEDOUT   # zero timeout: an immediate answer
        os.write(wfd, b"go\n")
        assert _reap(p) == 0, "the holder could not unlock"
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        os.close(rfd)
        os.close(wfd)
    # the holder released it: we get it at once
    assert lib.mmkv_mutex_lock(m, 1_000_000_000) == 0
    assert lib.mmkv_mutex_unlock(m) == 0


def test_mutex_blocking_lock_waits_for_the_holder(shm):
    """A lock with no timeout returns 0 once the other process unlocks."""
    m = shm
    assert lib.mmkv_mutex_init(m) == 0
    p, rfd, wfd, line = _start_holder(m, die=False)
    try:
        assert line == b"L0\n"

        def release_later():
            time.sleep(0.2)
            os.write(wfd, b"go\n")

        import threading
        t = threading.Thread(target=release_later)
        t.start()
        t0 = time.monotonic()
        assert lib.mmkv_mutex_lock(m, -1) == 0
        assert time.monotonic() - t0 >= 0.15
        t.join(5)
        assert lib.mmkv_mutex_unlock(m) == 0
        assert _reap(p) == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        os.close(rfd)
        os.close(wfd)


@pytest.mark.parametrize("how", ["lock", "timedlock", "trylock"])
def test_mutex_owner_death_gives_eownerdead(shm, how):
    m = shm
    assert lib.mmkv_mutex_init(m) == 0
    p, rfd, wfd, line = _start_holder(m, die=True)
    try:
        assert line == b"L0\n"
        _reap(p)
        assert p.exitcode == -signal.SIGKILL
    finally:
        os.close(rfd)
        os.close(wfd)
    if how == "lock":
        rc = lib.mmkv_mutex_lock(m, -1)
    elif how == "timedlock":
        rc = lib.mmkv_mutex_lock(m, 1_000_000_000)
    else:
        rc = lib.mmkv_mutex_trylock(m)
    assert rc == errno.EOWNERDEAD
    # we hold it now: mark it consistent, unlock, and it behaves normally again
    assert lib.mmkv_mutex_consistent(m) == 0
    assert lib.mmkv_mutex_unlock(m) == 0
    assert lib.mmkv_mutex_lock(m, 1_000_000_000) == 0
    assert lib.mmkv_mutex_unlock(m) == 0
    assert lib.mmkv_mutex_trylock(m) == 0
    assert lib.mmkv_mutex_unlock(m) == 0


def test_mutex_not_made_consistent_becomes_unrecoverable(shm):
    """Unlocking after EOWNERDEAD without consistent() leaves it ENOTRECOVERABLE (the engine relies on it)."""
    m = shm
    assert lib.mmkv_mutex_init(m) == 0
    p, rfd, wfd, line = _start_holder(m, die=True)
    try:
        assert line == b"L0\n"
        _reap(p)
    finally:
        os.close(rfd)
        os.close(wfd)
    assert lib.mmkv_mutex_lock(m, -1) == errno.EOWNERDEAD
    assert lib.mmkv_mutex_unlock(m) == 0
    assert lib.mmkv_mutex_lock(m, 100_000_000) == errno.ENOTRECOVERABLE
    assert lib.mmkv_mutex_trylock(m) == errno.ENOTRECOVERABLE
    # reinitialising (what the first opener does) makes it usable again
    assert lib.mmkv_mutex_init(m) == 0
    assert lib.mmkv_mutex_lock(m, 100_000_000) == 0
    assert lib.mmkv_mutex_unlock(m) == 0


def test_mutex_lock_unlock_cost(shm):
    """Measured and printed, never asserted: the cost of one uncontended lock + unlock pair."""
    m = shm
    assert lib.mmkv_mutex_init(m) == 0
    n = 100_000
    lock, unlock = lib.mmkv_mutex_lock, lib.mmkv_mutex_unlock
    bad = 0
    t0 = time.perf_counter_ns()
    for _ in range(n):
        bad |= lock(m, -1)
        bad |= unlock(m)
    pair_ns = (time.perf_counter_ns() - t0) / n

    v = ffi.new("uint64_t *")
    load = lib.mmkv_atomic_load
    t0 = time.perf_counter_ns()
    for _ in range(n):
        bad |= load(m, 4096, 128, v)
    call_ns = (time.perf_counter_ns() - t0) / n

    t0 = time.perf_counter_ns()
    for _ in range(n):
        pass
    loop_ns = (time.perf_counter_ns() - t0) / n
    print(f"\n[mmkv native] lock+unlock pair: {pair_ns:.0f} ns; one shim call (mmkv_atomic_load): "
          f"{call_ns:.0f} ns; empty loop: {loop_ns:.0f} ns (100k iterations each)")
    assert bad == 0, "a lock, unlock or load failed during the measurement"


# ---------------------------------------------------------------- semaphores

def test_semaphore_single_process(shm):
    s = shm
    val = ffi.new("int32_t *", -99)
    assert lib.mmkv_sem_init(s, 0) == 0
    assert lib.mmkv_sem_value(s, val) == 0 and val[0] == 0
    assert lib.mmkv_sem_trywait(s) == errno.EAGAIN
    for _ in range(3):
        assert lib.mmkv_sem_post(s) == 0
    assert lib.mmkv_sem_value(s, val) == 0 and val[0] == 3
    assert lib.mmkv_sem_trywait(s) == 0
    assert lib.mmkv_sem_value(s, val) == 0 and val[0] == 2
    assert lib.mmkv_sem_wait(s) == 0
    assert lib.mmkv_sem_timedwait(s, 1_000_000_000) == 0
    assert lib.mmkv_sem_value(s, val) == 0 and val[0] == 0
    assert lib.mmkv_sem_trywait(s) == errno.EAGAIN
    # init with a start value
    assert lib.mmkv_sem_init(s, 5) == 0
    assert lib.mmkv_sem_value(s, val) == 0 and val[0] == 5


def test_semaphore_init_with_start_value_is_independent(shm):
    """Neighbouring semaphores in one area do not share counts."""
    a, b = shm, shm + lib.MMKV_SEM_BYTES
    val = ffi.new("int32_t *")
    assert lib.mmkv_sem_init(a, 2) == 0
    assert lib.mmkv_sem_init(b, 0) == 0
    assert lib.mmkv_sem_post(b) == 0
    assert lib.mmkv_sem_value(a, val) == 0 and val[0] == 2
    assert lib.mmkv_sem_value(b, val) == 0 and val[0] == 1


@pytest.mark.parametrize("timeout", [0.15, 0.3])
def test_semaphore_timedwait_times_out(shm, timeout):
    s = shm
    assert lib.mmkv_sem_init(s, 0) == 0
    t0 = time.monotonic()
    rc = lib.mmkv_sem_timedwait(s, int(timeout * 1e9))
    waited = time.monotonic() - t0
    assert rc == errno.ETIMEDOUT
    assert timeout - 0.005 <= waited < timeout + 5, waited


def test_semaphore_timedwait_zero_and_negative(shm):
    s = shm
    assert lib.mmkv_sem_init(s, 0) == 0
    assert lib.mmkv_sem_timedwait(s, 0) == errno.ETIMEDOUT
    assert lib.mmkv_sem_timedwait(s, -5) == errno.ETIMEDOUT
    assert lib.mmkv_sem_post(s) == 0
    assert lib.mmkv_sem_timedwait(s, 0) == 0       # available: no wait needed


def _sem_waiter(s, wfd, timed):
    os.write(wfd, b"R\n")                          # about to block
    rc = lib.mmkv_sem_timedwait(s, 20_000_000_000) if timed else lib.mmkv_sem_wait(s)
    os.write(wfd, b"W%d\n" % rc)                   # only after waking
    os._exit(0)


@pytest.mark.parametrize("timed", [False, True])
def test_semaphore_wait_post_across_processes(shm, timed):
    s = shm
    assert lib.mmkv_sem_init(s, 0) == 0
    r, w = os.pipe()
    p = FORK.Process(target=_sem_waiter, args=(s, w, timed))
    p.start()
    os.close(w)
    try:
        assert _read_line(r) == b"R\n"
        # the child is blocked: nothing arrives while we do not post
        assert _read_nowait(r, 0.3) == b""
        assert p.is_alive()
        val = ffi.new("int32_t *")
        assert lib.mmkv_sem_value(s, val) == 0 and val[0] == 0
        assert lib.mmkv_sem_post(s) == 0
        assert _read_line(r, 10) == b"W0\n", "the waiter did not wake up after the post"
        assert _reap(p) == 0
        assert lib.mmkv_sem_value(s, val) == 0 and val[0] == 0, "the child consumed the post"
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        os.close(r)


def _sem_consumer(s, n, wfd):
    got = 0
    for _ in range(n):
        if lib.mmkv_sem_timedwait(s, 10_000_000_000) == 0:
            got += 1
    os.write(wfd, b"%d\n" % got)
    os._exit(0)


def test_semaphore_counts_every_post(shm):
    """Posts from one process are each consumed exactly once by two others."""
    s = shm
    assert lib.mmkv_sem_init(s, 0) == 0
    r, w = os.pipe()
    procs = [FORK.Process(target=_sem_consumer, args=(s, 50, w)) for _ in range(2)]
    for p in procs:
        p.start()
    os.close(w)
    try:
        for _ in range(100):
            assert lib.mmkv_sem_post(s) == 0
        counts = sorted(int(_read_line(r)) for _ in procs)
        assert sum(counts) == 100 and counts == [50, 50]
        assert [_reap(p) for p in procs] == [0, 0]
        val = ffi.new("int32_t *")
        assert lib.mmkv_sem_value(s, val) == 0 and val[0] == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        os.close(r)


# ---------------------------------------------------------------- very long timeouts
# A timeout near INT64_MAX ns must wait (as "forever"), not overflow the deadline into EINVAL.

INT64_MAX = (1 << 63) - 1


def _unlock_later(m, wfd, delay):
    lib.mmkv_mutex_lock(m, -1)
    os.write(wfd, b"L\n")
    time.sleep(delay)
    os._exit(lib.mmkv_mutex_unlock(m))


def _post_later(s, delay):
    time.sleep(delay)
    os._exit(lib.mmkv_sem_post(s))


@pytest.mark.parametrize("timeout_ns", [1 << 62, INT64_MAX - 1, INT64_MAX])
def test_mutex_huge_timeout_waits(shm, timeout_ns):
    m = shm
    assert lib.mmkv_mutex_init(m) == 0
    r, w = os.pipe()
    p = FORK.Process(target=_unlock_later, args=(m, w, 0.3))
    p.start()
    os.close(w)
    try:
        assert _read_line(r) == b"L\n"
        t0 = time.monotonic()
        rc = lib.mmkv_mutex_lock(m, timeout_ns)
        waited = time.monotonic() - t0
        if rc == 0:
            lib.mmkv_mutex_unlock(m)
        assert _reap(p) == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
        os.close(r)
    assert rc == 0, f"lock with a {timeout_ns} ns timeout returned {errno.errorcode.get(rc, rc)}"
    assert waited >= 0.1


@pytest.mark.parametrize("timeout_ns", [1 << 62, INT64_MAX - 1, INT64_MAX])
def test_semaphore_huge_timeout_waits(shm, timeout_ns):
    s = shm
    assert lib.mmkv_sem_init(s, 0) == 0
    p = FORK.Process(target=_post_later, args=(s, 0.3))
    p.start()
    try:
        t0 = time.monotonic()
        rc = lib.mmkv_sem_timedwait(s, timeout_ns)
        waited = time.monotonic() - t0
        assert _reap(p) == 0
    finally:
        if p.is_alive():
            p.kill()
            p.join(5)
    assert rc == 0, f"timedwait with a {timeout_ns} ns timeout returned {errno.errorcode.get(rc, rc)}"
    assert waited >= 0.1
