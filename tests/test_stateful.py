"""A hypothesis state machine driving two handles on one store and a dict side by side.

Keys come mostly from a small pool (so overwrites and deletes hit existing keys),
from the empty key up to several KiB; values from empty up to several KiB, with
a rare large one (64 KiB and more takes the allocator's page-aligned path).
Each step may go through either of two open handles on the same file, so every
step also checks that a write through one handle is visible through the other,
including after the file or the index grew.  Every step ends with check() and a
full comparison of the contents with the model.

The index grows by splitting a full segment (16,384 slots, split past 12,288 keys),
far more keys than a step of the machine writes.  SplittingMachine therefore sets
every handle's ``view.max_count`` (the per-handle split threshold the engine derives
from SEGMENT_SLOTS * MAX_LOAD) to a small number, so that bulk_put splits segments
and deepens the directory under the other handle's feet; the file format and every
code path are the engine's own.

Crashes of other processes (crash_other_process): a forked process opens the same file,
through its path, a hard link or a symbolic link, arms a failpoint and performs one write
or transaction, dying at the failpoint if it reaches it, while this process keeps both
handles open; then this process either keeps them, reopens one, or closes both (in a drawn
order: the last close must not mark the file clean over the dead process's half-done
work) and reopens them.  The store must then hold the model before the operation or after
it, nothing else (after it, when the process did not die), and pass check().

Transactions: one of several puts and deletes (of present keys and of an absent one) that
commits (the model takes all of them) and one whose block raises after its writes (the model
and the other handle see none of them); reads in the block see its own writes.  In
crash_in_transaction another process dies at one of the txn.* failpoints: at one before the
commit point the store holds the model as it was, at one after it the whole transaction.

Expiry: both handles read one ManualClock, which the advance rule moves on (the model drops the
keys whose deadline it reaches); set_ttl and expire give keys deadlines, every other write of a
key takes its deadline away (incr and setdefault of a present key keep it), and the reads,
len(), check() and the sweep must agree with the model at every step.  The clock starts far
ahead of the wall clock, which other processes (the crash rules) use: none of them ever finds
a key expired that the model still holds.  A crash rule first takes the deadlines off the keys
its operation writes (so the state before and after it are told apart by value alone).
"""
import os
import shutil
import tempfile
import time

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule


import mmkv
from mmkv.engine import failpoints
from mmkv.crashkit import torture
from mmkv.engine.layout import SEGMENT_SLOTS

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

KEY_POOL = [b"", b"a", b"b", b"c", b"key", b"\x00", b"\xff" * 7, b"k" * 8, b"k" * 9, b"ctr", b"ctr2",
            "ключ".encode("utf-8"), b"m" * 300, b"L" * 3000, b"\x01" * 5000]


def _fill(n, byte):
    return bytes([byte]) * n


def _pool_key(i):
    return KEY_POOL[i]


pool_keys = st.integers(0, len(KEY_POOL) - 1).map(_pool_key)    # keeps reprs of long keys out of reports
keys = st.one_of(pool_keys, pool_keys, st.binary(max_size=12))
values = st.one_of(
    st.binary(max_size=16),
    st.binary(max_size=300),
    st.builds(_fill, st.integers(0, 6000), st.integers(0, 255)),
)
large_values = st.builds(_fill, st.sampled_from([64 * 1024 - 100, 64 * 1024, 100 * 1024, 150 * 1024 + 3]),
                         st.integers(0, 255))
