"""One adapter class per benchmarked system: everything bench/run.py needs to know about a store.

bench/run.py holds the workloads and never asks which system it is driving; whatever differs
between mmkv, lmdb, sqlite, diskcache, a dict, multiprocessing.Value and redis is here.  Every
adapter answers the same interface (see ``Adapter``):

- an instance owns one fresh, empty store in its own folder (``Adapter(folder, sync="none")``,
  ``sync="full"`` for the durable workload) and has the timed loops ``get_loop``,
  ``absent_loop``, ``put_loop``, ``batch``, ``delete_loop`` (the idiomatic per-call API of the
  system, attribute look-ups hoisted out of the loop), the untimed checks ``fetch`` and ``count``,
  ``stats`` (the store's own statistics, if it has any) and ``close``;
- ``build(folder, chunks)`` writes a big store from an iterable of dicts and returns its path
  (the open workload's input);
- ``open_import()`` and ``open_get(path, key)`` are what a fresh process does in the open
  workload: import the module, then open the store read-only and read one key;
- ``counter_setup(folder)`` creates the shared counter at 0 and ``counter_open(target)`` is what
  each incrementing process does (open its own handle, return ``step`` and ``close``);
- ``unavailable()`` says why the system cannot run on this machine (None if it can).

A system that does not take part in a workload leaves the method unimplemented (the workload's
participant list in bench/run.py never calls it).  ``ADAPTERS`` lists the systems in table order.

This module imports nothing but ``os`` and ``sys`` at the top (not even ``importlib``: with the
``warnings`` it pulls in, about 1 ms of every child): the open workload's child
process imports it before its timer starts, and each system's own module is imported inside the
methods, as the child's import time is part of what is measured.
"""
import os
import sys

LMDB_MAP_SIZE = 16 << 30
COUNTER_KEY = b"counter"


def import_module(name):
    """The module called name (dotted names too), imported: importlib.import_module without importlib."""
    __import__(name)
    return sys.modules[name]


class Adapter:
    """The common interface; each method a system does not support raises NotImplementedError."""

    name = None          # the key in ADAPTERS, the JSON and the --only participant lists
    label = None         # the column heading in the table and the chart
    module = None        # must import for the system to run (None: always available)
    setting = None       # how the system is configured, for the report's "Settings" list

    def __init__(self, folder, sync="none"):
        self.folder = folder

    # ----------------------------------------------------------------- timed loops
    def get_loop(self, keys):
        raise NotImplementedError

    def absent_loop(self, keys):
        raise NotImplementedError

    def contains_loop(self, keys):
        raise NotImplementedError

    def items_loop(self):
        """Read every (key, value) pair through the system's own iteration; returns how many."""
        raise NotImplementedError

    def put_loop(self, items):
        raise NotImplementedError

    def batch(self, mapping):
        raise NotImplementedError

    def delete_loop(self, keys):
        raise NotImplementedError

    # ----------------------------------------------------------------- untimed checks
    def fetch(self, k):
        raise NotImplementedError

    def count(self):
        raise NotImplementedError

    def stats(self):
        """The store's own statistics (recorded in the JSON), or None if it has none."""
        return None

    def compact(self):
        """Run the system's own compaction; returns the folder whose files now hold the store
        (self.folder, or a compacted copy where the system compacts only into a new file).
        NotImplementedError: the system has none."""
        raise NotImplementedError

    def close(self):
        pass

    # ----------------------------------------------------------------- availability
    @classmethod
    def unavailable(cls):
        """None if the system can run here, else the reason it is skipped."""
        if cls.module is None:
            return None
        try:
            import_module(cls.module)
            return None
        except Exception as exc:      # not installed, or broken
            return f"module {cls.module!r} is not importable ({type(exc).__name__}: {exc})"

    # ----------------------------------------------------------------- open workload
    @classmethod
    def build(cls, folder, chunks):
        """Write every dict of chunks into a new store in folder; return the store's path."""
        raise NotImplementedError

    @classmethod
    def open_import(cls):
        """Import the system's module (timed apart from the open in the open workload's child)."""
        return import_module(cls.module)

    @classmethod
    def open_get(cls, path, k):
        """Open the store at path read-only and read k; return (value, close)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- counter workload
    @classmethod
    def counter_setup(cls, folder):
        """Create the shared counter at 0 in folder; return (target for the children, read_final())."""
        raise NotImplementedError

    @classmethod
    def counter_open(cls, target):
        """In an incrementing process: open an own handle on target; return (step, close)."""
        raise NotImplementedError

    @classmethod
    def cas_open(cls, target):
        """As counter_open, but each step reads the counter and writes it back plus one only if it
        is unchanged (compare-and-swap, retried until it succeeds); a system whose natural form of
        that is a read-modify-write transaction returns counter_open's step."""
        return cls.counter_open(target)


