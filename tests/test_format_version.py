"""Format version 3: a file that may hold a catalog of namespaces is refused by an mmkv that reads
only versions 1 and 2 (whose recovery would free the namespaces' blocks as leaked space).

New files are version 3.  A version 1 or 2 file keeps its version until its first catalog is
written; then its identity sector is rewritten once at version 3 (a version 1 file keeping its
SipHash record checksums: the SIPHASH_SUMS flag) and synced before the catalog exists.  "An mmkv
that reads only versions 1 and 2" is this one with layout.VERSION set to 2: the same check the
builds before namespaces make (``OLDEST_VERSION <= version <= VERSION``).
"""
import signal
import struct
import subprocess
import sys
import textwrap

import pytest

import mmkv
from mmkv.engine import layout
from mmkv.engine.shim import lib
from test_record_checksum import make_store      # a new store whose identity says an older version


def identity(path) -> tuple:
    """(version, flags) from the file's identity sector."""
    with open(path, "rb") as f:
        page = f.read(layout.HEADER_SIZE)
    return struct.unpack_from("<I", page, 8)[0], struct.unpack_from("<Q", page, 40)[0]


def opens_in_an_older_mmkv(path, monkeypatch) -> bool:
    """Whether an mmkv reading versions 1 and 2 only would open the file."""
    with monkeypatch.context() as m:
        m.setattr(layout, "VERSION", 2)
        try:
            mmkv.open(path, "r").close()
        except mmkv.VersionError:
            return False
    return True


def test_new_files_are_version_3_and_older_mmkvs_refuse_them(path, monkeypatch):
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
    assert layout.VERSION == 3 and identity(path) == (3, 0)
    assert not opens_in_an_older_mmkv(path, monkeypatch)
    with monkeypatch.context() as m:
        m.setattr(layout, "VERSION", 2)
        with pytest.raises(mmkv.VersionError, match="format version 3; this mmkv reads versions 1 to 2"):
            mmkv.open(path)


@pytest.mark.parametrize("how", ["namespace", "sequence", "queue"])
def test_a_version_2_file_becomes_version_3_with_its_first_namespace(tmp_path, monkeypatch, how):
    p = str(tmp_path / f"v2-{how}.mmkv")
    with make_store(p, 2, monkeypatch) as db:
        db.update((b"k%d" % i, b"v%d" % i) for i in range(2000))
        db.incr(b"counter", 7)
        db.check()
    assert identity(p) == (2, 0)
    assert opens_in_an_older_mmkv(p, monkeypatch)      # the control: before, older mmkvs read it
    with mmkv.open(p) as db:
        assert db[b"k5"] == b"v5"                        # plain use does not raise the version
    assert identity(p) == (2, 0)
    with mmkv.open(p) as db:
        if how == "namespace":
            db.namespace("users")[b"alice"] = b"1"
        elif how == "sequence":
            with mmkv.Sequence(db, "ids", block=1) as ids:
                assert ids.next() == 1
        else:
            with mmkv.Queue(db, "jobs") as jobs:
                jobs.put(b"job")
        assert db.engine.ident.version == 3 and db.engine.view.crc_sums == 1
        db.check()
    assert identity(p) == (3, 0)
    assert not opens_in_an_older_mmkv(p, monkeypatch)
    with mmkv.open(p) as db:
        assert len(db) == 2001 and db[b"k1999"] == b"v1999" and db.incr(b"counter") == 8
        assert db.recover().dropped == 0                # every record's CRC32C checksum still verifies
        db.check()


