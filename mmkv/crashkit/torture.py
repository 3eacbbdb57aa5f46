"""Crash-durability harness: kill writers at random moments and at every failpoint, then prove
that nothing acknowledged was lost.

    python -m mmkv torture kill PATH [--kills N] [--sync none|full] [--seed S] [--bystanders K]
    python -m mmkv torture powerloss DIR [--images N] [--sync none|full] [--seed S]

**Kill harness.**  Each round forks a writer (the victim) that runs a
deterministic stream of operations drawn from its seed (puts of 0 B to 300 KiB,
deletes, increments, transactions of several keys, batches, compare-and-swaps,
keys set with a deadline a millisecond away (expired, so gone, by the time anything
verifies: the writes after them run the expiry sweep, which deletes their records) or an
hour away, deadlines given and taken away, explicit sweeps, compactions, clears that
restart index growth) and acknowledges each one on a pipe when the call has
returned.  The round ends with SIGKILL: either the parent's, after a random
delay, or the writer's own at an armed failpoint.

Deployments have other processes on the file, so a round also has up to K
*bystanders* (``--bystanders K``, a random 0..K per round, default 3; 0 gives
single-handle rounds): processes forked from the harness that open the same
file before the victim does, each through one of its names (the path, a hard
link, a symbolic link, or a relative path from another working directory,
after which the process changes directory again) and then

* ``idle``: hold the handle and do nothing (the one that closes last after a
  death is the case that matters most);
* ``reader``: read the victim's keys in a loop, through a read-only handle;
* ``writer``: write keys of its own (prefix ``b"by:"``, never touched by the
  victim, whose clears are left out of such rounds), acknowledging each;
* ``reopener``: close and open its handle in a loop;
* ``lockless``: read the victim's keys in a loop through a lockless handle (``lockless=True``:
  a read-only mapping that never takes the lock, as a process without write access gets),
  every read lock-free; after the victim dies holding the lock its reads raise
  ``RecoveryNeededError`` until a handle that may write repairs, which it counts and goes on.

``idle`` and ``reopener`` open read-only half the time (seeded, at each open): a read-only
handle leaves a clean file marked clean, so the victim that opens after it must clear the
mark itself, and a reader that finds the victim dead repairs the file through a read-only
handle (see mmkv/engine/opening.py).

After the victim's death the bystanders are asked to stop (a line on a control
pipe), one after the other in a seeded random order, and each closes its handle
and exits; a bystander that fails is reported with its traceback.  Sometimes one
of them (not a writer) stays open while the parent verifies, through another
name than the bystander's, and closes afterwards; the store is verified again
after that last close.  The victim too opens through a random name.

The parent then reopens the file (recovery runs) and checks that:

* the whole content equals the model of the acknowledged operations (the
  victim's and every bystander writer's), or that plus the victim's one
  operation in flight (never anything else: a transaction is all or nothing,
  a counter is never lost or doubled, a bystander's acknowledged write is there);
* ``check()`` passes.

The writers lower the index's split threshold (MAX_LOAD) so that segment
splits, and the failpoints on them, come every few hundred inserts, and the
batch size at which update() presizes the index (PRESIZE_PAIRS) so that the
stream's larger batches rebuild it in one step (the rebuild.* failpoints).

**Power-loss simulator.**  One process, one handle: it records the file at
every sync barrier of a writer and opens crash images cut between barriers
(pages lost, torn).  It covers what reaches the disk and in which order; it
does not cover other processes on the file (their open/close protocol, a
crash observed by another live handle): that is the kill harness's part.
"""
import argparse
import hashlib
import os
import random
import select
import signal
import sys
import time
import traceback
from collections import Counter

from ..engine import failpoints

POOL = 600                      # keys the writer draws from
SIZES = (0, 1, 10, 100, 1000, 5000, 70_000)
TORTURE_MAX_LOAD = 0.01         # the writer's split threshold: 163 keys per segment
TORTURE_PRESIZE_PAIRS = 100     # the writer's update() presizes the index from this many pairs
TORTURE_RELEASE = (64 << 10, 16 << 10)   # free blocks of 64 KiB release their pages; backing by 16 KiB
#: The kinds of bystander process, and the names of the file a process may open it through.
BYSTANDER_KINDS = ("idle", "reader", "writer", "reopener", "lockless")
NAME_KINDS = ("path", "hardlink", "symlink", "relative")
#: Prefix of the keys bystander writers own (the victim's keys are k0.. and counter).
BYSTANDER_PREFIX = b"by:"
#: Seconds any one child may take to open, to stop, or (the victim) to run.
CHILD_TIMEOUT = 60
#: Marks the start of a child's traceback on its report pipe.
_TRACEBACK = b"\0traceback\n"


#: An expected value no key of the victim ever holds (its values are random bytes of other sizes,
#: or of up to 63 bytes in batches: 2^-104 that one is this).
CAS_NEVER = b"\xfe" * 13
#: The time to live of the victim's short-lived keys (seconds): they have expired by the time
#: anything verifies them (verify and check_image wait this long first), so the model drops them.
SHORT_TTL = 0.001
#: ... and of its long-lived ones, which outlive any run.
LONG_TTL = 3600.0