deltas = st.one_of(st.integers(-3, 3), st.integers(INT64_MIN, INT64_MAX), st.sampled_from([INT64_MIN, INT64_MAX]))
which = st.integers(0, 1)
#: The failpoints an operation of each kind can reach (so most crashes happen); a sync.* point is
#: reached in sync="full" only, a split point when the machine's segments are small.
CRASH_POINTS = {
    "put": ["put.after_record", "put.after_slot", "alloc.mid", "free.mid", "split.before_meta",
            "split.after_meta", "meta.before_sync"],
    "put_large": ["put.after_record", "put.after_slot", "alloc.mid", "grow.after_fallocate", "meta.before_sync"],
    "del": ["delete.mid_shift", "free.mid"],
    "incr": ["incr.before_store", "put.after_record", "put.after_slot", "alloc.mid"],
    "txn": ["txn.after_records", "txn.mid_journal", "txn.after_journal", "txn.after_commit", "txn.mid_apply",
            "txn.before_retire", "alloc.mid", "free.mid", "meta.before_sync"],
}
assert all(p in failpoints.NAMES for points in CRASH_POINTS.values() for p in points)
#: The transaction failpoints on either side of the commit point (the meta write that names the
#: journal, mmkv/engine/transaction.py commit()): a crash before it leaves the store as it was, a
#: crash after it is finished by recovery (the journal is replayed).
TXN_BEFORE_COMMIT = ["txn.after_records", "txn.mid_journal", "txn.after_journal"]
TXN_AFTER_COMMIT = ["txn.after_commit", "txn.mid_apply", "txn.before_retire"]
assert set(TXN_BEFORE_COMMIT + TXN_AFTER_COMMIT) == {p for p in failpoints.NAMES if p.startswith("txn.")}
txn_puts = st.lists(st.tuples(keys, values), min_size=1, max_size=4)
txn_deletes = st.lists(st.integers(0, 1 << 16), max_size=3)      # indexes into the model's sorted keys
other_names = st.sampled_from(["path", "hardlink", "symlink"])
ns_names = st.sampled_from(["a", "b"])
afterwards = st.sampled_from(["keep", "reopen_one", "reopen_all"])


class _Abandon(Exception):
    """Raised by a transaction's block to abandon it."""


def le64(n):
    return n.to_bytes(8, "little", signed=True)