def test_a_version_1_file_keeps_its_siphash_checksums_at_version_3(tmp_path, monkeypatch):
    p = str(tmp_path / "v1.mmkv")
    with make_store(p, 1, monkeypatch) as db:
        db.update((b"k%d" % i, b"v%d" % i * 3) for i in range(3000))
        assert db.engine.view.crc_sums == 0
    assert identity(p) == (1, 0)
    with mmkv.open(p) as db:
        with mmkv.Sequence(db, "ids", block=1) as ids:
            assert ids.next() == 1
        db.namespace("extra")[b"x"] = b"y"
        db[b"written-after"] = b"z"
        db.check()
    assert identity(p) == (3, layout.SIPHASH_SUMS)
    assert not opens_in_an_older_mmkv(p, monkeypatch)
    with mmkv.open(p) as db:
        assert db.engine.ident.crc_sums is False and db.engine.view.crc_sums == 0
        assert db[b"k2999"] == b"v2999" * 3 and db[b"written-after"] == b"z"
        assert db.namespace("extra")[b"x"] == b"y"
        assert db.recover().dropped == 0                # old and new records: SipHash sums throughout
        with mmkv.Sequence(db, "ids", block=1) as ids:
            assert ids.next() == 2
        db.check()


def write_identity(path, ident):
    with open(path, "r+b") as f:
        f.seek(layout.OFF_IDENTITY)
        f.write(layout.build_identity(ident))


def test_unknown_identity_flags_are_refused_and_ignored_below_version_3(tmp_path, monkeypatch):
    p = str(tmp_path / "flags.mmkv")
    with mmkv.open(p) as db:
        db[b"k"] = b"v"
        ident = db.engine.ident
    write_identity(p, ident._replace(flags=1 << 7))    # a feature this mmkv does not know, resealed
    with pytest.raises(mmkv.VersionError, match="features this mmkv does not know"):
        mmkv.open(p)
    write_identity(p, ident)
    with mmkv.open(p) as db:
        assert db[b"k"] == b"v"
    q = str(tmp_path / "v2flags.mmkv")
    with make_store(q, 2, monkeypatch) as db:
        db[b"k"] = b"v"
        ident = db.engine.ident
    write_identity(q, ident._replace(flags=1 << 7))    # versions 1 and 2 never read the word
    with mmkv.open(q) as db:
        assert db[b"k"] == b"v" and db.engine.ident.flags == 0 and db.engine.view.crc_sums == 1


def test_a_version_3_identity_with_a_damaged_flags_word_fails_its_checksum(tmp_path):
    path = str(tmp_path / "flags.bad")                  # left damaged: the after-test check skips .bad
    with mmkv.open(path) as db:
        db[b"k"] = b"v"
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(struct.pack("<Q", layout.SIPHASH_SUMS))  # not resealed: damage, not a feature
    with pytest.raises(mmkv.ChecksumError):
        mmkv.open(path)


@pytest.mark.parametrize("failpoint", ["version.after_raise", "catalog.before_meta", "catalog.after_meta"])
def test_killed_while_a_version_2_file_gets_its_first_namespace(tmp_path, monkeypatch, failpoint):
    """SIGKILL after the identity is raised (before the catalog is written), or around the catalog's
    commit: the file opens, is version 3 (the identity is synced first), and holds the namespace
    or not, with every other record."""
    p = str(tmp_path / "v2kill.mmkv")
    with make_store(p, 2, monkeypatch) as db:
        db.update((b"k%d" % i, b"v") for i in range(500))
    code = textwrap.dedent(f"""
        import mmkv
        from mmkv.engine import failpoints
        db = mmkv.open({p!r})
        failpoints.arm({failpoint!r})
        db.namespace("users")[b"alice"] = b"1"
        print("survived")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stdout.decode() + out.stderr.decode()[-2000:]
    assert identity(p) == (3, 0)
    with mmkv.open(p) as db:
        db.check()
        assert len(db) == 500 and db.namespaces() in ([], ["users"])
        if db.namespaces():
            assert len(db.namespace("users")) == 0      # killed before its first key
    assert not opens_in_an_older_mmkv(p, monkeypatch)


def test_the_version_constants_match_the_header():
    assert (layout.VERSION, layout.OLDEST_VERSION, layout.NAMESPACES_VERSION) == (3, 1, 3)
    assert lib.MMKV_ID_KNOWN_FLAGS == layout.SIPHASH_SUMS == 1
