"""Crash-durability harness: kill writers at random moments and at every failpoint, then prove
that nothing acknowledged was lost.

    python -m mmkv torture kill PATH [--kills N] [--sync none|full] [--seed S]

Each round forks a writer that runs a deterministic stream of operations drawn
from its seed (puts of 0 B to 300 KiB, deletes, increments, transactions of
several keys, batches, clears that restart index growth) and acknowledges each
one on a pipe when the call has returned.  The round ends with SIGKILL: either
the parent's, after a random delay, or the writer's own at an armed failpoint.
The parent then reopens the file (recovery runs) and checks that:

* the whole content equals the model of the acknowledged operations, or that
  model plus the one operation that was in flight (never anything else: a
  transaction is all or nothing, a counter is never lost or doubled);
* ``check()`` passes.

The writer lowers the index's split threshold (MAX_LOAD) so that segment
splits, and the failpoints on them, come every few hundred inserts.
"""
import argparse
import hashlib
import os
import random
import select
import signal
import sys
import time
from collections import Counter

from . import failpoints

POOL = 600                      # keys the writer draws from
SIZES = (0, 1, 10, 100, 1000, 5000, 70_000)
TORTURE_MAX_LOAD = 0.01         # the writer's split threshold: 163 keys per segment


def operations(seed: int):
    """The writer's operation stream: deterministic in seed, independent of the store."""
    rnd = random.Random(seed)

    def key():
        return b"k%d" % rnd.randrange(POOL)

    def value():
        n = rnd.choice(SIZES) if rnd.random() < 0.995 else 300_000
        return rnd.randbytes(n)

    while True:
        r = rnd.random()
        if r < 0.40:
            yield ("put", key(), value())
        elif r < 0.55:
            yield ("del", key())
        elif r < 0.70:
            yield ("incr", b"counter", rnd.choice((1, 1, 1, 7, -3)))
        elif r < 0.88:
            yield ("txn", [(key(), None if rnd.random() < 0.25 else value()) for _ in range(rnd.randint(2, 6))])
        elif r < 0.998:
            batch = {key(): rnd.randbytes(rnd.randrange(64)) for _ in range(rnd.randint(10, 120))}
            yield ("batch", list(batch.items()))
        else:
            yield ("clear",)


def apply(model: dict, op) -> None:
    """What op does to a dict model of the store."""
    kind = op[0]
    if kind == "put":
        model[op[1]] = op[2]
    elif kind == "del":
        model.pop(op[1], None)
    elif kind == "incr":
        now = int.from_bytes(model.get(op[1], bytes(8)), "little", signed=True) + op[2]
        model[op[1]] = now.to_bytes(8, "little", signed=True)
    elif kind in ("txn", "batch"):
        for k, v in op[1]:
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
    elif kind == "clear":
        model.clear()


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


def writer(path: str, seed: int, sync: str, ack_fd: int, limit: int) -> None:
    """Body of the forked writer: perform the stream, acknowledge each op by its number."""
    from . import store as store_module
    store_module.MAX_LOAD = TORTURE_MAX_LOAD
    import mmkv
    db = mmkv.open(path, sync=sync)
    os.write(ack_fd, b"open\n")
    for n, op in enumerate(operations(seed)):
        if n >= limit:
            break
        perform(db, op)
        os.write(ack_fd, b"%d\n" % n)
    db.close()


def digest(contents: dict) -> dict:
    return {k: hashlib.sha1(v).digest() for k, v in contents.items()}