def operations(seed: int, clears: bool = True):
    """The writer's operation stream: deterministic in (seed, clears), independent of the store.

    With clears=False (rounds with bystander writers, whose keys a clear would
    remove) the stream draws the same numbers and makes a clear a delete.
    """
    rnd = random.Random(seed)

    def key():
        return b"k%d" % rnd.randrange(POOL)

    def value():
        n = rnd.choice(SIZES) if rnd.random() < 0.995 else 300_000
        return rnd.randbytes(n)

    while True:
        r = rnd.random()
        if r < 0.28:
            yield ("put", key(), value())
        elif r < 0.31:
            yield ("set-short", key(), value())    # expires at once: then the sweep takes it
        elif r < 0.33:
            yield ("set-long", key(), value())
        elif r < 0.335:
            yield ("expire-short", key())
        elif r < 0.34:
            yield ("expire-counter", rnd.choice((LONG_TTL, None)))   # incr keeps a deadline
        elif r < 0.37:
            yield ("cas", key(), value())          # read the value, then cas it to a new one
        elif r < 0.39:
            yield ("cas-del", key())               # read the value, then cas it away
        elif r < 0.395:
            yield ("cas-miss", key(), value())     # a cas whose expected value is never there
        elif r < 0.40:
            yield ("cas-counter", b"counter")      # read the counter, cas it one up (in place, as incr)
        elif r < 0.55:
            yield ("del", key())
        elif r < 0.70:
            yield ("incr", b"counter", rnd.choice((1, 1, 1, 7, -3)))
        elif r < 0.86:
            yield ("txn", [(key(), None if rnd.random() < 0.25 else value()) for _ in range(rnd.randint(2, 6))])
        elif r < 0.88:
            yield namespace_op(rnd, key)
        elif r < 0.99:
            size = rnd.randint(10, 120) if rnd.random() < 0.85 else rnd.randint(150, 500)
            batch = {key(): rnd.randbytes(rnd.randrange(64)) for _ in range(size)}
            yield ("batch", list(batch.items()))
        elif r < 0.994:
            yield ("compact",)
        elif r < 0.998:
            yield ("sweep", rnd.choice((None, 1, 64, 4096)))
        elif clears:
            yield ("clear",)
        else:
            yield ("del", b"counter")


#: Namespaces the writer's stream uses, and how their keys appear in the model (a flat dict):
#: NS_PREFIX + name + b"\0" + key, which no key of the main index the writers use can be.
NAMESPACES = ("n1", "n2")
NS_PREFIX = b"\xffns:"


def ns_key(name: str, key: bytes) -> bytes:
    return NS_PREFIX + name.encode() + b"\0" + key


def namespace_op(rnd, key):
    """One operation on the namespaces: a put or delete in one, a transaction spanning the main
    index and both, a clear or a drop of one."""
    name, r = rnd.choice(NAMESPACES), rnd.random()

    def value():
        return rnd.randbytes(rnd.choice((0, 10, 100, 2000)))
    if r < 0.45:
        return ("ns-put", name, key(), value())
    if r < 0.65:
        return ("ns-del", name, key())
    if r < 0.85:
        return ("ns-txn", [(rnd.choice((None,) + NAMESPACES), key(), None if rnd.random() < 0.25 else value())
                           for _ in range(rnd.randint(2, 5))])
    if r < 0.95:
        return ("ns-clear", name)
    return ("ns-drop", name)


def contents(db) -> dict:
    """Every key of the store as the model holds it: the main index's, and each namespace's
    under ns_key."""
    got = dict(db.items())
    for name in db.namespaces():
        got.update((ns_key(name, k), v) for k, v in db.namespace(name).items())
    return got


def bystander_operations(ident: bytes, seed: int):
    """A bystander writer's stream: puts, deletes, increments and transactions of its own keys
    (``b"by:" + ident + b":..."``), deterministic in (ident, seed)."""
    rnd = random.Random(seed)
    keys = [BYSTANDER_PREFIX + ident + b":%d" % i for i in range(6)]

    def value():
        return rnd.randbytes(rnd.choice((0, 10, 100, 1000, 5000)))

    while True:
        r = rnd.random()
        if r < 0.5:
            yield ("put", rnd.choice(keys), value())
        elif r < 0.7:
            yield ("del", rnd.choice(keys))
        elif r < 0.85:
            yield ("incr", BYSTANDER_PREFIX + ident + b":ctr", rnd.choice((1, 5, -2)))
        else:
            yield ("txn", [(k, None if rnd.random() < 0.3 else value()) for k in rnd.sample(keys, 3)])


def apply(model: dict, op) -> None:
    """What op does to a dict model of the store."""
    kind = op[0]
    if kind in ("put", "cas", "set-long"):
        model[op[1]] = op[2]
    elif kind in ("del", "cas-del", "set-short", "expire-short"):
        model.pop(op[1], None)
    elif kind in ("incr", "cas-counter"):
        now = int.from_bytes(model.get(op[1], bytes(8)), "little", signed=True) + (op[2] if kind == "incr" else 1)
        model[op[1]] = now.to_bytes(8, "little", signed=True)
    elif kind in ("txn", "batch"):
        for k, v in op[1]:
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
    elif kind == "clear":                  # the main index only: namespaces keep their keys
        for k in [k for k in model if not k.startswith(NS_PREFIX)]:
            del model[k]
    elif kind == "ns-put":
        model[ns_key(op[1], op[2])] = op[3]
    elif kind == "ns-del":
        model.pop(ns_key(op[1], op[2]), None)
    elif kind == "ns-txn":
        for name, k, v in op[1]:
            k = k if name is None else ns_key(name, k)
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
    elif kind in ("ns-clear", "ns-drop"):
        for k in [k for k in model if k.startswith(ns_key(op[1], b""))]:
            del model[k]


