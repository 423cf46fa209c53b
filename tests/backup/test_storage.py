"""What every repository storage does, the same way: :class:`StorageContract`
holds the tests, each run here on a local directory (:class:`DirStorage`)
and in ``tests/s3/test_storage.py`` on a bucket of a real RADOS Gateway, so
that the two implementations are shown to agree."""

from __future__ import annotations

import errno
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blksnap.backup.backends import open_storage
from blksnap.backup.storage import DirStorage, Entry, Storage
from blksnap.errors import InvalidArgument, NotFound


class StorageContract:
    """Tests of the :class:`Storage` interface; a subclass gives the fixture
    ``storage`` (an empty storage)."""

    def test_put_get_and_overwrite(self, storage: Storage) -> None:
        storage.put("a/b/c", b"first")
        assert storage.get("a/b/c") == b"first"
        storage.put("a/b/c", b"second, longer")
        assert storage.get("a/b/c") == b"second, longer"
        storage.put("a/b/c", b"")
        assert storage.get("a/b/c") == b""
        storage.put("top", memoryview(b"xyz0123")[:3], durable=False)
        storage.flush(dirs=True)
        assert storage.get("top") == b"xyz"

    def test_missing_object(self, storage: Storage) -> None:
        storage.put("there/one", b"1")
        for read in (
            lambda: storage.get("there/two"),
            lambda: storage.get("elsewhere/x"),
            lambda: storage.get_range("there/two", 0, 10),
            lambda: storage.get_range("there/two", 0, 0),
        ):
            with pytest.raises(NotFound) as exc:
                read()
            assert exc.value.errno == errno.ENOENT
        assert storage.stat("there/two") is None
        assert storage.touch("there/two") is None

    def test_get_range(self, storage: Storage) -> None:
        data = bytes(range(256)) * 4
        storage.put("blob", data)
        assert storage.get_range("blob", 0, 10) == data[:10]
        assert storage.get_range("blob", 100, 300) == data[100:400]
        assert storage.get_range("blob", 1000, 100) == data[1000:]  # fewer at the end
        assert storage.get_range("blob", 1023, 1) == data[1023:]
        assert storage.get_range("blob", 1024, 10) == b""  # at the end
        assert storage.get_range("blob", 5000, 10) == b""  # past it
        assert storage.get_range("blob", 10, 0) == b""
        storage.put("empty", b"")
        assert storage.get_range("empty", 0, 10) == b""

    def test_put_if_absent(self, storage: Storage) -> None:
        assert storage.put_if_absent("m/manifest", b"mine") is True
        assert storage.put_if_absent("m/manifest", b"theirs") is False
        assert storage.put_if_absent("m/manifest", b"mine") is False
        assert storage.get("m/manifest") == b"mine"
        assert storage.put_if_absent("m/other", memoryview(b"x"), durable=False) is True
        storage.flush()

    def test_put_if_absent_from_many_threads_makes_one(self, storage: Storage) -> None:
        start = threading.Barrier(8)

        def race(i: int) -> bool:
            start.wait()
            return storage.put_if_absent("race/key", f"writer {i}".encode())

        with ThreadPoolExecutor(8) as pool:
            made = list(pool.map(race, range(8)))
        assert made.count(True) == 1
        assert storage.get("race/key") == f"writer {made.index(True)}".encode()

    def test_stat_and_delete(self, storage: Storage) -> None:
        before = storage.now()
        storage.put("s/obj", b"12345")
        entry = storage.stat("s/obj")
        assert entry is not None
        assert (entry.key, entry.size) == ("s/obj", 5)
        assert before - 2 <= entry.mtime <= storage.now() + 2
        touched = storage.touch("s/obj")
        assert touched is not None and touched.size == 5
        storage.delete("s/obj")
        assert storage.stat("s/obj") is None
        storage.delete("s/obj")  # nothing there: fine
        storage.delete("never/was")

    def test_list(self, storage: Storage) -> None:
        keys = ["chunks/ab/ab01", "chunks/ab/ab02", "chunks/ac/ac01", "chunks/b0/b001",
                "backups/1/manifest.json", "backups/1/dev.index", "REPO.json"]  # fmt: skip
        for i, key in enumerate(keys):
            storage.put(key, b"x" * i)
        got = list(storage.list("chunks/"))
        assert [e.key for e in got] == sorted(k for k in keys if k.startswith("chunks/"))
        assert all(isinstance(e, Entry) and e.size == keys.index(e.key) for e in got)
        assert [e.key for e in storage.list("chunks/a")] == [
            "chunks/ab/ab01", "chunks/ab/ab02", "chunks/ac/ac01"
        ]  # fmt: skip
        assert [e.key for e in storage.list("chunks/ab/ab0")] == [
            "chunks/ab/ab01",
            "chunks/ab/ab02",
        ]
        assert [e.key for e in storage.list("backups/1/")] == [
            "backups/1/dev.index", "backups/1/manifest.json"
        ]  # fmt: skip
        assert [e.key for e in storage.list("")] == sorted(keys)
        assert list(storage.list("nothing/")) == []
        assert list(storage.list("chunks/zz")) == []

    def test_list_dirs(self, storage: Storage) -> None:
        one, two = "backups/20260101T000000Z", "backups/20260102T000000Z"
        for key in (f"{one}/manifest.json", f"{two}/a.index", f"{two}/deeper/x",
                    "chunks/00/0001", "REPO.json"):  # fmt: skip
            storage.put(key, b"x")
        assert storage.list_dirs("backups/") == ["20260101T000000Z", "20260102T000000Z"]
        assert storage.list_dirs("backups/20260102T000000Z/") == ["deeper"]
        assert storage.list_dirs("") == ["backups", "chunks"]
        assert storage.list_dirs("chunks/") == ["00"]
        assert storage.list_dirs("nothing/") == []

    def test_listing_of_many(self, storage: Storage) -> None:
        """More keys than one page of a listing (1000 for S3)."""
        keys = [f"many/{i % 7}/{i:05d}" for i in range(1100)]
        with ThreadPoolExecutor(storage.parallelism) as pool:
            list(pool.map(lambda k: storage.put(k, k.encode()), keys))
        got = list(storage.list("many/"))
        assert [e.key for e in got] == sorted(keys)
        assert all(e.size == len(e.key) for e in got)
        assert storage.list_dirs("many/") == [str(i) for i in range(7)]

    def test_bad_keys(self, storage: Storage) -> None:
        for key in ("", "/abs", "a//b", "a/./b", "../up", "a/", "a/.."):
            with pytest.raises(InvalidArgument):
                storage.put(key, b"x")
            with pytest.raises(InvalidArgument):
                storage.get(key)

    def test_now_is_a_clock(self, storage: Storage) -> None:
        """The store's clock; here the store runs on this host, so it is ours."""
        first = storage.now()
        assert abs(first - time.time()) < 5
        time.sleep(0.05)
        assert storage.now() >= first

    def test_traffic_is_counted(self, storage: Storage) -> None:
        before = storage.traffic.snapshot()
        storage.put("t/obj", b"z" * 1000)
        assert storage.get("t/obj") == b"z" * 1000
        assert storage.get_range("t/obj", 0, 100) == b"z" * 100
        moved = storage.traffic.snapshot().since(before)
        assert moved.requests >= 3
        assert moved.bytes_sent >= 1000
        assert moved.bytes_received >= 1100
        assert moved.retries == 0


class TestDirStorage(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path: Path) -> DirStorage:
        return DirStorage(str(tmp_path / "repo"))


def test_open_storage_picks_by_address(tmp_path: Path) -> None:
    assert isinstance(open_storage(str(tmp_path)), DirStorage)
    with pytest.raises(InvalidArgument):
        open_storage("ftp://somewhere/repo")
