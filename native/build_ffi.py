"""cffi builder for mmkv's native shim (API mode).

The cdef is the two public headers themselves, so the structs the C compiler
lays out and the ones Python sees come from one text.  Built by setup.py's cffi_modules.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = ("mmkv_layout.h", "mmkv_shim.h")      # the cdef, in this order: shim.h uses layout.h's names
#: The C core, one job per file; they share mmkv_internal.h, which is not part of the cdef.
SOURCES = ("mmkv_sys.c", "mmkv_hash.c", "mmkv_index.c", "mmkv_alloc.c", "mmkv_fused.c", "mmkv_shim.c")


def _read(name):
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        return f.read()


ffibuilder = FFI()
ffibuilder.cdef("\n".join(_read(h) for h in HEADERS))
ffibuilder.set_source(
    "mmkv._native",
    "".join(f'#include "{h}"\n' for h in HEADERS),
    sources=[os.path.relpath(os.path.join(HERE, c)) for c in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    libraries=["pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
