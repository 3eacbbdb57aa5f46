"""Per-call read rates of mmkv's two bindings beside py-lmdb and a dict (issue 11, phase 1).

    python bench/read_bench.py              # one run, the binding MMKV_BINDING selects
    python bench/read_bench.py --rounds 5   # driver: runs alternating cffi / cpython children, medians

50k keys (b"key%08d") of 100-byte random values; 200k gets of present keys in random order,
200k of absent keys, 200k `in` of present keys; each loop timed best of 5.  py-lmdb: one read
transaction per get (``with env.begin() as txn``) and one reused read transaction.  Needs
``pip install lmdb``.  Run under load, the driver's interleaving and medians are what to trust.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

N_KEYS, N_GETS, VALUE_SIZE, REPEATS = 50_000, 200_000, 100, 5


def best_of(loops):
    """{name: (loop, *args)} -> {name: ops/s, the best of REPEATS}; the repeats go round-robin
    over the loops, so a slow spell of the machine hits every loop alike."""
    times = {name: [] for name in loops}
    for _ in range(REPEATS):
        for name, (loop, *args) in loops.items():
            t = time.perf_counter()
            loop(*args)
            times[name].append(time.perf_counter() - t)
    return {name: N_GETS / min(ts) for name, ts in times.items()}


def mmkv_get(db, keys):
    g = db.get
    for k in keys:
        g(k)


def mmkv_item(db, keys):
    for k in keys:
        db[k]


def mmkv_in(db, keys):
    for k in keys:
        k in db


def lmdb_per_call(env, keys):
    begin = env.begin
    for k in keys:
        with begin() as txn:
            txn.get(k)


def lmdb_reused(txn, keys):
    g = txn.get
    for k in keys:
        g(k)


def dict_get(d, keys):
    g = d.get
    for k in keys:
        g(k)


def one_run():
    import lmdb
    import mmkv
    import mmkv.store
    rng = random.Random(11)
    data = {b"key%08d" % i: os.urandom(VALUE_SIZE) for i in range(N_KEYS)}
    present = [b"key%08d" % rng.randrange(N_KEYS) for _ in range(N_GETS)]
    absent = [b"nokey%08d" % rng.randrange(N_KEYS) for _ in range(N_GETS)]
    out = {"binding": mmkv.store.BINDING}
    with tempfile.TemporaryDirectory() as d:
        db = mmkv.open(os.path.join(d, "r.mmkv"))
        db.update(data)
        assert db.get(present[0]) == data[present[0]] and absent[0] not in db
        env = lmdb.open(os.path.join(d, "lmdb"), map_size=1 << 30, sync=False, metasync=False)
        with env.begin(write=True) as txn:
            txn.cursor().putmulti(list(data.items()))
        with env.begin() as txn:
            out.update(best_of({
                "mmkv get": (mmkv_get, db, present),
                "mmkv []": (mmkv_item, db, present),
                "mmkv get absent": (mmkv_get, db, absent),
                "mmkv in": (mmkv_in, db, present),
                "mmkv in absent": (mmkv_in, db, absent),
                "lmdb get, txn per call": (lmdb_per_call, env, present),
                "lmdb get absent, txn per call": (lmdb_per_call, env, absent),
                "lmdb get, reused txn": (lmdb_reused, txn, present),
                "lmdb get absent, reused txn": (lmdb_reused, txn, absent),
                "dict get": (dict_get, data, present),
                "dict get absent": (dict_get, data, absent),
            }))
        env.close()
        db.close()
    print(json.dumps(out))


def driver(rounds):
    runs = {"cffi": [], "cpython": []}
    for r in range(rounds):
        for binding in (("cffi", "cpython") if r % 2 == 0 else ("cpython", "cffi")):
            env = dict(os.environ, MMKV_BINDING=binding)
            res = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, check=True)
            runs[binding].append(json.loads(res.stdout))
            print(f"round {r + 1} {binding}: get {runs[binding][-1]['mmkv get'] / 1e3:,.0f}k/s", file=sys.stderr)
    med = {b: {k: statistics.median(run[k] for run in rs) for k in rs[0] if k != "binding"} for b, rs in runs.items()}
    names = list(med["cpython"])
    print(f"medians of {rounds} interleaved runs, each best of {REPEATS} x {N_GETS:,} ops (k ops/s)")
    print(f"{'':34}{'cffi':>10}{'cpython':>10}   (medians of rates: each column's runs saw other load)")
    for k in names:
        print(f"{k:34}{med['cffi'][k] / 1e3:>10,.0f}{med['cpython'][k] / 1e3:>10,.0f}")
    # against the peers: the ratio in each run (same process, same minute), then the median
    def ratio(binding, a, b):
        return statistics.median(run[a] / run[b] for run in runs[binding])
    c, f = med["cpython"], med["cffi"]
    print("binding against binding (medians of different processes: the noisiest figures)")
    for k in ("mmkv get", "mmkv []", "mmkv get absent", "mmkv in", "mmkv in absent"):
        print(f"  {k + ': cpython / cffi':42} x{c[k] / f[k]:.2f}")
    print("binding against binding, each normalised by a peer timed in the same process")
    for k in ("mmkv get", "mmkv []", "mmkv get absent", "mmkv in", "mmkv in absent"):
        for p in ("dict get", "lmdb get, reused txn"):
            print(f"  {k + ': cpython / cffi, per ' + p:58} x{ratio('cpython', k, p) / ratio('cffi', k, p):.2f}")
    print("each binding against its peers (median of the per-run ratios)")
    for b in ("cpython", "cffi"):
        for a, p in (("mmkv get", "lmdb get, txn per call"), ("mmkv get", "lmdb get, reused txn"),
                     ("mmkv get absent", "lmdb get absent, txn per call"),
                     ("mmkv get absent", "lmdb get absent, reused txn"), ("mmkv in", "mmkv get"),
                     ("mmkv in absent", "mmkv get absent"), ("dict get", "mmkv get")):
            what = "time per get / dict's" if a == "dict get" else f"{a} / {p}"
            print(f"  {b:8}{what:56} x{ratio(b, a, p):.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=0, help="driver mode: interleaved runs of both bindings")
    a = ap.parse_args()
    driver(a.rounds) if a.rounds else one_run()
