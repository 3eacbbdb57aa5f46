"""Crash safety: the kill harness with the victim alone on the file, and the power-loss simulator
(default sizes; the long runs are `mmkv torture kill PATH --kills 10000` and `mmkv torture
powerloss DIR --images 10000`).  Kills with other processes on the file: test_crash_bystanders.py."""
import signal
import subprocess
import sys
import textwrap

import pytest

import mmkv
from mmkv.crashkit import torture
from mmkv.engine import index
from mmkv.engine.shim import lib


def test_two_hundred_kills_lose_nothing(tmp_path):
    summary = torture.run_kills(str(tmp_path / "kills.mmkv"), kills=200, sync="none", seed=101, bystanders=0)
    assert summary["killed"] + summary["failpoint"] >= 200
    assert summary["failpoint"] >= 50 and summary["killed"] >= 50
    assert sum(1 for k in summary if k.startswith("fp:")) >= 10     # many different failpoints hit
    assert summary["acknowledged ops"] > 1000


def test_kills_in_full_sync_mode(tmp_path):
    summary = torture.run_kills(str(tmp_path / "kills-full.mmkv"), kills=40, sync="full", seed=202, bystanders=0)
    assert summary["killed"] + summary["failpoint"] >= 40


@pytest.mark.parametrize("sync", ["full", "none"])
def test_two_hundred_power_loss_images(tmp_path, sync):
    summary = torture.run_powerloss(str(tmp_path), images=200, sync=sync, seed=303)
    assert summary["images"] >= 200
    assert summary["pages lost"] > 0 and summary.get("pages torn, new-then-old", 0) > 0


def test_crash_image_tears_only_what_changed():
    import random
    old = bytes(4096)
    new = bytearray(old)
    new[600:610] = b"x" * 10             # sector 1 changes, the other seven do not
    image, counts = torture.crash_image(bytearray(old), {0: bytes(new)}, random.Random(1), torn_share=1.0)
    assert image[:512] == old[:512] and image[1024:] == old[1024:]
    assert image[512:1024] in (bytes(new[512:1024]), old[512:1024])


def _die_at(path, failpoint, body):
    """Run body in a child with failpoint armed; it must die by SIGKILL.  Returns its stdout."""
    code = textwrap.dedent(f"""
        import mmkv, mmkv.store
        from mmkv.engine import failpoints
        db = mmkv.open({path!r})
        failpoints.arm({failpoint!r})
    """) + textwrap.dedent(body)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr.decode()[-2000:]
    return out.stdout.decode()


def test_killed_mid_growth(path):
    with mmkv.open(path) as db:
        db[b"before"] = b"x" * 1000
        size = db.stats()["file_size"]
    _die_at(path, "grow.after_fallocate", "db[b'big'] = b'y' * (4 << 20)\n")
    with mmkv.open(path) as db:
        assert db[b"before"] == b"x" * 1000 and b"big" not in db
        db.check()
        db[b"big"] = b"y" * (4 << 20)      # the growth works after recovery
        assert db.stats()["file_size"] > size


def test_killed_mid_backward_shift(path):
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"v%d" % i for i in range(12000)})   # a crowded segment: shifts happen
    body = """
        import sys
        for i in range(12000):
            del db[b"k%d" % i]
            sys.stdout.write("%d\\n" % i)     # acknowledged
            sys.stdout.flush()
    """
    done = len(_die_at(path, "delete.mid_shift", body).splitlines())   # deletes without a shift finish
    with mmkv.open(path) as db:
        db.check()
        left = dict(db.items())
    assert all(b"k%d" % i not in left for i in range(done))            # acknowledged deletes hold
    assert all(left[b"k%d" % i] == b"v%d" % i for i in range(done + 1, 12000))   # the rest untouched
    assert len(left) in (12000 - done, 12000 - done - 1)                # the one in flight: either way


def test_killed_mid_split_and_mid_index_rebuild(path):
    _die_at(path, "split.before_meta", """
        for i in range(20000):
            db[b"s%d" % i] = b"v"
    """)
    with mmkv.open(path) as db:
        n = len(db)
        assert all(db[b"s%d" % i] == b"v" for i in range(n))
        db.check()
        # damage one slot, then die half way through the index rebuild that repairs it
        seg, slot, _ = next(index.entries(db._view))
        with db.lock():
            assert lib.mmkv_slot_set(db._view, seg, slot, 0) == 0
    _die_at(path, "recover.mid_rebuild", "db.recover()\n")
    with mmkv.open(path) as db:
        db.check()
        assert len(db) == n - 1
