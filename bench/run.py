#!/usr/bin/env python3
"""Benchmark mmkv against the stores a user would otherwise pick, on the same workloads, in one run.

Usage (from the repository root, in an environment where mmkv is installed)::

    pip install -r bench/requirements.txt     # the peers; any that is missing is skipped with a note
    python bench/run.py                       # every workload at full size (about 10-15 min on 2 cores)
    python bench/run.py --quick               # every workload at small sizes (well under a minute)
    python bench/run.py --only get,put        # some workloads (names below), comma separated
    python bench/run.py --out DIR             # where results go (default: bench/results)
    python bench/run.py --repeats 5           # timed repeats per system (the median is reported; >= 3)
    python bench/run.py --workdir DIR         # where the stores are built (default: the system temp dir)

Outputs, written to --out (a --quick run writes ``*-quick.*`` so it never overwrites a full run):

- ``results.md``   a markdown table of every figure, each peer's cell followed by the mmkv/peer ratio
                   (always oriented so that a ratio above 1 means mmkv is better); also printed to stdout;
- ``results.json`` every raw figure (each repeat), the settings, the machine (CPU, cores, memory,
                   Python, filesystem, versions), skipped peers and failures;
- ``ratios.png``   a chart of the ratios (needs matplotlib; skipped with a note otherwise).

Workloads (``--only`` names):

==============  ==============================================================================
get             get of present keys through each system's per-call API (100-byte values)
get_absent      get of absent keys
contains        ``k in store`` of present keys (lmdb: ``txn.get(k) is not None``)
put             put of new keys, each call its own commit, no sync; 100-byte and 1000-byte values
batch_put       put of N keys in one transaction / batch
delete          delete of every key, each call its own commit
durable_put     put, each call durable when it returns (fewer ops)
counter         4 processes increment one shared counter; the final count is checked
open            a fresh process opens a big store and reads one key (1M keys; mmkv also at 10M)
iterate         every (key, value) pair through each system's own iteration (1M keys)
space           file size / live logical bytes, after loading and after 5 rounds of churn
compact         mmkv compact() of a 1 GB half-free store, a reader and a writer in other processes
backup          db.backup() of a 1 GB store beside a writer process; lmdb env.copy(compact=True) beside its own
scale           mmkv alone at 10M keys: insert and get rate, file size, peak RSS, put latencies, items()
transfer        mmkv dump of the 10M-key store to JSON lines, and mmkv load of them into a new store
expiry          get and put of keys without a deadline: this mmkv, the same with as many keys with a
                deadline beside them, and mmkv as it was before expiry (built from git: EXPIRY_BASELINE)
==============  ==============================================================================

Peers: py-lmdb, sqlite3 (stdlib, WAL mode), diskcache, a plain dict (the in-memory floor),
multiprocessing.Value (counter only) and Redis (a ``redis-server`` on PATH, started by the bench on a
free loopback port with persistence off, stopped at the end).  Settings, as used everywhere unless a
workload says otherwise:

- mmkv: ``mmkv.open(path, "n", sync="none")``; ``sync="full"`` for durable_put.
- lmdb: ``lmdb.open(dir, map_size=16 GiB, sync=False, metasync=False)`` (no fsync at commit: the OS
  writes the pages back later); ``sync=True, metasync=True`` for durable_put.  Reads are measured
  twice: a read transaction per call (``lmdb``) and one reused read transaction (``lmdb-reused-txn``).
- sqlite: ``journal_mode=WAL``, ``synchronous=OFF`` (``FULL`` for durable_put), autocommit, table
  ``kv(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID``, one statement per call.
- diskcache: ``diskcache.Cache(dir)`` with its defaults (SQLite in WAL mode, synchronous=NORMAL, so no
  fsync per commit).
- dict: a plain ``dict`` (nothing is persisted or shared; the floor of what a Python call costs).
- redis: redis-py client on 127.0.0.1, one round trip per call; MSET for batch_put; INCR for counter.

Method: keys are ``b"key%08d"``, values ``os.urandom``; access order is random (a fresh shuffle per
repeat; the 10M-key scale run uses a pseudo-random permutation i -> (a*i + b) mod N to keep the
harness's own memory out of the RSS figure).  Within a workload the systems run in turn, interleaved
repeat by repeat, in one process; each timed loop runs with the garbage collector off; the figure is
the median of the repeats.  Stores live in one temporary folder on one filesystem (recorded in the
JSON), and the open workload reads files that were just written (warm page cache).  Ratios:
throughput mmkv/peer, times and sizes peer/mmkv, so a ratio above 1 always means mmkv is better.

Where things are:

- this file: the command line, the workloads (``wl_*``, what each one times and checks), the timing
  helpers (``timed``, ``rate_runs``), the run's record of figures and failures (``Run``) and the
  machine description;
- ``bench/adapters.py``: one adapter class per system (how it builds, opens, gets, puts, deletes,
  batches, does the shared counter and is opened in a fresh process), and the redis-server the run
  starts; a workload only ever calls the common interface;
- ``bench/report.py``: the markdown table, the JSON file and the ratio chart made from the results.
"""
import argparse
import contextlib
import gc
import heapq
import importlib
import json
import math
import os
import platform
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

# bench/ is sys.path[0] when this file runs as a script
import report
from adapters import ADAPTERS, SETTINGS, RedisServer, RedisStore, availability
from report import fmt

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

SIZES = {
    "full": dict(n=50_000, durable=300, counter_per_proc=25_000, procs=4,
                 open_small=1_000_000, open_big=10_000_000, space_n=50_000, space_rounds=5,
                 scale_n=10_000_000, compact_bytes=1 << 30, iterate_n=1_000_000, expiry_n=300_000),
    "quick": dict(n=2_000, durable=30, counter_per_proc=500, procs=4,
                  open_small=10_000, open_big=100_000, space_n=2_000, space_rounds=5,
                  scale_n=100_000, compact_bytes=20 << 20, iterate_n=20_000, expiry_n=2_000),
}

VALUE_SIZE = 100          # bytes, unless a workload says otherwise
CHUNK = 100_000           # keys per chunk when building big stores

# Which systems take part in each workload (those available on the machine run).
PARTICIPANTS = {
    "get": ["mmkv", "lmdb", "lmdb-reused-txn", "sqlite", "diskcache", "dict", "redis"],
    "get_absent": ["mmkv", "lmdb", "lmdb-reused-txn", "sqlite", "diskcache", "dict", "redis"],
    "contains": ["mmkv", "lmdb", "lmdb-reused-txn", "diskcache", "dict"],
    "put": ["mmkv", "lmdb", "sqlite", "diskcache", "dict", "redis"],
    "batch_put": ["mmkv", "lmdb", "sqlite", "diskcache", "dict", "redis"],
    "delete": ["mmkv", "lmdb", "sqlite", "diskcache", "dict", "redis"],
    "durable_put": ["mmkv", "lmdb", "sqlite"],
    "counter": ["mmkv", "lmdb", "sqlite", "diskcache", "mp.Value", "redis"],
    "cas": ["mmkv", "lmdb"],
    "get_many": ["mmkv", "lmdb"],
    "open": ["mmkv", "lmdb", "sqlite"],
    "space": ["mmkv", "lmdb", "sqlite", "diskcache"],
    "scale": ["mmkv"],
    "compact": ["mmkv"],
    "backup": ["mmkv", "lmdb"],
    "transfer": ["mmkv"],
    "iterate": ["mmkv", "lmdb", "sqlite", "diskcache", "dict"],
    "expiry": ["mmkv", "mmkv-with-ttl-keys", "mmkv-before-expiry"],
    "namespaces": ["mmkv", "mmkv-namespace", "mmkv-before-namespaces"],
}
TABLE_ORDER = ["get", "get_absent", "contains", "get_many", "iterate", "put", "batch_put", "delete", "durable_put", "counter", "cas", "open", "space",
               "compact", "backup", "scale", "transfer", "expiry", "namespaces"]
# scale runs before open so that open can reuse scale's 10M-key mmkv file instead of building one
RUN_ORDER = ["get", "get_absent", "contains", "get_many", "iterate", "put", "batch_put", "delete", "durable_put", "counter", "cas", "space", "compact",
             "backup", "scale", "transfer", "open", "expiry", "namespaces"]