# ===================================================================== dict-like stores
class MappingStore(Adapter):
    """Adapter for anything dict-like: the loops are the plain mapping protocol."""

    def __init__(self, folder, mapping):
        super().__init__(folder)
        self.m = mapping

    def items_loop(self):
        n = 0
        for _k, _v in self.m.items():
            n += 1
        return n

    def get_loop(self, keys):
        m = self.m
        for k in keys:
            m[k]

    def batch_get_loop(self, batches):
        """Each batch read as of one moment, where the system has such a call."""
        raise NotImplementedError

    def absent_loop(self, keys):
        get = self.m.get
        for k in keys:
            get(k)

    def contains_loop(self, keys):
        m = self.m
        for k in keys:
            k in m

    def put_loop(self, items):
        m = self.m
        for k, v in items:
            m[k] = v

    def batch(self, mapping):
        self.m.update(mapping)

    def delete_loop(self, keys):
        m = self.m
        for k in keys:
            del m[k]

    def fetch(self, k):
        return self.m.get(k)

    def count(self):
        return len(self.m)

    def close(self):
        self.m = None


class MmkvStore(MappingStore):
    name = "mmkv"
    label = "mmkv"
    module = "mmkv"
    setting = ("mmkv: mmkv.open(path, \"n\", sync=\"none\") (sync=\"full\" for durable_put); gets use db[k], "
               "absent gets db.get(k).")

    def __init__(self, folder, sync="none"):
        import mmkv
        self.path = os.path.join(folder, "store.mmkv")
        super().__init__(folder, mmkv.open(self.path, "n", sync=sync))
        self.db = self.m

    def stats(self):
        return self.db.stats()

    def batch_get_loop(self, batches):
        get_many = self.db.get_many
        for keys in batches:
            get_many(keys)

    def compact(self):
        self.last_compaction = self.db.compact()
        return self.folder

    def close(self):
        self.db.close()
        super().close()

    @classmethod
    def build(cls, folder, chunks):
        import mmkv
        path = os.path.join(folder, "store.mmkv")
        n = 0
        with mmkv.open(path, "n") as db:
            for chunk in chunks:
                db.update(chunk)
                n += len(chunk)
            if len(db) != n:
                raise AssertionError(f"{len(db)} keys after building {n}")
        return path

    @classmethod
    def open_get(cls, path, k):
        import mmkv
        db = mmkv.open(path, "r")
        return db[k], db.close

    @classmethod
    def counter_setup(cls, folder):
        import mmkv
        path = os.path.join(folder, "store.mmkv")
        with mmkv.open(path, "n") as db:
            db.incr(COUNTER_KEY, 0)

        def final():
            with mmkv.open(path, "w") as db:
                return db.incr(COUNTER_KEY, 0)
        return path, final

    @classmethod
    def counter_open(cls, target):
        import mmkv
        db = mmkv.open(target, "w")
        incr = db.incr

        def step():
            incr(COUNTER_KEY)
        return step, db.close

    @classmethod
    def cas_open(cls, target):
        import mmkv
        db = mmkv.open(target, "w")
        get, cas = db.get, db.cas

        def step():
            while True:
                old = get(COUNTER_KEY)
                if cas(COUNTER_KEY, old, (int.from_bytes(old, "little") + 1).to_bytes(8, "little")):
                    return
        return step, db.close


