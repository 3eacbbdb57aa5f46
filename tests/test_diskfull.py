"""A full disk: DiskFullError means the store is unchanged, and the store keeps working.

Each test runs on its own small file system (a size-limited tmpfs, and for some tests a
loop-mounted ext4 image too), so that ``posix_fallocate`` really fails with ENOSPC.
Mounting needs root: without it, or where the kernel refuses, the tests skip and say so.

The disk is made full in two ways: by the store itself (an operation repeated until it
raises DiskFullError), or by a filler file that takes every free byte of the file system
(``Disk.fill``) and gives back a chosen amount (``Disk.release``).  ``brim`` then fills the
free space inside the store's file until not even an empty value fits.

After every DiskFullError a test asserts: check() passes, the content equals the model
(nothing half-applied, nothing lost), the used/free byte counters match a walk of the heap,
and after closing, ``mmkv check PATH`` exits 0 and a reopened store holds the model (the
command runs through ``cli.main`` in this process, and in six tests as ``python -m mmkv check``
in its own process: 0.2 s each).  Every test here fails on the engine before this file was
written (growth asked a quarter of the file or nothing; failed splits and commits leaked
blocks; clear() and a one-delete transaction raised DiskFullError on a full disk).
"""
import errno
import os
import shutil
import subprocess
import sys

import pytest

import mmkv
from mmkv import DiskFullError, cli
from mmkv.engine.layout import EPILOGUE_BYTES, HEAP_START, RECORD_HEADER, SEGMENT_BYTES, SEGMENT_SLOTS, pad8
from mmkv.queue import Queue
from mmkv.sequence import SEQ_PREFIX, Sequence
from mmkv.engine.tunables import MAX_LOAD

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1 << 20
#: Bytes of the values that fill a store (about 900 of them on a 4 MiB disk).
FILL = 4000


