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


# ---------------------------------------------------------------- get, put, del, ls, stats (issue 13)

def test_put_get_del_round_trip_with_exit_codes(path):
    assert run(["put", path, "greeting", "héllo"]).returncode == 0
    out = run(["get", path, "greeting"])
    assert out.returncode == 0 and out.stdout == "héllo"
    missing = run(["get", path, "nope"])
    assert missing.returncode == 1 and "no key" in missing.stderr
    assert run(["del", path, "greeting"]).returncode == 0
    again = run(["del", path, "greeting"])
    assert again.returncode == 1 and "no key" in again.stderr
    assert run(["get", path + ".absent", "k"]).returncode == 2
    assert run(["get", path]).returncode == 2                     # usage: a missing argument
    with mmkv.open(path, "r") as db:
        assert len(db) == 0


def test_binary_keys_and_values_are_lossless_in_hex_and_json(path):
    assert run(["put", "--hex", path, "00ff", "01fe80"]).returncode == 0
    assert subprocess.run(MMKV + ["put", path, "blob", "-"], input=b"\x00\xff raw", capture_output=True,
                          timeout=120).returncode == 0
    out = run(["get", "--json", "--hex", path, "00ff"])
    import json
    import base64
    obj = json.loads(out.stdout)
    assert base64.b64decode(obj["key_b64"]) == b"\x00\xff" and base64.b64decode(obj["value_b64"]) == b"\x01\xfe\x80"
    raw = subprocess.run(MMKV + ["get", path, "blob"], capture_output=True, timeout=120)
    assert raw.returncode == 0 and raw.stdout == b"\x00\xff raw"
    bad = run(["put", "--hex", path, "zz", "00"])
    assert bad.returncode == 2 and "not hex" in bad.stderr


def test_ls_streams_with_a_prefix_a_limit_and_values(path):
    import json
    with mmkv.open(path, "n") as db:
        db.update({b"user:%d" % i: b"u%d" % i for i in range(300)})
        db.update({b"order:%d" % i: b"o%d" % i for i in range(50)})
    out = run(["ls", path, "--prefix", "order:"])
    assert out.returncode == 0 and sorted(out.stdout.split()) == sorted("order:%d" % i for i in range(50))
    out = run(["ls", path, "--prefix", "user:", "--limit", "7", "--values", "--json"])
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 7 and all(r["value"] == "u" + r["key"].split(":")[1] for r in rows)
    assert len(run(["ls", path]).stdout.splitlines()) == 350


def test_ls_into_a_closed_pipe_is_quiet(path):
    with mmkv.open(path, "n") as db:
        db.update({b"k%d" % i: b"v" * 100 for i in range(50_000)})
    assert_quiet_into_a_closed_pipe(["ls", path])


def assert_quiet_into_a_closed_pipe(args) -> None:
    """`mmkv ARGS | head -1`: the command exits 0 and says nothing when its reader goes away."""
    proc = subprocess.Popen(MMKV + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()                                          # like `| head -1`
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == b""


def test_stats_text_and_json(path):
    import json
    with mmkv.open(path, "n") as db:
        db.update({b"k%d" % i: b"v" for i in range(10)})
    out = run(["stats", "--json", path])
    st = json.loads(out.stdout)
    assert out.returncode == 0 and st["keys"] == 10 and st["file_size"] > 0 and "disk_bytes" in st
    text = run(["stats", path]).stdout.splitlines()
    assert text[0].split() == ["keys", "10"]


def test_every_command_has_help():
    for command in ("demo", "check", "incr", "next-id", "compact", "get", "put", "del", "ls", "stats", "dump", "load", "backup"):
        out = run([command, "--help"])
        assert out.returncode == 0 and "usage: mmkv " + command in out.stdout, command