class DiskCacheStore(MappingStore):
    name = "diskcache"
    label = "diskcache"
    module = "diskcache"
    setting = "diskcache: Cache(dir) defaults (SQLite WAL, synchronous=NORMAL: no fsync per commit)."

    def __init__(self, folder, sync="none"):
        import diskcache
        super().__init__(folder, diskcache.Cache(os.path.join(folder, "diskcache")))
        self.cache = self.m

    def items_loop(self):
        n, c = 0, self.cache
        for k in c:                        # diskcache iterates keys; a value is a get
            c[k]
            n += 1
        return n

    def batch(self, mapping):
        c = self.cache
        with c.transact():
            for k, v in mapping.items():
                c[k] = v

    def compact(self):
        self.cache.check(fix=True)        # diskcache's repair pass: its SQLite database is vacuumed
        self.cache._sql("VACUUM")           # (check alone does not always); no public call for it
        return self.folder

    def close(self):
        self.cache.close()
        super().close()

    @classmethod
    def counter_setup(cls, folder):
        import diskcache
        path = os.path.join(folder, "diskcache")
        with diskcache.Cache(path) as c:
            c.set(COUNTER_KEY, 0)

        def final():
            with diskcache.Cache(path) as c:
                return c.get(COUNTER_KEY)
        return path, final

    @classmethod
    def counter_open(cls, target):
        import diskcache
        cache = diskcache.Cache(target, timeout=120)
        incr = cache.incr

        def step():
            incr(COUNTER_KEY)
        return step, cache.close


class DictStore(MappingStore):
    name = "dict"
    label = "dict"
    module = None
    setting = "dict: a plain in-process dict (persists nothing; the floor of a Python call)."

    def __init__(self, folder, sync="none"):
        super().__init__(folder, {})


# ===================================================================== lmdb
class LmdbStore(Adapter):
    """A transaction per call, reads included."""

    name = "lmdb"
    label = "lmdb"
    module = "lmdb"
    setting = ("lmdb: lmdb.open(dir, map_size=16 GiB, sync=False, metasync=False): commits do not fsync "
               "(sync=True, metasync=True for durable_put); a transaction per call, and for gets also one reused "
               "read transaction.")

    def __init__(self, folder, sync="none"):
        import lmdb
        super().__init__(folder)
        durable = sync == "full"
        self.env = lmdb.open(os.path.join(folder, "lmdb"), map_size=LMDB_MAP_SIZE, sync=durable,
                             metasync=durable)

    def get_loop(self, keys):
        begin = self.env.begin
        for k in keys:
            with begin() as txn:
                txn.get(k)

    def batch_get_loop(self, batches):
        """Each batch read as of one moment: one read transaction and a cursor's getmulti."""
        begin = self.env.begin
        for keys in batches:
            with begin() as txn:
                txn.cursor().getmulti(keys)

    def items_loop(self):
        n = 0
        with self.env.begin() as txn:
            for _k, _v in txn.cursor():
                n += 1
        return n

    absent_loop = get_loop      # txn.get returns None for an absent key

    def contains_loop(self, keys):
        begin = self.env.begin
        for k in keys:
            with begin() as txn:
                txn.get(k) is not None

    def put_loop(self, items):
        begin = self.env.begin
        for k, v in items:
            with begin(write=True) as txn:
                txn.put(k, v)

    def batch(self, mapping):
        with self.env.begin(write=True) as txn:
            txn.cursor().putmulti(mapping.items())

    def delete_loop(self, keys):
        begin = self.env.begin
        for k in keys:
            with begin(write=True) as txn:
                txn.delete(k)

    def fetch(self, k):
        with self.env.begin() as txn:
            return txn.get(k)

    def count(self):
        return self.env.stat()["entries"]

    def compact(self):
        """mdb_env_copy with MDB_CP_COMPACT: LMDB compacts only into a new file."""
        out = self.folder + "-compacted"
        os.makedirs(out, exist_ok=True)
        self.env.copy(out, compact=True)
        return out

    def close(self):
        self.env.close()

    @classmethod
    def build(cls, folder, chunks):
        import lmdb
        path = os.path.join(folder, "lmdb")
        env = lmdb.open(path, map_size=LMDB_MAP_SIZE, sync=False, metasync=False)
        for chunk in chunks:
            with env.begin(write=True) as txn:
                txn.cursor().putmulti(list(chunk.items()))
        env.sync(True)
        env.close()
        return path

    @classmethod
    def open_get(cls, path, k):
        import lmdb
        env = lmdb.open(path, readonly=True)
        with env.begin() as txn:
            v = txn.get(k)
        return v, env.close

    @classmethod
    def counter_setup(cls, folder):
        import lmdb
        path = os.path.join(folder, "lmdb")
        env = lmdb.open(path, map_size=LMDB_MAP_SIZE, sync=False, metasync=False)
        with env.begin(write=True) as txn:
            txn.put(COUNTER_KEY, b"0")
        env.close()

        def final():
            env = lmdb.open(path, map_size=LMDB_MAP_SIZE)
            with env.begin() as txn:
                v = int(txn.get(COUNTER_KEY))
            env.close()
            return v
        return path, final

    @classmethod
    def counter_open(cls, target):
        import lmdb
        env = lmdb.open(target, map_size=LMDB_MAP_SIZE, sync=False, metasync=False)
        begin = env.begin

        def step():
            with begin(write=True) as txn:
                txn.put(COUNTER_KEY, b"%d" % (int(txn.get(COUNTER_KEY)) + 1))
        return step, env.close


