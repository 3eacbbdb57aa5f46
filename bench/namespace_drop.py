"""Clear and drop of a big namespace: how long the store lock is held, and how long the freeing
of the old index's records takes in all.

    python bench/namespace_drop.py [--keys 1000000] [--value 100]

For each of clear() and drop_namespace(): a fresh store with a namespace of --keys keys of --value
bytes; the switch (one catalog commit) is timed, then every later hold of the lock that frees
records (namespaces.free_dropped).  Run twice in one process: with the C loop the engine uses
(mmkv_drain_index, resuming where the last hold stopped), and with the Python loop it replaced
(kept here as the baseline: each hold scanned the index from its first slot).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmkv                                            # noqa: E402
from mmkv.engine import index, namespaces             # noqa: E402
from mmkv.engine.shim import lib, raise_for           # noqa: E402


def python_free_dropped(eng, ns_id, budget=namespaces.FREE_STEP):
    """The Python loop of 6f44023 (the baseline)."""
    entry = eng.catalog.by_id(ns_id) if eng.catalog is not None else None
    if entry is None or not entry.dropped:
        return True
    v = namespaces._private_view(eng, entry)
    for seg, slot, rec in index.entries(v):
        if not budget:
            return False
        raise_for(lib.mmkv_slot_set(v, seg, slot, 0), "dropped namespace: slot clear")
        if lib.mmkv_record_verify_contents(v, rec) == 0:
            eng.free(rec, v.rec_need)
        budget -= 1
    entries = [e for e in namespaces.entries_now(eng) if e.id != ns_id]
    namespaces.commit(eng, eng.catalog.next_id, entries)
    namespaces._free_index_blocks(eng, entry)
    return True


def timed(fn, holds):
    def wrapper(*args, **kw):
        t = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            holds.append(time.perf_counter() - t)
    return wrapper


def one(folder, keys, value, how, loop):
    path = os.path.join(folder, f"{how}-{loop}.mmkv")
    with mmkv.open(path, "n") as db:
        ns = db.namespace("big")
        payload = b"v" * value
        step = 100_000
        for start in range(0, keys, step):
            ns.update((b"key-%09d" % i, payload) for i in range(start, min(keys, start + step)))
        used = db.stats()["used_bytes"]
        switch, frees = [], []
        real_drop, real_free = namespaces.drop, namespaces.free_dropped
        namespaces.drop = timed(real_drop, switch)
        namespaces.free_dropped = timed(real_free if loop == "c" else python_free_dropped, frees)
        try:
            t0 = time.perf_counter()
            if how == "clear":
                ns.clear()
            else:
                db.drop_namespace("big")
            total = time.perf_counter() - t0
        finally:
            namespaces.drop, namespaces.free_dropped = real_drop, real_free
        db.check()
        freed = used - db.stats()["used_bytes"]
    os.unlink(path)
    return {"switch_ms": switch[0] * 1e3, "total_s": total, "holds": len(frees),
            "median_hold_ms": statistics.median(frees) * 1e3, "max_hold_ms": max(frees) * 1e3,
            "freed_mb": freed / 1e6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value", type=int, default=100)
    ap.add_argument("--dir", default=None, help="folder for the stores (default: a temporary one)")
    args = ap.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="mmkv-nsdrop-")
    print(f"namespace of {args.keys:,} keys of {args.value} B; lock holds of the switch and of the freeing")
    print(f"{'op':6} {'loop':7} {'switch ms':>10} {'total s':>8} {'holds':>6} {'median ms':>10} {'max ms':>8}")
    for how in ("clear", "drop"):
        for loop in ("c", "python"):
            r = one(folder, args.keys, args.value, how, loop)
            print(f"{how:6} {loop:7} {r['switch_ms']:10.2f} {r['total_s']:8.2f} {r['holds']:6d} "
                  f"{r['median_hold_ms']:10.2f} {r['max_hold_ms']:8.2f}", flush=True)


if __name__ == "__main__":
    main()
