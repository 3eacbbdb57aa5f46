"""The ``mmkv`` command line (also ``python -m mmkv``)."""
import argparse
import json
import os
import sys
import time

from . import open as open_store
from .errors import Error, RecoveryNeededError
from .sequence import Sequence
from .transfer import encode_field


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
    """Audit a store; exit 0 when sound, 1 when damaged or in need of recovery.  Without --repair
    the file is opened lockless (read-only, no lock): checking never changes a byte of it."""
    if not os.path.exists(args.path):
        print(f"mmkv check: {args.path}: no such file", file=sys.stderr)
        return 2
    if not args.repair:
        try:
            with open_store(args.path, "r", lockless=True) as db:
                report = db.check()
        except RecoveryNeededError as exc:
            print(f"mmkv check: {args.path}: NEEDS RECOVERY: {exc}", file=sys.stderr)
            return 1
        except Error as exc:
            print(f"mmkv check: {args.path}: DAMAGED: {exc} (`mmkv check --repair` runs recovery)",
                  file=sys.stderr)
            return 1
        print(report)
        return 0
    try:
        with open_store(args.path, "w") as db:
            recovered = db.last_recovery
            try:
                report = db.check()
            except Error:
                if recovered is not None:  # recovery ran on open and the audit still fails
                    raise
                recovered = db.recover()   # the file was sound at open: repair what the audit finds
                report = db.check()
    except Error as exc:
        print(f"mmkv check: {args.path}: DAMAGED beyond repair: {exc}", file=sys.stderr)
        return 1
    print(report)
    if recovered is not None:
        print(f"  recovery ran ({recovered.reason}): kept {recovered.records} records, dropped "
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
    last = [0.0]
    tty = sys.stderr.isatty()

    def walked(done, total):
        now = time.monotonic()
        if now - last[0] < 0.5 and done < total:
            return
        last[0] = now
        pct = 100.0 * done / total if total else 100.0
        end = "\r" if tty and done < total else "\n"
        sys.stderr.write(f"mmkv compact: {args.path}: {pct:5.1f}% of {total / 1e6:,.1f} MB walked{end}")
        sys.stderr.flush()
    progress = walked if os.path.getsize(args.path) >= args.progress_from else None
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


# ------------------------------------------------------------------ looking inside a store
#
# Keys on the command line are UTF-8 text, or hex with --hex.  Output: the value's bytes as they
# are (get), or with --json one object per line in which a key or value that is valid UTF-8 is a
# string under "key"/"value" and any other is base64 under "key_b64"/"value_b64" (lossless).
# Exit codes: 0 ok, 1 not found or damage, 2 usage (argparse's, and a missing file).

def _key(args, text: str) -> bytes:
    if args.hex:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise SystemExit(_usage(args, f"not hex: {text!r}"))
    return text.encode("utf-8")


def _usage(args, message: str) -> int:
    print(f"mmkv {args.command}: {message}", file=sys.stderr)
    return 2


def _existing(args) -> bool:
    if os.path.exists(args.path):
        return True
    print(f"mmkv {args.command}: {args.path}: no such file", file=sys.stderr)
    return False


def _out_line(obj) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def cmd_get(args) -> int:
    """Print the value of KEY (its bytes as they are, or a JSON line with --json)."""
    if not _existing(args):
        return 2
    key = _key(args, args.key)
    try:
        with open_store(args.path, "r") as db:
            value = _space(db, args).get(key)
    except Error as exc:
        print(f"mmkv get: {args.path}: {exc}", file=sys.stderr)
        return 1
    if value is None:
        print(f"mmkv get: {args.path}: no key {args.key!r}", file=sys.stderr)
        return 1
    if args.json:
        _out_line({**encode_field("key", key), **encode_field("value", value)})
    else:
        sys.stdout.buffer.write(value)
        if sys.stdout.isatty():
            sys.stdout.buffer.write(b"\n")
    sys.stdout.flush()
    return 0


def cmd_put(args) -> int:
    """Set KEY to VALUE (UTF-8, or hex with --hex; "-" reads the value's bytes from stdin)."""
    if args.ttl is not None and not 0 < args.ttl < float("inf"):
        return _usage(args, f"--ttl must be more than 0 seconds, not {args.ttl}")
    key = _key(args, args.key)
    if args.value == "-":
        value = sys.stdin.buffer.read()
    else:
        value = _key(args, args.value)
    try:
        with open_store(args.path, "c", sync=args.sync) as db:
            _space(db, args, create=True).set(key, value, ttl=args.ttl)
    except Error as exc:
        print(f"mmkv put: {args.path}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_del(args) -> int:
    """Delete KEY; exit 1 if it was not there."""
    if not _existing(args):
        return 2
    key = _key(args, args.key)
    try:
        with open_store(args.path, "w", sync=args.sync) as db:
            found = _space(db, args).pop(key, None) is not None
    except Error as exc:
        print(f"mmkv del: {args.path}: {exc}", file=sys.stderr)
        return 1
    if not found:
        print(f"mmkv del: {args.path}: no key {args.key!r}", file=sys.stderr)
        return 1
    return 0


def _namespace_option(parser, more: str = "") -> None:
    parser.add_argument("--namespace", metavar="NAME",
                        help="work in namespace NAME (a named sub-store) instead of the main key space" + more)


def _space(db, args, create: bool = False):
    """The store, or with --namespace NAME its namespace NAME (created only when create is set).
    :raises NamespaceError: no such namespace."""
    name = getattr(args, "namespace", None)
    return db if name is None else db.namespace(name, create=create)


def cmd_namespaces(args) -> int:
    """List the store's namespaces, each with its number of keys."""
    if not _existing(args):
        return 2
    try:
        with open_store(args.path, "r") as db:
            rows = [(name, len(db.namespace(name, create=False))) for name in db.namespaces()]
    except Error as exc:
        print(f"mmkv namespaces: {args.path}: {exc}", file=sys.stderr)
        return 1
    for name, keys in rows:
        if args.json:
            _out_line({"namespace": name, "keys": keys})
        else:
            sys.stdout.write(f"{name}\t{keys}\n")
    sys.stdout.flush()
    return 0


def cmd_ls(args) -> int:
    """List keys (streamed, in hash order), those starting with --prefix, at most --limit."""
    if not _existing(args):
        return 2
    prefix = _key(args, args.prefix) if args.prefix is not None else b""
    shown = 0
    try:
        with open_store(args.path, "r") as db:
            db = _space(db, args)
            source = db.items() if args.values else ((k, None) for k in db)
            for key, value in source:
                if not key.startswith(prefix):
                    continue
                if args.limit is not None and shown >= args.limit:
                    break
                shown += 1
                if args.json:
                    obj = encode_field("key", key)
                    if value is not None:
                        obj.update(encode_field("value", value))
                    _out_line(obj)
                else:
                    text = key.hex() if args.hex else key.decode("utf-8", "backslashreplace")
                    if value is not None:
                        text += "\t" + (value.hex() if args.hex else value.decode("utf-8", "backslashreplace"))
                    sys.stdout.write(text + "\n")
    except Error as exc:
        print(f"mmkv ls: {args.path}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    return 0


def cmd_stats(args) -> int:
    """Print the store's statistics (keys, bytes, index, space), as JSON with --json."""
    if not _existing(args):
        return 2
    try:
        with open_store(args.path, "r") as db:
            st = db.stats()
    except Error as exc:
        print(f"mmkv stats: {args.path}: {exc}", file=sys.stderr)
        return 1
    st = {k: v for k, v in sorted(st.items(), key=lambda kv: kv[0] != "keys")
          if isinstance(v, (int, float, str, bool)) or v is None}
    if args.json:
        _out_line(st)
    else:
        width = max(map(len, st))
        for k, v in st.items():
            sys.stdout.write(f"{k:<{width}}  {v:,}\n" if isinstance(v, int) and not isinstance(v, bool)
                             else f"{k:<{width}}  {v}\n")
    return 0


def cmd_dump(args) -> int:
    """Write every record as a JSON line (or, --format redis, a Redis SET command) to stdout or
    --out, streamed: memory holds one iteration batch.  Progress on stderr (see progress.py)."""
    from .progress import Progress
    from .transfer import dump
    if not _existing(args):
        return 2
    prefix = _key(args, args.prefix) if args.prefix is not None else b""
    out = open(args.out, "wb") if args.out else sys.stdout.buffer
    try:
        with open_store(args.path, "r") as store:
            db = _space(store, args)
            with Progress(f"mmkv dump {args.path}", total=len(db), lines=args.progress) as progress:
                n = dump(db.items(), out, args.format, prefix, progress, db.deadlines())
        out.flush()
    except Error as exc:
        print(f"mmkv dump: {args.path}: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.out:
            out.close()
    if args.progress:
        print(f"mmkv dump: {args.path}: {n:,} records", file=sys.stderr)
    return 0


def put_expiring(db):
    """load's writer of a record with a deadline (seconds since the epoch): the time left, or
    nothing when it has passed."""
    import time

    def put(key, value, expires_at):
        left = expires_at - time.time()
        if left > 0:
            db.set(key, value, ttl=left)
        return left > 0
    return put


def cmd_load(args) -> int:
    """Write the JSON-line records of FILE (or stdin) into the store (created if missing), in
    batches of one update() each; keys already there take the loaded value."""
    from .progress import Progress
    from .transfer import LoadError, load
    source = sys.stdin.buffer if args.file in (None, "-") else None
    try:
        if source is None:
            source = open(args.file, "rb")
    except OSError as exc:
        return _usage(args, f"{args.file}: {exc.strerror}")
    total = os.fstat(source.fileno()).st_size if source is not sys.stdin.buffer else None
    try:
        # one barrier at the end, not two per record: everything loaded is durable when load exits
        with open_store(args.path, "c") as store, \
                Progress(f"mmkv load {args.path}", total=total or None, unit="bytes", lines=args.progress) as progress:
            db = _space(store, args, create=True)
            try:
                n = load(source, db.update, progress, put_expiring(db))
            finally:
                if args.sync == "full":
                    store.sync()
    except LoadError as exc:
        print(f"mmkv load: {args.path}: {exc}; the {exc.loaded:,} records before it were loaded (they stay)",
              file=sys.stderr)
        return 2
    except Error as exc:
        print(f"mmkv load: {args.path}: {exc}", file=sys.stderr)
        return 1
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    if args.progress:
        print(f"mmkv load: {args.path}: {n:,} records", file=sys.stderr)
    return 0


def cmd_backup(args) -> int:
    """Write a point-in-time, compact, audited copy of the store to DEST (a new file) while other
    processes keep using it; writers wait only while the file's bytes are copied."""
    from .progress import Progress
    if not _existing(args):
        return 2
    try:
        with open_store(args.path, "r") as db, \
                Progress(f"mmkv backup {args.path}", unit="bytes", lines=args.progress) as bar:
            result = db.backup(args.dest, bar.update)
    except FileExistsError as exc:
        return _usage(args, f"{args.dest}: {exc.strerror}")
    except (Error, OSError) as exc:
        print(f"mmkv backup: {args.path}: {exc}", file=sys.stderr)
        return 1
    print(f"{args.dest}: {result['keys']:,} keys, {result['file_size']:,} bytes (the store's file: "
          f"{result['source_file_size']:,}); writers waited {result['lock_seconds'] * 1000:.1f} ms while "
          f"{result['bytes_copied'] / 1e6:,.1f} MB were copied; {result['seconds']:.2f}s in all")
    return 0


def _sync_option(parser, full="the new value is on disk before it is printed"):
    parser.add_argument("--sync", choices=("full", "none"), default="full",
                        help=f"full (default): {full}; none: survives a crash of this process, not power loss")


def _progress_option(parser):
    parser.add_argument("--progress", action="store_true",
                        help="report progress on stderr also when it is not a terminal (a bar is drawn on a terminal)")


def _key_options(parser, json_output: bool):
    parser.add_argument("--hex", action="store_true", help="keys and values are given (and shown) as hex")
    if json_output:
        parser.add_argument("--json", action="store_true",
                            help="JSON lines: text as \"key\"/\"value\", other bytes as base64 \"key_b64\"/\"value_b64\"")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmkv", description="mmkv: memory-mapped, process-shared key-value store")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="write, read and audit a small store in the current folder")
    d.add_argument("path", nargs="?", default="demo.mmkv")
    d.add_argument("-n", type=int, default=10000, help="keys to write (default 10000)")
    d.set_defaults(func=cmd_demo)
    c = sub.add_parser("check", help="audit a store file without changing it; exit 0 when sound, 1 when not")
    c.add_argument("path")
    c.add_argument("--repair", action="store_true",
                   help="open it for writing and run recovery when the file needs it or the audit fails")
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
    g = sub.add_parser("get", help="print the value of KEY (exit 1 if absent)")
    g.add_argument("path")
    g.add_argument("key")
    _namespace_option(g)
    _key_options(g, json_output=True)
    g.set_defaults(func=cmd_get)
    pu = sub.add_parser("put", help="set KEY to VALUE ('-': read the value from stdin)")
    pu.add_argument("path")
    pu.add_argument("key")
    pu.add_argument("value")
    pu.add_argument("--ttl", type=float, metavar="SECONDS", help="the key expires this many seconds from now")
    _namespace_option(pu, " (created if absent)")
    _key_options(pu, json_output=False)
    _sync_option(pu)
    pu.set_defaults(func=cmd_put)
    de = sub.add_parser("del", help="delete KEY (exit 1 if absent)")
    de.add_argument("path")
    de.add_argument("key")
    _namespace_option(de)
    _key_options(de, json_output=False)
    _sync_option(de)
    de.set_defaults(func=cmd_del)
    ls = sub.add_parser("ls", help="list keys, streamed (in hash order, not sorted)")
    ls.add_argument("path")
    ls.add_argument("--prefix", help="only keys that start with this")
    ls.add_argument("--limit", type=int, help="at most this many keys")
    ls.add_argument("--values", action="store_true", help="values too (tab-separated, or in the JSON)")
    _namespace_option(ls)
    ns = sub.add_parser("namespaces", help="list the namespaces (named sub-stores) of a store and their key counts")
    ns.add_argument("path")
    ns.add_argument("--json", action="store_true", help="one JSON object per namespace")
    ns.set_defaults(func=cmd_namespaces)
    _key_options(ls, json_output=True)
    ls.set_defaults(func=cmd_ls)
    stt = sub.add_parser("stats", help="keys, bytes, index and space figures of a store")
    stt.add_argument("path")
    stt.add_argument("--json", action="store_true", help="one JSON object")
    stt.set_defaults(func=cmd_stats)
    du = sub.add_parser("dump", help="write every record as JSON lines (or Redis commands) to stdout, streamed")
    du.add_argument("path")
    du.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    du.add_argument("--format", choices=("json", "redis"), default="json",
                    help="json (default): one object per line, text as \"key\"/\"value\", other bytes as base64 "
                         "\"key_b64\"/\"value_b64\"; redis: SET commands in the Redis protocol, for redis-cli --pipe")
    du.add_argument("--prefix", help="only keys that start with this")
    du.add_argument("--hex", action="store_true", help="--prefix is given as hex")
    _namespace_option(du)
    _progress_option(du)
    du.set_defaults(func=cmd_dump)
    lo = sub.add_parser("load", help="write JSON-line records (as dump writes them) into a store")
    lo.add_argument("path")
    lo.add_argument("file", nargs="?", help="input file (default, or '-': stdin)")
    _namespace_option(lo, " (created if absent)")
    _progress_option(lo)
    _sync_option(lo, full="everything loaded is on disk when the command exits (one sync at the end, also "
                          "after a bad line)")
    lo.set_defaults(func=cmd_load)
    bk = sub.add_parser("backup", help="write a point-in-time, compact, audited copy to DEST while others keep "
                                       "writing (writers wait only while the bytes are copied)")
    bk.add_argument("path")
    bk.add_argument("dest", help="the new file (never overwritten)")
    _progress_option(bk)
    bk.set_defaults(func=cmd_backup)
    sub.add_parser("torture", help="crash-durability runs: 'kill PATH --kills N' or 'powerloss DIR --images N' "
                                   "(see mmkv torture --help)")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["torture"]:          # its own parser, options and help included
        from .crashkit import torture
        return torture.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:                 # `mmkv ls PATH | head`: the reader has had enough
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())   # (Python's flush at exit would raise again)
        return 0
