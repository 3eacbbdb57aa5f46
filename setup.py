# cffi has no pyproject.toml form for its extension builder; this is its only job.
from setuptools import setup

setup(cffi_modules=["native/build_ffi.py:ffibuilder"])