def perform(db, op) -> None:
    """Run op on the store (the writer's side of apply)."""
    kind = op[0]
    if kind == "put":
        db[op[1]] = op[2]
    elif kind == "del":
        db.pop(op[1], None)
    elif kind == "incr":
        db.incr(op[1], op[2])
    elif kind == "txn":
        with db.transaction():
            for k, v in op[1]:
                if v is None:
                    db.pop(k, None)
                else:
                    db[k] = v
    elif kind == "batch":
        db.update(dict(op[1]))
    elif kind == "clear":
        db.clear()
    elif kind == "compact":
        db.compact()
    elif kind in ("cas", "cas-del"):                 # the victim alone writes its keys: it must swap
        new = op[2] if kind == "cas" else None
        if not db.cas(op[1], db.get(op[1]), new):
            raise AssertionError(f"cas of {op[1]!r} against the value just read did not swap")
    elif kind == "cas-miss":
        if db.cas(op[1], CAS_NEVER, op[2]):
            raise AssertionError(f"cas of {op[1]!r} against a value it never holds swapped")
    elif kind == "cas-counter":
        old = db.get(op[1])
        new = (int.from_bytes(old or bytes(8), "little", signed=True) + 1).to_bytes(8, "little", signed=True)
        if not db.cas(op[1], old, new):
            raise AssertionError(f"cas of counter {op[1]!r} against the value just read did not swap")
    elif kind in ("set-short", "set-long"):
        db.set(op[1], op[2], ttl=SHORT_TTL if kind == "set-short" else LONG_TTL)
    elif kind == "expire-short":
        db.expire(op[1], SHORT_TTL)
    elif kind == "expire-counter":
        db.expire(b"counter", op[1])
    elif kind == "sweep":
        db.sweep(op[1])
    elif kind == "ns-put":
        db.namespace(op[1])[op[2]] = op[3]
    elif kind == "ns-del":
        db.namespace(op[1]).pop(op[2], None)
    elif kind == "ns-txn":
        spaces = {name: db.namespace(name) for name, _, _ in op[1] if name}   # (created outside the block)
        with db.transaction():
            for name, k, v in op[1]:
                target = db if name is None else spaces[name]
                if v is None:
                    target.pop(k, None)
                else:
                    target[k] = v
    elif kind == "ns-clear":
        db.namespace(op[1]).clear()
    elif kind == "ns-drop":
        if op[1] in db.namespaces():
            db.drop_namespace(op[1])


# ---------------------------------------------------------------- names of one file

class Names:
    """The names one store file is opened through: its path, a hard link and a symbolic link
    next to it (``PATH.hardlink``, ``PATH.symlink``), and a relative path (``../NAME``) from a
    working directory next to it (``PATH.cwd/``).  A process that opened it by the relative
    name then moves to ``PATH.cwd/moved/``, where that name means another (absent) file.

    The links are made by ``make()`` once the file exists; the engine must keep the file's
    inode (it only replaces the file when creating it), which ``same_file()`` checks.
    """

    def __init__(self, path: str):
        self.path = path
        folder, base = os.path.split(os.path.abspath(path))
        self.hardlink = os.path.join(folder, base + ".hardlink")
        self.symlink = os.path.join(folder, base + ".symlink")
        self.cwd = os.path.join(folder, base + ".cwd")
        self.moved = os.path.join(self.cwd, "moved")
        self.relative = os.path.join(os.pardir, base)

    def make(self) -> None:
        """Create the links and the working directories (the file must exist)."""
        ino = os.stat(self.path).st_ino
        if not os.path.exists(self.hardlink) or os.stat(self.hardlink).st_ino != ino:
            if os.path.lexists(self.hardlink):
                os.unlink(self.hardlink)
            os.link(self.path, self.hardlink)
        if not os.path.lexists(self.symlink):
            os.symlink(os.path.basename(self.path), self.symlink)
        os.makedirs(self.moved, exist_ok=True)

    def same_file(self) -> None:
        """:raises AssertionError: a name no longer leads to the store's inode."""
        ino = os.stat(self.path).st_ino
        for name in (self.hardlink, self.symlink, os.path.join(self.cwd, self.relative)):
            if os.stat(name).st_ino != ino:
                raise AssertionError(f"{name} is no longer the store file {self.path} (it was replaced)")

    def name(self, kind: str) -> str:
        """The name of kind to pass to open (for "relative": valid in ``self.cwd`` only)."""
        return {"path": self.path, "hardlink": self.hardlink, "symlink": self.symlink,
                "relative": self.relative}[kind]

    def enter(self, kind: str) -> str:
        """In a child process, about to open through kind: change directory if need be; the name."""
        if kind == "relative":
            os.chdir(self.cwd)
        return self.name(kind)

    def leave(self, kind: str) -> None:
        """In a child process, just opened through kind: a relative opener moves away."""
        if kind == "relative":
            os.chdir(self.moved)


# ---------------------------------------------------------------- forked children

