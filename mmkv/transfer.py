"""Moving data in and out of a store: JSON lines (dump, load) and the Redis protocol.

JSON lines: one object per record.  A key or value that is valid UTF-8 is a string under "key" /
"value"; any other bytes are base64 under "key_b64" / "value_b64".  Both forms are lossless, and
one line may mix them (a text key with a binary value).  ``load`` reads either form.  A key with
a deadline (see mmkv/expiry.py) carries "expires_at": its deadline in seconds since the epoch (a
number); ``load`` gives it the time left until then, and skips it when that has passed.

Redis protocol (RESP): ``*3 $3 SET $<n> <key> $<n> <value>`` per record, each part ending in CRLF,
binary-safe: the input ``redis-cli --pipe`` sends to a server (``mmkv dump --format redis PATH |
redis-cli --pipe``); a key with a deadline gets ``PXAT <milliseconds since the epoch>`` (Redis 6.2+).

Both directions stream: a dump holds one iteration batch of the store at a time (see
``Store.items``), a load one batch of LOAD_BATCH records (written with one ``update``, one lock
hold).
"""
import base64
import json

#: Records a load writes per update() call (one lock hold; the memory a load holds at once).
LOAD_BATCH = 10000
#: ... unless their keys and values pass this many bytes first.
LOAD_BATCH_BYTES = 8 << 20


def encode_field(name: str, data: bytes) -> dict:
    """{name: text} when data is UTF-8, else {name + "_b64": base64}: lossless either way."""
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        return {name + "_b64": base64.b64encode(data).decode("ascii")}


def decode_field(obj: dict, name: str) -> bytes:
    """The inverse of encode_field.  :raises ValueError: neither form is there, or bad base64."""
    if name in obj and isinstance(obj[name], str):
        return obj[name].encode("utf-8")
    if name + "_b64" in obj and isinstance(obj[name + "_b64"], str):
        try:
            return base64.b64decode(obj[name + "_b64"], validate=True)
        except ValueError as exc:          # binascii.Error
            raise ValueError(f"{name + '_b64'!r} is not base64 ({exc})") from None
    raise ValueError(f"no {name!r} (text) or {name + '_b64'!r} (base64) field")


def json_line(key: bytes, value: bytes, deadline: int = 0) -> bytes:
    """One record as a JSON line (UTF-8, newline-terminated); deadline: nanoseconds since the
    epoch, 0 for none."""
    obj = encode_field("key", key)
    obj.update(encode_field("value", value))
    if deadline:
        obj["expires_at"] = deadline / 1e9
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def resp_set(key: bytes, value: bytes, deadline: int = 0) -> bytes:
    """One record as a Redis SET command in the Redis protocol (with PXAT for a deadline)."""
    if deadline:
        at = b"%d" % -(-deadline // 1_000_000)          # milliseconds, rounded up: never earlier
        return b"*5\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$4\r\nPXAT\r\n$%d\r\n%b\r\n" % (
            len(key), key, len(value), value, len(at), at)
    return b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(key), key, len(value), value)


FORMATS = {"json": json_line, "redis": resp_set}


def dump(items, out, fmt: str = "json", prefix: bytes = b"", progress=None, deadlines=None) -> int:
    """Write every (key, value) of items whose key starts with prefix to the binary stream out
    in format fmt ("json" or "redis"); returns the number written.  deadlines: {key: deadline in
    nanoseconds} of the keys that have one.  ``progress.advance()`` is called per record read.
    :raises OSError: writing failed (BrokenPipeError included)."""
    encode = FORMATS[fmt]
    deadlines = deadlines or {}
    n = 0
    write = out.write
    for key, value in items:
        if progress is not None:
            progress.advance()
        if prefix and not key.startswith(prefix):
            continue
        write(encode(key, value, deadlines.get(key, 0)))
        n += 1
    return n


class LoadError(ValueError):
    """A line of a load's input is not a record; ``line`` is its number (from 1), ``loaded`` how
    many records were written before it (they stay)."""

    def __init__(self, message: str, line: int, loaded: int):
        super().__init__(message)
        self.line, self.loaded = line, loaded


def parse_line(raw: bytes, number: int):
    """(key, value, expires_at or None) of one JSON line.  :raises ValueError: not a record (says why)."""
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    expires = obj.get("expires_at")
    if expires is not None and (isinstance(expires, bool) or not isinstance(expires, (int, float))):
        raise ValueError(f"'expires_at' must be a number (seconds since the epoch), not {expires!r}")
    return decode_field(obj, "key"), decode_field(obj, "value"), expires


def load(lines, put_many, progress=None, put_expiring=None) -> int:
    """Read JSON-line records from lines (an iterable of bytes lines) and write them with
    put_many(list of pairs) in batches of LOAD_BATCH records or LOAD_BATCH_BYTES bytes; a record
    with "expires_at" goes to put_expiring(key, value, expires_at) instead (after the batch before
    it), which returns whether it wrote it (not when that time has passed); blank lines are
    skipped; returns the number written.  ``progress.advance(n)`` gets the bytes read.

    :raises LoadError: a line is not a record; every record before it was written (``loaded``
        says how many), none after it.
    """
    batch, size, loaded = [], 0, 0
    number = 0
    for number, raw in enumerate(lines, 1):
        if progress is not None:
            progress.advance(len(raw))
        if not raw.strip():
            continue
        try:
            key, value, expires = parse_line(raw, number)
            if expires is not None and put_expiring is None:
                raise ValueError("a record with 'expires_at', and no way to write one was given")
        except ValueError as exc:
            if batch:
                put_many(batch)
                loaded += len(batch)
            raise LoadError(f"line {number}: {exc}", number, loaded) from None
        if expires is not None:
            if batch:               # in order: a later line for the same key wins
                put_many(batch)
                loaded += len(batch)
                batch, size = [], 0
            loaded += bool(put_expiring(key, value, expires))
            continue
        batch.append((key, value))
        size += len(key) + len(value)
        if len(batch) >= LOAD_BATCH or size >= LOAD_BATCH_BYTES:
            put_many(batch)
            loaded += len(batch)
            batch, size = [], 0
    if batch:
        put_many(batch)
        loaded += len(batch)
    return loaded
