"""Data in and out and the read-only audit, end to end as subprocesses: `mmkv dump`, `mmkv load`,
`mmkv dump --format redis` into a real redis-server, `mmkv check` (never changes the file) and
`--repair`, and the progress bar on a terminal."""
import json
import os
import pty
import shutil
import socket
import subprocess
import time

import pytest

import mmkv
from test_cli import MMKV, assert_quiet_into_a_closed_pipe, run
from test_lockless import crash_while_writing, digest

BINARY = {bytes([i]) * (i % 7 + 1): bytes(range(i, 256)) + bytes(range(0, i)) for i in range(256)}


def fill(path: str) -> dict:
    data = {b"text-%d" % i: ("v\u00e9rt %d" % i).encode() for i in range(2000)}
    data.update(BINARY)
    data[b"big"] = os.urandom(1 << 20)
    data[b"empty"] = b""
    data["clé".encode()] = b"\xff\xfe"            # text key, binary value
    with mmkv.open(path, "n") as db:
        db.update(data)
    return data


def contents(path: str) -> dict:
    with mmkv.open(path, "r") as db:
        return dict(db.items())


def test_dump_then_load_is_lossless(tmp_path):
    src, dst, lines = str(tmp_path / "src.mmkv"), str(tmp_path / "dst.mmkv"), str(tmp_path / "dump.jsonl")
    data = fill(src)
    out = run(["dump", src, "--out", lines])
    assert out.returncode == 0, out.stderr
    assert out.stderr == "", "no progress is printed when stderr is not a terminal"
    with open(lines, "rb") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == len(data)
    assert {"key": "text-7", "value": "v\u00e9rt 7"} in rows
    assert {"key": "clé", "value_b64": "//4="} in rows
    out = run(["load", dst, lines])
    assert out.returncode == 0, out.stderr
    assert contents(dst) == data


def test_load_from_stdin_and_a_pipe_from_dump(tmp_path):
    src, dst = str(tmp_path / "src.mmkv"), str(tmp_path / "dst.mmkv")
    data = fill(src)
    dump = subprocess.Popen(MMKV + ["dump", src], stdout=subprocess.PIPE)
    load = subprocess.run(MMKV + ["load", dst, "-"], stdin=dump.stdout, capture_output=True, timeout=120)
    dump.stdout.close()
    assert dump.wait(timeout=120) == 0 and load.returncode == 0, load.stderr
    assert contents(dst) == data