class LmdbReusedTxnStore(LmdbStore):
    """lmdb with one read transaction for a whole read loop (writes as LmdbStore)."""

    name = "lmdb-reused-txn"
    label = "lmdb (reused txn)"
    setting = None       # described by lmdb's

    def get_loop(self, keys):
        with self.env.begin() as txn:
            get = txn.get
            for k in keys:
                get(k)

    absent_loop = get_loop

    def contains_loop(self, keys):
        with self.env.begin() as txn:
            get = txn.get
            for k in keys:
                get(k) is not None


# ===================================================================== sqlite
SQL_GET = "SELECT v FROM kv WHERE k = ?"
SQL_PUT = "INSERT OR REPLACE INTO kv (k, v) VALUES (?, ?)"
SQL_DEL = "DELETE FROM kv WHERE k = ?"


class SqliteStore(Adapter):
    """WAL mode, autocommit: one statement is one transaction."""

    name = "sqlite"
    label = "sqlite"
    module = "sqlite3"
    setting = ("sqlite: journal_mode=WAL, synchronous=OFF (FULL for durable_put), autocommit, "
               "kv(k BLOB PRIMARY KEY, v BLOB) WITHOUT ROWID, one statement per call.")

    def __init__(self, folder, sync="none"):
        import sqlite3
        super().__init__(folder)
        self.path = os.path.join(folder, "store.sqlite")
        self.con = sqlite3.connect(self.path, isolation_level=None)      # autocommit: a statement = a txn
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("PRAGMA synchronous=" + ("FULL" if sync == "full" else "OFF"))
        self.con.execute("CREATE TABLE IF NOT EXISTS kv (k BLOB PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID")

    def get_loop(self, keys):
        ex = self.con.execute
        for k in keys:
            ex(SQL_GET, (k,)).fetchone()

    def items_loop(self):
        n = 0
        for _k, _v in self.con.execute("SELECT k, v FROM kv"):
            n += 1
        return n

    absent_loop = get_loop

    def put_loop(self, items):
        ex = self.con.execute
        for kv in items:
            ex(SQL_PUT, kv)

    def batch(self, mapping):
        self.con.execute("BEGIN")
        self.con.executemany(SQL_PUT, mapping.items())
        self.con.execute("COMMIT")

    def delete_loop(self, keys):
        ex = self.con.execute
        for k in keys:
            ex(SQL_DEL, (k,))

    def fetch(self, k):
        row = self.con.execute(SQL_GET, (k,)).fetchone()
        return row[0] if row else None

    def count(self):
        return self.con.execute("SELECT count(*) FROM kv").fetchone()[0]

    def compact(self):
        self.con.execute("VACUUM")
        self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return self.folder

    def close(self):
        self.con.close()

    @classmethod
    def build(cls, folder, chunks):
        st = cls(folder)
        for chunk in chunks:
            st.batch(chunk)
        st.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        st.close()
        return st.path

    @classmethod
    def open_get(cls, path, k):
        import sqlite3
        con = sqlite3.connect(path)
        v = con.execute(SQL_GET, (k,)).fetchone()[0]
        return v, con.close

    @classmethod
    def counter_setup(cls, folder):
        import sqlite3
        path = os.path.join(folder, "store.sqlite")
        con = sqlite3.connect(path, isolation_level=None)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE counters (k BLOB PRIMARY KEY, v INTEGER NOT NULL) WITHOUT ROWID")
        con.execute("INSERT INTO counters VALUES (?, 0)", (COUNTER_KEY,))
        con.close()

        def final():
            con = sqlite3.connect(path)
            v = con.execute("SELECT v FROM counters WHERE k = ?", (COUNTER_KEY,)).fetchone()[0]
            con.close()
            return v
        return path, final

    @classmethod
    def counter_open(cls, target):
        import sqlite3
        con = sqlite3.connect(target, isolation_level=None, timeout=120)
        con.execute("PRAGMA synchronous=OFF")
        ex = con.execute

        def step():
            ex("UPDATE counters SET v = v + 1 WHERE k = ?", (COUNTER_KEY,))
        return step, con.close


