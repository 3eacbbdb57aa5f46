"""Warnings on the "mmkv" logger, with ``logging`` imported at the first one.

The engine logs only on rare paths (a lock held for long, a close that could not take the
open/close lock), and ``import logging`` costs more than the rest of ``import mmkv``
(it pulls in ``re``, ``traceback``, ``string``, ``threading``...: about 10 ms measured with
``python -X importtime``).  So nothing imports it until there is something to say; the
record is the one ``logging.getLogger("mmkv").warning(fmt, *args)`` at the caller's line
would make (``stacklevel`` points it at the caller, not at this module).
"""
_log = None


def warn(fmt: str, *args) -> None:
    """Log fmt % args at WARNING on the "mmkv" logger, attributed to the caller's line."""
    global _log
    if _log is None:
        import logging
        _log = logging.getLogger("mmkv")
    _log.warning(fmt, *args, stacklevel=2)
