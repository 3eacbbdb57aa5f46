"""The stdlib ``dbm`` conventions over mmkv: code written for ``dbm`` can ``import mmkv.dbm as dbm``.

``open(file, flag="r", mode=0o666)`` returns a ``Database``: a mutable mapping of bytes to bytes
(``str`` keys and values are stored UTF-8 encoded, as ``dbm.gnu`` and ``dbm.dumb`` do) whose
``keys()`` is a list, as in every ``dbm`` module.  Every error an mmkv store raises on purpose
reaches the caller as an instance of ``error`` (a subclass of ``OSError`` and of ``mmkv.Error``)
*and* of its own class: ``except dbm.error`` catches a damaged file, a closed database or a full
disk, and ``except mmkv.CorruptionError`` still catches the damage.  ``KeyError`` (a missing key)
and ``TypeError`` (a key that is neither bytes nor str) stay what they are, as in ``dbm``.

``register()`` teaches the stdlib's ``dbm.open`` (and so ``shelve.open``) to recognise mmkv
files, and with ``default=True`` to create them; ``open_shelf(path)`` opens a ``shelve.Shelf``
over an mmkv file without touching the stdlib.

Where mmkv differs from ``dbm.gnu``/``dbm.dumb`` on purpose: the default ``flag`` of
``mmkv.open`` is "c" (here it is "r", as in ``dbm``); keys must be bytes or str (``int`` keys
raise ``TypeError``, as in ``dbm.gnu`` and ``dbm.dumb``); several processes may have one file
open at once and see each other's writes (``dbm.dumb`` corrupts, ``dbm.gnu`` refuses); a file of
another dbm module is refused with ``error`` (``mmkv.NotMmkvFileError``), never read.
"""
from __future__ import annotations

import builtins
import os
from collections.abc import MutableMapping

from .engine.layout import MAGIC_BYTES
from .errors import Error
from .store import Store

TYPE_CHECKING = False       # (typing is not imported at run time)
if TYPE_CHECKING:
    import shelve
    from collections.abc import Iterator
    from typing import Any
    Bytes = bytes | bytearray | memoryview | str

__all__ = ["open", "error", "whichdb", "register", "open_shelf", "Database"]

class error(Error, OSError):
    """What a ``Database`` raises for anything but a missing key or a wrong key type: every
    instance is also of the mmkv exception it stands for (see ``_translated``)."""


_classes = {}


def _translated(exc: BaseException) -> BaseException:
    """exc as an instance of a class deriving from both its own class and ``error`` (made once
    per class); exc itself when it already is one."""
    if isinstance(exc, error):
        return exc
    cls = type(exc)
    sub = _classes.get(cls)
    if sub is None:
        try:
            sub = type(cls.__name__, (cls, error), {"__module__": cls.__module__, "__doc__": cls.__doc__})
        except TypeError:                   # a class that cannot be combined with OSError: as it is
            return exc
        _classes[cls] = sub
    try:
        new = sub(*exc.args)
    except TypeError:                        # a constructor with other arguments: keep the message
        new = sub(str(exc))
    for name in ("filename", "filename2"):
        if getattr(exc, name, None) is not None:
            setattr(new, name, getattr(exc, name))
    new.__dict__.update(getattr(exc, "__dict__", {}))
    return new.with_traceback(exc.__traceback__)


def _raising(exc: BaseException):
    """The exception a Database call raises for exc: itself for KeyError and TypeError (and
    ValueError that is not mmkv's), else the translated one."""
    if isinstance(exc, (Error, OSError)):
        return _translated(exc)
    return exc


class Database(MutableMapping):   # a MutableMapping[bytes, bytes] that also takes str
    """A dbm-style database over one mmkv store.  Each call is one call of ``mmkv.Store`` (see
    its docstrings for what blocks and what other processes see); ``keys()`` returns a list
    (read in batches: see ``mmkv.Store.__iter__``).  Closing twice is allowed; any other call on a closed database
    raises ``error`` (also ``mmkv.ClosedError`` and ``ValueError``)."""

    __slots__ = ("_db", "__weakref__")

    def __init__(self, store: Store):
        self._db = store

    # ------------------------------------------------------------------ mapping
    def __getitem__(self, key: Bytes) -> bytes:
        try:
            return self._db[key]
        except KeyError:
            raise
        except Exception as exc:
            raise _raising(exc) from None

    def __setitem__(self, key: Bytes, value: Bytes) -> None:
        try:
            self._db[key] = value
        except Exception as exc:
            raise _raising(exc) from None

    def __delitem__(self, key: Bytes) -> None:
        try:
            del self._db[key]
        except KeyError:
            raise
        except Exception as exc:
            raise _raising(exc) from None

    def __contains__(self, key: object) -> bool:
        try:
            return key in self._db
        except Exception as exc:
            raise _raising(exc) from None

    def __len__(self) -> int:
        try:
            return len(self._db)
        except Exception as exc:
            raise _raising(exc) from None

    def __iter__(self) -> Iterator[bytes]:
        try:
            return iter(list(self._db))
        except Exception as exc:
            raise _raising(exc) from None

    def keys(self) -> list[bytes]:  # type: ignore[override]  # a list, as in every dbm module
        """Every key, as a list (as in every dbm module), read as ``list(store)`` reads it."""
        try:
            return list(self._db)
        except Exception as exc:
            raise _raising(exc) from None

    def get(self, key: Bytes, default: Any = None) -> Any:
        try:
            return self._db.get(key, default)
        except Exception as exc:
            raise _raising(exc) from None

    def setdefault(self, key: Bytes, default: Bytes = b"") -> bytes:
        try:
            return self._db.setdefault(key, default)
        except Exception as exc:
            raise _raising(exc) from None

    def clear(self) -> None:
        """Remove every key, atomically."""
        try:
            self._db.clear()
        except Exception as exc:
            raise _raising(exc) from None

    # ------------------------------------------------------------------ dbm extras
    def sync(self) -> None:
        """Write everything to disk (msync of the whole file)."""
        try:
            self._db.sync()
        except Exception as exc:
            raise _raising(exc) from None

    def reorganize(self) -> None:
        """Give free space back (``dbm.gnu``'s name for it): ``mmkv.Store.compact()``."""
        try:
            self._db.compact()
        except Exception as exc:
            raise _raising(exc) from None

    def close(self) -> None:
        """Close the database; closing again does nothing."""
        try:
            self._db.close()
        except Exception as exc:
            raise _raising(exc) from None

    @property
    def store(self) -> Store:
        """The ``mmkv.Store`` underneath (its transactions, counters, ``check()``, ...)."""
        return self._db

    def __enter__(self) -> Database:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
        return False

    def __repr__(self):
        return f"<mmkv.dbm.Database {self._db.path!r}>"


