"""The lock-free read path (seqlock) never returns a torn or mixed value.

Readers in other processes read while a writer overwrites values (changing
their sizes, so blocks are freed and reused), deletes and re-inserts keys,
and grows the file and the index.  Every value carries its own proof: a
header (key, version, length) and a body derived from them.
"""
import hashlib
import multiprocessing as mp
import struct

import mmkv

KEYS = 64


def make_value(key: bytes, version: int, length: int) -> bytes:
    head = struct.pack("<QQ", version, length) + hashlib.sha1(key).digest()[:8]
    body = hashlib.sha256(key + struct.pack("<Q", version)).digest()
    n = max(0, length - len(head))
    return head + (body * (n // len(body) + 1))[:n]


def valid(key: bytes, value: bytes) -> bool:
    if len(value) < 24:
        return False
    version, length = struct.unpack_from("<QQ", value)
    return value == make_value(key, version, length)


def writer(path, rounds, done):
    with mmkv.open(path) as db:
        for v in range(rounds):
            for i in range(KEYS):
                key = b"key%d" % i
                length = 24 + (v * 7919 + i * 104729) % 20000
                db[key] = make_value(key, v, length)
                if (v + i) % 11 == 0:
                    del db[key]
            db[b"fill%d" % v] = bytes(3000)           # growth of file and index under the readers:
            db.update((b"small%d-%d" % (v, j), b"") for j in range(100))   # 30,000 keys split the index
        done.value = 1


def reader(path, done, out):
    seen = bad = 0
    with mmkv.open(path, "r") as db:
        while not done.value:
            for i in range(KEYS):
                key = b"key%d" % i
                value = db.get(key)
                if value is None:
                    continue
                seen += 1
                if not valid(key, value):
                    bad += 1
    out.put((seen, bad))


def test_readers_never_see_torn_values(path):
    mmkv.open(path).close()
    ctx = mp.get_context("spawn")
    done, out = ctx.Value("i", 0), ctx.Queue()
    readers = [ctx.Process(target=reader, args=(path, done, out)) for _ in range(2)]
    for r in readers:
        r.start()
    w = ctx.Process(target=writer, args=(path, 300, done))
    w.start()
    w.join(240)
    assert w.exitcode == 0
    results = [out.get(timeout=60) for _ in readers]
    for r in readers:
        r.join(30)
        assert r.exitcode == 0
    assert all(seen > 1000 for seen, _ in results), results
    assert all(bad == 0 for _, bad in results), results
    with mmkv.open(path) as db:
        for i in range(KEYS):
            value = db.get(b"key%d" % i)
            assert value is None or valid(b"key%d" % i, value)
        st_ = db.stats()
        assert st_["index_segments"] >= 3 and st_["index_depth"] >= 2, "the index should have split under the readers"
