"""Every tunable of the engine, with its unit, in one place."""

#: Bytes of a new file (header page included); it grows geometrically from here.
INITIAL_FILE_SIZE = 256 * 1024
#: An index segment splits when an insert would take its load (keys / slots) above this.
MAX_LOAD = 0.75
#: Longest key, in bytes.
MAX_KEY_SIZE = 64 * 1024
#: Longest value, in bytes.
MAX_VALUE_SIZE = (1 << 32) - 1
#: Seconds to wait for the store lock before LockTimeoutError (None: wait forever).
LOCK_TIMEOUT = 10.0
#: Seconds a lock wait lasts before the holder (pid, time held) is logged on the "mmkv" logger.
LOCK_REPORT_AFTER = 1.0
#: Seconds to wait for the open/close protocol's sidecar lock.
OPEN_TIMEOUT = 30.0
#: Bytes of the per-handle buffer that get() copies values into; larger values take a bigger one.
GET_BUFFER = 64 * 1024
#: The file grows by a quarter of its size per step, at least GROW_STEP_MIN, at most GROW_STEP_MAX bytes;
#: when the disk cannot take that, by half as much, and so on down to what the operation needs
#: (mapping.next_size, mapping.grow_file).
GROW_STEP_MIN = 256 * 1024
GROW_STEP_MAX = 1 << 30
#: After each growth, the first this many bytes of the new space are written with zeros (pwrite)
#: so that the pages the allocator hands out next are already in the page cache: a first touch
#: through the mapping of a fallocated page costs ~8 us (ext4), of a written one ~0.5 us.
PREFILL_BYTES = 8 << 20
#: A free that makes a free block of at least this many bytes reach a larger size class gives the
#: pages inside it back to the filesystem (fallocate PUNCH_HOLE; format version 2 files).
RELEASE_MIN = 1 << 20
#: Bytes of released space backed again (posix_fallocate) at a time when an allocation reaches it.
BACK_CHUNK = 1 << 20
#: Allocations of at least this many bytes are page-aligned and sized in whole pages.
LARGE_BLOCK = 64 * 1024
#: update() of at least this many pairs first makes room in one step (Store._reserve_for): the
#: index at its final size, the file grown once.  Read at each update (see set_presize_pairs).
PRESIZE_PAIRS = 1024
#: Blocks a first-fit scan of one free list may inspect before taking a larger class.
FIT_SCAN = 32


def set_max_load(load: float) -> float:
    """Testing hook: handles opened from now on split an index segment above this load
    (a tiny load makes splits, rebuilds and deep directories happen with a few hundred keys);
    returns the previous value, to restore.  Only the crash kit and the tests call it.

    :raises ValueError: load is not in (0, 1].
    """
    global MAX_LOAD
    if not 0 < load <= 1:
        raise ValueError(f"load must be in (0, 1], not {load}")
    old, MAX_LOAD = MAX_LOAD, load
    return old


def set_presize_pairs(pairs: int) -> int:
    """Set PRESIZE_PAIRS (the crash kit lowers it so that its small batches presize); returns the
    old value."""
    global PRESIZE_PAIRS
    old, PRESIZE_PAIRS = PRESIZE_PAIRS, pairs
    return old


def set_release(release_min: int, back_chunk: int) -> tuple:
    """Set RELEASE_MIN and BACK_CHUNK (the crash kit lowers them so that its small stores release
    and back space often); read by handles opened from now on (RELEASE_MIN) and at each backing
    (BACK_CHUNK).  Returns the old values."""
    global RELEASE_MIN, BACK_CHUNK
    old = RELEASE_MIN, BACK_CHUNK
    RELEASE_MIN, BACK_CHUNK = release_min, back_chunk
    return old
