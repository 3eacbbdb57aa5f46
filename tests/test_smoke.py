import mmkv


def test_put_get_delete_reopen(path):
    with mmkv.open(path) as db:
        db[b"a"] = b"1"
        db["b"] = "2"
        assert db[b"a"] == b"1" and db[b"b"] == b"2"
        del db[b"a"]
        assert b"a" not in db and len(db) == 1
    with mmkv.open(path, "r") as db:
        assert dict(db.items()) == {b"b": b"2"}
