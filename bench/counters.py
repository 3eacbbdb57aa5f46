#!/usr/bin/env python3
"""Throughput of the counter service: incr, Sequence ids and Queue put+get, across processes.

Usage (from the repository root, with mmkv installed)::

    python bench/counters.py                 # about 20 s
    python bench/counters.py --seconds 3     # longer runs per figure
    python bench/counters.py --workdir DIR   # where the store files go (default: the system temp dir)

Prints (and only prints: the figures depend on the machine and its load):

* ``db.incr`` of one shared counter, from 1, 2 and 4 processes (sync="none"); the final
  counter is checked against the sum of what the processes report;
* ``Sequence.next()`` from 1, 2 and 4 processes on one name: block=1000 with sync="full"
  (the Sequence default for a path) and block=1 with sync="none" (one incr per id); every id
  is checked to be unique;
* ``Queue`` put+get pairs per second between a producer and a consumer process
  (sync="none"), every item checked to arrive once and in order.

Each process starts work at one barrier and runs for --seconds; a figure is the total
operations divided by the wall time from the barrier to the last process's end.
"""
import argparse
import multiprocessing as mp
import os
import shutil
import tempfile
import time

import mmkv


def _incr_worker(path, seconds, barrier, out):
    with mmkv.open(path) as db:
        barrier.wait()
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(100):
                db.incr(b"counter")
            n += 100
        out.put((n, time.monotonic()))


def _ids_worker(path, seconds, block, sync, barrier, out):
    with mmkv.Sequence(path, "ids", block=block, sync=sync) as ids:
        barrier.wait()
        got, end = [], time.monotonic() + seconds
        while time.monotonic() < end:
            for _ in range(100):
                got.append(ids.next())
        out.put((got, time.monotonic()))


def _producer(path, n, barrier, out):
    with mmkv.Queue(path, "bench") as q:
        barrier.wait()
        for i in range(n):
            q.put(b"%d" % i)
        out.put(("producer", time.monotonic()))


def _consumer(path, n, barrier, out):
    with mmkv.Queue(path, "bench") as q:
        barrier.wait()
        expect = 0
        for _ in range(n):
            if q.get(timeout=30) != b"%d" % expect:
                raise SystemExit(f"queue out of order at item {expect}")
            expect += 1
        out.put(("consumer", time.monotonic()))


def _run(target, argsets):
    """Run one process per argument tuple behind a barrier; (results, wall seconds)."""
    ctx = mp.get_context("spawn")           # every worker opens its own store, as unrelated processes do
    barrier, out = ctx.Barrier(len(argsets) + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for args in argsets]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.monotonic()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"a worker failed (exit code {p.exitcode})")
    return [r[0] for r in results], max(r[1] for r in results) - t0


def bench_incr(workdir, seconds):
    rows = []
    for nproc in (1, 2, 4):
        path = os.path.join(workdir, f"incr{nproc}.mmkv")
        counts, wall = _run(_incr_worker, [(path, seconds)] * nproc)
        with mmkv.open(path) as db:
            final = int.from_bytes(db[b"counter"], "little", signed=True)
        assert final == sum(counts), (final, sum(counts))
        rows.append((f"incr, {nproc} process{'es' if nproc > 1 else ''}", sum(counts) / wall, sum(counts)))
    return rows


def bench_ids(workdir, seconds):
    rows = []
    for block, sync in ((1000, "full"), (1, "none")):
        for nproc in (1, 2, 4):
            path = os.path.join(workdir, f"ids{block}-{nproc}.mmkv")
            got, wall = _run(_ids_worker, [(path, seconds, block, sync)] * nproc)
            every = [i for mine in got for i in mine]
            assert len(every) == len(set(every)), "an id was handed out twice"
            rows.append((f"Sequence.next, block={block} sync={sync}, {nproc} process{'es' if nproc > 1 else ''}",
                         len(every) / wall, len(every)))
    return rows


def bench_queue(workdir, n):
    path = os.path.join(workdir, "queue.mmkv")
    mmkv.Queue(path, "bench").close()
    _, wall = _run_pair(path, n)
    return [("Queue put+get pairs, producer and consumer processes", n / wall, n)]


def _run_pair(path, n):
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=f, args=(path, n, barrier, out)) for f in (_producer, _consumer)]
    for p in procs:
        p.start()
    barrier.wait()
    t0 = time.monotonic()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
        if p.exitcode != 0:
            raise SystemExit(f"a queue worker failed (exit code {p.exitcode})")
    return results, results["consumer"] - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.5, help="run time per figure (default 1.5)")
    ap.add_argument("--queue-items", type=int, default=20000, help="items through the queue (default 20000)")
    ap.add_argument("--workdir", default=None, help="folder for the store files (default: a new temp folder)")
    args = ap.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="mmkv-counters-", dir=args.workdir)
    try:
        rows = bench_incr(workdir, args.seconds) + bench_ids(workdir, args.seconds) + \
            bench_queue(workdir, args.queue_items)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    width = max(len(r[0]) for r in rows)
    print(f"mmkv {mmkv.__version__}, {os.cpu_count()} CPUs, {args.seconds}s per figure")
    print(f"{'workload':<{width}}  {'ops/s':>12}  {'ops':>10}")
    for name, rate, total in rows:
        print(f"{name:<{width}}  {rate:>12,.0f}  {total:>10,}")


if __name__ == "__main__":
    main()