# ===================================================================== multiprocessing.Value (counter only)
class MpValueCounter(Adapter):
    """Not a store: a shared 64-bit integer and its lock, inherited by forked children."""

    name = "mp.Value"
    label = "mp.Value"
    module = "multiprocessing"
    setting = "mp.Value: multiprocessing.Value('q') with its lock (counter only)."

    @classmethod
    def counter_setup(cls, folder):
        import multiprocessing
        value = multiprocessing.get_context("fork").Value("q", 0)
        return value, lambda: value.value

    @classmethod
    def counter_open(cls, target):
        value = target
        lock = value.get_lock()

        def step():
            with lock:
                value.value += 1

        def close():
            pass
        return step, close


# ===================================================================== redis
class RedisServer:
    """A throw-away redis-server on a free loopback port, no persistence."""

    def __init__(self, folder):
        self.folder = folder
        self.proc = None
        self.port = None
        self.version = None

    def start(self):
        import socket
        import subprocess
        import time
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.folder, "--daemonize", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except Exception:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not come up")
                time.sleep(0.05)
        self.version = client.info("server").get("redis_version")
        client.close()

    def stop(self):
        import subprocess
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class RedisStore(Adapter):
    """redis-py on the RedisServer the harness started; set RedisStore.port while it runs."""

    name = "redis"
    label = "redis"
    module = "redis"
    setting = ("redis: redis-server on 127.0.0.1, persistence off (--save '' --appendonly no), redis-py client, one "
               "round trip per call.")
    port = None          # of the running RedisServer

    def __init__(self, folder, sync="none"):
        import redis
        super().__init__(folder)
        self.r = redis.Redis(host="127.0.0.1", port=self.port)
        self.r.flushall()

    def get_loop(self, keys):
        get = self.r.get
        for k in keys:
            get(k)

    absent_loop = get_loop

    def put_loop(self, items):
        put = self.r.set
        for k, v in items:
            put(k, v)

    def batch(self, mapping):
        self.r.mset(mapping)

    def delete_loop(self, keys):
        delete = self.r.delete
        for k in keys:
            delete(k)

    def fetch(self, k):
        return self.r.get(k)

    def count(self):
        return self.r.dbsize()

    def close(self):
        self.r.flushall()
        self.r.close()

    @classmethod
    def unavailable(cls):
        import shutil
        why = super().unavailable()
        if why is None and shutil.which("redis-server") is None:
            why = "no redis-server on PATH"
        return why

    @classmethod
    def counter_setup(cls, folder):
        import redis
        r = redis.Redis(host="127.0.0.1", port=cls.port)
        r.flushall()
        r.set(COUNTER_KEY, 0)
        r.close()

        def final():
            r = redis.Redis(host="127.0.0.1", port=cls.port)
            v = int(r.get(COUNTER_KEY))
            r.flushall()
            r.close()
            return v
        return cls.port, final       # the children connect to the port

    @classmethod
    def counter_open(cls, target):
        import redis
        r = redis.Redis(host="127.0.0.1", port=target)
        incr = r.incr

        def step():
            incr(COUNTER_KEY)
        return step, r.close


# ===================================================================== the list
# Every system, in table order.
ADAPTERS = {cls.name: cls for cls in (MmkvStore, LmdbStore, LmdbReusedTxnStore, SqliteStore, DiskCacheStore,
                                      DictStore, MpValueCounter, RedisStore)}

# The report's "Settings" list, in the order it has always been printed.
SETTINGS = [ADAPTERS[s].setting for s in ("mmkv", "lmdb", "sqlite", "diskcache", "dict", "redis", "mp.Value")]


def availability():
    """{system: None if it can run here, else the reason it is skipped}, in table order."""
    return {name: cls.unavailable() for name, cls in ADAPTERS.items()}
