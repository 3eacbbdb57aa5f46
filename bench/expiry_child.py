"""One measurement of the expiry and namespaces workloads (bench/run.py wl_expiry, wl_namespaces), in
a process of its own so that the mmkv it measures is whichever PYTHONPATH names (this tree's, or a
build from before expiry or namespaces).

    python bench/expiry_child.py FOLDER N MODE  ->  prints {"get": ops/s, "put": ops/s, "mmkv": file}

A store of N keys without a deadline (100-byte values) and N other keys: with MODE 1 each of the
others has a deadline an hour away (so the store's expiry bound is set, and nothing expires during
the run), with MODE 0 none has (an older build can run it); with MODE ns the N measured keys are in
a namespace ("bench"), the others in the main key space.
Then every measured key is read once in a random order (get), and written once in another (put of
a new 100-byte value over it).  Garbage collection is off while timing.
"""
import gc
import json
import os
import random
import sys
import time

import mmkv


def main():
    folder, n, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    timed = mode == "1"
    path = os.path.join(folder, "expiry.mmkv")
    keys = [b"key%08d" % i for i in range(n)]
    rnd = random.Random(n)
    with mmkv.open(path, "n") as store:
        db = store.namespace("bench") if mode == "ns" else store
        db.update({k: os.urandom(100) for k in keys})
        for i in range(n):      # as many other keys, with a deadline or not: every store the same size
            if timed:
                store.set(b"ttl%08d" % i, os.urandom(100), ttl=3600)
            else:
                store[b"ttl%08d" % i] = os.urandom(100)
        reads, writes = keys[:], keys[:]
        rnd.shuffle(reads)
        rnd.shuffle(writes)
        values = [os.urandom(100) for _ in range(1024)]
        get = db.get
        gc.collect()
        gc.disable()
        t = time.perf_counter()
        for k in reads:
            get(k)
        get_s = time.perf_counter() - t
        t = time.perf_counter()
        for i, k in enumerate(writes):
            db[k] = values[i & 1023]
        put_s = time.perf_counter() - t
        gc.enable()
        assert len(db) + (0 if db is store else len(store)) == 2 * n
    os.unlink(path)
    print(json.dumps({"get": n / get_s, "put": n / put_s, "mmkv": mmkv.__file__}))


if __name__ == "__main__":
    main()
