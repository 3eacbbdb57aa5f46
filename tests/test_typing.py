"""mmkv ships py.typed and annotations on its public API: a user program type-checks cleanly with
mypy --strict (and runs), and a program that misuses the API is rejected."""
import os
import subprocess
import sys
import textwrap

import pytest

import mmkv

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mmkv.__file__)))


def mypy(tmp_path, program: str):
    pytest.importorskip("mypy", reason="mypy is not installed (pip install -e '.[test]' installs it)")
    env = dict(os.environ, MYPYPATH=SOURCE_ROOT)     # an editable install's import hook is invisible to mypy
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent",
                           "--cache-dir", str(tmp_path / "cache"), "--no-error-summary", program],
                          capture_output=True, text=True, env=env, timeout=300)


def test_the_package_is_marked_typed():
    assert os.path.isfile(os.path.join(os.path.dirname(mmkv.__file__), "py.typed"))


def test_a_user_program_type_checks_strictly_and_runs(tmp_path):
    out = mypy(tmp_path, os.path.join(HERE, "typing_program.py"))
    assert out.returncode == 0, out.stdout + out.stderr
    run = subprocess.run([sys.executable, os.path.join(HERE, "typing_program.py")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr


def test_misuse_is_rejected(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""
        import mmkv
        import mmkv.dbm
        with mmkv.open("x.mmkv") as db:
            db[b"k"] = 3
            n: str = db.incr(b"c")
        q = mmkv.Queue("q.mmkv", "jobs")
        q.put(1)
        keys: list[str] = mmkv.dbm.open("d.db").keys()
    """))
    out = mypy(tmp_path, str(bad))
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert any(":5: error: Incompatible types in assignment" in x for x in lines), out.stdout
    assert any(":6: error: Incompatible types in assignment" in x for x in lines), out.stdout
    assert any(":8: error: Argument 1 to \"put\" of \"Queue\" has incompatible type \"int\"" in x for x in lines), out.stdout
    assert any(":9: error: Incompatible types in assignment" in x for x in lines), out.stdout