class Child:
    """A process forked from the harness running ``body(report_fd, control_fd)``.

    The child writes lines on its report pipe; when body raises, its traceback
    follows a marker and the child exits with status 3.  The parent reads the pipe
    (``feed``) while the child runs and reaps it with ``finish``.  Every descriptor
    the parent keeps for a child is closed in every later child, so that a
    child's pipes reach end-of-file when it exits, whoever else was forked.
    """

    _parent_fds = set()

    def __init__(self, what: str, body, control: bool = False):
        self.what = what
        rep_r, rep_w = os.pipe()
        ctl_r, ctl_w = os.pipe() if control else (None, None)
        pid = os.fork()
        if pid == 0:                                           # pragma: no cover - the child
            code = 0
            try:
                for fd in Child._parent_fds | {rep_r, ctl_w} - {None}:
                    os.close(fd)
                body(rep_w, ctl_r)
            except BaseException:
                try:
                    _write_all(rep_w, _TRACEBACK + traceback.format_exc().encode())
                except OSError:
                    pass
                code = 3
            os._exit(code)
        os.close(rep_w)
        if ctl_r is not None:
            os.close(ctl_r)
        self.pid, self.rep, self.ctl = pid, rep_r, ctl_w
        Child._parent_fds.update(fd for fd in (rep_r, ctl_w) if fd is not None)
        self.data = b""
        self.eof = False
        self.status = None

    def fileno(self) -> int:
        return self.rep

    def feed(self) -> None:
        """Read what the child wrote (call when the pipe is readable)."""
        chunk = os.read(self.rep, 65536)
        if chunk:
            self.data += chunk
        else:
            self.eof = True

    def lines(self) -> list:
        """The complete lines before any traceback (a line cut by a kill was never said)."""
        return self.data.split(_TRACEBACK)[0].split(b"\n")[:-1]

    def traceback(self) -> str:
        if _TRACEBACK not in self.data:
            return ""
        return self.data.split(_TRACEBACK, 1)[1].decode(errors="replace")

    def wait_for(self, line: bytes, timeout: float = CHILD_TIMEOUT) -> None:
        """Read until the child said line.  :raises AssertionError: it exited or took too long."""
        deadline = time.monotonic() + timeout
        while line not in self.lines():
            if self.eof or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{self.what} did not say {line.decode()!r}: "
                                     f"{self.failure() or 'timed out'}")
            if select.select([self.rep], [], [], max(0.0, deadline - time.monotonic()))[0]:
                self.feed()

    def send(self, line: bytes) -> None:
        try:
            os.write(self.ctl, line)
        except (BrokenPipeError, OSError):       # it died: finish() reports how
            pass

    def finish(self, timeout: float = CHILD_TIMEOUT) -> int:
        """Read the report to end-of-file and reap the child; returns its wait status
        (SIGKILL after timeout seconds)."""
        deadline = time.monotonic() + timeout
        while not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(self.pid, signal.SIGKILL)
                deadline = float("inf")
                self.data += b"\n[killed: it did not finish in %d s]" % timeout
                continue
            if select.select([self.rep], [], [], left)[0]:
                self.feed()
        _, self.status = os.waitpid(self.pid, 0)
        self._close_fds()
        return self.status

    def kill(self) -> None:
        """SIGKILL and reap (cleanup after a failure; safe to call twice)."""
        if self.status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, self.status = os.waitpid(self.pid, 0)
        self._close_fds()

    def failure(self) -> str:
        """Why the child failed: its traceback, else its wait status ("" while it runs)."""
        tb = self.traceback()
        if tb:
            return "\n" + tb
        if self.status is None:
            return ""
        if os.WIFSIGNALED(self.status):
            return f"killed by signal {os.WTERMSIG(self.status)}"
        return f"exit status {os.WEXITSTATUS(self.status)}"

    def _close_fds(self) -> None:
        for fd in (self.rep, self.ctl):
            if fd is not None and fd in Child._parent_fds:
                Child._parent_fds.discard(fd)
                os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def _lower_split_threshold() -> None:
    from ..engine import tunables
    tunables.set_max_load(TORTURE_MAX_LOAD)
    tunables.set_presize_pairs(TORTURE_PRESIZE_PAIRS)
    tunables.set_release(*TORTURE_RELEASE)


# ---------------------------------------------------------------- the victim

def writer(path: str, seed: int, sync: str, ack_fd: int, limit: int, clears: bool = True) -> None:
    """Body of the forked writer: perform the stream, acknowledge each op by its number."""
    _lower_split_threshold()
    import mmkv
    db = mmkv.open(path, sync=sync)
    os.write(ack_fd, b"open\n")
    for n, op in enumerate(operations(seed, clears)):
        if n >= limit:
            break
        perform(db, op)
        os.write(ack_fd, b"%d\n" % n)
    db.close()


def run_victim(path: str, ops, failpoint=None, sync: str = "none", name: str = "path", prepare=None) -> tuple:
    """Fork a process that opens the store through name (a Names kind), calls prepare(db)
    if given, arms failpoint ((name, countdown) or None), performs ops, acknowledging
    each, and closes it.  Blocks until the process has ended (CHILD_TIMEOUT at most).

    Returns (number of ops acknowledged, "failpoint" when it died by SIGKILL, else "finished").
    :raises AssertionError: the child failed otherwise (with its traceback).
    """
    names = Names(path)
    ops = list(ops)

    def body(rep, _ctl):
        import mmkv
        db = mmkv.open(names.enter(name), sync=sync)
        names.leave(name)
        if prepare is not None:
            prepare(db)
        os.write(rep, b"open\n")
        if failpoint:
            failpoints.arm(*failpoint)
        for n, op in enumerate(ops):
            perform(db, op)
            os.write(rep, b"%d\n" % n)
        db.close()

    child = Child(f"victim through {name}", body)
    try:
        status = child.finish()
    finally:
        child.kill()
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and not child.traceback():
        ended = "failpoint"
    elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        ended = "finished"
    else:
        raise AssertionError(f"{child.what} failed: {child.failure()}")
    return sum(1 for line in child.lines() if line != b"open"), ended


# ---------------------------------------------------------------- bystanders