TITLES = {
    "get": "get, present keys (per call)",
    "get_absent": "get, absent keys (per call)",
    "contains": "`in`, present keys (per call)",
    "put": "put, each call its own commit, no sync",
    "batch_put": "put of N keys in one transaction / batch",
    "delete": "delete, each call its own commit",
    "durable_put": "durable put (each call on disk when it returns)",
    "counter": "shared counter, 4 processes",
    "cas": "read-then-compare-and-swap increments of one counter, 4 processes",
    "get_many": "batch reads of 100 random keys (mmkv get_many, lmdb getmulti) beside 100 single gets",
    "open": "fresh process: open a big store and read one key",
    "space": "space: bytes on disk / live logical bytes",
    "scale": "scale: mmkv alone",
    "compact": "compaction of a big, half-free store with a reader and a writer in other processes",
    "iterate": "every (key, value) pair read through each system's own iteration (mmkv items(), an lmdb cursor)",
    "backup": "online backup of a big store while a writer in another process keeps writing",
    "transfer": "mmkv dump and mmkv load of the scale store (command line, fresh processes)",
    "expiry": "what expiry costs keys without a deadline: get and put beside the build from before expiry",
    "namespaces": "get and put in a namespace, in the main key space, and in the build from before namespaces",
}


def key(i: int) -> bytes:
    return b"key%08d" % i


def log(msg: str) -> None:
    try:
        print(msg, flush=True)
    except OSError:         # stdout on a full disk: keep measuring
        pass


# ===================================================================== run context and results
class Run:
    """One run: its settings, the systems available, and every figure, note and failure recorded so far."""

    def __init__(self, args, size, avail, workdir):
        self.args = args
        self.size = size
        self.avail = avail
        self.workdir = workdir
        self.repeats = args.repeats
        self.results = {}        # workload -> {"title", "metrics": [...], "notes": [...]}
        self.failures = []       # {"workload", "system", "message"}
        self.prebuilt = {}       # (system, n) -> path of a store with keys key(0..n-1), 100-byte values
        self.seq = 0
        self.load = {"start": [round(x, 2) for x in os.getloadavg()]}   # 1/5/15-min load averages

    def systems(self, workload):
        return [s for s in PARTICIPANTS[workload] if self.avail.get(s) is None]

    def folder(self, tag):
        self.seq += 1
        path = os.path.join(self.workdir, f"{self.seq:04d}-{tag}")
        os.makedirs(path)
        return path

    def fail(self, workload, system, message):
        log(f"  !! {workload} / {system}: {message}")
        self.failures.append(dict(workload=workload, system=system, message=message))

    def metric(self, workload, mid, label, unit, better, values, extra_note=None):
        """Record one metric: values = {system: {"median": x, "runs": [...], ...}}."""
        wl = self.results.setdefault(workload, dict(title=TITLES[workload], metrics=[], notes=[]))
        m = dict(id=mid, label=label, unit=unit, better=better, values=values)
        base = values.get("mmkv", {}).get("median")
        ratios = {}
        for system, v in values.items():
            if system == "mmkv" or v.get("median") is None or not base:
                continue
            x = v["median"]
            if x <= 0:
                continue
            ratios[system] = base / x if better == "higher" else x / base
        m["ratios"] = ratios
        wl["metrics"].append(m)
        shown = ", ".join(f"{s}={fmt(v.get('median'), unit)}" for s, v in values.items())
        log(f"  {label}: {shown}")
        return m

    def note(self, workload, text):
        self.results.setdefault(workload, dict(title=TITLES[workload], metrics=[], notes=[]))["notes"].append(text)


def timed(fn, *args):
    """Seconds fn(*args) takes, with the garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        t = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t
    finally:
        gc.enable()


def summarize(runs, **extra):
    d = dict(median=statistics.median(runs) if runs else None, runs=runs)
    d.update(extra)
    return d


def remove(path):
    shutil.rmtree(path, ignore_errors=True)


def close_quietly(ad) -> None:
    """Close an adapter on the way out of a failed or finished workload; a failure to close is
    not the workload's result (the failure that led here, if any, is already recorded)."""
    try:
        ad.close()
    except Exception:
        pass


def rate_runs(run, workload, systems, n, make, body, check, label_fmt):
    """Generic 'fresh store per repeat' loop: make(system) -> (adapter, arg); time body(adapter, arg).

    Returns {system: summary of ops/s}.  Systems that fail are recorded and dropped.
    """
    runs = {s: [] for s in systems}
    alive = list(systems)
    for r in range(run.repeats):
        for s in list(alive):
            ad = None
            try:
                ad, arg = make(s)
                dt = timed(body, ad, arg)
                problem = check(ad)
                if problem:
                    run.fail(workload, s, f"{label_fmt}: {problem}")
                    alive.remove(s)
                else:
                    runs[s].append(n / dt)
            except Exception as exc:
                run.fail(workload, s, f"{label_fmt}: {type(exc).__name__}: {exc}")
                log(traceback.format_exc())
                alive.remove(s)
            finally:
                if ad is not None:
                    close_quietly(ad)
                    remove(ad.folder)
    return {s: summarize(runs[s]) for s in systems if runs[s]}


def shuffled(seq, rng):
    out = list(seq)
    rng.shuffle(out)
    return out


# ===================================================================== workloads 1, 2: get
def wl_get(run, workload):
    absent = workload == "get_absent"
    contains = workload == "contains"
    n = run.size["n"]
    rng = random.Random(1)
    systems = run.systems(workload)
    mapping = {key(i): os.urandom(VALUE_SIZE) for i in shuffled(range(n), rng)}
    probe = [key(i) for i in range(n, 2 * n)] if absent else list(mapping)
    stores = {}
    for s in systems:
        try:
            ad = ADAPTERS[s](run.folder(f"{workload}-{s}"))
            stores[s] = ad
            ad.batch(mapping)
            if ad.count() != n:
                raise AssertionError(f"{ad.count()} keys after loading {n}")
            sample = rng.sample(list(mapping), min(n, 200))
            bad = [k for k in sample if ad.fetch(k) != mapping[k]]
            if bad:
                raise AssertionError(f"wrong value for {bad[0]!r} after loading")
        except Exception as exc:
            run.fail(workload, s, f"load: {type(exc).__name__}: {exc}")
            stores.pop(s, None)
    runs = {s: [] for s in stores}
    for r in range(run.repeats):
        order = shuffled(probe, rng)
        for s, ad in list(stores.items()):
            try:
                dt = timed(ad.absent_loop if absent else ad.contains_loop if contains else ad.get_loop, order)
                runs[s].append(n / dt)
            except Exception as exc:
                run.fail(workload, s, f"{type(exc).__name__}: {exc}")
                stores.pop(s)
    for ad in list(stores.values()):
        ad.close()
        remove(ad.folder)
    values = {s: summarize(v) for s, v in runs.items() if v}
    what = "absent" if absent else "present"
    op = "`in` of a present key" if contains else f"get {what} key"
    run.metric(workload, workload, f"{op}, {n:,} keys, {VALUE_SIZE} B values", "ops/s", "higher", values)


