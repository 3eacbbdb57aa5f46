"""The command line: `mmkv demo`, `mmkv check`, and `python -m mmkv` as the same program."""
import os
import shutil
import subprocess
import sys

import mmkv

MMKV = [sys.executable, "-m", "mmkv"]


def run(args, cwd=None):
    return subprocess.run(MMKV + args, capture_output=True, text=True, cwd=cwd, timeout=120)


def console_script():
    return shutil.which("mmkv", path=os.path.dirname(sys.executable))


def test_demo_writes_a_store_in_the_current_folder(tmp_path):
    out = run(["demo", "-n", "500"], cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout and "500 puts" in out.stdout
    os.rename(tmp_path / "demo.mmkv", tmp_path / "demo-run.mmkv")   # audited by conftest
    with mmkv.open(str(tmp_path / "demo-run.mmkv"), "r") as db:
        assert db[b"key00000007"] == b"value 7"
        assert int.from_bytes(db[b"demo:runs"], "little", signed=True) == 1


def test_console_script_is_the_same_program(tmp_path):
    script = console_script()
    assert script, "the mmkv console script is not installed next to the interpreter"
    out = subprocess.run([script, "check", str(tmp_path / "missing.mmkv")], capture_output=True, text=True)
    via_m = run(["check", str(tmp_path / "missing.mmkv")])
    assert out.returncode == via_m.returncode == 2
    assert out.stderr == via_m.stderr and "no such file" in out.stderr


def test_check_sound_file_exits_zero(path):
    with mmkv.open(path) as db:
        for i in range(1000):
            db[b"k%d" % i] = b"v" * (i % 300)
    out = run(["check", path])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK" in out.stdout and "keys 1000" in out.stdout


def _record_value_offset(db, key):
    db._acquire()
    try:
        from mmkv.engine.shim import lib
        assert lib.mmkv_find(db._view, key, len(key)) == 0
        return db._view.val_off
    finally:
        db._release()


def test_check_damaged_record_exits_nonzero(tmp_path):
    p = str(tmp_path / "damaged.bad")
    with mmkv.open(p) as db:
        for i in range(100):
            db[b"k%d" % i] = b"value-%d" % i
        off = _record_value_offset(db, b"k42")
    with open(p, "r+b") as f:          # flip a byte of one value: its checksum no longer matches
        f.seek(off)
        f.write(b"X")
    out = run(["check", p])
    assert out.returncode == 1
    assert "DAMAGED" in out.stdout + out.stderr


def test_check_not_an_mmkv_file(tmp_path):
    p = tmp_path / "text.bad"
    p.write_text("hello\n" * 1000)
    out = run(["check", str(p)])
    assert out.returncode == 1
    assert "not an mmkv file" in out.stderr


def test_check_truncated_file(tmp_path, path):
    with mmkv.open(path) as db:
        db[b"a"] = b"x" * 100_000
    p = str(tmp_path / "cut.bad")
    shutil.copy(path, p)
    os.truncate(p, os.path.getsize(p) // 2)
    out = run(["check", p])
    assert out.returncode == 1
    assert "cut short" in out.stderr or "shorter" in out.stderr


def test_torture_command_runs_both_modes(tmp_path):
    kill = run(["torture", "kill", str(tmp_path / "tortured.mmkv"), "--kills", "5", "--seed", "9"])
    assert kill.returncode == 0, kill.stderr
    assert "5 kills" in kill.stdout and "no failure" in kill.stdout
    power = run(["torture", "powerloss", str(tmp_path / "images"), "--images", "20", "--seed", "9"])
    assert power.returncode == 0, power.stderr
    assert "20 images" in power.stdout and "no failure" in power.stdout
