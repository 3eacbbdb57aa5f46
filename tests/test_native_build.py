"""The C shim compiles warning-free with -Wall -Wextra (as the standards require)."""
import os
import shutil
import subprocess

import pytest

NATIVE = os.path.join(os.path.dirname(__file__), os.pardir, "native")


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_shim_compiles_without_warnings():
    out = subprocess.run(
        ["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
         os.path.join(NATIVE, "mmkv_shim.c")],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
