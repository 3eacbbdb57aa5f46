"""A user program written against mmkv's public API; tests/test_typing.py type-checks it with
mypy --strict and runs it.  (Not a test module: pytest does not collect it.)"""
import sys
import tempfile
from pathlib import Path

import mmkv
import mmkv.dbm


def counters(folder: Path) -> int:
    with mmkv.open(folder / "app.mmkv") as db:
        db[b"user:1"] = b"alice"
        db["user:2"] = "bob"                      # str is stored UTF-8
        name: bytes = db[b"user:1"]
        missing: bytes | None = db.get(b"user:9")
        fallback: bytes | str = db.get(b"user:9", "nobody")
        hits: int = db.incr(b"hits", 2)
        swapped: bool = db.cas(b"hits", None, b"x") or db.cas("s", b"x", None)
        assert swapped is False
        pair: list[bytes | None] = db.get_many([b"user:1", "user:9"])
        assert pair == [name, None]
        with db.transaction():
            db.update({b"a": b"1", b"b": b"2"})
            db.pop(b"b")
        with db.lock():
            db.setdefault(b"c", b"3")
        keys: list[bytes] = sorted(db)
        pairs: dict[bytes, bytes] = dict(db.items())
        snap: dict[bytes, bytes] = db.snapshot()
        stats = db.stats()
        db.check()
        db.backup(folder / "app-copy.mmkv")
        assert missing is None and fallback == "nobody" and name == b"alice"
        return hits + len(keys) + len(pairs) + len(snap) + int(stats["keys"])


def service(folder: Path) -> int:
    with mmkv.Sequence(folder / "ids.mmkv", "orders", block=10) as ids:
        first: int = ids.next()
    with mmkv.Queue(folder / "jobs.mmkv", "resize") as q:
        q.put(b"job-1")
        job: bytes = q.get(timeout=1.0)
        left: int = q.qsize()
    return first + len(job) + left


def legacy(folder: Path) -> int:
    with mmkv.dbm.open(str(folder / "legacy.db"), "c") as db:
        db["k"] = "v"
        keys: list[bytes] = db.keys()
    try:
        mmkv.dbm.open(str(folder / "legacy.db"), "r")["absent"]
    except KeyError:
        pass
    except mmkv.dbm.error:
        raise
    return len(keys)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            total = counters(Path(tmp)) + service(Path(tmp)) + legacy(Path(tmp))
        except mmkv.Error as exc:
            print(f"mmkv failed: {exc}", file=sys.stderr)
            return 1
    print("ok", total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
