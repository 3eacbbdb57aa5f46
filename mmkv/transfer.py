"""Moving data in and out of a store: JSON lines (dump, load) and the Redis protocol.

JSON lines: one object per record.  A key or value that is valid UTF-8 is a string under "key" /
"value"; any other bytes are base64 under "key_b64" / "value_b64".  Both forms are lossless, and
one line may mix them (a text key with a binary value).  ``load`` reads either form.

Redis protocol (RESP): ``*3 $3 SET $<n> <key> $<n> <value>`` per record, each part ending in CRLF,
binary-safe: the input ``redis-cli --pipe`` sends to a server (``mmkv dump --format redis PATH |
redis-cli --pipe``).

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


def json_line(key: bytes, value: bytes) -> bytes:
    """One record as a JSON line (UTF-8, newline-terminated)."""
    obj = encode_field("key", key)
    obj.update(encode_field("value", value))
    return (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")


def resp_set(key: bytes, value: bytes) -> bytes:
    """One record as a Redis SET command in the Redis protocol."""
    return b"*3\r\n$3\r\nSET\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (len(key), key, len(value), value)


FORMATS = {"json": json_line, "redis": resp_set}


def dump(items, out, fmt: str = "json", prefix: bytes = b"", progress=None) -> int:
    """Write every (key, value) of items whose key starts with prefix to the binary stream out
    in format fmt ("json" or "redis"); returns the number written.  ``progress.advance()`` is
    called per record read.  :raises OSError: writing failed (BrokenPipeError included)."""
    encode = FORMATS[fmt]
    n = 0
    write = out.write
    for key, value in items:
        if progress is not None:
            progress.advance()
        if prefix and not key.startswith(prefix):
            continue
        write(encode(key, value))
        n += 1
    return n


class LoadError(ValueError):
    """A line of a load's input is not a record; ``line`` is its number (from 1), ``loaded`` how
    many records were written before it (they stay)."""

    def __init__(self, message: str, line: int, loaded: int):
        super().__init__(message)
        self.line, self.loaded = line, loaded


def parse_line(raw: bytes, number: int):
    """(key, value) of one JSON line.  :raises ValueError: not a record (says why)."""
    try:
        obj = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    return decode_field(obj, "key"), decode_field(obj, "value")


def load(lines, put_many, progress=None) -> int:
    """Read JSON-line records from lines (an iterable of bytes lines) and write them with
    put_many(list of pairs) in batches of LOAD_BATCH records or LOAD_BATCH_BYTES bytes; blank
    lines are skipped; returns the number written.  ``progress.advance(n)`` gets the bytes read.

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
            key, value = parse_line(raw, number)
        except ValueError as exc:
            if batch:
                put_many(batch)
                loaded += len(batch)
            raise LoadError(f"line {number}: {exc}", number, loaded) from None
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