class StoreMachine(RuleBasedStateMachine):
    SYNC = "none"
    #: Split threshold (keys per segment) of every handle; None: the engine's own.
    MAX_COUNT = None

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="mmkv-state-")
        self.path = os.path.join(self.dir, "state.mmkv")
        self.clock = mmkv.ManualClock(time.time() + 10_000)
        self.deadlines = {}     # key -> deadline (ns) of the model's keys that have one
        self.dbs = [self._open("n"), self._open("c")]
        torture.Names(self.path).make()     # other names of the file, for other processes
        self.model = {}
        self.ns_model = {}      # namespace name -> its keys and values (no namespace: absent)
        self.segments = 1       # most segments the index has had (it never shrinks but through clear)

    def _open(self, flag):
        db = mmkv.open(self.path, flag, sync=self.SYNC, clock=self.clock)
        if self.MAX_COUNT is not None:
            db._view.max_count = self.MAX_COUNT
        return db

    def teardown(self):
        try:
            if all(db._view is not None for db in self.dbs):
                assert self.dbs[0].check().ok
        finally:
            for db in self.dbs:
                db.close()
            try:
                with mmkv.open(self.path, "w", clock=self.clock) as db:     # a clean reopen still holds the model
                    db.check()
                    assert dict(db.items()) == self.model
                    assert {name: dict(db.namespace(name).items()) for name in db.namespaces()} == self.ns_model
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------ writes
    def _forget(self, keys):
        """Those keys were written without a deadline (or deleted): they have none now."""
        for k in keys:
            self.deadlines.pop(k, None)

    @rule(i=which, key=keys, value=values)
    def put(self, i, key, value):
        self.dbs[i][key] = value
        self.model[key] = value
        self._forget([key])

    @rule(i=which, key=keys, value=large_values)
    def put_large(self, i, key, value):
        self.dbs[i][key] = value
        self.model[key] = value
        self._forget([key])

    # ------------------------------------------------------------ expiry
    @rule(i=which, key=keys, value=values, ttl=st.sampled_from([0.5, 1, 2, 30]))
    def set_ttl(self, i, key, value, ttl):
        self.dbs[i].set(key, value, ttl=ttl)
        self.model[key] = value
        self.deadlines[key] = self.clock.now_ns() + int(ttl * 1e9)

    @rule(i=which, key=keys, ttl=st.sampled_from([None, 0.5, 1, 5]))
    def expire(self, i, key, ttl):
        assert self.dbs[i].expire(key, ttl) is (key in self.model)
        if key in self.model:
            if ttl is None:
                self.deadlines.pop(key, None)
            else:
                self.deadlines[key] = self.clock.now_ns() + int(ttl * 1e9)

    @rule(seconds=st.sampled_from([0.25, 0.5, 1, 2, 40]))
    def advance(self, seconds):
        """The clock moves on: the keys whose deadline it reaches are gone."""
        self.clock.advance(seconds)
        now = self.clock.now_ns()
        for k in [k for k, d in self.deadlines.items() if d <= now]:
            del self.deadlines[k]
            del self.model[k]

    @rule(i=which, key=keys)
    def ttl(self, i, key):
        if key not in self.model:
            try:
                self.dbs[i].ttl(key)
            except KeyError:
                return
            raise AssertionError(f"ttl of absent key {key!r} did not raise KeyError")
        left = self.dbs[i].ttl(key)
        if key in self.deadlines:
            assert left == (self.deadlines[key] - self.clock.now_ns()) / 1e9
        else:
            assert left is None

    @rule(i=which, limit=st.sampled_from([None, 1, 40, 5000]))
    def sweep(self, i, limit):
        self.dbs[i].sweep(limit)
        report = self.dbs[1 - i].check()
        if limit is None:
            assert report.expired == 0

    @rule(i=which, tag=st.integers(0, 3), n=st.integers(1, 1500), size=st.integers(0, 40))
    def bulk_put(self, i, tag, n, size):
        """Many keys at once: grows the index (and the file) under the other handle's feet."""
        pairs = [(b"bulk%d-%d" % (tag, j), b"%d" % j * (size // 4 + 1)) for j in range(n)]
        self.dbs[i].update(pairs)
        self.model.update(pairs)
        self._forget(k for k, _ in pairs)

    @rule(i=which, key=st.text(max_size=20), value=st.text(max_size=50))
    def put_str(self, i, key, value):
        self.dbs[i][key] = value
        self.model[key.encode("utf-8")] = value.encode("utf-8")
        self._forget([key.encode("utf-8")])

    @rule(i=which, key=keys)
    def delete(self, i, key):
        self._forget([key])
        if key in self.model:
            del self.dbs[i][key]
            del self.model[key]
        else:
            try:
                del self.dbs[i][key]
            except KeyError:
                pass
            else:
                raise AssertionError(f"del of absent key {key!r} did not raise KeyError")

    @precondition(lambda self: self.model)
    @rule(i=which, data=st.data())
    def delete_present(self, i, data):
        key = data.draw(st.sampled_from(sorted(self.model)))
        del self.dbs[i][key]
        del self.model[key]
        self._forget([key])

    @rule(i=which, key=keys, default=st.sampled_from([None, b"dflt"]))
    def pop(self, i, key, default):
        got = self.dbs[i].pop(key, default)
        assert got == self.model.pop(key, default)
        self._forget([key])

    @rule(i=which, key=keys, expected=st.one_of(st.none(), values), new=st.one_of(st.none(), values))
    def cas(self, i, key, expected, new):
        """Compare-and-swap with an expected value drawn at random (mostly a miss)."""
        self._cas(i, key, expected, new)

    @rule(i=which, key=keys, new=st.one_of(st.none(), values))
    def cas_current(self, i, key, new):
        """Compare-and-swap against the model's value (it must swap)."""
        self._cas(i, key, self.model.get(key), new)

    def _cas(self, i, key, expected, new):
        swaps = self.model.get(key) == expected
        assert self.dbs[i].cas(key, expected, new) is swaps
        if swaps:
            self._forget([key])
        if swaps and new is None:
            self.model.pop(key, None)
        elif swaps:
            self.model[key] = new

    @rule(i=which, key=keys, value=values)
    def setdefault(self, i, key, value):
        assert self.dbs[i].setdefault(key, value) == self.model.setdefault(key, value)

    @rule(i=which, pairs=st.lists(st.tuples(keys, values), max_size=5))
    def update(self, i, pairs):
        self.dbs[i].update(pairs)
        self.model.update(pairs)
        self._forget(k for k, _ in pairs)

    @rule(i=which, key=keys, delta=deltas)
    def incr(self, i, key, delta):
        db = self.dbs[i]
        old = self.model.get(key, le64(0))        # (a key with a deadline keeps it)
        if len(old) != 8:
            try:
                db.incr(key, delta)
            except mmkv.NotACounterError:
                return
            raise AssertionError("incr on a non-counter value did not raise NotACounterError")
        new = int.from_bytes(old, "little", signed=True) + delta
        if not INT64_MIN <= new <= INT64_MAX:
            try:
                db.incr(key, delta)
            except OverflowError:
                return
            raise AssertionError("incr past the int64 range did not raise OverflowError")
        assert db.incr(key, delta) == new
        self.model[key] = le64(new)

    @rule(i=which)
    def clear(self, i):
        self.dbs[i].clear()
        self.model.clear()
        self.deadlines.clear()
        st_ = self.dbs[1 - i].stats()          # the other handle sees the fresh index
        assert st_["index_segments"] == 1 and st_["index_depth"] == 0 and st_["index_slots"] == SEGMENT_SLOTS

    @rule(i=which, flag=st.sampled_from(["c", "w"]))
    def reopen(self, i, flag):
        self.dbs[i].close()
        self.dbs[i] = self._open(flag)

    @rule(flag=st.sampled_from(["c", "w"]))
    def reopen_both(self, flag):
        """Close every handle (the last one marks the file clean), then open two again."""
        for db in self.dbs:
            db.close()
        self.dbs = [self._open(flag) for _ in range(2)]

    # ------------------------------------------------------------ transactions
    def _run_txn_block(self, db, ops, expected):
        """The writes of ops ([(key, value, or None for a delete)]) inside the current transaction,
        applied to expected too; reads in the block see them."""
        for k, v in ops:
            if v is None:
                assert db.pop(k, None) == expected.pop(k, None)
            else:
                db[k] = v
                expected[k] = v
            assert db.get(k) == expected.get(k)
            assert (k in db) == (k in expected)

    @rule(i=which, puts=txn_puts, deletes=txn_deletes, data=st.data())
    def transaction_commits(self, i, puts, deletes, data):
        """Several puts and deletes in one transaction that commits: all of them are applied."""
        ops = data.draw(st.permutations(list(puts) + [(k, None) for k in self._deleted_keys(deletes)]), label="ops")
        expected = dict(self.model)
        with self.dbs[i].transaction():
            self._run_txn_block(self.dbs[i], ops, expected)
        self.model = expected
        self._forget(k for k, _ in ops)

    @rule(i=which, puts=txn_puts, deletes=txn_deletes, commit=st.booleans())
    def transaction_of_cas(self, i, puts, deletes, commit):
        """Compare-and-swaps inside a transaction see its own writes; a miss changes nothing;
        they commit or roll back with it."""
        db, expected = self.dbs[i], dict(self.model)
        ops = list(puts) + [(k, None) for k in self._deleted_keys(deletes)]
        try:
            with db.transaction():
                for k, v in ops:
                    if expected.get(k) != b"\xfe" * 13:
                        assert db.cas(k, b"\xfe" * 13, b"never") is False
                    assert db.cas(k, expected.get(k), v) is True
                    if v is None:
                        expected.pop(k, None)
                    else:
                        expected[k] = v
                    assert db.get(k) == expected.get(k)
                if not commit:
                    raise _Abandon()
        except _Abandon:
            pass
        if commit:
            self.model = expected
            self._forget(k for k, _ in ops)

    @rule(i=which, puts=txn_puts, deletes=txn_deletes, data=st.data())
    def transaction_raises(self, i, puts, deletes, data):
        """The same, but the block raises after its writes: none of them is applied."""
        ops = data.draw(st.permutations(list(puts) + [(k, None) for k in self._deleted_keys(deletes)]), label="ops")
        expected = dict(self.model)
        try:
            with self.dbs[i].transaction():
                self._run_txn_block(self.dbs[i], ops, expected)
                raise _Abandon()
        except _Abandon:
            pass
        else:
            raise AssertionError("the transaction swallowed its block's exception")
        assert dict(self.dbs[1 - i].items()) == self.model

    def _deleted_keys(self, deletes):
        """Keys of the model picked by deletes (indexes), and one key never written."""
        present = sorted(self.model)
        return [present[d % len(present)] for d in deletes if present] + [b"never-written"]

    @rule(puts=txn_puts, deletes=txn_deletes, data=st.data(), then=afterwards, order=st.permutations([0, 1]))
    def crash_in_transaction(self, puts, deletes, data, then, order):
        """Another process dies at a transaction failpoint: before the commit point nothing of the
        transaction is in the store, after it all of it is (recovery replays the journal)."""
        point = data.draw(st.sampled_from(TXN_BEFORE_COMMIT + TXN_AFTER_COMMIT), label="failpoint")
        pairs = data.draw(st.permutations(list(puts) + [(k, None) for k in self._deleted_keys(deletes)]), label="ops")
        op = ("txn", pairs)
        self._settle(k for k, _ in pairs)
        # countdown 1: a transaction with a put always reaches every txn.* point once
        acked, ended = torture.run_victim(self.path, [op], (point, 1), self.SYNC, "path", self._prepare_victim())
        assert ended == "failpoint" and acked == 0, f"the transaction did not reach {point}"
        self._after_other_process(then, order)
        after = dict(self.model)
        torture.apply(after, op)
        want = self.model if point in TXN_BEFORE_COMMIT else after
        got = dict(self.dbs[order[1]].items())
        assert got == want, (f"crash at {point}: {'before' if want is self.model else 'after'} the commit point, "
                             f"{sorted(set(got) ^ set(want))[:5]} differ in presence, "
                             f"{[k for k in got if k in want and got[k] != want[k]][:5]} in value")
        self.model = want

    def _settle(self, keys):
        """Take the deadlines off keys another process's operation is about to write (see the
        module docstring)."""
        for k in list(keys):
            if k in self.deadlines:
                assert self.dbs[0].expire(k, None)
                del self.deadlines[k]

    def _prepare_victim(self):
        """What the other process does to its handle before the operation: this machine's split threshold."""
        max_count = self.MAX_COUNT

        def prepare(db):
            if max_count is not None:
                db._view.max_count = max_count
        return prepare

    def _after_other_process(self, then, order):
        """Keep both handles, reopen one, or close both (in order) and open two again."""
        if then == "reopen_one":
            self.reopen(order[0], "w")
        elif then == "reopen_all":
            for i in order:              # the last close must repair what the dead process left
                self.dbs[i].close()
            self.dbs = [self._open("w") for _ in range(2)]

    # ------------------------------------------------------------ other processes
    @rule(data=st.data(), name=other_names, then=afterwards, order=st.permutations([0, 1]))
    def crash_other_process(self, data, name, then, order):
        """Another process, opened through name, dies at a failpoint during one operation."""
        kind = data.draw(st.sampled_from(sorted(CRASH_POINTS)), label="kind")
        points = CRASH_POINTS[kind] + (["sync.before", "sync.after"] if self.SYNC == "full" else [])
        point = (data.draw(st.sampled_from(points), label="failpoint"), data.draw(st.integers(1, 2), label="countdown"))
        if kind == "put":
            op = ("put", data.draw(keys, label="key"), data.draw(values, label="value"))
        elif kind == "put_large":
            op = ("put", data.draw(keys, label="key"), data.draw(large_values, label="value"))
        elif kind == "del":
            op = ("del", data.draw(st.sampled_from(sorted(self.model) or [b"a"]), label="key"))
        elif kind == "incr":
            counters = sorted(k for k, v in self.model.items() if len(v) == 8)
            counters += [k for k in (b"ctr", b"ctr2", b"ctr3") if k not in self.model]
            key = data.draw(st.sampled_from(counters or [b"ctr"]), label="key")
            if len(self.model.get(key, le64(0))) != 8:      # three non-counters in the way
                self.model[key] = le64(0)
                self.dbs[0][key] = le64(0)
                self._forget([key])
            now = int.from_bytes(self.model.get(key, le64(0)), "little", signed=True)
            op = ("incr", key, data.draw(st.integers(max(-3, INT64_MIN - now), min(3, INT64_MAX - now)),
                                         label="delta"))
        else:
            op = ("txn", data.draw(st.lists(st.tuples(keys, st.one_of(st.none(), values)), min_size=1, max_size=5),
                                   label="pairs"))
        self._settle([op[1]] if op[0] != "txn" else [k for k, _ in op[1]])
        acked, ended = torture.run_victim(self.path, [op], point, self.SYNC, name, self._prepare_victim())
        self._after_other_process(then, order)
        after = dict(self.model)
        torture.apply(after, op)
        got = dict(self.dbs[order[1]].items())
        if ended == "finished":
            assert acked == 1 and got == after, "an operation that returned is not in the store"
        else:
            assert got in (self.model, after), (
                f"after a crash at {point[0]} during {op[0]}, the store is neither the state before "
                f"nor after it: {sorted(set(got) ^ set(after))[:5]} differ in presence, "
                f"{[k for k in got if k in after and got[k] != after[k] and got[k] != self.model.get(k)][:5]} in value")
        self.model = got

    # ------------------------------------------------------------ reads
    @rule(i=which, key=keys)
    def get(self, i, key):
        db = self.dbs[i]
        assert db.get(key) == self.model.get(key)
        assert (key in db) == (key in self.model)
        if key in self.model:
            assert db[key] == self.model[key]
        else:
            try:
                db[key]
            except KeyError:
                pass
            else:
                raise AssertionError(f"absent key {key!r} did not raise KeyError")

    @rule(i=which, ks=st.lists(keys, max_size=12), default=st.sampled_from([None, b"dflt"]))
    def get_many(self, i, ks, default):
        assert self.dbs[i].get_many(ks, default) == [self.model.get(k, default) for k in ks]

    # ------------------------------------------------------------ invariants
    # ------------------------------------------------------------ namespaces
    @rule(i=which, name=ns_names, key=keys, value=values)
    def ns_put(self, i, name, key, value):
        self.dbs[i].namespace(name)[key] = value
        self.ns_model.setdefault(name, {})[key] = value

    @rule(i=which, name=ns_names, key=keys)
    def ns_delete(self, i, name, key):
        got = self.dbs[i].namespace(name).pop(key, None)
        assert got == self.ns_model.setdefault(name, {}).pop(key, None)

    @rule(i=which, name=ns_names)
    def ns_clear(self, i, name):
        self.dbs[i].namespace(name).clear()
        self.ns_model[name] = {}

    @rule(i=which, name=ns_names)
    def ns_drop(self, i, name):
        if name in self.ns_model:
            self.dbs[i].drop_namespace(name)
            del self.ns_model[name]
        else:
            with pytest.raises(mmkv.NamespaceError):
                self.dbs[i].drop_namespace(name)

    @rule(i=which, writes=st.lists(st.tuples(st.one_of(st.none(), ns_names), keys, st.one_of(st.none(), values)),
                                   min_size=1, max_size=5), abandon=st.booleans())
    def ns_transaction(self, i, writes, abandon):
        """One transaction over the main index and namespaces: all of it, or (abandoned) none."""
        db = self.dbs[i]
        spaces = {name: db.namespace(name) for name, _, _ in writes if name}
        for name in spaces:
            self.ns_model.setdefault(name, {})
        try:
            with db.transaction():
                for name, k, v in writes:
                    target = db if name is None else spaces[name]
                    if v is None:
                        target.pop(k, None)
                    else:
                        target[k] = v
                if abandon:
                    raise _Abandon()
        except _Abandon:
            return
        for name, k, v in writes:
            model = self.model if name is None else self.ns_model[name]
            if v is None:
                model.pop(k, None)
            else:
                model[k] = v
            if name is None:
                self._forget([k])

    @invariant()
    def namespaces_match(self):
        for db in self.dbs:
            assert db.namespaces() == sorted(self.ns_model)
            for name, model in self.ns_model.items():
                ns = db.namespace(name, create=False)
                assert len(ns) == len(model) and dict(ns.items()) == model

    @invariant()
    def contents_match(self):
        # plain reads first: after the other handle grew the file or the index (or cleared it),
        # this handle's first call must notice, even on the lock-light read path
        for k in [k for k in self.deadlines if k not in self.model]:   # (a crash rule replaced the model)
            del self.deadlines[k]
        sample = sorted(self.model)[:20] + [b"never-written"]
        for db in self.dbs:
            for key in sample:
                assert db.get(key) == self.model.get(key)
        for db in self.dbs:                      # the batch read notices it too
            assert db.get_many(sample) == [self.model.get(k) for k in sample]
        for db in self.dbs:
            assert len(db) == len(self.model)
        assert dict(self.dbs[0].items()) == self.model
        assert sorted(self.dbs[1]) == sorted(self.model)

    @invariant()
    def store_is_sound(self):
        report = self.dbs[1].check()     # (contents_match's len() swept what had expired)
        in_namespaces = sum(len(m) for m in self.ns_model.values())
        assert report.ok and report.keys == len(self.model) + in_namespaces and report.expiring == len(self.deadlines)
        st_ = self.dbs[0].stats()
        assert st_["keys"] == len(self.model)
        assert st_["live_bytes"] == sum(len(k) + len(v) for k, v in self.model.items()) + 8 * len(self.deadlines)
        # both handles see one index: as many segments as the keys need, named by 2^depth entries
        other = self.dbs[1].stats()
        shape = (st_["index_segments"], st_["index_depth"], st_["index_slots"])
        assert shape == (other["index_segments"], other["index_depth"], other["index_slots"])
        assert st_["index_slots"] == st_["index_segments"] * SEGMENT_SLOTS
        assert st_["index_segments"] <= 2 ** st_["index_depth"]
        max_count = self.dbs[0]._view.max_count
        assert st_["index_segments"] >= len(self.model) / max_count
        self.segments = max(self.segments, st_["index_segments"])


_SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


STORE_SETTINGS = settings(max_examples=30, stateful_step_count=40, deadline=None, suppress_health_check=_SUPPRESS)
StoreMachine.TestCase.settings = STORE_SETTINGS
TestStoreMachine = StoreMachine.TestCase


class FullSyncMachine(StoreMachine):
    """The same rules in sync="full" mode (every write msync'ed before it returns), fewer steps."""
    SYNC = "full"


FULL_SYNC_SETTINGS = settings(max_examples=12, stateful_step_count=25, deadline=None,
                              suppress_health_check=_SUPPRESS)
FullSyncMachine.TestCase.settings = FULL_SYNC_SETTINGS
TestFullSyncMachine = FullSyncMachine.TestCase


class SplittingMachine(StoreMachine):
    """The same rules with segments that split past 64 keys: bulk_put splits segments (and doubles
    the directory) under the other handle's feet, deletes shift entries inside split segments,
    clear() drops a deep index."""
    MAX_COUNT = 64

    def teardown(self):
        try:
            super().teardown()
        finally:
            SplittingMachine.most_segments = max(SplittingMachine.most_segments, self.segments)


SplittingMachine.most_segments = 1
SPLITTING_SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None,
                              suppress_health_check=_SUPPRESS)
SplittingMachine.TestCase.settings = SPLITTING_SETTINGS


class TestSplittingMachine(SplittingMachine.TestCase):
    def runTest(self):
        SplittingMachine.most_segments = 1
        super().runTest()
        # the machine did what it is for: some run split the index many times
        assert SplittingMachine.most_segments >= 8, SplittingMachine.most_segments