# ===================================================================== workload 3: put
def wl_put(run, workload):
    n = run.size["n"]
    rng = random.Random(3)
    systems = run.systems(workload)
    for size in (100, 1000):
        items = [(key(i), os.urandom(size)) for i in range(n)]
        def make(s, items=items, size=size):
            return ADAPTERS[s](run.folder(f"put{size}-{s}")), shuffled(items, rng)

        def check(ad, items=items):
            c = ad.count()
            if c != n:
                return f"{c} keys after {n} puts"
            k, v = items[n // 2]
            if ad.fetch(k) != v:
                return f"wrong value read back for {k!r}"
            return None

        values = rate_runs(run, workload, systems, n, make, lambda ad, order: ad.put_loop(order), check,
                           f"{size} B")
        run.metric(workload, f"put_{size}", f"put new key, {size} B values, {n:,} keys", "ops/s", "higher", values)


# ===================================================================== workload 4: batch put
def wl_batch_put(run, workload):
    n = run.size["n"]
    rng = random.Random(4)
    systems = run.systems(workload)
    items = [(key(i), os.urandom(VALUE_SIZE)) for i in range(n)]

    def make(s):
        return ADAPTERS[s](run.folder(f"batch-{s}")), dict(shuffled(items, rng))

    def check(ad):
        c = ad.count()
        if c != n:
            return f"{c} keys after a batch of {n}"
        k, v = items[n // 3]
        if ad.fetch(k) != v:
            return f"wrong value read back for {k!r}"
        return None

    values = rate_runs(run, workload, systems, n, make, lambda ad, mapping: ad.batch(mapping), check, "batch")
    run.metric(workload, workload, f"batch of {n:,} keys in one txn, {VALUE_SIZE} B values (keys/s)", "ops/s",
               "higher", values)
    run.note(workload, "mmkv db.update(dict); lmdb one write txn with cursor.putmulti; sqlite executemany in "
                       "BEGIN..COMMIT; diskcache cache.transact(); dict.update; redis MSET.")


# ===================================================================== workload 5: delete
def wl_delete(run, workload):
    n = run.size["n"]
    rng = random.Random(5)
    systems = run.systems(workload)
    mapping = {key(i): os.urandom(VALUE_SIZE) for i in range(n)}

    def make(s):
        ad = ADAPTERS[s](run.folder(f"delete-{s}"))
        ad.batch(mapping)
        if ad.count() != n:
            raise AssertionError(f"{ad.count()} keys after loading {n}")
        return ad, shuffled(mapping, rng)

    def check(ad):
        c = ad.count()
        return f"{c} keys left after deleting all {n}" if c else None

    values = rate_runs(run, workload, systems, n, make, lambda ad, keys: ad.delete_loop(keys), check, "delete")
    run.metric(workload, workload, f"delete, {n:,} keys of {VALUE_SIZE} B", "ops/s", "higher", values)


@contextlib.contextmanager
def filled_adapter(run, workload, system, fill):
    """ADAPTERS[system] in a folder of its own, each dict of fill written with batch(); closed and
    removed after the block.  An error in it is the system's failure in this workload (recorded,
    and the block left); NotImplementedError means the system has no such call (left out)."""
    ad = None
    try:
        ad = ADAPTERS[system](run.folder(f"{workload}-{system}"))
        for chunk in fill:
            ad.batch(chunk)
        yield ad
    except NotImplementedError:
        pass
    except Exception as exc:
        run.fail(workload, system, f"{workload}: {type(exc).__name__}: {exc}")
        log(traceback.format_exc())
    finally:
        if ad is not None:
            close_quietly(ad)
            remove(ad.folder)


# ===================================================================== iterate
def wl_iterate(run, workload):
    """Every (key, value) pair of a store of iterate_n keys, read through each system's own
    iteration, one full pass per repeat (the store built once per system)."""
    n = run.size["iterate_n"]
    mapping = {key(i): os.urandom(VALUE_SIZE) for i in range(n)}
    values = {}
    for s in run.systems(workload):
        with filled_adapter(run, workload, s, chunks(n, lambda i: mapping[key(i)])) as ad:
            runs = []
            for _ in range(run.repeats):
                t = time.perf_counter()
                got = ad.items_loop()
                runs.append(got / (time.perf_counter() - t))
                if got != n:
                    raise AssertionError(f"{got} items of {n}")
            values[s] = summarize(runs)
    run.metric(workload, workload, f"items over {n:,} keys of {VALUE_SIZE} B, per item", "items/s", "higher", values)


# ===================================================================== expiry
#: The commit before expiry was added: the expiry workload builds it to measure what expiry costs.
EXPIRY_BASELINE = "733451f"


def build_baseline(run, commit: str) -> str:
    """This repository's mmkv as of commit, built into a folder of its own: the folder to put on
    PYTHONPATH.  Needs git and a C compiler (as installing mmkv does)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folder = run.folder(f"mmkv-{commit}")
    src, wheels, lib = (os.path.join(folder, d) for d in ("src", "wheels", "lib"))
    os.makedirs(src)
    archive = subprocess.run(["git", "-C", repo, "archive", "--format=tar", commit], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", src], input=archive.stdout, check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", wheels, src],
                   check=True, capture_output=True)
    import zipfile
    for name in os.listdir(wheels):
        with zipfile.ZipFile(os.path.join(wheels, name)) as z:
            z.extractall(lib)
    return lib


def wl_expiry(run, workload):
    """Get and put of n keys without a deadline, each measurement in a fresh process, on a store
    of 2n keys: this mmkv with n other plain keys; the same with n other keys with a deadline an
    hour away (the expiry bound is set, nothing expires); and mmkv as it was before expiry, with n
    other plain keys.  The three run in turn, in a fresh order each repeat."""
    n = run.size["expiry_n"]
    fresh_process_get_put(run, workload, {"mmkv": "0", "mmkv-with-ttl-keys": "1"}, "mmkv-before-expiry",
                          EXPIRY_BASELINE, f"without a deadline, {n:,} of {2 * n:,} keys, 100 B values, fresh process",
                          "a ratio of at least 0.95 means expiry adds at most 5% to the operation")


#: The commit before namespaces were added: the namespaces workload builds it.
NAMESPACES_BASELINE = "7139335"


def wl_namespaces(run, workload):
    """Get and put of n keys in a namespace, beside the same in the main key space, and the main
    key space of the build from before namespaces (what the per-index counters cost the C core);
    each measurement a fresh process on a store of 2n keys, as wl_expiry."""
    n = run.size["expiry_n"]
    fresh_process_get_put(run, workload, {"mmkv": "0", "mmkv-namespace": "ns"}, "mmkv-before-namespaces",
                          NAMESPACES_BASELINE, f"{n:,} keys beside {n:,} others, 100 B values, fresh process",
                          "mmkv-namespace: the measured keys are in a namespace (the others in the main key space)")


def fresh_process_get_put(run, workload, modes: dict, baseline: str, commit: str, what: str, note: str):
    """Run bench/expiry_child.py for each system (modes: system -> its MODE; baseline: a system
    that runs MODE 0 on this repository's mmkv as of commit), each repeat in a fresh order, and
    report get and put rates."""
    child = os.path.join(os.path.dirname(os.path.abspath(__file__)), "expiry_child.py")
    n = run.size["expiry_n"]
    env = {s: dict(os.environ) for s in modes}
    modes = dict(modes, **{baseline: "0"})
    if run.args.quick:          # (the build takes a minute: a quick run checks the harness only)
        run.note(workload, f"--quick: {baseline} is not built")
    else:
        try:
            lib = build_baseline(run, commit)
            env[baseline] = dict(os.environ, PYTHONPATH=lib)
        except (subprocess.CalledProcessError, OSError) as exc:
            err = getattr(exc, "stderr", b"") or b""
            run.fail(workload, baseline, f"build of {commit}: {exc} {err[-500:]!r}")
    systems = [s for s in run.systems(workload) if s in env]
    runs = {s: {"get": [], "put": []} for s in systems}
    rng = random.Random(11)
    for r in range(run.repeats):
        for s in shuffled(systems, rng):
            folder = run.folder(f"{workload}-{s}")
            try:
                out = subprocess.run([sys.executable, child, folder, str(n), modes[s]],
                                     env=env[s], capture_output=True, text=True, timeout=600, cwd=folder)
                if out.returncode:
                    raise RuntimeError(out.stderr[-800:])
                got = json.loads(out.stdout)
                if s == baseline and not got["mmkv"].startswith(env[s]["PYTHONPATH"]):
                    raise RuntimeError(f"the baseline child imported {got['mmkv']}")
                runs[s]["get"].append(got["get"])
                runs[s]["put"].append(got["put"])
            except Exception as exc:
                run.fail(workload, s, f"{type(exc).__name__}: {exc}")
                systems.remove(s)
            finally:
                remove(folder)
    for op in ("get", "put"):
        values = {s: summarize(v[op]) for s, v in runs.items() if v[op]}
        run.metric(workload, op, f"{op} of a key, {what}", "ops/s", "higher", values)
    run.note(workload, f"{baseline} is commit {commit} built from git; {note}")


# ===================================================================== get_many
def wl_get_many(run, workload):
    """Batches of 100 random present keys of a store of iterate_n keys: each system's batch read
    (mmkv get_many, lmdb getmulti in one read transaction) beside its own 100 single gets."""
    n, per, count = run.size["iterate_n"], 100, 2000
    rng = random.Random(14)
    batches = [[key(rng.randrange(n)) for _ in range(per)] for _ in range(count)]
    flat = [k for b in batches for k in b]
    many, single = {}, {}
    for s in run.systems(workload):
        with filled_adapter(run, workload, s, chunks(n, random_value)) as ad:
            ad.batch_get_loop(batches[:50])                  # warm: the mapping's page tables
            ad.get_loop(flat[:5000])
            m_runs, s_runs = [], []
            for _ in range(run.repeats):                     # interleaved: both see the same machine
                m_runs.append(len(flat) / timed(ad.batch_get_loop, batches))
                s_runs.append(len(flat) / timed(ad.get_loop, flat))
            many[s], single[s] = summarize(m_runs), summarize(s_runs)
    run.metric(workload, "batch", f"batch reads of {per} random keys of {n:,} ({VALUE_SIZE} B values), per key",
               "keys/s", "higher", many)
    run.metric(workload, "single", f"the same keys by {per} single gets, per key", "keys/s", "higher", single)
    if "mmkv" in many and "mmkv" in single:
        ratio = many["mmkv"]["median"] / single["mmkv"]["median"]
        run.note(workload, f"mmkv get_many / mmkv single gets: {ratio:.2f}x (target >= 3x). lmdb's batch read is "
                           "Cursor.getmulti in one read transaction; its single gets a transaction each, as in get.")


# ===================================================================== workload 6: durable put
def wl_durable_put(run, workload):
    n = run.size["durable"]
    rng = random.Random(6)
    systems = run.systems(workload)
    items = [(key(i), os.urandom(VALUE_SIZE)) for i in range(n)]

    def make(s):
        return ADAPTERS[s](run.folder(f"durable-{s}"), sync="full"), shuffled(items, rng)

    def check(ad):
        c = ad.count()
        return f"{c} keys after {n} puts" if c != n else None

    values = rate_runs(run, workload, systems, n, make, lambda ad, order: ad.put_loop(order), check, "durable")
    run.metric(workload, workload, f"durable put, {VALUE_SIZE} B values, {n} keys", "ops/s", "higher", values)
    run.note(workload, "mmkv sync=\"full\" (msync MS_SYNC of record, then of slot); lmdb sync=True, "
                       "metasync=True; sqlite WAL with synchronous=FULL.")


# ===================================================================== workload 7: counter
def counter_child(system, target, n, barrier, queue, opener="counter_open"):
    """Body of one incrementing process: open own handle (the adapter's opener: counter_open, or
    cas_open for a read-then-compare-and-swap step), wait for the others, increment n times."""
    try:
        step, close = getattr(ADAPTERS[system], opener)(target)
        barrier.wait(120)
        gc.disable()
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        t1 = time.perf_counter()
        close()
        queue.put((t0, t1, None))
    except BaseException as exc:
        queue.put((None, None, f"{type(exc).__name__}: {exc}"))


def shared_counter_runs(run, workload, systems, opener="counter_open"):
    """Repeated runs of run.size["procs"] processes each taking counter_per_proc increments of one
    counter through ADAPTERS[s].<opener>; the final count is checked to be exact.  Returns
    (rates by system, final counts by system, expected total)."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    procs, per = run.size["procs"], run.size["counter_per_proc"]
    total = procs * per
    runs = {s: [] for s in systems}
    finals = {s: [] for s in systems}
    alive = list(systems)
    for r in range(run.repeats):
        for s in list(alive):
            folder = None
            try:
                folder = run.folder(f"counter-{s}")
                target, final = ADAPTERS[s].counter_setup(folder)
                barrier, queue = ctx.Barrier(procs + 1), ctx.Queue()
                children = [ctx.Process(target=counter_child, args=(s, target, per, barrier, queue, opener))
                            for _ in range(procs)]
                for c in children:
                    c.start()
                barrier.wait(120)
                got = [queue.get(timeout=600) for _ in children]
                for c in children:
                    c.join(60)
                errors = [e for _, _, e in got if e]
                if errors:
                    raise RuntimeError("child failed: " + errors[0])
                if any(c.exitcode != 0 for c in children):
                    raise RuntimeError(f"child exit codes {[c.exitcode for c in children]}")
                elapsed = max(t1 for _, t1, _ in got) - min(t0 for t0, _, _ in got)
                count = final()
                finals[s].append(count)
                if count != total:
                    run.fail(workload, s, f"final count {count}, expected {total} ({procs} x {per} increments)")
                    alive.remove(s)
                    continue
                runs[s].append(total / elapsed)
            except Exception as exc:
                run.fail(workload, s, f"{type(exc).__name__}: {exc}")
                alive.remove(s)
            finally:
                if folder:
                    remove(folder)
    return runs, finals, total


def counter_values(systems, runs, finals, total) -> dict:
    values = {}
    for s in systems:
        if runs[s] or finals[s]:
            values[s] = summarize(runs[s], final_counts=finals[s], expected=total,
                                  exact=all(f == total for f in finals[s]) and bool(finals[s]))
            if not runs[s]:
                values[s]["median"] = None
    return values


def wl_counter(run, workload):
    systems = run.systems(workload)
    procs, per = run.size["procs"], run.size["counter_per_proc"]
    values = counter_values(systems, *shared_counter_runs(run, workload, systems))
    run.metric(workload, workload, f"{procs} processes x {per:,} increments of one counter (total incr/s)",
               "ops/s", "higher", values)
    run.note(workload, "Each process opens its own handle (mp.Value: inherits the shared value and uses its "
                       "lock). mmkv db.incr; lmdb a write txn that reads, adds 1 and puts; sqlite UPDATE v=v+1 "
                       "(WAL, synchronous=OFF, autocommit, busy timeout 120 s); diskcache cache.incr; redis INCR. "
                       "Time from the first process starting to the last finishing; the final count is checked "
                       "to be exact.")


def wl_cas(run, workload):
    """Read-then-compare-and-swap increments of one counter from several processes: mmkv's
    db.get + db.cas (retried until it swaps) beside lmdb's read-modify-write transaction, and
    mmkv's incr of the same counter for scale."""
    systems = run.systems(workload)
    procs, per = run.size["procs"], run.size["counter_per_proc"]
    values = counter_values(systems, *shared_counter_runs(run, workload, systems, "cas_open"))
    run.metric(workload, "cas", f"{procs} processes x {per:,} read-then-cas increments of one counter "
               "(successful increments/s; lmdb: a write txn reading and putting)", "ops/s", "higher", values)
    if "mmkv" in systems:
        incr = counter_values(["mmkv"], *shared_counter_runs(run, workload, ["mmkv"]))
        run.metric(workload, "incr", "the same with mmkv's incr (one call per increment)", "ops/s", "higher", incr)
    run.note(workload, "mmkv: each step reads the counter (db.get, lock-free) and calls db.cas(key, read, read + 1) "
                       "until it returns True (a failed cas is a retry, not an increment); lmdb: each step is one "
                       "write transaction (get, put; sync=False, metasync=False), which serialises the processes "
                       "on lmdb's writer lock. The final count is checked to be exact.")


# ===================================================================== workload 8: open
# The open workload's child: a fresh interpreter imports bench/adapters.py (before its clock starts; the
# parent's wall time includes it, well under 1 ms with its bytecode), then the system's module (import_s),
# then opens the store and reads one key (open_get_s).  It imports nothing else before the system's
# module (json, say, would import re, enum, functools and collections first, about 5 ms, and hand
# them to the system's import for free): its figures go out as one line of numbers.
OPEN_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
import adapters
del sys.path[0]
system, path, k = sys.argv[2], sys.argv[3], sys.argv[4].encode()
store = adapters.ADAPTERS[system]
t_start = time.perf_counter()
store.open_import()
t0 = time.perf_counter()
v, close = store.open_get(path, k)
t1 = time.perf_counter()
close()
import resource
print(t1 - t0, t0 - t_start, len(v), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def parse_open_child(stdout):
    """The open child's figures, from its last line."""
    open_get_s, import_s, value_len, maxrss_kb = stdout.strip().splitlines()[-1].split()
    return {"open_get_s": float(open_get_s), "import_s": float(import_s), "value_len": int(value_len),
            "maxrss_kb": int(maxrss_kb)}


def chunks(n, value_of):
    """{key(i): value_of(i)} for keys 0..n-1, CHUNK keys per dict."""
    for start in range(0, n, CHUNK):
        yield {key(i): value_of(i) for i in range(start, min(n, start + CHUNK))}


def random_value(_i) -> bytes:
    return os.urandom(VALUE_SIZE)


def write_chunks(update, n, value):
    """update({key(i): value, ...}) for keys 0..n-1, CHUNK keys per call."""
    for chunk in chunks(n, lambda _i: value):
        update(chunk)


def build_store(system, n, folder):
    """A store of keys key(0..n-1) with random 100-byte values, built in chunks; returns its path."""
    return ADAPTERS[system].build(folder, chunks(n, random_value))


#: Children per (system, size) in the open workload, at least: one costs tens of milliseconds, and the
#: wall time of a process start scatters by several ms on a busy machine, so a median of 3 is noise.
OPEN_REPEATS = 11


def open_child_env():
    """The open workload's child environment: the caller's, but bytecode may be written.

    An installed package has its modules compiled (pip compiles them at install); an editable or
    in-tree mmkv under PYTHONDONTWRITEBYTECODE=1 would be compiled from source in every child
    (about 20 ms of mmkv's import measured), which is not what a user's fresh process pays.
    The untimed warm-up child of each case writes the bytecode the timed ones then read.
    """
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def wl_open(run, workload):
    rng = random.Random(8)
    small, big = run.size["open_small"], run.size["open_big"]
    cases = [(small, s) for s in run.systems(workload)] + [(big, "mmkv")]
    made = []
    paths = {}
    for n, s in cases:
        try:
            if (s, n) in run.prebuilt:
                paths[(s, n)] = run.prebuilt[(s, n)]
                log(f"  reusing the {n:,}-key {s} store left by an earlier workload")
            else:
                t = time.perf_counter()
                folder = run.folder(f"open-{s}-{n}")
                made.append(folder)
                paths[(s, n)] = build_store(s, n, folder)
                log(f"  built {n:,}-key {s} store in {time.perf_counter() - t:.1f} s")
        except Exception as exc:
            run.fail(workload, s, f"building {n:,} keys: {type(exc).__name__}: {exc}")
    inner = {c: [] for c in paths}
    wall = {c: [] for c in paths}
    extra = {c: [] for c in paths}
    env = open_child_env()
    for r in range(max(OPEN_REPEATS, run.repeats) + 1):     # round 0: the untimed warm-up
        for (s, n), path in list(paths.items()):
            k = key(rng.randrange(n)).decode()
            try:
                t = time.perf_counter()
                # cwd: the store's folder, never the repository: `python -c` puts the working directory first
                # on sys.path, and from the repository root the child would import the source tree's mmkv
                # instead of the installed one
                proc = subprocess.run([sys.executable, "-c", OPEN_CHILD, HERE, s, path, k], capture_output=True,
                                      text=True, timeout=300, env=env, cwd=os.path.dirname(os.path.abspath(path)))
                dt = time.perf_counter() - t
                if proc.returncode:
                    raise RuntimeError(f"child exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
                out = parse_open_child(proc.stdout)
                if out["value_len"] != VALUE_SIZE:
                    raise AssertionError(f"read {out['value_len']} bytes, expected {VALUE_SIZE}")
                if r == 0:
                    continue
                inner[(s, n)].append(out["open_get_s"] * 1e3)
                wall[(s, n)].append(dt * 1e3)
                extra[(s, n)].append(out)
            except Exception as exc:
                run.fail(workload, s, f"{n:,} keys: {type(exc).__name__}: {exc}")
                paths.pop((s, n))
    for n in (small, big):
        for what, data, unit in (("open + first get, timed inside the child", inner, "ms"),
                                 ("whole child process, wall", wall, "ms")):
            values = {s: summarize(data[(s, nn)], file_bytes=store_bytes(paths[(s, nn)]),
                                   import_ms=statistics.median(e["import_s"] * 1e3 for e in extra[(s, nn)]),
                                   child_maxrss_kb=max(e["maxrss_kb"] for e in extra[(s, nn)]))
                      for (s, nn) in paths if nn == n and data[(s, nn)]}
            mid = ("open_" if "inside" in what else "open_wall_") + label_n(n)
            run.metric(workload, mid, f"{what}, {n:,} keys", unit, "lower", values)
    for folder in made:
        remove(folder)
    for (s, n), path in run.prebuilt.items():
        remove(os.path.dirname(path))
    run.note(workload, f"Stores of {small:,} keys (mmkv, lmdb, sqlite) and {big:,} keys (mmkv only, to show that "
                       "opening does not grow with the key count), 100-byte values, files just written (warm page "
                       "cache). mmkv opens with flag \"r\", lmdb readonly=True, sqlite a plain connect. "
                       "The inside time runs from before open to after the first get (module already imported); "
                       "the wall time is the whole child (interpreter start, import, open, get, exit). "
                       f"Median of {max(OPEN_REPEATS, run.repeats)} children per case, the systems interleaved, after "
                       "one untimed child per case that writes the modules' bytecode (children run without "
                       "PYTHONDONTWRITEBYTECODE: an installed package is compiled at install)." + source_tree_caveat())


def source_tree_caveat():
    """A warning for the open workload's note when mmkv runs from this source tree (an editable install):
    setuptools' editable import hook then loads pathlib, re, urllib and more at every interpreter start
    (about 20 ms measured), in every child of every system alike, which hides part of the difference."""
    import mmkv
    if os.path.commonpath([os.path.abspath(mmkv.__file__), REPO]) != REPO:
        return ""
    return (" mmkv ran from the source tree (an editable install): every child, of every system, also paid "
            "the editable import hook at start-up (about 20 ms); the figures a user sees come from a venv "
            "with `pip install .`.")


def store_bytes(path):
    """Bytes of a store: a file (and its -wal), or every file of a folder (lmdb)."""
    if os.path.isdir(path):
        return tree_bytes(path)[0]
    return sum(os.path.getsize(p) for p in (path, path + "-wal") if os.path.exists(p))


def label_n(n):
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k"


# ===================================================================== workload 9: space
def tree_bytes(folder):
    """(apparent bytes, allocated bytes, {file: bytes}) of every file under folder."""
    apparent = allocated = 0
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            p = os.path.join(root, name)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            apparent += st.st_size
            allocated += st.st_blocks * 512
            files[os.path.relpath(p, folder)] = st.st_size
    return apparent, allocated, files


def _hold_open(path):
    """A child process that opens the mmkv store at path and keeps it open until its stdin closes."""
    import subprocess
    code = "import sys, mmkv; db = mmkv.open(sys.argv[1]); print('open', flush=True); sys.stdin.read(); db.close()"
    child = subprocess.Popen([sys.executable, "-c", code, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
    if child.stdout.readline().strip() != "open":
        child.kill()
        raise RuntimeError("the process meant to hold the store open did not open it")
    return child


def wl_space(run, workload):
    n, rounds = run.size["space_n"], run.size["space_rounds"]
    systems = run.systems(workload)
    after_load, after_churn, churn_disk, shared, compacted, compacted_disk = {}, {}, {}, {}, {}, {}
    folders = []
    for s in systems:
        rng = random.Random(9)        # the same sizes and deletions for every system
        ad = None
        try:
            folders.append(run.folder(f"space-{s}"))
            ad = ADAPTERS[s](folders[-1])
            live = {}
            items = []
            for i in shuffled(range(n), rng):
                v = os.urandom(rng.randint(10, 2000))
                items.append((key(i), v))
                live[key(i)] = len(v)
            ad.put_loop(items)
            logical = sum(len(k) + v for k, v in live.items())
            app, alloc, files = tree_bytes(ad.folder)
            after_load[s] = summarize([app / logical], bytes=app, allocated_bytes=alloc, logical_bytes=logical,
                                      keys=len(live), files=files)
            for _ in range(rounds):
                items = []
                for i in shuffled(range(n), rng):
                    v = os.urandom(rng.randint(10, 2000))
                    items.append((key(i), v))
                    live[key(i)] = len(v)
                ad.put_loop(items)
                gone = rng.sample(sorted(live), len(live) // 2)
                ad.delete_loop(gone)
                for k in gone:
                    del live[k]
            if ad.count() != len(live):
                raise AssertionError(f"{ad.count()} keys, expected {len(live)}")
            logical = sum(len(k) + v for k, v in live.items())
            app, alloc, files = tree_bytes(ad.folder)
            after_churn[s] = summarize([app / logical], bytes=app, allocated_bytes=alloc, logical_bytes=logical,
                                       keys=len(live), files=files)
            churn_disk[s] = summarize([alloc / logical], bytes=app, allocated_bytes=alloc, logical_bytes=logical)
            stats = ad.stats()
            if stats is not None:           # the store's own account (mmkv: db.stats())
                after_churn[s]["stats"] = stats
            if s == "mmkv":                 # compaction while another process holds the store open
                holder = _hold_open(ad.path)
                try:
                    ad.compact()
                    app2, alloc2, _ = tree_bytes(ad.folder)
                    shared[s] = summarize([alloc2 / logical], bytes=app2, allocated_bytes=alloc2,
                                          file_ratio=app2 / logical, compaction=ad.last_compaction)
                finally:
                    holder.stdin.close()
                    holder.wait(timeout=60)
            try:
                where = ad.compact()
            except NotImplementedError:
                where = None
            if where is not None:
                if where != ad.folder:
                    folders.append(where)
                app3, alloc3, files3 = tree_bytes(where)
                extra = {"compaction": ad.last_compaction} if s == "mmkv" else {}
                compacted[s] = summarize([app3 / logical], bytes=app3, allocated_bytes=alloc3, files=files3, **extra)
                compacted_disk[s] = summarize([alloc3 / logical], bytes=app3, allocated_bytes=alloc3)
            ad.close()
            after_churn[s]["bytes_after_close"] = tree_bytes(ad.folder)[0]
            ad = None
        except Exception as exc:
            run.fail(workload, s, f"{type(exc).__name__}: {exc}")
            log(traceback.format_exc())
        finally:
            if ad is not None:
                close_quietly(ad)
    run.metric(workload, "space_load", f"after loading {n:,} keys (10..2000 B values)", "x", "lower", after_load)
    run.metric(workload, "space_churn", f"after {rounds} rounds of overwrite-all + delete-half", "x", "lower",
               after_churn)
    run.metric(workload, "space_churn_disk", "the same, bytes allocated on disk (st_blocks)", "x", "lower",
               churn_disk)
    run.metric(workload, "space_compact_shared", "allocated on disk after compact() while another process has "
               "the store open (mmkv)", "x", "lower", shared)
    run.metric(workload, "space_compact", "after each system's own compaction (mmkv compact(), sqlite VACUUM, "
               "lmdb copy with compaction, diskcache check(fix) + VACUUM)", "x", "lower", compacted)
    run.metric(workload, "space_compact_disk", "the same, bytes allocated on disk", "x", "lower", compacted_disk)
    run.note(workload, "Bytes of every file the system keeps (main file, WAL, lock or sidecar files), measured "
                       "while the store is open, divided by the live logical bytes (sum of len(key)+len(value) of "
                       "what is stored). Each call its own commit; one run (a size, not a timing). A round "
                       "overwrites every key (re-inserting the ones deleted in the previous round) with a random "
                       "10..2000-byte value, then deletes a random half. The JSON also has allocated bytes, each "
                       "file's size and the size after close.")
    for folder in folders:
        remove(folder)


# ===================================================================== workload 10: scale
def scale_child(path, n, out_path):
    """Run in a fresh interpreter: insert n keys one call at a time, timing each call, then get them all."""
    from array import array
    import mmkv
    rng = random.Random(10)

    def permutation():
        while True:
            a = rng.randrange(n // 3, n) | 1
            if math.gcd(a, n) == 1:
                return a, rng.randrange(n)

    a, b = permutation()
    lat = array("q", bytes(8 * n))
    pc = time.perf_counter_ns
    urandom = os.urandom
    db = mmkv.open(path, "n")
    put_s = 0.0
    j = 0
    for start in range(0, n, CHUNK):
        idx = range(start, min(n, start + CHUNK))
        keys = [key((a * i + b) % n) for i in idx]
        vals = [urandom(VALUE_SIZE) for _ in idx]
        gc.collect()
        gc.disable()
        t = time.perf_counter()
        for k, v in zip(keys, vals):
            t0 = pc()
            db[k] = v
            lat[j] = pc() - t0
            j += 1
        put_s += time.perf_counter() - t
        gc.enable()
    st = db.stats()
    a2, b2 = permutation()
    get_s = 0.0
    bad = 0
    for start in range(0, n, CHUNK):
        keys = [key((a2 * i + b2) % n) for i in range(start, min(n, start + CHUNK))]
        gc.collect()
        gc.disable()
        t = time.perf_counter()
        for k in keys:
            db[k]
        get_s += time.perf_counter() - t
        gc.enable()
        bad += sum(1 for k in keys[:100] if len(db[k]) != VALUE_SIZE)

    def proc_status():
        status = {}
        with open("/proc/self/status") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    status[name] = int(rest.split()[0]) * 1024
        return status
    status = proc_status()
    # streaming iteration of every item: its rate, and the process's anonymous memory (the Python
    # heap, not the mapped file) sampled every 100k items
    gc.collect()
    anon_before = anon_peak = proc_status()["RssAnon"]
    t = time.perf_counter()
    seen = 0
    for k, v in db.items():
        seen += 1
        if seen % 100_000 == 0:
            anon_peak = max(anon_peak, proc_status()["RssAnon"])
    iter_s = time.perf_counter() - t
    anon_peak = max(anon_peak, proc_status()["RssAnon"])
    file_size = os.path.getsize(path)
    db.close()
    slowest = heapq.nlargest(10, range(n), key=lat.__getitem__)
    s = sorted(lat)

    def pct(q):
        return s[min(n - 1, int(q * n))] / 1e3
    out = dict(n=n, insert_rate=n / put_s, get_rate=n / get_s, file_bytes=file_size, keys=st["keys"],
               iterated=seen, iter_rate=seen / iter_s, iter_anon_before=anon_before, iter_anon_peak=anon_peak,
               stats=st, bad_values=bad, proc_status=status, peak_rss_bytes=status.get("VmHWM"),
               p50_us=pct(0.50), p99_us=pct(0.99), p999_us=pct(0.999), max_us=s[-1] / 1e3,
               mean_us=sum(s) / n / 1e3,
               slowest=[dict(call=i, keys_before=i, us=lat[i] / 1e3) for i in sorted(slowest)])
    with open(out_path, "w") as f:
        json.dump(out, f)


def wl_scale(run, workload):
    n = run.size["scale_n"]
    folder = run.folder("scale-mmkv")
    path = os.path.join(folder, "store.mmkv")
    out_path = os.path.join(folder, "scale.json")
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child-scale", path, str(n), out_path],
                          capture_output=True, text=True, timeout=3600)
    wall = time.perf_counter() - t
    if proc.returncode:
        run.fail(workload, "mmkv", f"scale child exited {proc.returncode}: {proc.stderr.strip()[-1500:]}")
        remove(folder)
        return
    with open(out_path) as f:
        out = json.load(f)
    if out["keys"] != n:
        run.fail(workload, "mmkv", f"{out['keys']} keys after inserting {n}")
    if out["bad_values"]:
        run.fail(workload, "mmkv", f"{out['bad_values']} values read back with the wrong length")
    if out["iterated"] != n:
        run.fail(workload, "mmkv", f"items() yielded {out['iterated']} of {n} keys")
    tag = label_n(n)
    rows = [("scale_insert", f"insert rate, {tag} keys, per call", "ops/s", "higher", out["insert_rate"]),
            ("scale_get", f"get rate, {tag} keys, random order", "ops/s", "higher", out["get_rate"]),
            ("scale_file", f"file size at {tag} keys", "MB", "lower", out["file_bytes"] / 1e6),
            ("scale_bytes_per_key", f"file bytes per key ({len(key(0))} B key + {VALUE_SIZE} B value)", "B",
             "lower", out["file_bytes"] / n),
            ("scale_rss", "peak RSS of the process (VmHWM)", "MB", "lower", (out["peak_rss_bytes"] or 0) / 1e6),
            ("scale_iter", f"items() over all {tag} keys, per item", "items/s", "higher", out["iter_rate"]),
            ("scale_iter_memory", "anonymous memory (RssAnon) items() added at its peak, sampled every 100k items",
             "MB", "lower", (out["iter_anon_peak"] - out["iter_anon_before"]) / 1e6),
            ("scale_p50", "put latency p50", "us", "lower", out["p50_us"]),
            ("scale_p99", "put latency p99", "us", "lower", out["p99_us"]),
            ("scale_p999", "put latency p99.9", "us", "lower", out["p999_us"]),
            ("scale_max", "put latency max", "us", "lower", out["max_us"])]
    for mid, label, unit, better, v in rows:
        extra = dict(raw=out) if mid == "scale_insert" else {}
        run.metric(workload, mid, label, unit, better, {"mmkv": summarize([v], **extra)})
    slow = ", ".join(f"{x['us'] / 1e3:.1f} ms at key {x['call']:,}" for x in sorted(out["slowest"],
                                                                                       key=lambda x: -x["us"])[:5])
    st = out["proc_status"]
    run.note(workload, f"One run in a fresh process ({wall:.0f} s wall including key and value generation). "
                       f"Every put is timed on its own (perf_counter_ns around db[k] = v) while the file and the "
                       f"index grow; the rates include that timer. Slowest puts: {slow}. The peak RSS counts the "
                       f"mapped file's resident pages (RssFile {st.get('RssFile', 0) / 1e6:.0f} MB, RssAnon "
                       f"{st.get('RssAnon', 0) / 1e6:.0f} MB at the end, of which {8 * n / 1e6:.0f} MB is the "
                       f"harness's latency array).")
    run.prebuilt[("mmkv", n)] = path


#: Seconds the compact workload's reader and writer run with no compaction, for their baseline
#: (3 in --quick).
BASELINE_SECONDS = 15

#: The end of every timing worker: its latencies (nanoseconds in ``lat``, ``n`` calls) summarised
#: as JSON into the file ``out``.
_LATENCY_SUMMARY = """
lat.sort()
json.dump(dict(ops=n, max_us=lat[-1] / 1e3, p999_us=lat[int(len(lat) * 0.999)] / 1e3,
               over_10ms=sum(1 for x in lat if x > 10_000_000)), open(out, "w"))
"""


def start_workers(commands: dict, stop: str, outs: dict):
    """Start one timing worker per name (``commands[name]``: its argv, to which its output file
    ``outs[name]`` is appended) and give them a second to settle; returns a function that
    stops them (by creating the file ``stop``) and returns what each measured, by name."""
    if os.path.exists(stop):
        os.remove(stop)
    kids = [subprocess.Popen(argv + [outs[name]]) for name, argv in commands.items()]
    time.sleep(1.0)

    def finish():
        with open(stop, "w"):
            pass
        for kid in kids:
            kid.wait(timeout=600)
        seen = {}
        for name in commands:
            with open(outs[name]) as f:
                seen[name] = json.load(f)
        return seen
    return finish


_COMPACT_WORKER = """
import json, sys, time, mmkv
path, role, stop, out = sys.argv[1:5]
db = mmkv.open(path)
lat, n, t_end = [], 0, time.time() + 3600
import os
while not (n % 256 == 0 and (os.path.exists(stop) or time.time() > t_end)):
    k = b"key%08d" % ((n * 7919) % 1_000_000 * 2)           # keys the compaction keeps (even ones)
    t = time.perf_counter_ns()
    if role == "reader":
        db.get(k)
    else:
        db[b"w%d" % (n % 1000)] = b"x" * 100
    lat.append(time.perf_counter_ns() - t)
    n += 1
""" + _LATENCY_SUMMARY


def wl_compact(run, workload):
    """A store of compact_bytes of 1000-byte values, every other key deleted, compacted while a
    reader and a writer in other processes time each of their calls."""
    total = run.size["compact_bytes"]
    n = total // 1000
    folder = run.folder("compact-mmkv")
    path = os.path.join(folder, "store.mmkv")
    import mmkv
    value = os.urandom(1000)
    with mmkv.open(path, "n") as db:
        write_chunks(db.update, n, value)
        for i in range(1, n, 2):
            del db[key(i)]
        live = db.stats()["live_bytes"]
    script, stop = os.path.join(folder, "worker.py"), os.path.join(folder, "stop")
    with open(script, "w") as f:
        f.write(_COMPACT_WORKER)

    def workers(phase):
        """Start the reader and the writer; returns a function that stops them and returns what
        each measured."""
        roles = ("reader", "writer")
        return start_workers({role: [sys.executable, script, path, role, stop] for role in roles}, stop,
                             {role: os.path.join(folder, f"{phase}-{role}.json") for role in roles})

    # the same two workers with no compaction, a CPU-bound loop in its place: what this machine's
    # scheduler alone does to their calls (three busy processes on the cores)
    base_seconds = BASELINE_SECONDS if total >= 1 << 30 else 3
    finish = workers("base")
    t_end = time.monotonic() + base_seconds
    while time.monotonic() < t_end:
        pass
    base = finish()
    finish = workers("compact")
    with mmkv.open(path) as db:
        res = db.compact()
        seen = finish()
        check = db.check()                  # after the workers: it holds the lock for seconds
    if not check.ok:
        run.fail(workload, "mmkv", f"check() after compaction: {check.problems[:3]}")
    mb = res["moved_bytes"] / 1e6
    rows = [("compact_rate", f"live data moved, {total / 1e9:.2f} GB store half free", "MB/s", "higher",
             mb / res["seconds"] if res["seconds"] else 0.0),
            ("compact_hold", "longest lock hold of the compaction", "ms", "lower", res["longest_step_seconds"] * 1e3),
            ("compact_reader_max", "longest get of a reader in another process meanwhile", "ms", "lower",
             seen["reader"]["max_us"] / 1e3),
            ("compact_writer_max", "longest put of a writer in another process meanwhile", "ms", "lower",
             seen["writer"]["max_us"] / 1e3),
            ("compact_reader_base_max", "the same reader's longest get with no compaction (a CPU-bound loop "
             "in its place)", "ms", "lower", base["reader"]["max_us"] / 1e3),
            ("compact_writer_base_max", "the same writer's longest put with no compaction", "ms", "lower",
             base["writer"]["max_us"] / 1e3),
            ("compact_disk", "bytes allocated on disk after, per live logical byte (the file is shared: no shrink)",
             "x", "lower", res["disk_bytes_after"] / live)]
    for mid, label, unit, better, v in rows:
        extra = dict(result=res, workers=seen, baseline=base) if mid == "compact_rate" else {}
        run.metric(workload, mid, label, unit, better, {"mmkv": summarize([v], **extra)})
    run.note(workload, f"{n:,} keys of 1000 B written, every other one deleted, then db.compact() while two other "
                       f"processes run: one doing gets, one puts, each call timed (reader {seen['reader']['ops']:,} "
                       f"gets, {seen['reader']['over_10ms']} over 10 ms; writer {seen['writer']['ops']:,} puts, "
                       f"{seen['writer']['over_10ms']} over 10 ms; with no compaction, for {base_seconds} s: "
                       f"{base['reader']['over_10ms']} gets and {base['writer']['over_10ms']} puts over 10 ms). "
                       f"{res['moved_records']:,} records "
                       f"({mb:,.0f} MB) moved in {res['seconds']:.1f} s; longest hold by phase: "
                       + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in res['longest_hold_by_phase'].items()) + ".")
    remove(folder)


_LMDB_WRITER = """
import json, os, sys, time, lmdb
path, stop, out = sys.argv[1:4]
env = lmdb.open(path, map_size=4 << 30, subdir=False, lock=True)
lat, n = [], 0
while not (n % 256 == 0 and os.path.exists(stop)):
    t = time.perf_counter_ns()
    with env.begin(write=True) as txn:
        txn.put(b"w%d" % (n % 1000), b"x" * 100)
    lat.append(time.perf_counter_ns() - t)
    n += 1
""" + _LATENCY_SUMMARY


def wl_backup(run, workload):
    """db.backup() of a store of compact_bytes (1000-byte values, a quarter deleted) while a writer
    in another process times each put; py-lmdb's env.copy(compact=True) of the same data beside
    its own writer process."""
    total = run.size["compact_bytes"]
    n = total // 1000
    value = os.urandom(1000)
    results = {}
    for system in run.systems(workload):
        folder = run.folder(f"backup-{system}")
        path, dest = os.path.join(folder, "store"), os.path.join(folder, "copy")
        script, stop = os.path.join(folder, "writer.py"), os.path.join(folder, "stop")
        if system == "mmkv":
            import mmkv
            with mmkv.open(path, "n") as db:
                write_chunks(db.update, n, value)
                for i in range(3, n, 4):
                    del db[key(i)]
            with open(script, "w") as f:
                f.write(_COMPACT_WORKER)
            argv = [sys.executable, script, path, "writer", stop]
        else:
            import lmdb
            env = lmdb.open(path, map_size=4 << 30, subdir=False)
            for start in range(0, n, CHUNK):
                with env.begin(write=True) as txn:
                    for i in range(start, min(n, start + CHUNK)):
                        txn.put(key(i), value)
            with env.begin(write=True) as txn:
                for i in range(3, n, 4):
                    txn.delete(key(i))
            env.close()
            with open(script, "w") as f:
                f.write(_LMDB_WRITER)
            argv = [sys.executable, script, path, stop]

        def writer(phase):
            finish = start_workers({"writer": argv}, stop, {"writer": os.path.join(folder, f"{phase}.json")})
            return lambda: finish()["writer"]
        finish = writer("base")
        time.sleep(3.0)
        base = finish()
        finish = writer("backup")
        t0 = time.perf_counter()
        if system == "mmkv":
            with mmkv.open(path, "r") as db:
                res = db.backup(dest)
            held = res["lock_seconds"]
        else:
            env = lmdb.open(path, map_size=4 << 30, subdir=False)
            env.copy(dest, compact=True)
            env.close()
            held = None
        seconds = time.perf_counter() - t0
        seen = finish()
        size_ratio = os.path.getsize(dest) / os.path.getsize(path)
        results[system] = dict(seconds=seconds, held=held, seen=seen, base=base, size_ratio=size_ratio,
                               source=os.path.getsize(path))
        remove(folder)
    rows = [("backup_seconds", f"backup of a {total / 1e9:.2f} GB store (a quarter deleted), start to finish", "s",
             "lower", {s: r["seconds"] for s, r in results.items()}),
            ("backup_writer_max", "longest put of a writer in another process during the backup", "ms", "lower",
             {s: r["seen"]["max_us"] / 1e3 for s, r in results.items()}),
            ("backup_writer_base_max", "the same writer's longest put with no backup (3 s)", "ms", "lower",
             {s: r["base"]["max_us"] / 1e3 for s, r in results.items()}),
            ("backup_size", "the copy's file size / the store's", "x", "lower",
             {s: r["size_ratio"] for s, r in results.items()})]
    if "mmkv" in results:
        rows.insert(1, ("backup_lock", "mmkv: the store lock held to copy the bytes (what writers may wait)", "ms",
                        "lower", {"mmkv": results["mmkv"]["held"] * 1e3}))
    for mid, label, unit, better, values in rows:
        run.metric(workload, mid, label, unit, better, {s: summarize([v]) for s, v in values.items()})
    run.note(workload, "; ".join(f"{s}: writer {r['seen']['ops']:,} puts during the backup, {r['seen']['over_10ms']} "
                                 f"over 10 ms (with no backup: {r['base']['over_10ms']} of {r['base']['ops']:,})"
                                 for s, r in results.items())
             + ". mmkv's copy is recovered, compacted and audited after the lock is released; lmdb's writers "
               "never wait for a copy (its readers see a snapshot), and its compacting copy rewrites the tree.")


#: Runs the mmkv command line given as its arguments, then writes the process's peak RSS (VmHWM,
#: kB) to the file named by MMKV_BENCH_HWM.  (The rusage of a child counts the parent's memory at
#: fork: every child of this bench would report the bench's own peak.)
_CLI_WITH_HWM = """
import os, sys
from mmkv.cli import main
code = main(sys.argv[1:])
with open("/proc/self/status") as f:
    hwm = next(line.split()[1] for line in f if line.startswith("VmHWM:"))
with open(os.environ["MMKV_BENCH_HWM"], "w") as f:
    f.write(hwm)
sys.exit(code)
"""


def _cli_run(args, folder):
    """Run `mmkv ARGS` in a fresh process to completion; (seconds, its peak RSS in bytes)."""
    hwm = os.path.join(folder, "hwm")
    t0 = time.perf_counter()
    code = subprocess.run([sys.executable, "-c", _CLI_WITH_HWM] + args, env=dict(os.environ, MMKV_BENCH_HWM=hwm)).returncode
    seconds = time.perf_counter() - t0
    if code:
        raise RuntimeError(f"mmkv {' '.join(args[:3])} exited {code}")
    with open(hwm) as f:
        return seconds, int(f.read()) * 1024


def wl_transfer(run, workload):
    """`mmkv dump` of the scale store (scale_n keys of 100 B; built here when the scale workload did
    not run) to a JSON-lines file, then `mmkv load` of that file into a new store: rates and the
    peak memory of each process."""
    n = run.size["scale_n"]
    folder = run.folder("transfer")
    src = run.prebuilt.get(("mmkv", n))
    if src is None or not os.path.exists(src):
        import mmkv
        src = os.path.join(folder, "src.mmkv")
        value = b"v" * VALUE_SIZE
        with mmkv.open(src, "n") as db:
            write_chunks(db.update, n, value)
    lines, dst = os.path.join(folder, "dump.jsonl"), os.path.join(folder, "dst.mmkv")
    dump_s, dump_rss = _cli_run(["dump", src, "--out", lines], folder)
    load_s, load_rss = _cli_run(["load", dst, lines], folder)
    size = os.path.getsize(lines)
    import mmkv
    with mmkv.open(dst, "r") as db:
        loaded = len(db)
    if loaded != n:
        run.fail(workload, "mmkv", f"load wrote {loaded} keys of {n}")
    tag = label_n(n)
    for mid, label, unit, better, v in [
            ("dump_rate", f"mmkv dump of {tag} keys to a JSON-lines file", "records/s", "higher", n / dump_s),
            ("dump_mb", "the same, bytes of JSON written per second", "MB/s", "higher", size / dump_s / 1e6),
            ("dump_rss", "peak RSS of the dump process (counts the mapped file's resident pages)", "MB", "lower",
             dump_rss / 1e6),
            ("load_rate", f"mmkv load of those {tag} records into a new store", "records/s", "higher", n / load_s),
            ("load_rss", "peak RSS of the load process (counts the mapped file's resident pages)", "MB", "lower",
             load_rss / 1e6)]:
        run.metric(workload, mid, label, unit, better, {"mmkv": summarize([v])})
    run.note(workload, f"{n:,} keys (key{{i:08d}}, {VALUE_SIZE} B values): dump {dump_s:.1f} s, {size / 1e9:.2f} GB "
                       f"of JSON lines; load {load_s:.1f} s. Both are the command line in a fresh process.")
    remove(folder)


WORKLOADS = {"get": wl_get, "get_absent": wl_get, "contains": wl_get, "put": wl_put, "batch_put": wl_batch_put, "delete": wl_delete,
             "durable_put": wl_durable_put, "counter": wl_counter, "open": wl_open, "space": wl_space,
             "scale": wl_scale, "compact": wl_compact, "iterate": wl_iterate, "backup": wl_backup,
             "transfer": wl_transfer, "cas": wl_cas, "get_many": wl_get_many,
             "expiry": wl_expiry, "namespaces": wl_namespaces}


# ===================================================================== machine info
def filesystem_of(path):
    path = os.path.realpath(path)
    best = ("?", "?", "?")
    with open("/proc/mounts") as f:
        for line in f:
            dev, mnt, fstype = line.split()[:3]
            mnt = mnt.replace("\\040", " ")
            if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
                best = (dev, mnt, fstype)
    return dict(device=best[0], mount=best[1], type=best[2])


def machine_info(workdir, avail, redis_version):
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    versions = {"python": platform.python_version(), "sqlite": sqlite3.sqlite_version}
    for mod in ("mmkv", "lmdb", "diskcache", "redis", "matplotlib"):
        try:
            m = importlib.import_module(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:
            pass
    if redis_version:
        versions["redis-server"] = redis_version
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except Exception:
        commit = ""
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "mmkv", "native"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except Exception:
        dirty = []
    return dict(cpu=cpu, cores=os.cpu_count(), memory_bytes=mem, platform=platform.platform(),
                python=sys.version.split()[0], implementation=platform.python_implementation(),
                workdir=workdir, filesystem=filesystem_of(workdir), repo_filesystem=filesystem_of(REPO),
                versions=versions, git_commit=commit, mmkv_uncommitted_changes=dirty)


# ===================================================================== main
def parse_args(argv):
    p = argparse.ArgumentParser(description="Benchmark mmkv against its peers (see the module docstring).")
    p.add_argument("--quick", action="store_true", help="every workload at small sizes (well under a minute)")
    p.add_argument("--only", default="", help="comma-separated workloads: " + ",".join(TABLE_ORDER))
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output folder (default bench/results)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per system (median reported; >= 3)")
    p.add_argument("--workdir", default=None, help="folder for the temporary stores (default: system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the temporary stores")
    p.add_argument("--child-scale", nargs=3, metavar=("PATH", "N", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3")
    args.only = [w.strip() for w in args.only.split(",") if w.strip()]
    unknown = [w for w in args.only if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown workload(s) {unknown}; choose from {','.join(TABLE_ORDER)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child_scale:
        path, n, out = args.child_scale
        scale_child(path, int(n), out)
        return 0
    started = time.perf_counter()
    mode = "quick" if args.quick else "full"
    size = SIZES[mode]
    selected = [w for w in RUN_ORDER if not args.only or w in args.only]
    avail = availability()
    for s, why in avail.items():
        if why and any(s in PARTICIPANTS[w] for w in selected):
            log(f"note: skipping {s}: {why}")
    if avail["mmkv"]:
        log("error: mmkv itself is not importable")
        return 2
    base = args.workdir or tempfile.gettempdir()
    os.makedirs(base, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="mmkv-bench-", dir=base)
    run = Run(args, size, avail, workdir)
    server = None
    try:
        if avail["redis"] is None and any("redis" in PARTICIPANTS[w] for w in selected):
            server = RedisServer(workdir)
            try:
                server.start()
                RedisStore.port = server.port
                log(f"redis-server {server.version} on 127.0.0.1:{server.port}")
            except Exception as exc:
                avail["redis"] = f"redis-server failed to start: {exc}"
                log(f"note: skipping redis: {avail['redis']}")
                server = None
        machine = machine_info(base, avail, server.version if server else None)   # the code as measured
        log(f"{mode} run of {', '.join(selected)}; stores in {workdir}")
        for w in selected:
            t = time.perf_counter()
            log(f"== {w}: {TITLES[w]}")
            run.load[w] = [round(x, 2) for x in os.getloadavg()]
            try:
                WORKLOADS[w](run, w)
            except Exception as exc:
                run.fail(w, "harness", f"{type(exc).__name__}: {exc}")
                log(traceback.format_exc())
            log(f"   ({time.perf_counter() - t:.1f} s)")
    finally:
        if server:
            server.stop()
        RedisStore.port = None
        if not args.keep:
            remove(workdir)
    doc = dict(
        config=dict(quick=args.quick, sizes=size, repeats=args.repeats, workloads=selected,
                    argv=sys.argv[1:]),
        machine=machine,
        settings=SETTINGS,
        skipped={s: why for s, why in avail.items() if why},
        participants={w: run.systems(w) for w in selected},
        workloads={w: run.results[w] for w in TABLE_ORDER if w in run.results},
        failures=run.failures,
        load_averages=dict(run.load, end=[round(x, 2) for x in os.getloadavg()]),
        duration_s=time.perf_counter() - started,
    )
    md, why = report.write(doc, args.out)
    if why:
        log(f"note: {why}")
    suffix = "-quick" if args.quick else ""
    print(md)
    log(f"wrote {args.out}/results{suffix}.md, results{suffix}.json" + ("" if why else f", ratios{suffix}.png")
        + f" in {doc['duration_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())