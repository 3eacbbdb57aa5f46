"""Every C file of the core, and the CPython extension, compiles warning-free with -Wall -Wextra
(as the standards require)."""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

NATIVE = os.path.join(os.path.dirname(__file__), os.pardir, "native")
#: The CPython binding: not part of the core (it calls the core through pointers), built against Python.h.
EXTENSION = os.path.join(NATIVE, "mmkv_fast.c")
SOURCES = sorted(p for p in glob.glob(os.path.join(NATIVE, "mmkv_*.c")) if os.path.basename(p) != "mmkv_fast.c")


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


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed")
def test_the_extension_compiles_without_warnings():
    out = subprocess.run(
        ["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
         "-I", sysconfig.get_paths()["include"], "-I", NATIVE, EXTENSION],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


def test_the_extension_holds_no_copy_of_the_core():
    """One copy of the C core: the extension compiles none of its files (it calls the cffi
    module's functions through pointers), so no core function is defined in it."""
    with open(EXTENSION, encoding="utf-8") as f:
        text = f.read()
    assert '#include "mmkv_internal.h"' not in text
    assert not any(f'"{os.path.basename(p)}"' in text for p in SOURCES)
    fast = pytest.importorskip("mmkv._fast")
    nm = shutil.which("nm")
    if nm:
        out = subprocess.run([nm, "-D", "--defined-only", fast.__file__], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert [line for line in out.stdout.splitlines() if " mmkv_" in line] == []