# ---------------------------------------------------------------- the small file system
class Disk:
    """A mounted file system of a few MiB, with a filler file to take its free space."""

    def __init__(self, root: str):
        self.root = root
        self.filler = os.path.join(root, "filler")
        self.handles = []

    def path(self, name: str = "store.mmkv") -> str:
        return os.path.join(self.root, name)

    def open(self, name: str = "store.mmkv", **options):
        db = mmkv.open(self.path(name), **options)
        self.handles.append(db)
        return db

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize          # what an unprivileged allocation may still take

    def fill(self) -> None:
        """Take every free byte with the filler file (chunks halving down to one page)."""
        fd = os.open(self.filler, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size, chunk = os.fstat(fd).st_size, 4 * MIB
            while chunk >= PAGE:
                try:
                    os.posix_fallocate(fd, size, chunk)
                    size += chunk
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    os.ftruncate(fd, size)          # drop what a failed call may have added
                    chunk //= 2
        finally:
            os.close(fd)

    def release(self, n: int) -> None:
        """Give n bytes (whole pages) of the filler back to the file system."""
        size = os.path.getsize(self.filler)
        os.truncate(self.filler, max(0, size - (n + PAGE - 1) // PAGE * PAGE))

    def leave(self, n: int) -> None:
        """Make the file system hold about n free bytes (n to n + one page)."""
        self.fill()
        self.release(n)


def _mount(tmp_path, kind: str, mib: int) -> str:
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("a full disk is tested on a small mounted file system: that needs root on Linux")
    root = tmp_path / f"disk-{kind}"
    root.mkdir()
    if kind == "tmpfs":
        cmd = ["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(root)]
    else:
        if not shutil.which("mkfs.ext4"):
            pytest.skip("mkfs.ext4 is not installed: cannot build a small ext4 image")
        image = tmp_path / "disk.img"
        with open(image, "wb") as f:
            f.truncate(mib * MIB)
        out = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], capture_output=True, text=True)
        if out.returncode:
            pytest.skip(f"mkfs.ext4 failed: {out.stderr.strip()}")
        cmd = ["mount", "-o", "loop", str(image), str(root)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no mount command: cannot build a small file system")
    if out.returncode:
        pytest.skip(f"cannot mount a {mib} MiB {kind} ({' '.join(cmd)}): {out.stderr.strip()}")
    return str(root)


def _unmount(root: str) -> None:
    if subprocess.run(["umount", root], capture_output=True).returncode:
        subprocess.run(["umount", "-l", root], capture_output=True)


@pytest.fixture
def mount(tmp_path):
    """mount(kind="tmpfs", mib=4) -> Disk; every handle opened through it is closed and the file
    system unmounted at teardown, also when the test failed."""
    disks = []

    def _make(kind: str = "tmpfs", mib: int = 4) -> Disk:
        disk = Disk(_mount(tmp_path, kind, mib))
        disks.append(disk)
        return disk

    yield _make
    for disk in disks:
        for db in disk.handles:
            try:
                db.close()
            except Exception:
                pass
        _unmount(disk.root)


@pytest.fixture(params=["tmpfs", "ext4"])
def fs_kind(request):
    return request.param


# ---------------------------------------------------------------- filling and auditing
def value(i: int, n: int) -> bytes:
    return (b"%08d" % i * (n // 8 + 1))[:n]


def fill_with_puts(db, model, size: int, prefix: bytes) -> int:
    """Put values of size bytes under new keys (prefix + 6 digits) until DiskFullError; returns
    how many went in."""
    i = 0
    while True:
        k, v = b"%s%06d" % (prefix, i), value(i, size)
        try:
            db[k] = v
        except DiskFullError:
            assert k not in db
            return i
        model[k] = v
        i += 1


def brim(db, model) -> None:
    """Fill the free space inside the file (the disk is full already) until not even an empty
    value fits: afterwards no free block of the heap holds more than 32 bytes (the smallest
    record, an empty value under a key of up to 8 bytes, takes a block of 48)."""
    for size, prefix in ((64 * 1024, b"brim64k-"), (4096, b"brim4k-"), (256, b"brim-"), (0, b"b0")):
        fill_with_puts(db, model, size, prefix)
    with db.lock():
        assert db.engine.alloc.largest_free() <= 32


def full_store(disk, model, **options):
    """A store on disk, filled with FILL-byte values until DiskFullError, then the disk filled and
    the file filled to the brim.  Returns the open handle; model holds its content."""
    db = disk.open(**options)
    model.update(contents(db))
    fill_with_puts(db, model, FILL, b"k")
    disk.fill()
    brim(db, model)
    return db


def contents(db) -> dict:
    """The user's keys and mmkv's own records (Sequence and Queue keep theirs in a namespace of
    mmkv's; their keys never collide with the user's here)."""
    from mmkv.namespace import _MIGRATED, SYSTEM, system_space
    got = dict(db.items())
    with db.lock():
        eng = db.engine
        if eng.catalog is not None and eng.catalog.named(SYSTEM) is not None:
            got.update((k, v) for k, v in system_space(db).items() if k != _MIGRATED)
    return got


def own_marks(db) -> int:
    """Records of mmkv's own that no model holds: the mark of the move of old files' records."""
    from mmkv.namespace import _MIGRATED, SYSTEM, system_space
    with db.lock():
        eng = db.engine
        if eng.catalog is None or eng.catalog.named(SYSTEM) is None:
            return 0
        return int(_MIGRATED in system_space(db))


def index_of(db, name):
    """The mapping whose index a kind's writes go to: mmkv's own namespace for Sequence and Queue."""
    from mmkv.namespace import system_space
    return system_space(db) if name in ("sequence", "queue") else db


def assert_sound(db, model) -> None:
    """check() passes, the content is the model, the counters match a walk of the heap."""
    assert db.check().ok
    assert contents(db) == model
    assert db.check().keys == len(model) + own_marks(db)
    with db.lock():
        blocks = list(db.engine.alloc.blocks())
    st = db.stats()
    used = sum(s for _, s, in_use in blocks if in_use)
    free = sum(s for _, s, in_use in blocks if not in_use)
    assert (st["used_bytes"], st["free_bytes"]) == (used, free)
    assert used + free + HEAP_START + EPILOGUE_BYTES == st["file_size"]
    main = dict(db.items())              # (the main key space's counters; mmkv's own namespace has its own)
    assert st["keys"] == len(main)
    assert st["live_bytes"] == sum(len(k) + len(v) for k, v in main.items())


def reopen(disk, db, model, capsys, own_process: bool = False):
    """Close the handle; `mmkv check PATH` exits 0 (no recovery needed) and the store, opened
    again, is sound and holds model: returns that new handle.  The command runs in this process
    (``cli.main``, which ``python -m mmkv`` runs), or with own_process as ``python -m mmkv check
    PATH`` (0.2 s more, so in a few tests only)."""
    path = db.path
    db.close()
    if own_process:
        out = subprocess.run([sys.executable, "-m", "mmkv", "check", path], capture_output=True, text=True,
                             timeout=120)
        rc, text = out.returncode, out.stdout + out.stderr
    else:
        capsys.readouterr()
        rc = cli.main(["check", path])
        out = capsys.readouterr()
        text = out.out + out.err
    assert rc == 0, text
    assert ": OK" in text and "recovery ran" not in text
    again = disk.open(os.path.basename(path), flag="w")
    assert_sound(again, model)
    return again


# ---------------------------------------------------------------- the operation kinds
class Kind:
    """One kind of write: changes(i) is what its i-th call writes, in order (key -> value);
    run(db, i) does it.  ``prefix_ok``: a DiskFullError may leave a prefix of the changes
    applied (update(), which is not atomic); for the others, nothing.  ``payload`` bounds the
    largest block one call allocates (for the bound on the space left when it fails)."""
    prefix_ok = False

    def __init__(self, db):
        self.db = db

    def rebind(self, db):
        """Go on with another handle on the same store."""
        self.db = db

    def apply(self, model, changes):
        for k, v in changes:
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v


class Put(Kind):
    size = 1000

    def changes(self, i):
        return [(b"put-%09d" % i, value(i, self.size))]

    def run(self, i):
        (k, v), = self.changes(i)
        self.db[k] = v

    @property
    def payload(self):
        return RECORD_HEADER + 16 + self.size


class LargePut(Put):
    size = 80_000


class Update(Kind):
    prefix_ok = True
    payload = RECORD_HEADER + 24 + 1000

    def changes(self, i):
        return [(b"upd-%09d-%02d" % (i, j), value(i + j, 1000)) for j in range(10)]

    def run(self, i):
        self.db.update(self.changes(i))


class Txn(Kind):
    payload = RECORD_HEADER + 24 + 1000

    def changes(self, i):
        return [(b"txn-%09d-%02d" % (i, j), value(i + j, 1000)) for j in range(3)]

    def run(self, i):
        with self.db.transaction():
            for k, v in self.changes(i):
                self.db[k] = v


class Incr(Kind):
    payload = RECORD_HEADER + 48 + 8

    def changes(self, i):
        return [(b"counter-%032d" % i, (5).to_bytes(8, "little", signed=True))]

    def run(self, i):
        (k, _), = self.changes(i)
        assert self.db.incr(k, 5) == 5


class SetDefault(Put):
    def run(self, i):
        (k, v), = self.changes(i)
        assert self.db.setdefault(k, v) == v


class Seq(Kind):
    payload = RECORD_HEADER + 48 + 8

    def name(self, i):
        return b"seq-%032d" % i

    def changes(self, i):
        return [(SEQ_PREFIX + self.name(i), (1).to_bytes(8, "little", signed=True))]

    def run(self, i):
        assert Sequence(self.db, self.name(i), block=1).next() == 1


class QueuePut(Kind):
    payload = RECORD_HEADER + 64 + 1000

    def __init__(self, db):
        super().__init__(db)
        self.q = Queue(db, "jobs")       # its records exist before the disk fills
        self.tail = 0

    def rebind(self, db):
        super().rebind(db)
        self.q.close()
        self.q = Queue(db, "jobs")

    def changes(self, i):
        return [(self.q._item_key(self.tail), value(i, 1000)),
                (self.q._k_tail, (self.tail + 1).to_bytes(8, "little", signed=True))]

    def run(self, i):
        self.q.put(value(i, 1000))
        self.tail += 1


KINDS = {"put": Put, "large_put": LargePut, "update": Update, "transaction": Txn, "incr": Incr,
         "setdefault": SetDefault, "sequence": Seq, "queue": QueuePut}


def run_until_full(kind, model, first: int = 0) -> int:
    """Run kind's calls (i = first, first + 1, ...) until DiskFullError, keeping model; then assert
    the failed call changed nothing (or, for update, applied a prefix).  Returns the failed i."""
    i = first
    while True:
        changes = kind.changes(i)
        try:
            kind.run(i)
        except DiskFullError:
            break
        kind.apply(model, changes)
        i += 1
    applied = 0
    if kind.prefix_ok:               # update(): pairs in order, each whole; find how far it got
        while applied < len(changes) and changes[applied][0] in kind.db:
            applied += 1
        assert applied < len(changes)
    kind.apply(model, changes[:applied])
    assert_sound(kind.db, model)
    return i


# ---------------------------------------------------------------- filling the disk with each kind
@pytest.mark.parametrize("name", list(KINDS))
def test_each_write_kind_fills_the_disk_then_fails_cleanly(mount, capsys, name):
    """Repeat one kind of write until DiskFullError, with 200 KiB free on the disk at the start:
    the file grows into all of it (the growth falls back to smaller steps) and the failed call
    changes nothing; only then is the disk too full for the call."""
    disk = mount()
    db = disk.open()
    kind = KINDS[name](db)
    model = contents(db)
    disk.leave(200 * 1024)
    run_until_full(kind, model)
    need = kind.payload + 3 * PAGE      # what the failed call asked the disk for, at most
    assert disk.free_bytes() < need, "DiskFullError with space left for the call on the disk"
    reopen(disk, db, model, capsys, own_process=name == "put")


def test_put_fills_an_ext4_disk_then_fails_cleanly(mount, capsys):
    """The same on ext4 (a loop-mounted image), whose fallocate may allocate part of a request."""
    disk = mount("ext4", 8)
    db = disk.open()
    kind = Put(db)
    model = {}
    disk.leave(200 * 1024)
    run_until_full(kind, model)
    assert disk.free_bytes() < kind.payload + 3 * PAGE
    reopen(disk, db, model, capsys, own_process=True)


# ---------------------------------------------------------------- an index split that does not fit
#: A value whose record block is exactly the block of an index segment.
BALLAST = b"ballast"
BALLAST_VALUE = SEGMENT_BYTES - RECORD_HEADER - pad8(len(BALLAST))


def store_with_room_for_one_segment(disk, model, setup=None):
    """A full disk, and a store file whose free space is one index segment's block and crumbs."""
    db = disk.open()
    if setup:
        setup(db)
    model.update(contents(db))
    db[BALLAST] = bytes(BALLAST_VALUE)
    fill_with_puts(db, model, FILL, b"k")
    disk.fill()
    brim(db, model)
    del db[BALLAST]                                  # free: one segment's block, and crumbs
    st = db.stats()
    assert SEGMENT_BYTES < st["largest_free_block"] < 2 * SEGMENT_BYTES
    return db


@pytest.mark.parametrize("name", list(KINDS))
def test_a_split_that_does_not_fit_changes_nothing(mount, capsys, name):
    """The call needs an index split (two new segments and a directory); the file has room for
    one segment only and the disk is full.  The first segment must be given back."""
    disk = mount()
    model, kinds = {}, []
    db = store_with_room_for_one_segment(disk, model, lambda db: (index_of(db, name),   # (its index exists)
                                                                  kinds.append(KINDS[name](db))))
    kind, = kinds
    target = index_of(db, name)
    assert target.stats()["index_segments"] == 1
    target._view.max_count = len(target)             # the one segment is full: a new key splits it
    with pytest.raises(DiskFullError):
        kind.run(10 ** 6)
    assert_sound(db, model)
    db = reopen(disk, db, model, capsys, own_process=name == "transaction")
    kind.rebind(db)
    # with room (300 values deleted, mostly side by side), the same call works
    for i in range(100, 400):
        del db[b"k%06d" % i]
        del model[b"k%06d" % i]
    target = index_of(db, name)
    target._view.max_count = len(target)
    changes = kind.changes(10 ** 6)
    kind.run(10 ** 6)
    kind.apply(model, changes)
    # (2; or more in mmkv's own namespace, whose few keys may all fall in one half of a split)
    assert target.stats()["index_segments"] == 2 or target is not db and target.stats()["index_segments"] > 2
    assert_sound(db, model)
    reopen(disk, db, model, capsys)


# ---------------------------------------------------------------- transactions
def _holes(db, model, keys):
    """Delete keys (FILL-byte values) from a store filled to the brim: one free block each."""
    for k in keys:
        del db[k]
        del model[k]


def test_transaction_whose_last_record_does_not_fit_changes_nothing(mount, capsys, fs_kind):
    disk = mount(fs_kind, 4 if fs_kind == "tmpfs" else 8)
    model = {}
    db = full_store(disk, model)
    _holes(db, model, [b"k%06d" % i for i in (10, 20, 30)])
    with pytest.raises(DiskFullError):
        with db.transaction():
            db[b"k%06d" % 40] = value(1, FILL)       # a new record each: they fit in the holes
            db[b"k%06d" % 50] = value(2, FILL)
            db[b"big"] = value(3, 5 * FILL)          # no hole holds it, and the disk is full
    assert_sound(db, model)
    reopen(disk, db, model, capsys, own_process=fs_kind == "ext4")


def test_transaction_whose_journal_does_not_fit_changes_nothing(mount, capsys):
    disk = mount()
    model = {}
    db = full_store(disk, model)
    _holes(db, model, [b"k%06d" % i for i in (10, 20)])
    with pytest.raises(DiskFullError):
        with db.transaction():
            db[b"k%06d" % 30] = value(1, FILL)       # both records fit (one hole each) ...
            db[b"k%06d" % 40] = value(2, FILL)       # ... the journal of the two does not
    assert_sound(db, model)
    db = reopen(disk, db, model, capsys)
    # a transaction of one write needs no journal: it is applied as a plain write
    with db.transaction():
        db[b"k%06d" % 30] = value(1, FILL)
    model[b"k%06d" % 30] = value(1, FILL)
    assert_sound(db, model)
    reopen(disk, db, model, capsys)


def test_transaction_that_needs_a_split_splits_before_its_commit_point(mount, capsys):
    """The new keys of a transaction would overfill their segment: the split is done (or, on a
    full disk, fails) before the journal is committed, never while it is applied."""
    disk = mount()
    model = {}
    db = store_with_room_for_one_segment(disk, model)
    db._view.max_count = len(db) + 1                 # room for one more key, not for two
    with pytest.raises(DiskFullError):
        with db.transaction():
            db[b"new1"] = b"1"
            db[b"new2"] = b"2"
            del db[b"k%06d" % 5]
    assert_sound(db, model)
    with db.lock():
        assert db.engine.meta.journal_off == 0
    db = reopen(disk, db, model, capsys)
    db[b"new1"] = model[b"new1"] = b"1"              # fits in the segment: no split
    assert_sound(db, model)
    reopen(disk, db, model, capsys)


# ---------------------------------------------------------------- growth falls back to smaller steps
def test_growth_falls_back_when_less_than_a_quarter_of_the_file_is_free(mount, capsys):
    """The geometric step (a quarter of a 12 MiB file) does not fit, 2 MiB do: puts still work."""
    disk = mount("tmpfs", 20)
    db = disk.open()
    model = {b"grow": value(0, 12 * MIB)}
    db[b"grow"] = model[b"grow"]
    disk.fill()
    brim(db, model)
    st = db.stats()
    assert st["file_size"] >= 12 * MIB
    disk.release(2 * MIB)
    for i in range(3):
        db[b"small%d" % i] = model[b"small%d" % i] = value(i, 1000)
    db[b"large"] = model[b"large"] = value(7, MIB)
    assert db.stats()["file_size"] > st["file_size"]
    with pytest.raises(DiskFullError):
        db[b"too large"] = value(8, 3 * MIB)
    assert_sound(db, model)
    reopen(disk, db, model, capsys, own_process=True)


# ---------------------------------------------------------------- clear() and deletes on a full disk
def test_clear_works_on_a_full_disk(mount, capsys):
    disk = mount()
    model = {}
    db = full_store(disk, model)
    assert len(db) > 500
    db.clear()
    assert_sound(db, {})
    db[b"again"] = b"1"
    assert_sound(db, {b"again": b"1"})
    reopen(disk, db, {b"again": b"1"}, capsys, own_process=True)


def test_clear_works_on_a_full_disk_with_a_grown_index(mount, capsys):
    disk = mount()
    db = disk.open()
    db._view.max_count = 200                         # splits after 200 keys a segment
    model = {}
    for i in range(600):
        db[b"s%06d" % i] = model[b"s%06d" % i] = value(i, 16)
    assert db.stats()["index_segments"] >= 3
    db._view.max_count = int(SEGMENT_SLOTS * MAX_LOAD)   # back to the engine's: no split while filling
    fill_with_puts(db, model, FILL, b"k")
    disk.fill()
    brim(db, model)
    db.clear()
    assert_sound(db, {})
    for i in range(100):
        db[b"s%06d" % i] = value(i, 16)
    reopen(disk, db, {b"s%06d" % i: value(i, 16) for i in range(100)}, capsys)


def test_a_process_killed_in_clear_on_a_full_disk_leaves_a_sound_subset(mount, capsys):
    """On a full disk clear() deletes keys one by one before it can switch to a new index: a
    process killed there (at the 5th free that merges two blocks) leaves some keys, each whole,
    and the next opener's recovery leaves a sound store that clear() then empties."""
    disk = mount()
    model = {}
    db = full_store(disk, model)
    path = db.path
    db.close()
    child = subprocess.run([sys.executable, "-c", "import sys, mmkv; mmkv.open(sys.argv[1]).clear()", path],
                           env=dict(os.environ, MMKV_FAILPOINT="free.mid:5"), capture_output=True, text=True,
                           timeout=120)
    assert child.returncode == -9, child.stderr[-2000:]
    db = disk.open(os.path.basename(path), flag="w")
    assert db.stats()["recoveries"] == 1
    left = dict(db.items())
    assert 0 < len(left) < len(model)
    assert all(model[k] == v for k, v in left.items())
    assert_sound(db, left)
    db.clear()
    assert_sound(db, {})
    reopen(disk, db, {}, capsys)


def test_deletes_work_on_a_full_disk(mount, capsys):
    disk = mount()
    db = disk.open()
    q = Queue(db, "jobs")
    for i in range(3):
        q.put(b"job%d" % i)
    q.close()
    assert Sequence(db, "ids", block=1).next() == 1
    model = contents(db)
    fill_with_puts(db, model, FILL, b"k")
    disk.fill()
    brim(db, model)
    # several deletes in one transaction need a journal block: none is free on this disk
    with pytest.raises(DiskFullError):
        with db.transaction():
            del db[b"k%06d" % 1]
            del db[b"k%06d" % 2]
    assert_sound(db, model)
    db = reopen(disk, db, model, capsys)
    with db.transaction():                           # one delete: a plain delete, no journal
        del db[b"k%06d" % 1]
    del model[b"k%06d" % 1]
    assert_sound(db, model)
    del db[b"k%06d" % 2]
    del model[b"k%06d" % 2]
    assert db.pop(b"k%06d" % 3) == model.pop(b"k%06d" % 3)
    assert_sound(db, model)
    with db.transaction():                           # the deletes above left room for a journal
        del db[b"k%06d" % 4]
        del db[b"k%06d" % 5]
    del model[b"k%06d" % 4], model[b"k%06d" % 5]
    q = Queue(db, "jobs")
    assert q.get(timeout=0) == b"job0"              # a get deletes an item; counters change in place
    del model[q._item_key(0)]
    model[q._k_head] = (1).to_bytes(8, "little")
    q.close()
    seq = Sequence(db, "ids", block=1)
    assert seq.next() == 2
    model[seq.key] = (2).to_bytes(8, "little")
    seq.close()
    assert_sound(db, model)
    reopen(disk, db, model, capsys)