class Bystander:
    """Another process with the store open while the victim runs (see the module docstring).

    ``start()`` forks it and returns once it has the file open; ``stop()`` asks it
    to close its handle and exit, and waits.  A writer's acknowledged operations are
    ``bystander_operations(ident, seed)`` up to ``acked``.
    """

    def __init__(self, names: Names, kind: str, name: str, seed: int, sync: str = "none",
                 ident: bytes = b"0"):
        if kind not in BYSTANDER_KINDS or name not in NAME_KINDS:
            raise ValueError(f"unknown bystander {kind!r} through {name!r}")
        self.names, self.kind, self.name, self.seed, self.sync, self.ident = names, kind, name, seed, sync, ident
        self.child = None
        self.acked = 0
        self.refused = False

    def __repr__(self):
        return f"{self.kind} through {self.name}"

    def start(self) -> "Bystander":
        """Fork it; return when it has the file open.  :raises AssertionError: it failed to."""
        self.child = Child(f"bystander {self!r}", self._body, control=True)
        self.child.wait_for(b"open")
        return self

    def stop(self) -> None:
        """Ask it to close and exit; wait.  :raises AssertionError: it failed (with its
        traceback), or did not stop within CHILD_TIMEOUT seconds."""
        self.child.send(b"stop\n")
        status = self.child.finish()
        lines = self.child.lines()
        self.acked = sum(1 for line in lines if line.isdigit())
        self.refused = b"recovery needed" in lines       # a lockless one met the victim's death
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and b"closed" in lines):
            raise AssertionError(f"{self.child.what} failed: {self.child.failure()}")

    def kill(self) -> None:
        if self.child is not None:
            self.child.kill()

    def writes(self):
        """The operations it acknowledged (a writer; after stop())."""
        ops = bystander_operations(self.ident, self.seed)
        return [next(ops) for _ in range(self.acked)]

    def _body(self, rep, ctl):
        _lower_split_threshold()
        import mmkv
        rnd = random.Random(self.seed)
        names, name = self.names, self.name
        lockless = self.kind == "lockless"
        db = mmkv.open(names.enter(name), self._flag(rnd), sync=self.sync, lockless=lockless)
        names.leave(name)
        ops = enumerate(bystander_operations(self.ident, self.seed))
        if self.kind == "writer":           # one write before the victim starts, the rest during
            n, op = next(ops)
            perform(db, op)
            os.write(rep, b"%d\n" % n)
        os.write(rep, b"open\n")
        pause = {"idle": None, "reader": 0.001, "writer": 0.002, "reopener": 0.005, "lockless": 0.001}[self.kind]
        refused = False
        while not select.select([ctl], [], [], pause)[0]:      # any line (or EOF) means stop
            if lockless:
                try:
                    read_locklessly(db, rnd)
                    refused = False
                except mmkv.RecoveryNeededError:
                    if not refused:                            # the victim died holding the lock
                        os.write(rep, b"recovery needed\n")
                    refused = True
            elif self.kind == "reader":
                for _ in range(20):                           # the lock-free path
                    db.get(b"k%d" % rnd.randrange(POOL))
                counter = db.get(b"counter")
                if counter is not None and len(counter) != 8:
                    raise AssertionError(f"the counter holds {len(counter)} bytes")
                len(db)                                       # under the lock
            elif self.kind == "writer":
                n, op = next(ops)
                perform(db, op)
                os.write(rep, b"%d\n" % n)
            elif self.kind == "reopener":
                db.close()
                db = mmkv.open(names.enter(name), self._flag(rnd), sync=self.sync)
                names.leave(name)
        db.close()
        os.write(rep, b"closed\n")

    def _flag(self, rnd: random.Random) -> str:
        """The open flag: a reader or a lockless one reads through a read-only handle, an idle
        one or a reopener half the time, a writer never."""
        if self.kind in ("reader", "lockless") or (self.kind in ("idle", "reopener") and rnd.random() < 0.5):
            return "r"
        return "c"


def read_locklessly(db, rnd: random.Random) -> None:
    """One round of a lockless bystander: gets, the count, a stretch of iteration; what it reads
    must be plausible (a counter is 8 bytes, no key twice).  :raises RecoveryNeededError: the
    victim died holding the lock and nobody has repaired yet."""
    for _ in range(20):
        db.get(b"k%d" % rnd.randrange(POOL))
    counter = db.get(b"counter")
    if counter is not None and len(counter) != 8:
        raise AssertionError(f"the counter holds {len(counter)} bytes (read without the lock)")
    len(db)
    seen = set()
    for key in db:
        if key in seen:
            raise AssertionError(f"iteration without the lock yielded {key!r} twice")
        seen.add(key)
        if len(seen) >= 50:
            break


def choose_bystanders(rnd: random.Random, most: int, kinds, names) -> list:
    """(kind, name) of a random 0..most bystanders."""
    return [(rnd.choice(kinds), rnd.choice(names)) for _ in range(rnd.randint(0, most))]


# ---------------------------------------------------------------- rounds

class Round:
    """One writer run: start the bystanders, fork the victim, kill it (or let a failpoint kill
    it), collect its acknowledgements, stop the bystanders in order.

    ``bystanders``: Bystander objects (not started); ``order``: the indices in which they
    stop; ``linger``: the index of one that stays open until ``finish()`` (or None).
    """

    def __init__(self, path, seed, sync, failpoint, delay, limit, bystanders=(), order=None, linger=None,
                 victim_name="path", clears=True):
        self.path, self.seed, self.sync = path, seed, sync
        self.failpoint, self.delay, self.limit = failpoint, delay, limit
        self.bystanders = list(bystanders)
        self.order = list(range(len(self.bystanders))) if order is None else list(order)
        self.linger = linger
        self.victim_name, self.clears = victim_name, clears

    def describe(self) -> str:
        fp = f"failpoint {self.failpoint[0]}:{self.failpoint[1]}" if self.failpoint else \
            f"SIGKILL after {self.delay * 1000:.0f} ms"
        text = f"seed {self.seed}, {fp}, victim through {self.victim_name}"
        if self.bystanders:
            order = [f"{self.bystanders[i]!r}" + (" (stays open during the verify)" if i == self.linger else "")
                     for i in self.order]
            text += f", bystanders closing in order: {', '.join(order)}"
        return text

    def run(self):
        """(number of acknowledged ops, how it ended: 'killed', 'failpoint' or 'finished').

        Every bystander but the lingering one has closed when this returns.
        :raises AssertionError: the victim or a bystander failed (every child is reaped).
        """
        try:
            for b in self.bystanders:
                b.start()
            acked, ended = self._victim()
            for i in self.order:
                if i != self.linger:
                    self.bystanders[i].stop()
        except BaseException:
            self.abort()
            raise
        return acked, ended

    def finish(self) -> bool:
        """Stop the lingering bystander; True if there was one."""
        if self.linger is None:
            return False
        try:
            self.bystanders[self.linger].stop()
        except BaseException:
            self.abort()
            raise
        return True

    def abort(self) -> None:
        for b in self.bystanders:
            b.kill()

    def _victim(self):
        names = Names(self.path)

        def body(ack, _ctl):
            if self.failpoint:
                failpoints.arm(*self.failpoint)
            path = names.enter(self.victim_name)
            writer(path, self.seed, self.sync, ack, self.limit, self.clears)

        victim = Child(f"writer {self.seed}", body)
        pid = victim.pid
        running = [b.child for b in self.bystanders]
        opened_at = None
        deadline = time.monotonic() + CHILD_TIMEOUT
        try:
            while not victim.eof:
                now = time.monotonic()
                if opened_at is not None and now >= opened_at + self.delay and not self.failpoint:
                    os.kill(pid, signal.SIGKILL)
                timeout = max(0.0, (opened_at + self.delay - now) if opened_at is not None and not self.failpoint
                              else deadline - now)
                ready, _, _ = select.select([victim] + running, [], [], min(timeout, 1.0))
                for child in ready:             # bystanders' reports are drained as they come
                    child.feed()
                    if child is not victim and child.eof:
                        running.remove(child)   # it exited early: stop() reports why
                if opened_at is None and b"open" in victim.lines():
                    opened_at = time.monotonic()
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
            status = victim.finish()
        finally:
            victim.kill()
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL and not victim.traceback():
            ended = "failpoint" if self.failpoint else "killed"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            ended = "finished"
        else:
            raise AssertionError(f"writer {self.seed} failed: {victim.failure()}")
        acked = sum(1 for line in victim.lines() if line != b"open")
        return acked, ended

    def writes(self) -> list:
        """Every operation the bystander writers acknowledged (after they stopped)."""
        return [op for b in self.bystanders if b.kind == "writer" for op in b.writes()]


