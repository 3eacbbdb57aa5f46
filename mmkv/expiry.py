"""Expiry: keys with a time to live, the clock they are measured by, and ``memoize``.

A key set with ``db.set(key, value, ttl=seconds)`` (or given one later by ``db.expire``) gets a
*deadline*: the wall clock (``CLOCK_REALTIME``, nanoseconds since the epoch) at the write plus
the ttl, stored in its record.  From the moment any process's clock reaches the deadline the key
is absent for every read of every process (get, ``in``, get_many, iteration, ``len``); the
core compares the deadline with the clock on each read of such a record, so there is no window
in which one process still sees it.

Why the wall clock: a deadline must mean the same to every process and survive a reboot, and
the monotonic clock does neither (it restarts at boot).  The cost is that the wall clock can
jump: set forward (by hand or by NTP stepping it), keys expire early; set back, they live longer
by the jump.  NTP's usual slewing (a few hundred ppm) changes a ttl by as little.  ``ttl(key)``
reports what is left by the clock as it reads now.

Space: an expired key's record goes when a read meets it and the store lock is free at that moment
(Store._reap: a read never waits for the lock; a read-only handle leaves it), when a write meets
the key (put, delete, pop, cas reclaim it), or when the sweep reaches it: every fourth write of a handle (MMKV_SWEEP_EVERY) that
finds a deadline passed since the last whole pass (``state.ttl_min``) examines the next
MMKV_SWEEP_STEP (128) index slots in the same lock hold, and ``db.sweep()`` runs a whole pass.  ``len(db)``
is O(1) until some deadline passes; then its next call sweeps the whole index once under the
lock (a lockless handle counts instead), which makes it O(1) again until the next deadline.

Tests control time with ``ManualClock``: ``mmkv.open(path, clock=clock)``; the handle's reads,
writes and sweeps then take the time from it.
"""
from __future__ import annotations

import math
import time

from .engine.shim import ffi

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

_NS = 1_000_000_000
_DEADLINE_MAX = (1 << 63) - 1


class ManualClock:
    """A clock for tests: the time is what ``set`` or ``advance`` made it, in seconds since the
    epoch (default: the real time when made).  Every handle opened with it reads it (without a
    call into Python: the core reads the cell this object owns); other processes keep their own
    clocks, so give each the same times (a child can be handed ``clock.now()``)."""

    def __init__(self, start: float | None = None):
        self._cell = ffi.new("int64_t *")
        self.set(time.time() if start is None else start)

    def now(self) -> float:
        """The time, in seconds since the epoch."""
        return self._cell[0] / _NS

    def now_ns(self) -> int:
        return self._cell[0]

    def set(self, seconds: float) -> None:
        """Make the time `seconds` since the epoch (back or forward)."""
        self._cell[0] = int(seconds * _NS)

    def advance(self, seconds: float) -> None:
        """Move the time on by `seconds` (negative: back)."""
        self._cell[0] += int(seconds * _NS)

    def __repr__(self):
        return f"ManualClock({self.now()!r})"


def check_ttl(ttl: Any, what: str = "ttl") -> float:
    """ttl as seconds, or TypeError/ValueError: a real number of seconds, > 0 and finite."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(ttl).__name__}")
    if not ttl > 0 or math.isinf(ttl):
        raise ValueError(f"{what} must be more than 0 seconds and finite, not {ttl!r}")
    return ttl


def deadline_after(now_ns: int, ttl: Any) -> int:
    """The deadline (nanoseconds since the epoch) ttl seconds after now_ns; at least now_ns + 1.
    :raises OverflowError: past the year 2262 (the deadline's 64 bits)."""
    seconds = check_ttl(ttl)
    deadline = now_ns + max(1, math.ceil(seconds * _NS))
    if deadline > _DEADLINE_MAX:
        raise OverflowError(f"ttl {ttl!r} puts the deadline past what 64 bits of nanoseconds hold (2262)")
    return deadline


def memoize(db, ttl: float | None = None, name: str | None = None) -> Callable:
    """A decorator that caches a function's results in db, shared by every process that opens
    the file: ``@memoize(db, ttl=60)``.  The key is the function's name (or `name`) with its
    arguments, pickled; the value is the result, pickled.  A result older than ttl seconds is
    computed again.  Two processes that miss at once both compute, and the last write wins (as
    in diskcache's memoize): the function should be one whose result may be computed twice.
    Arguments must be picklable, and equal arguments must pickle equally (e.g. not a set of
    strings, whose order varies between processes).  ``f.__wrapped__`` is the function;
    ``f.cache_key(*args, **kw)`` the key a call uses.
    """
    import functools
    import pickle

    if ttl is not None:
        check_ttl(ttl)

    def decorate(fn):
        prefix = (name or f"{fn.__module__}.{fn.__qualname__}").encode()

        def cache_key(*args, **kw):
            return b"memo:" + prefix + b":" + pickle.dumps((args, sorted(kw.items())), protocol=4)

        @functools.wraps(fn)
        def wrapper(*args, **kw):
            key = cache_key(*args, **kw)
            hit = db.get(key)
            if hit is not None:
                return pickle.loads(hit)
            result = fn(*args, **kw)
            db.set(key, pickle.dumps(result, protocol=4), ttl=ttl)
            return result

        wrapper.cache_key = cache_key
        return wrapper
    return decorate