def test_load_overwrites_existing_keys_and_keeps_others(tmp_path):
    dst = str(tmp_path / "dst.mmkv")
    with mmkv.open(dst, "n") as db:
        db.update({b"a": b"old", b"keep": b"1"})
    out = subprocess.run(MMKV + ["load", dst], input=b'{"key": "a", "value": "new"}\n\n{"key": "b", "value": ""}\n',
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert contents(dst) == {b"a": b"new", b"keep": b"1", b"b": b""}


def test_a_bad_line_stops_the_load_with_its_number_and_what_was_loaded(tmp_path):
    dst = str(tmp_path / "dst.mmkv")
    good = b"".join(b'{"key": "k%d", "value": "v"}\n' % i for i in range(5))
    for bad, why in ((b"{not json\n", "not JSON"), (b'["k", "v"]\n', "not a JSON object"),
                     (b'{"key": "k"}\n', "no 'value'"), (b'{"key_b64": "!!", "value": "v"}\n', "key")):
        out = subprocess.run(MMKV + ["load", dst], input=good + bad + good, capture_output=True, timeout=60)
        assert out.returncode == 2, (bad, out.stderr)
        assert b"line 6" in out.stderr and why.encode() in out.stderr and b"5 records before it" in out.stderr
        assert set(contents(dst)) == {b"k%d" % i for i in range(5)}
    assert run(["load", dst, str(tmp_path / "missing.jsonl")]).returncode == 2


def test_dump_with_a_prefix_and_into_a_closed_pipe(tmp_path):
    src = str(tmp_path / "src.mmkv")
    with mmkv.open(src, "n") as db:
        db.update({b"a%d" % i: b"x" * 100 for i in range(50_000)})
        db.update({b"b%d" % i: b"y" for i in range(10)})
    out = run(["dump", src, "--prefix", "b"])
    assert out.returncode == 0
    assert sorted(json.loads(line)["key"] for line in out.stdout.splitlines()) == sorted("b%d" % i for i in range(10))
    assert_quiet_into_a_closed_pipe(["dump", src])


def test_redis_format_is_byte_exact(tmp_path):
    src = str(tmp_path / "src.mmkv")
    with mmkv.open(src, "n") as db:
        db[b"k\r\n"] = b"\x00v"
    out = subprocess.run(MMKV + ["dump", "--format", "redis", src], capture_output=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n\x00v\r\n"


# ---------------------------------------------------------------- a real redis-server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _resp_get(sock, key: bytes):
    sock.sendall(b"*2\r\n$3\r\nGET\r\n$%d\r\n%b\r\n" % (len(key), key))
    buf = b""
    while b"\r\n" not in buf:
        buf += sock.recv(65536)
    head, rest = buf.split(b"\r\n", 1)
    assert head[:1] == b"$", head
    n = int(head[1:])
    if n < 0:
        return None
    while len(rest) < n + 2:
        rest += sock.recv(1 << 20)
    return rest[:n]


@pytest.fixture
def redis_port(tmp_path):
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not server or not cli:
        pytest.skip("redis-server and redis-cli are not installed: the Redis pipe is not tested here")
    port = _free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while subprocess.run([cli, "-p", str(port), "ping"], capture_output=True).stdout.strip() != b"PONG":
            assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def test_dump_into_a_real_redis_server(tmp_path, redis_port):
    src = str(tmp_path / "src.mmkv")
    data = fill(src)
    dump = subprocess.Popen(MMKV + ["dump", "--format", "redis", src], stdout=subprocess.PIPE)
    pipe = subprocess.run([shutil.which("redis-cli"), "-p", str(redis_port), "--pipe"], stdin=dump.stdout,
                          capture_output=True, timeout=120)
    dump.stdout.close()
    assert dump.wait(timeout=120) == 0 and pipe.returncode == 0, pipe.stdout + pipe.stderr
    assert b"errors: 0, replies: %d" % len(data) in pipe.stdout, pipe.stdout
    with socket.create_connection(("127.0.0.1", redis_port)) as sock:
        for key, value in data.items():
            assert _resp_get(sock, key) == value, key


# ---------------------------------------------------------------- check: read-only, and --repair
def test_check_never_changes_the_file(path):
    with mmkv.open(path) as db:
        db.update({b"k%d" % i: b"v" * (i % 100) for i in range(3000)})
    before, mtime = digest(path), os.stat(path).st_mtime_ns
    out = run(["check", path])
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr
    assert digest(path) == before and os.stat(path).st_mtime_ns == mtime


def test_check_reports_a_file_that_needs_recovery_and_repair_runs_it(path):
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
    crash_while_writing(path)
    before = digest(path)
    out = run(["check", path])
    assert out.returncode == 1 and "NEEDS RECOVERY" in out.stderr and "--repair" in out.stderr
    assert digest(path) == before, "check without --repair changed the file"
    out = run(["check", "--repair", path])
    assert out.returncode == 0, out.stderr
    assert "recovery ran (the file was not closed cleanly)" in out.stdout
    assert run(["check", path]).returncode == 0


def test_repair_mends_what_the_audit_finds(tmp_path):
    from test_cli import _record_value_offset
    p = str(tmp_path / "damaged.bad")
    with mmkv.open(p) as db:
        db.update({b"k%d" % i: b"value-%d" % i for i in range(100)})
        off = _record_value_offset(db, b"k42")
    with open(p, "r+b") as f:
        f.seek(off)
        f.write(b"X")
    assert run(["check", p]).returncode == 1
    out = run(["check", "--repair", p])
    assert out.returncode == 1 and "dropped 1 bad" in out.stdout and "dropped by recovery" in out.stderr
    assert run(["check", p]).returncode == 0
    with mmkv.open(p, "r") as db:
        assert len(db) == 99 and b"k42" not in db


# ---------------------------------------------------------------- progress
def test_a_progress_bar_is_drawn_on_a_terminal(tmp_path):
    src = str(tmp_path / "src.mmkv")
    with mmkv.open(src, "n") as db:
        db.update({b"k%d" % i: b"v" * 200 for i in range(200_000)})
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(MMKV + ["dump", src, "--out", str(tmp_path / "d.jsonl")], stderr=follower)
        os.close(follower)
        follower = None
        err = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:                  # EIO: the child closed its end
                break
            if not chunk:
                break
            err += chunk
        assert proc.wait(timeout=120) == 0
    finally:
        os.close(leader)
        if follower is not None:
            os.close(follower)
    assert b"\r" in err and b"100.0% 200,000/200,000 keys" in err and err.endswith(b"\r\n"), err[-300:]
    assert b"[" + b"#" * 30 + b"]" in err


def test_progress_lines_on_request_when_not_a_terminal(tmp_path):
    src, lines = str(tmp_path / "src.mmkv"), str(tmp_path / "d.jsonl")
    with mmkv.open(src, "n") as db:
        db.update({b"k%d" % i: b"v" for i in range(1000)})
    out = run(["dump", src, "--out", lines, "--progress"])
    assert out.returncode == 0 and "1,000 records" in out.stderr and "\r" not in out.stderr
    out = run(["load", str(tmp_path / "dst.mmkv"), lines, "--progress"])
    assert out.returncode == 0 and "1,000 records" in out.stderr


def test_the_new_commands_have_help():
    for command in ("dump", "load", "check"):
        out = run([command, "--help"])
        assert out.returncode == 0 and "usage: mmkv " + command in out.stdout, command
