"""Loads the compiled native shim and maps its errno results to exceptions."""
import errno
import os
import sys

if sys.byteorder != "little":  # the format is little-endian and the engine reads it natively
    raise ImportError("mmkv supports little-endian machines only")

try:
    from .._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only on a broken install
    raise ImportError(
        "mmkv's native shim is not built; install the package with "
        "'pip install .' (or 'pip install -e .' for development): " + str(exc)
    ) from exc

from ..errors import CorruptionError, Error

ESTALE = lib.MMKV_ESTALE


def raise_for(rc: int, what: str) -> None:
    """Raise the exception for a shim result code (0 is success and raises nothing)."""
    if rc == 0:
        return
    if rc == errno.EBADMSG:
        raise CorruptionError(f"{what}: the file holds an out-of-range offset or a bad record")
    raise Error(f"{what}: {os.strerror(rc)} (errno {rc})")