class Round:
    """One writer run: fork, kill (or let a failpoint kill), collect acknowledgements."""

    def __init__(self, path, seed, sync, failpoint, delay, limit):
        self.path, self.seed, self.sync = path, seed, sync
        self.failpoint, self.delay, self.limit = failpoint, delay, limit

    def run(self):
        """(number of acknowledged ops, how it ended: 'killed', 'failpoint' or 'finished')."""
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:                              # the writer
            os.close(rfd)
            code = 0
            try:
                if self.failpoint:
                    failpoints.arm(*self.failpoint)
                writer(self.path, self.seed, self.sync, wfd, self.limit)
            except BaseException:                 # pragma: no cover - reported through the exit code
                import traceback
                traceback.print_exc()
                code = 3
            os._exit(code)
        os.close(wfd)
        data, opened_at = b"", None
        deadline = time.monotonic() + 60
        ended = None
        while True:
            now = time.monotonic()
            if opened_at is not None and now >= opened_at + self.delay and not self.failpoint:
                os.kill(pid, signal.SIGKILL)
            timeout = max(0.0, (opened_at + self.delay - now) if opened_at is not None and not self.failpoint
                          else deadline - now)
            ready, _, _ = select.select([rfd], [], [], min(timeout, 1.0))
            if ready:
                chunk = os.read(rfd, 65536)
                if not chunk:
                    break
                data += chunk
                if opened_at is None and b"open\n" in data:
                    opened_at = time.monotonic()
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            ended = "failpoint" if self.failpoint else "killed"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            ended = "finished"
        else:
            raise AssertionError(f"writer {self.seed} failed: status {status}")
        lines = data.split(b"\n")[:-1]            # a line cut by the kill was never acknowledged
        acked = sum(1 for line in lines if line != b"open")
        return acked, ended


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
    """Reopen the store and check it holds one of the allowed states; return that state."""
    import mmkv
    with mmkv.open(path) as db:
        db.check()
        got = dict(db.items())
    seen = digest(got)
    for state in allowed_states(before, inflight):
        if digest(state) == seen:
            return state
    after = dict(before)
    if inflight is not None:
        apply(after, inflight)
    missing = [k for k in before if k not in got][:5]
    extra = [k for k in got if k not in before and k not in after][:5]
    wrong = [k for k in got if k in before and got[k] != before[k] and got[k] != after.get(k)][:5]
    raise AssertionError(f"store differs from the acknowledged state: missing {missing}, "
                         f"unexpected {extra}, wrong values {wrong}, in flight {inflight and inflight[0]}")


def run_kills(path: str, kills: int, sync: str = "none", seed: int = 1, failpoint_share: float = 0.5,
              log=None) -> dict:
    """Kill writers until `kills` rounds ended in SIGKILL; verify after each.  Returns a summary.

    :raises AssertionError: an acknowledged write was lost, a transaction was half
        applied, a counter was lost or doubled, or check() failed.
    """
    import mmkv
    rnd = random.Random(seed)
    mmkv.open(path, sync=sync).close()
    with mmkv.open(path) as db:
        model = dict(db.items())
    points = [p for p in failpoints.NAMES if sync == "full" or not p.startswith("sync.")]
    summary = Counter()
    started = time.monotonic()
    round_no = 0
    while summary["killed"] + summary["failpoint"] < kills:
        round_no += 1
        fp = (rnd.choice(points), rnd.randint(1, 4)) if rnd.random() < failpoint_share else None
        # a random kill always comes (no op limit); an armed failpoint may not be reached in 20-400 ops
        limit = rnd.randint(20, 400) if fp else 1 << 62
        r = Round(path, seed * 1_000_003 + round_no, sync, fp, rnd.uniform(0.001, 0.08), limit)
        acked, ended = r.run()
        summary[ended] += 1
        if fp and ended == "failpoint":
            summary["fp:" + fp[0]] += 1
        ops = operations(r.seed)
        for _ in range(acked):
            apply(model, next(ops))
        inflight = next(ops) if ended != "finished" else None
        model = verify(path, model, inflight)
        summary["acknowledged ops"] += acked
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
        from ._shim import ffi
        self.fd, self.page = db._fd, db._ident.page_size
        self.last = os.pread(self.fd, os.fstat(self.fd).st_size, 0)
        self.first = self.last
        self.changes = []
        self.acked = []
        self._callback = ffi.callback("void(uint64_t, uint64_t)", self.barrier)
        db._view.sync_hook = self._callback
        db._fm.sync_hook = self.barrier

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
    from . import store as store_module
    rnd = random.Random(seed)
    summary = Counter()
    started = time.monotonic()
    run = 0
    while summary["images"] < images:
        run += 1
        path = os.path.join(folder, f"power-{seed}-{run}.mmkv")
        saved = store_module.MAX_LOAD
        store_module.MAX_LOAD = TORTURE_MAX_LOAD
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
            store_module.MAX_LOAD = saved
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
    with open(path, "wb") as f:
        f.write(image)
    try:
        with mmkv.open(path) as db:
            db.check()
            got = digest(dict(db.items()))
    finally:
        for p in (path, path + ".lock"):
            if os.path.exists(p):
                os.unlink(p)
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mmkv torture", description=__doc__.split("\n\n")[0].strip())
    sub = p.add_subparsers(dest="mode", required=True)
    k = sub.add_parser("kill", help="SIGKILL writers at random moments and failpoints; verify after each")
    k.add_argument("path")
    k.add_argument("--kills", type=int, default=10_000)
    k.add_argument("--sync", choices=("none", "full"), default="none")
    k.add_argument("--seed", type=int, default=1)
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
        summary = run_kills(args.path, args.kills, args.sync, args.seed, log=print)
        print(f"mmkv torture kill: {args.kills} kills, sync={args.sync}, seed={args.seed}: no failure")
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