_FLAGS = {"r": "r", "w": "w", "c": "c", "n": "n"}


def open(file: str | bytes | os.PathLike[str] | os.PathLike[bytes], flag: str = "r", mode: int = 0o666) -> Database:
    """Open the mmkv store at ``file`` (str, bytes or os.PathLike) the way ``dbm.open`` opens its
    databases.  flag: "r" read-only (default), "w" read-write, "c" read-write and created if
    missing, "n" always a new empty database; "s" after it asks for every write to be on disk
    when it returns (``sync="full"``), "f" and "u" (``dbm.gnu``'s fast and unlocked modes) are
    accepted and change nothing.  mode: the permissions a new file gets (less the umask).

    Blocks while another process opens or closes the same file (up to mmkv's open timeout).
    :raises error: no such file for "r"/"w" (also ``FileNotFoundError``), not an mmkv file
        (also ``mmkv.NotMmkvFileError``), a damaged one, no permission, a full disk.
    :raises ValueError: a flag other than the above.
    """
    if not isinstance(flag, str) or not flag or flag[0] not in _FLAGS or any(c not in "fsu" for c in flag[1:]):
        raise ValueError(f"flag must be 'r', 'w', 'c' or 'n', optionally followed by 'f', 's' or 'u', not {flag!r}")
    sync = "full" if "s" in flag[1:] else "none"
    umask = os.umask(0)
    os.umask(umask)
    try:
        store = Store(file, flag=_FLAGS[flag[0]], sync=sync, mode=mode & ~umask)
    except Exception as exc:
        raise _raising(exc) from None
    return Database(store)


def whichdb(filename: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str | None:
    """"mmkv.dbm" for an mmkv file, else what the stdlib's ``dbm.whichdb`` says (None: no such
    file or it cannot be read; "": a file no module recognises)."""
    if _is_mmkv(filename):
        return "mmkv.dbm"
    import dbm
    return _stdlib_whichdb(dbm)(filename)


def _is_mmkv(filename) -> bool:
    try:
        with builtins.open(os.fspath(filename), "rb") as f:
            return f.read(len(MAGIC_BYTES)) == MAGIC_BYTES
    except OSError:
        return False


def _stdlib_whichdb(dbm):
    return getattr(dbm.whichdb, "_mmkv_original", dbm.whichdb)


def register(default: bool = False) -> None:
    """Teach the stdlib's ``dbm`` (and so ``shelve.open``) about mmkv files: ``dbm.whichdb``
    recognises them and ``dbm.open`` opens them with this module.  With default=True, new
    databases (``dbm.open(path, "c")`` of a missing file, ``"n"``) are mmkv stores too.
    Idempotent; affects this process only."""
    import dbm
    import sys
    dbm._modules["mmkv.dbm"] = sys.modules[__name__]
    if not hasattr(dbm.whichdb, "_mmkv_original"):
        original = dbm.whichdb

        def whichdb_with_mmkv(filename):
            return "mmkv.dbm" if _is_mmkv(filename) else original(filename)
        whichdb_with_mmkv._mmkv_original = original
        whichdb_with_mmkv.__doc__ = original.__doc__
        dbm.whichdb = whichdb_with_mmkv
    if default:
        if dbm._defaultmod is None:          # let dbm find its own modules first (it fills _modules)
            try:
                dbm.open(os.devnull + "/none", "r")
            except Exception:
                pass
        dbm._defaultmod = sys.modules[__name__]


def open_shelf(filename: str | os.PathLike[str], flag: str = "c", protocol: int | None = None,
               writeback: bool = False) -> shelve.Shelf[Any]:
    """A ``shelve.Shelf`` over the mmkv file at filename (``shelve.open`` for mmkv, without
    ``register()``): values are pickled, keys are str.  Closing the shelf closes the file.
    :raises error: as ``open``."""
    import shelve
    return shelve.Shelf(open(filename, flag), protocol, writeback)

