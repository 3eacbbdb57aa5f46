"""Record checksums: CRC32C in format version 2, SipHash in version 1 files (still read and written).

Version 2 changed only the record checksum (SipHash-2-4 over ~130 bytes took ~60 ns of every get
and put; the SSE4.2 CRC32C takes ~15 ns).  A version 1 file keeps its version and its SipHash
checksums for its whole life; new files are version 2.
"""
import os
import random
import struct

import pytest

import mmkv
from mmkv.engine import layout, opening
from mmkv.engine.shim import ffi, lib


def crc(data: bytes, soft: bool = False) -> int:
    out = ffi.new("uint32_t *")
    fn = lib.mmkv_crc32c_soft if soft else lib.mmkv_crc32c
    assert fn(0, data, len(data), out) == 0
    return out[0]


def test_crc32c_is_the_castagnoli_crc():
    # check values of CRC-32C (iSCSI, RFC 3720 B.4): "123456789", 32 zero bytes, 32 0xff bytes
    assert crc(b"123456789") == 0xE3069283
    assert crc(bytes(32)) == 0x8A9136AA
    assert crc(b"\xff" * 32) == 0x62A8AB43
    rnd = random.Random(5)
    for n in list(range(0, 70)) + [127, 128, 129, 1000, 4099]:
        data = rnd.randbytes(n)
        assert crc(data) == crc(data, soft=True), n
        # continuing from a partial result gives the crc of the whole
        cut = n // 3
        out = ffi.new("uint32_t *")
        lib.mmkv_crc32c(crc(data[:cut]), data[cut:], n - cut, out)
        assert out[0] == crc(data), n


def make_store(path, version, monkeypatch):
    made = opening.new_identity

    def of_version(page_size):
        i = made(page_size)
        return layout.Identity(i.page_size, i.seed0, i.seed1, i.created_ns, version)

    monkeypatch.setattr(opening, "new_identity", of_version)
    db = mmkv.open(path, "n")
    monkeypatch.setattr(opening, "new_identity", made)
    return db


def header_version(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack_from("<I", f.read(16), 8)[0]


def value_offset(db, key):
    with db.lock():
        assert lib.mmkv_find(db._view, key, len(key)) == 0
        return db._view.val_off


@pytest.mark.parametrize("version", [1, 2])
def test_both_versions_are_read_written_and_checked(tmp_path, monkeypatch, version):
    p = str(tmp_path / f"v{version}.mmkv")
    db = make_store(p, version, monkeypatch)
    with db:
        for i in range(3000):                       # enough for an index split
            db[b"k%d" % i] = b"v%d" % i * (i % 50)
        db.incr(b"counter", 5)
        db.update({b"b%d" % i: b"w" * i for i in range(2000)})
        db.check()
    assert header_version(p) == version             # a version 1 file stays version 1
    with mmkv.open(p) as db:
        assert db[b"k2999"] == b"v2999" * 49 and db.incr(b"counter") == 6 and len(db) == 5001
        del db[b"k1"]
        db[b"k1"] = b"again"
        db.check()
        assert db.recover().dropped == 0            # recovery verifies every record: all sums agree
    assert header_version(p) == version


@pytest.mark.parametrize("version", [1, 2])
def test_a_damaged_value_fails_its_checksum_in_both_versions(tmp_path, monkeypatch, version):
    p = str(tmp_path / f"rot{version}.bad")
    with make_store(p, version, monkeypatch) as db:
        for i in range(100):
            db[b"k%d" % i] = b"value-%d" % i
        off = value_offset(db, b"k7")
    with open(p, "r+b") as f:
        f.seek(off + 3)
        f.write(b"#")
    with mmkv.open(p) as db:
        with pytest.raises(mmkv.CorruptionError):
            db[b"k7"]                               # the damaged bytes are never returned
        with pytest.raises(mmkv.CorruptionError):
            db.check()
        assert db.recover().dropped == 1
        assert b"k7" not in db and db[b"k8"] == b"value-8"
        db.check()
    os.rename(p, str(tmp_path / f"rot{version}-repaired.mmkv"))


def test_a_record_sum_with_high_bits_set_is_damage(tmp_path):
    """Version 2 stores the 32-bit CRC zero-extended: a word that agrees in its low half only
    (a flipped bit in the high half) is refused."""
    p = str(tmp_path / "high.bad")
    with mmkv.open(p, "n") as db:
        db[b"key"] = b"value"
        with db.lock():
            lib.mmkv_find(db._view, b"key", 3)
            rec = db._view.rec_off
    with open(p, "r+b") as f:
        f.seek(rec + 7)                             # the checksum word's top byte
        f.write(b"\x01")
    with mmkv.open(p) as db:
        with pytest.raises(mmkv.CorruptionError):
            db.check()
        assert db.recover().dropped == 1 and len(db) == 0
        db.check()
    os.rename(p, str(tmp_path / "high-repaired.mmkv"))