def allowed_states(before: dict, inflight):
    """The states a crash during inflight may leave: before it, after it, and for a batch
    (update(), which is not atomic) every prefix of its pairs."""
    yield before
    if inflight is None:
        return
    if inflight[0] == "batch":
        state = dict(before)
        for k, v in inflight[1]:
            state[k] = v
            yield dict(state)
        return
    after = dict(before)
    apply(after, inflight)
    yield after


def verify(path: str, before: dict, inflight) -> dict:
    """Reopen the store and check it holds one of the allowed states; return that state.

    :raises AssertionError: the content is none of the allowed states (the message
        names lost, unexpected and wrong keys, a bystander writer's apart, and a
        half-applied transaction), or check() failed.
    """
    import mmkv
    damage = ""
    time.sleep(SHORT_TTL)           # every short-lived key the victim set has expired
    with mmkv.open(path) as db:
        try:
            db.check()
        except mmkv.Error as exc:
            damage = f"check() failed: {exc}"
        try:
            got = contents(db)
        except mmkv.Error as exc:
            raise AssertionError(f"cannot read the store: {exc}; {damage}") from None
    seen = digest(got)
    for state in allowed_states(before, inflight):
        if digest(state) == seen:
            if damage:
                raise AssertionError(damage)
            return state
    after = dict(before)
    if inflight is not None:
        apply(after, inflight)
    missing = [k for k in before if k not in got and k in after]
    extra = [k for k in got if k not in before and k not in after]
    wrong = [k for k in got if k in before and got[k] != before[k] and got[k] != after.get(k)]
    by = [k for k in missing + wrong if k.startswith(BYSTANDER_PREFIX)]
    text = (f"store differs from the acknowledged state: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"wrong values {wrong[:5]}, in flight {inflight and inflight[0]}")
    if by:
        text += f"; bystander writers' acknowledged writes lost: {by[:5]}"
    if inflight is not None and inflight[0] == "txn":
        keys = {k for k, _ in inflight[1]}
        old = sorted(k for k in keys if got.get(k) == before.get(k) and before.get(k) != after.get(k))
        new = sorted(k for k in keys if got.get(k) == after.get(k) and got.get(k) != before.get(k))
        if old and new:
            text += f"; the transaction in flight is half applied: new {new[:5]}, old {old[:5]}"
    if damage:
        text += f"; also {damage}"
    raise AssertionError(text)


def digest(contents: dict) -> dict:
    return {k: hashlib.sha1(v).digest() for k, v in contents.items()}


def run_kills(path: str, kills: int, sync: str = "none", seed: int = 1, failpoint_share: float = 0.5,
              log=None, bystanders: int = 3, kinds=BYSTANDER_KINDS, names=NAME_KINDS,
              linger_share: float = 0.3) -> dict:
    """Kill writers until `kills` rounds ended in SIGKILL; verify after each.  Returns a summary.

    bystanders: at most this many other processes on the file per round (a seeded
    random 0..bystanders; 0: every round has the victim alone, as before), of the
    given kinds, opened through the given names; linger_share of the rounds with
    a non-writer bystander keep one open while the parent verifies.
    :raises AssertionError: an acknowledged write was lost, a transaction was half
        applied, a counter was lost or doubled, check() failed, or a bystander failed
        (the message names the round: seed, failpoint, the bystanders and their order).
    """
    import mmkv
    if bystanders < 0:
        raise ValueError(f"bystanders must be 0 or more, not {bystanders}")
    for kind in kinds:
        if kind not in BYSTANDER_KINDS:
            raise ValueError(f"unknown bystander kind {kind!r}; known: {', '.join(BYSTANDER_KINDS)}")
    for name in names:
        if name not in NAME_KINDS:
            raise ValueError(f"unknown name kind {name!r}; known: {', '.join(NAME_KINDS)}")
    rnd = random.Random(seed)
    mmkv.open(path, sync=sync).close()
    file_names = Names(path)
    if bystanders:
        file_names.make()
    with mmkv.open(path) as db:
        model = contents(db)
    points = [p for p in failpoints.NAMES if sync == "full" or not p.startswith("sync.")]
    # the parent cannot change directory (it may be a test runner): it verifies through the others
    parent_names = [n for n in names if n != "relative"] or ["path"]
    summary = Counter()
    started = time.monotonic()
    round_no = 0
    while summary["killed"] + summary["failpoint"] < kills:
        round_no += 1
        fp = (rnd.choice(points), rnd.randint(1, 4)) if rnd.random() < failpoint_share else None
        # a random kill always comes (no op limit); an armed failpoint may not be reached in 20-400 ops
        limit = rnd.randint(20, 400) if fp else 1 << 62
        delay = rnd.uniform(0.001, 0.08)
        r_seed = seed * 1_000_003 + round_no
        if bystanders:
            chosen = choose_bystanders(rnd, bystanders, kinds, names)
            crowd = [Bystander(file_names, kind, name, r_seed * 31 + i, sync, b"%d.%d" % (round_no, i))
                     for i, (kind, name) in enumerate(chosen)]
            order = list(range(len(crowd)))
            rnd.shuffle(order)
            quiet = [i for i, b in enumerate(crowd) if b.kind != "writer"]
            linger = rnd.choice(quiet) if quiet and rnd.random() < linger_share else None
            victim_name = rnd.choice(names)
            others = [n for n in parent_names if linger is None or n != crowd[linger].name] or ["path"]
            verify_name = rnd.choice(others) if linger is not None else "path"
        else:
            crowd, order, linger, victim_name, verify_name = [], None, None, "path", "path"
        clears = not any(b.kind == "writer" for b in crowd)
        r = Round(path, r_seed, sync, fp, delay, limit, crowd, order, linger, victim_name, clears)
        try:
            acked, ended = r.run()
            summary[ended] += 1
            if fp and ended == "failpoint":
                summary["fp:" + fp[0]] += 1
            ops = operations(r.seed, clears)
            for _ in range(acked):
                apply(model, next(ops))
            for op in r.writes():             # bystander writers' keys: they commute with the victim's
                apply(model, op)
                summary["bystander acknowledged ops"] += 1
            inflight = next(ops) if ended != "finished" else None
            model = verify(file_names.name(verify_name), model, inflight)
            if r.finish():
                summary["lingered"] += 1
                model = verify(path, model, None)   # after the lingering handle closed too
            if bystanders:
                file_names.same_file()
        except AssertionError as exc:
            r.abort()
            raise AssertionError(f"round {round_no} ({r.describe()}): {exc}") from None
        summary["acknowledged ops"] += acked
        for b in crowd:
            summary[f"bystander {b.kind}"] += 1
            summary[f"through {b.name}"] += 1
            summary["lockless refused after the victim died holding the lock"] += b.refused
        if log and round_no % 50 == 0:
            log(f"  round {round_no}: {summary['killed']} killed, {summary['failpoint']} at failpoints, "
                f"{len(model)} keys")
    summary["seconds"] = round(time.monotonic() - started, 1)
    summary["keys at end"] = len(model)
    return dict(summary)


# ---------------------------------------------------------------- power loss

SECTOR = 512


class BarrierRecorder:
    """Records the file's durable state at every sync barrier (msync/fdatasync, from Python or C).

    ``states[i]`` is the file after barrier i, kept as the pages that changed
    since barrier i - 1; ``acked[j]`` is the number of barriers op j had passed
    when it returned.
    """

    def __init__(self, db):
        from ..engine.shim import ffi
        self.fd, self.page = db.engine.fd, db.engine.ident.page_size
        self.last = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        self.first = self.last
        self.changes = []
        self.acked = []
        self._callback = ffi.callback("void(uint64_t, uint64_t)", self.barrier)
        db.engine.view.sync_hook = self._callback
        db.engine.fm.sync_hook = self.barrier

    def barrier(self, off=0, length=0):
        now = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        self.changes.append(changed_pages(self.last, now, self.page))
        self.last = now

    def pending(self):
        """Pages written after the last barrier (in the page cache only)."""
        now = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        return changed_pages(self.last, now, self.page)


def changed_pages(old: bytes, new: bytes, page: int) -> dict:
    out = {}
    for start in range(0, len(new), page):
        chunk = new[start:start + page]
        if chunk != old[start:start + page]:
            out[start] = chunk
    return out


def crash_image(durable: bytearray, pending: dict, rnd: random.Random, torn_share=0.3) -> tuple:
    """The durable state plus a random subset of the pending pages, some of them torn.

    A torn page keeps its sectors that did not change; of those that changed, the
    first k (in address order) are new and the rest old ("new-then-old") or, if
    they held only zeros at the barrier (space never written before), zero after
    all ("new-then-zero": the device did not get to them).  Returns (image, counts).
    """
    image = bytearray(durable)
    counts = Counter()
    for start, new in pending.items():
        if rnd.random() < 0.5:
            counts["pages lost"] += 1
            continue
        if start + len(new) > len(image):
            image.extend(bytes(start + len(new) - len(image)))
        if rnd.random() >= torn_share:
            image[start:start + len(new)] = new
            counts["pages written"] += 1
            continue
        old = bytes(durable[start:start + len(new)]).ljust(len(new), b"\0")
        moved = [o for o in range(0, len(new), SECTOR) if new[o:o + SECTOR] != old[o:o + SECTOR]]
        k = rnd.randrange(len(moved) + 1)
        zero = rnd.random() < 0.5
        for i, o in enumerate(moved):
            if i < k:
                image[start + o:start + o + SECTOR] = new[o:o + SECTOR]
            elif zero and not any(old[o:o + SECTOR]):
                image[start + o:start + o + SECTOR] = bytes(SECTOR)
        counts["pages torn, new-then-" + ("zero" if zero else "old")] += 1
    return bytes(image), counts


def run_powerloss(folder: str, images: int, sync: str = "full", seed: int = 1, ops_per_run: int = 60,
                  log=None) -> dict:
    """Simulate power loss: record every barrier of a writer, then open crash images of it.

    Every image must open, recover and pass check(); with sync="full" it must also hold
    every operation acknowledged before the barrier it was cut after (an operation in
    flight may be there or not, a transaction all or nothing).
    :raises AssertionError: a crash image lost an acknowledged write or failed check().
    """
    import mmkv
    from ..engine import tunables
    rnd = random.Random(seed)
    summary = Counter()
    started = time.monotonic()
    run = 0
    while summary["images"] < images:
        run += 1
        path = os.path.join(folder, f"power-{seed}-{run}.mmkv")
        saved = tunables.set_max_load(TORTURE_MAX_LOAD)
        saved_presize = tunables.set_presize_pairs(TORTURE_PRESIZE_PAIRS)
        saved_release = tunables.set_release(*TORTURE_RELEASE)
        try:
            db = mmkv.open(path, sync=sync)
            recorder = BarrierRecorder(db)
            ops, models, done_ops = operations(seed * 7919 + run), [{}], []
            model = {}
            for _ in range(ops_per_run):
                op = next(ops)
                if op[0] == "put" and len(op[2]) > 5000:
                    op = ("put", op[1], op[2][:5000])      # small files: images are copied whole
                perform(db, op)
                apply(model, op)
                models.append(dict(model))
                done_ops.append(op)
                recorder.acked.append(len(recorder.changes))
            pending_end = recorder.pending()
        finally:
            tunables.set_max_load(saved)
            tunables.set_presize_pairs(saved_presize)
            tunables.set_release(*saved_release)
        # replay the barriers: durable state after barrier i, pages pending until barrier i + 1
        # one image per barrier: the durable state after i barriers, cut before barrier i + 1
        durable = bytearray(recorder.first)
        for i, change in enumerate(recorder.changes + [pending_end]):
            if i > 0:
                for start, page in recorder.changes[i - 1].items():
                    if start + len(page) > len(durable):
                        durable.extend(bytes(start + len(page) - len(durable)))
                    durable[start:start + len(page)] = page
            image, counts = crash_image(durable, change, rnd)
            summary.update(counts)
            check_image(folder, image, sync, models, done_ops, recorder.acked, i)
            summary["images"] += 1
            if summary["images"] >= images:
                break
        db.close()
        os.unlink(path)
        if log and run % 10 == 0:
            log(f"  run {run}: {summary['images']} images")
    summary["seconds"] = round(time.monotonic() - started, 1)
    return dict(summary)


def check_image(folder, image, sync, models, ops, acked, barrier):
    """Open one crash image; it must recover, pass check(), and (sync="full") hold the
    model of every op acknowledged by this barrier, or that plus the next op."""
    import mmkv
    path = os.path.join(folder, "image.mmkv")
    time.sleep(SHORT_TTL)           # every short-lived key the writer set has expired
    with open(path, "wb") as f:
        f.write(image)
    try:
        with mmkv.open(path) as db:
            db.check()
            got = digest(contents(db))
    finally:
        for p in (path, path + ".lock"):     # the engine may or may not leave a sidecar lock file
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
    if sync != "full":
        return
    done = sum(1 for a in acked if a <= barrier)          # ops that returned before this barrier
    inflight = ops[done] if done < len(ops) else None
    if not any(got == digest(state) for state in allowed_states(models[done], inflight)):
        want = digest(models[done])
        lost = [k for k in want if k not in got][:5]
        extra = [k for k in got if k not in want][:5]
        wrong = [k for k in got if k in want and got[k] != want[k]][:5]
        raise AssertionError(f"crash image after barrier {barrier}: {done} acknowledged ops, state differs "
                             f"(missing {lost}, unexpected {extra}, other values {wrong})")


def _choices(parser, text: str, known) -> tuple:
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = [x for x in chosen if x not in known]
    if unknown or not chosen:
        parser.error(f"choose among {', '.join(known)} (got {text!r})")
    return chosen


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmkv torture", description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="mode", required=True)
    k = sub.add_parser("kill", help="SIGKILL writers at random moments and failpoints; verify after each")
    k.add_argument("path")
    k.add_argument("--kills", type=int, default=10_000)
    k.add_argument("--sync", choices=("none", "full"), default="none")
    k.add_argument("--seed", type=int, default=1)
    k.add_argument("--bystanders", type=int, default=3, metavar="K",
                   help="at most K other processes on the file per round (a random 0..K; 0: the victim alone)")
    k.add_argument("--bystander-kinds", default=",".join(BYSTANDER_KINDS), metavar="KINDS",
                   help="comma-separated kinds of bystander to draw from (default: all: %(default)s)")
    k.add_argument("--names", default=",".join(NAME_KINDS), metavar="NAMES",
                   help="comma-separated names the victim and bystanders open the file through "
                        "(default: all: %(default)s)")
    w = sub.add_parser("powerloss", help="open crash images cut at every sync barrier; verify each")
    w.add_argument("folder")
    w.add_argument("--images", type=int, default=10_000)
    w.add_argument("--sync", choices=("none", "full"), default="full")
    w.add_argument("--seed", type=int, default=1)
    f = sub.add_parser("fuzz", help="damage real stores (random and aimed at every field); run each case "
                                    "in a child with a timeout; count outcomes")
    f.add_argument("folder")
    f.add_argument("--cases", type=int, default=10_000)
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--timeout", type=float, default=10.0, help="seconds per case before it counts as a hang")
    f.add_argument("--first", type=int, default=0, help="number of the first case (to continue a run)")
    f.add_argument("--case", type=int, default=None, help="replay this one case and print its details")
    args = p.parse_args(argv)
    if args.mode == "fuzz":
        from . import fuzz
        return fuzz.main(args)
    if args.mode == "kill":
        summary = run_kills(args.path, args.kills, args.sync, args.seed, log=print, bystanders=args.bystanders,
                            kinds=_choices(p, args.bystander_kinds, BYSTANDER_KINDS),
                            names=_choices(p, args.names, NAME_KINDS))
        print(f"mmkv torture kill: {args.kills} kills, sync={args.sync}, seed={args.seed}, "
              f"bystanders 0..{args.bystanders}: no failure")
    else:
        os.makedirs(args.folder, exist_ok=True)
        summary = run_powerloss(args.folder, args.images, args.sync, args.seed, log=print)
        print(f"mmkv torture powerloss: {args.images} images, sync={args.sync}, seed={args.seed}: no failure")
    width = max(len(k) for k in summary)
    for name, value in sorted(summary.items()):
        print(f"  {name:{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
