"""Loads the compiled native shim (and the read binding) and maps its errno results to exceptions.

``error_for`` is the one place an errno from the shim (or a system call the engine makes
through it) becomes an exception: the class says what kind of failure it is, the message
what failed, the errno and what to do.  Every site calls it (or ``raise_for``).
"""
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

from ..errors import ClosedError, CorruptionError, DiskFullError, Error, LockTimeoutError

ESTALE = lib.MMKV_ESTALE
ENEEDBACK = lib.MMKV_ENEEDBACK   #: an allocation found a free block with holes where it would write

#: The binding of the per-call operations, chosen once at import: "cpython" (the extension
#: mmkv._fast, calling this module's C core through function pointers) or "cffi" (the portable
#: binding).  Environment variable MMKV_BINDING: "cffi" forces cffi, "cpython" requires the
#: extension (ImportError without it), unset or empty picks the extension when it is built.
_WANTED = os.environ.get("MMKV_BINDING", "")
if _WANTED not in ("", "cffi", "cpython"):
    raise ImportError(f"MMKV_BINDING must be 'cffi' or 'cpython' (or unset), not {_WANTED!r}")
fast = None
if _WANTED != "cffi":
    try:
        from .. import _fast as fast
    except ImportError:
        if _WANTED == "cpython":
            raise
BINDING = "cffi" if fast is None else "cpython"


def init_fast(**replace) -> None:
    """Hand the extension the addresses of the core's functions (fast.CORE_FUNCTIONS): the cffi
    module's, which are the only copy of the core in the process.  replace: name -> address
    (an int) to use instead, for tests that fake a result (a cffi callback); calling it again
    without replace restores the core.  No-op on the cffi binding."""
    if fast is None:
        return
    from ..errors import LimitError
    from .tunables import MAX_KEY_SIZE, MAX_VALUE_SIZE
    addresses = [replace.pop(name) if name in replace else int(ffi.cast("uintptr_t", ffi.addressof(lib, name)))
                 for name in fast.CORE_FUNCTIONS]
    if replace:
        raise ValueError(f"not functions the extension calls: {sorted(replace)}")
    fast.init(addresses, LimitError, MAX_KEY_SIZE, MAX_VALUE_SIZE)


init_fast()

#: errno -> (exception class, what to do).  Anything else is a plain mmkv.Error.
_ERRORS = {
    errno.EBADMSG: (CorruptionError, "the file holds an out-of-range offset or a bad record; "
                                     "db.recover() or 'mmkv check' the file"),
    errno.ENOTRECOVERABLE: (CorruptionError, "recovery failed earlier; close every handle and reopen "
                                             "(the first opener repairs the store)"),
    errno.ENOSPC: (DiskFullError, "free disk space and retry (the store is unchanged)"),
    errno.EDQUOT: (DiskFullError, "the disk quota is exhausted; free space and retry"),
    errno.EFBIG: (DiskFullError, "the file size limit (ulimit -f) is reached"),
    errno.ETIMEDOUT: (LockTimeoutError, "another process holds the lock; raise lock_timeout or stop it"),
    errno.EBADF: (ClosedError, "the handle is closed"),
}


def error_for(rc: int, what: str, other=Error) -> Exception:
    """The exception for a nonzero errno rc from the shim or a system call: ``what`` says
    what failed ("msync", "lock of /path", ...); an errno the table does not name gets class
    ``other`` (OSError where a standard file error is the better fit).  OSError subclasses
    carry rc as their errno."""
    cls, hint = _ERRORS.get(rc, (other, ""))
    text = f"{what}: {os.strerror(rc)} (errno {rc})" + (f"; {hint}" if hint else "")
    return cls(rc, text) if issubclass(cls, OSError) else cls(text)


def raise_for(rc: int, what: str) -> None:
    """Raise error_for(rc, what) unless rc is 0 (success)."""
    if rc:
        raise error_for(rc, what)
