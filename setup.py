# cffi has no pyproject.toml form for its extension builder, hence this file.  It builds the two
# bindings: the cffi module (mmkv._native: the C core, its only copy) and the CPython extension
# (mmkv._fast: the per-call read path, which calls the core through pointers taken from
# mmkv._native at import, so it compiles none of the core's files).
from setuptools import Extension, setup

fast = Extension(
    "mmkv._fast",
    sources=["native/mmkv_fast.c"],
    include_dirs=["native"],
    depends=["native/mmkv_layout.h", "native/mmkv_shim.h"],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
    optional=True,       # without a working compiler for it, mmkv runs on the cffi binding
)

setup(cffi_modules=["native/build_ffi.py:ffibuilder"], ext_modules=[fast])
