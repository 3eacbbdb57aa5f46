"""The ``mmkv`` command line (also ``python -m mmkv``)."""
import argparse
import os
import sys
import time

from . import open as open_store
from .errors import Error
from .sequence import Sequence


def cmd_demo(args) -> int:
    """Write, read, count and audit a small store in the current folder."""
    path = args.path
    with open_store(path) as db:
        t0 = time.perf_counter()
        for i in range(args.n):
            db[b"key%08d" % i] = b"value %d" % i
        t1 = time.perf_counter()
        for i in range(args.n):
            db[b"key%08d" % i]
        t2 = time.perf_counter()
        hits = db.incr("demo:runs")
        report = db.check()
        print(f"mmkv demo on {path}: this demo has run {hits} time(s) on this file")
        print(f"  {args.n} puts in {t1 - t0:.3f}s ({args.n / (t1 - t0):,.0f}/s), "
              f"{args.n} gets in {t2 - t1:.3f}s ({args.n / (t2 - t1):,.0f}/s)")
        print(f"  {len(db)} keys; db[b'key00000007'] = {db[b'key00000007']!r}")
        print(report)
    return 0


def cmd_check(args) -> int:
    """Audit a store; exit 0 when sound, 1 when damaged."""
    if not os.path.exists(args.path):
        print(f"mmkv check: {args.path}: no such file", file=sys.stderr)
        return 2
    try:
        with open_store(args.path, "w") as db:
            recovered = db.last_recovery
            report = db.check()
    except Error as exc:
        print(f"mmkv check: {args.path}: DAMAGED: {exc}", file=sys.stderr)
        return 1
    print(report)
    if recovered is not None:
        print(f"  recovery ran on open ({recovered.reason}): kept {recovered.records} records, dropped "
              f"{recovered.dropped} bad, {recovered.duplicates} duplicate, {recovered.overlaps} overlapping")
        if recovered.dropped or recovered.overlaps:
            print(f"mmkv check: {args.path}: damaged records were dropped by recovery", file=sys.stderr)
            return 1
    return 0


def cmd_compact(args) -> int:
    """Compact a store: move live records down, then shrink the file (no other handle open) or
    release its free pages (another handle open).  Progress on stderr for big files."""
    if not os.path.exists(args.path):
        print(f"mmkv compact: {args.path}: no such file", file=sys.stderr)
        return 2
    progress = None
    if os.path.getsize(args.path) >= args.progress_from:
        last = [0.0]
        tty = sys.stderr.isatty()

        def progress(done, total):
            now = time.monotonic()
            if now - last[0] < 0.5 and done < total:
                return
            last[0] = now
            pct = 100.0 * done / total if total else 100.0
            end = "\r" if tty and done < total else "\n"
            sys.stderr.write(f"mmkv compact: {args.path}: {pct:5.1f}% of {total / 1e6:,.1f} MB walked{end}")
            sys.stderr.flush()
    try:
        with open_store(args.path, "w") as db:
            result = db.compact(progress)
    except Error as exc:
        print(f"mmkv compact: {args.path}: {exc}", file=sys.stderr)
        return 1
    how = "file shrunk" if result["shrunk"] else "free pages released (another handle has the file open: size kept)"
    print(f"{args.path}: moved {result['moved_records']:,} records ({result['moved_bytes'] / 1e6:,.1f} MB) in "
          f"{result['seconds']:.2f}s; {how}")
    print(f"  file {result['file_size_before']:,} -> {result['file_size_after']:,} bytes, on disk "
          f"{result['disk_bytes_before']:,} -> {result['disk_bytes_after']:,} bytes; longest lock hold "
          f"{result['longest_step_seconds'] * 1000:.1f} ms")
    return 0


def say_line(value) -> None:
    """Print value as one line in one write: processes started together share the output pipe,
    and print() makes two writes (value, then newline) when Python runs unbuffered
    (PYTHONUNBUFFERED), so "1" and "2" could reach the reader as "12"."""
    sys.stdout.write(f"{value}\n")
    sys.stdout.flush()


def cmd_incr(args) -> int:
    """Add DELTA (default 1) to the counter KEY and print the new value (the file is created if missing)."""
    try:
        with open_store(args.path, "c", sync=args.sync) as db:
            value = db.incr(args.key.encode("utf-8"), args.delta)
    except (Error, OverflowError, OSError) as exc:
        print(f"mmkv incr: {args.path}: {exc}", file=sys.stderr)
        return 1
    say_line(value)
    return 0


def cmd_next_id(args) -> int:
    """Print the next id of sequence NAME: block=1, so a process that draws one id skips none."""
    try:
        with Sequence(args.path, args.name, block=1, sync=args.sync) as ids:
            value = ids.next()
    except (Error, OverflowError, OSError) as exc:
        print(f"mmkv next-id: {args.path}: {exc}", file=sys.stderr)
        return 1
    say_line(value)
    return 0


def _sync_option(parser):
    parser.add_argument("--sync", choices=("full", "none"), default="full",
                        help="full (default): the new value is on disk before it is printed; "
                             "none: survives a crash of this process, not power loss")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkv", description="mmkv: memory-mapped, process-shared key-value store")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write, read and audit a small store in the current folder")
    d.add_argument("path", nargs="?", default="demo.mmkv")
    d.add_argument("-n", type=int, default=10000, help="keys to write (default 10000)")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("check", help="audit a store file; exit 0 when sound")
    c.add_argument("path")
    c.set_defaults(func=cmd_check)
    i = sub.add_parser("incr", help="add DELTA (default 1) to counter KEY atomically; print the new value")
    i.add_argument("path")
    i.add_argument("key", help="counter key (UTF-8); the value is 8 little-endian signed bytes")
    i.add_argument("delta", nargs="?", type=int, default=1, help="amount to add, may be negative (default 1)")
    _sync_option(i)
    i.set_defaults(func=cmd_incr)
    n = sub.add_parser("next-id", help="print the next id of sequence NAME, unique across all processes")
    n.add_argument("path")
    n.add_argument("name", help="sequence name (UTF-8); each name counts from 1 on its own")
    _sync_option(n)
    n.set_defaults(func=cmd_next_id)
    m = sub.add_parser("compact", help="move live records down and give free space back (shrink the file "
                                       "when no other process has it open)")
    m.add_argument("path")
    m.add_argument("--progress-from", type=int, default=64 << 20, metavar="BYTES",
                   help="report progress on stderr for files of at least this size (default 64 MiB)")
    m.set_defaults(func=cmd_compact)
    sub.add_parser("torture", help="crash-durability runs: 'kill PATH --kills N' or 'powerloss DIR --images N' "
                                   "(see mmkv torture --help)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torture"]:          # its own parser, options and help included
        from .crashkit import torture
        return torture.main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)
