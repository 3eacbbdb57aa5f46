"""Every C file of the core compiles warning-free with -Wall -Wextra (as the standards require)."""
import glob
import os
import shutil
import subprocess

import pytest

NATIVE = os.path.join(os.path.dirname(__file__), os.pardir, "native")
SOURCES = sorted(glob.glob(os.path.join(NATIVE, "mmkv_*.c")))


def test_the_core_is_split_into_its_files():
    names = {os.path.basename(p) for p in SOURCES}
    assert {"mmkv_sys.c", "mmkv_hash.c", "mmkv_index.c", "mmkv_alloc.c", "mmkv_fused.c", "mmkv_shim.c"} <= names


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
@pytest.mark.parametrize("source", SOURCES, ids=os.path.basename)
def test_each_c_file_compiles_without_warnings(source):
    out = subprocess.run(
        ["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fsyntax-only", source],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
