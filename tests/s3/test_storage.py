"""The S3 storage of a repository, on a real Ceph RADOS Gateway: every test
of :class:`StorageContract` (the local directory passes the same ones, in
``tests/backup/test_storage.py``), then what only an object store has:
a missing bucket, credentials, multipart uploads, conditional puts whose
answer was lost, retries through a refused connection and through an outage
of the gateway."""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import Any

import pytest

from tests.backup.test_storage import StorageContract

pytest.importorskip("boto3", reason="boto3 is not installed (make setup installs it)")

from botocore.exceptions import ClientError, ConnectionClosedError

from blksnap.backup import s3 as s3mod
from blksnap.backup.backends import open_storage
from blksnap.backup.s3 import S3Storage
from blksnap.errors import BlksnapError, Exists, InvalidArgument, IOFailure, NotFound
from blksnap.tools import rgw
from tests.s3.conftest import empty_bucket

MiB = 1 << 20


@pytest.fixture
def make(s3_credentials: rgw.Gateway, bucket: str) -> Iterator[Callable[..., S3Storage]]:
    """Storages on the test's bucket (``prefix``, keyword arguments), closed after."""
    made: list[S3Storage] = []

    def new(prefix: str = "", **kwargs: Any) -> S3Storage:
        url = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
        kwargs.setdefault("endpoint", s3_credentials.endpoint)
        storage = S3Storage(url, **kwargs)
        made.append(storage)
        return storage

    yield new
    for storage in made:
        storage.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def uploads_left(gateway: rgw.Gateway, bucket: str) -> list[Any]:
    client: Any = gateway.client()
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def raw_etag(gateway: rgw.Gateway, bucket: str, key: str) -> str:
    client: Any = gateway.client()
    return str(client.head_object(Bucket=bucket, Key=key)["ETag"]).strip('"')


class TestS3Storage(StorageContract):
    @pytest.fixture(params=["", "repos/one"], ids=["bucket", "prefix"])
    def storage(self, request: pytest.FixtureRequest, make: Callable[..., S3Storage]) -> S3Storage:
        return make(request.param)


# ---------------------------------------------------------------------------
# addresses, endpoints, buckets, credentials


def test_addresses() -> None:
    assert s3mod.parse_url("s3://bkt") == ("bkt", "")
    assert s3mod.parse_url("s3://bkt/") == ("bkt", "")
    assert s3mod.parse_url("s3://bkt/a/b/") == ("bkt", "a/b")
    for bad in ("s3://", "s3:///x", "s3://bkt/a//b", "s3://bkt/../x", "http://bkt"):
        with pytest.raises(InvalidArgument):
            s3mod.parse_url(bad)


def test_url_attributes_and_open_storage(s3_credentials: rgw.Gateway, bucket: str) -> None:
    with closing(
        open_storage(f"s3://{bucket}/some/prefix/", endpoint=s3_credentials.endpoint)
    ) as storage:
        assert isinstance(storage, S3Storage)
        assert storage.url == f"s3://{bucket}/some/prefix"
        assert repr(storage) == f"<S3Storage s3://{bucket}/some/prefix>"
        assert storage.atomic_puts and storage.local_path is None
        assert storage.parallelism >= 8
        assert storage.client.meta.config.max_pool_connections > storage.parallelism
        storage.put("k", b"v")
        raw: Any = s3_credentials.client()
        assert raw.get_object(Bucket=bucket, Key="some/prefix/k")["Body"].read() == b"v"


def test_prefixes_keep_repositories_apart(make: Callable[..., S3Storage]) -> None:
    a, ab, top = make("a"), make("ab"), make()
    a.put("x/1", b"a")
    ab.put("x/1", b"ab")
    assert [e.key for e in a.list("")] == ["x/1"]
    assert a.get("x/1") == b"a" and ab.get("x/1") == b"ab"
    assert a.list_dirs("") == ["x"]
    assert [e.key for e in top.list("")] == ["a/x/1", "ab/x/1"]
    assert top.list_dirs("") == ["a", "ab"]


@pytest.mark.parametrize("variable", [s3mod.ENDPOINT_ENV, "AWS_ENDPOINT_URL"])
def test_endpoint_from_the_environment(
    s3_credentials: rgw.Gateway, bucket: str, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, s3_credentials.endpoint)
    with closing(S3Storage(f"s3://{bucket}")) as storage:
        assert storage.endpoint.rstrip("/") == s3_credentials.endpoint
        assert storage.client.meta.config.s3["addressing_style"] == "path"
        storage.put("k", b"v")
        assert storage.get("k") == b"v"


def test_missing_bucket_is_not_found(s3_credentials: rgw.Gateway) -> None:
    name = f"blksnap-absent-{uuid.uuid4().hex[:8]}"
    with closing(S3Storage(f"s3://{name}/repo", endpoint=s3_credentials.endpoint)) as storage:
        for use in (
            lambda: storage.stat("REPO.json"),
            lambda: storage.get("REPO.json"),
            lambda: list(storage.list("backups/")),
            lambda: storage.put("REPO.json", b"{}"),
        ):
            with pytest.raises(NotFound) as exc:
                use()
            assert exc.value.errno == errno.ENOENT
            assert f"s3://{name}: no such bucket" in str(exc.value)


def test_create_bucket_is_idempotent(s3_credentials: rgw.Gateway) -> None:
    name = f"blksnap-new-{uuid.uuid4().hex[:8]}"
    storage = S3Storage(f"s3://{name}", endpoint=s3_credentials.endpoint)
    try:
        storage.create_bucket()
        storage.create_bucket()
        assert storage.put_if_absent("REPO.json", b"{}") is True
        other = S3Storage(f"s3://{name}/x", endpoint=s3_credentials.endpoint)
        other.create_bucket()  # exists, ours: nothing to do
        assert other.list_dirs("") == []
        other.close()
    finally:
        storage.close()
        empty_bucket(s3_credentials.client(), name)


@pytest.mark.parametrize("which", ["secret", "access key"])
def test_bad_credentials_are_eacces(
    s3_credentials: rgw.Gateway, bucket: str, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    if which == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHACCESSKEY")
    with closing(S3Storage(f"s3://{bucket}", endpoint=s3_credentials.endpoint)) as storage:
        for use in (lambda: storage.get("k"), lambda: storage.put("k", b"v")):
            with pytest.raises(BlksnapError) as exc:
                use()
            assert exc.value.errno == errno.EACCES, exc.value
        assert storage.traffic.retries == 0


def test_no_credentials_are_eacces(
    s3_credentials: rgw.Gateway, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with closing(S3Storage(f"s3://{bucket}", endpoint=s3_credentials.endpoint)) as storage:
        with pytest.raises(BlksnapError) as exc:
            storage.get("k")
        assert exc.value.errno == errno.EACCES
        assert "AWS_ACCESS_KEY_ID" in str(exc.value)


def test_bucket_of_another_user_is_refused(s3_credentials: rgw.Gateway) -> None:
    """A bucket name taken: create_bucket says so (EEXIST), the data is not ours."""
    name = f"blksnap-taken-{uuid.uuid4().hex[:8]}"
    storage = S3Storage(f"s3://{name}", endpoint=s3_credentials.endpoint)
    storage.create_bucket()

    def taken(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "BucketAlreadyExists"}, "ResponseMetadata": {"HTTPStatusCode": 409}},
            "CreateBucket",
        )

    storage.client.meta.events.register("before-send.s3.CreateBucket", taken)
    try:
        with pytest.raises(Exists):
            storage.create_bucket()
    finally:
        storage.close()
        empty_bucket(s3_credentials.client(), name)


# ---------------------------------------------------------------------------
# multipart uploads


def test_multipart_round_trip(
    make: Callable[..., S3Storage], gateway: rgw.Gateway, bucket: str
) -> None:
    storage = make("r", multipart_threshold=5 * MiB, part_size=5 * MiB)
    data = os.urandom(12 * MiB + 123)
    storage.stat("nothing")  # the bucket looked at
    before = storage.traffic.snapshot()
    storage.put("backups/1/dev.index", data)
    moved = storage.traffic.snapshot().since(before)
    assert moved.requests == 5  # start, 3 parts, completion
    assert moved.bytes_sent == len(data)
    assert storage.get("backups/1/dev.index") == data
    assert (
        storage.get_range("backups/1/dev.index", 5 * MiB - 10, 20)
        == data[5 * MiB - 10 : 5 * MiB + 10]
    )
    assert raw_etag(gateway, bucket, "r/backups/1/dev.index").endswith("-3")
    entry = storage.stat("backups/1/dev.index")
    assert entry is not None and entry.size == len(data)
    assert uploads_left(gateway, bucket) == []
    # A small one is one PUT still.
    before = storage.traffic.snapshot()
    storage.put("small", b"s" * 1000)
    assert storage.traffic.snapshot().since(before).requests == 1


def test_a_large_object_is_read_in_ranged_parts(
    make: Callable[..., S3Storage], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get of an object over one part is a ranged GET per part (the first
    tells the size), several at once; an object replaced between two parts
    is read again whole, never a mix of two versions."""
    storage = make(multipart_threshold=5 * MiB, part_size=5 * MiB)
    data = os.urandom(12 * MiB + 7)
    storage.put("big", data)
    before = storage.traffic.snapshot()
    assert storage.get("big") == data
    assert storage.traffic.snapshot().since(before).requests == 3
    small = b"x" * 100
    storage.put("small", small)
    before = storage.traffic.snapshot()
    assert storage.get("small") == small
    assert storage.traffic.snapshot().since(before).requests == 1
    storage.put("empty", b"")
    assert storage.get("empty") == b""
    newer = os.urandom(11 * MiB)
    real = storage._get_rest
    swapped: list[bool] = []

    def replaced_meanwhile(*args: object) -> bytes:
        if not swapped:
            swapped.append(True)
            storage.put("big", newer)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(storage, "_get_rest", replaced_meanwhile)
    assert storage.get("big") == newer


def test_put_if_absent_up_to_5_gib_is_one_conditional_put(
    make: Callable[..., S3Storage], gateway: rgw.Gateway, bucket: str
) -> None:
    """Above the multipart threshold, a put-if-absent is still one PUT with
    If-None-Match (exclusive on every store), up to S3's 5 GiB."""
    storage = make(multipart_threshold=5 * MiB, part_size=5 * MiB)
    data = os.urandom(7 * MiB)
    assert storage.put_if_absent("index", data) is True
    assert "-" not in raw_etag(gateway, bucket, "index")
    assert storage.put_if_absent("index", b"other") is False
    assert storage.get("index") == data


def test_put_if_absent_as_multipart(
    make: Callable[..., S3Storage], gateway: rgw.Gateway, bucket: str
) -> None:
    """Beyond what one PUT carries: a look, then a multipart upload."""
    storage = make(multipart_threshold=5 * MiB, part_size=5 * MiB, max_put=5 * MiB)
    data = os.urandom(11 * MiB)
    assert storage.put_if_absent("big", data) is True
    assert raw_etag(gateway, bucket, "big").endswith("-3")
    assert storage.put_if_absent("big", os.urandom(11 * MiB)) is False
    assert storage.get("big") == data
    assert uploads_left(gateway, bucket) == []


def test_the_gateway_ignores_if_none_match_on_multipart_completion(
    gateway: rgw.Gateway, bucket: str
) -> None:
    """Ceph 16 completes a multipart upload over an existing object although
    the completion says If-None-Match: * (AWS refuses it, 412). Hence the
    look before a multipart put-if-absent; if this fails, the gateway has
    learnt it and the look could go."""
    client: Any = gateway.client()
    client.put_object(Bucket=bucket, Key="k", Body=b"first")
    up = client.create_multipart_upload(Bucket=bucket, Key="k")
    part = client.upload_part(
        Bucket=bucket, Key="k", UploadId=up["UploadId"], PartNumber=1, Body=b"second"
    )
    client.complete_multipart_upload(
        Bucket=bucket,
        Key="k",
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
        IfNoneMatch="*",
    )
    assert client.get_object(Bucket=bucket, Key="k")["Body"].read() == b"second"


def test_failed_multipart_upload_is_aborted(
    make: Callable[..., S3Storage], gateway: rgw.Gateway, bucket: str
) -> None:
    storage = make(multipart_threshold=5 * MiB, part_size=5 * MiB)

    def refuse_second(params: dict[str, Any], **_: Any) -> None:
        if params.get("PartNumber") == 2:
            raise ClientError(
                {"Error": {"Code": "InvalidPart"}, "ResponseMetadata": {"HTTPStatusCode": 400}},
                "UploadPart",
            )

    storage.client.meta.events.register("before-parameter-build.s3.UploadPart", refuse_second)
    with pytest.raises(IOFailure) as exc:
        storage.put("idx", os.urandom(12 * MiB))
    assert exc.value.errno == errno.EIO
    assert "idx" in str(exc.value) and "InvalidPart" in str(exc.value)
    assert storage.stat("idx") is None
    assert uploads_left(gateway, bucket) == []


def cut_once(storage: S3Storage, event: str, why: str = "lost answer") -> dict[str, int]:
    """The first ``event`` of the storage's client (``after-call...``: the
    store did it, the answer is lost; ``before-send...``: it never got
    there) fails as a closed connection; the count of those failures."""
    cut = {"n": 0}

    def once(**_: Any) -> None:
        if cut["n"] == 0:
            cut["n"] += 1
            raise ConnectionClosedError(endpoint_url=why)

    storage.client.meta.events.register(event, once)
    return cut


def test_multipart_completion_whose_answer_was_lost(make: Callable[..., S3Storage]) -> None:
    storage = make(multipart_threshold=5 * MiB, part_size=5 * MiB, max_put=5 * MiB, backoff=0.01)
    lost = cut_once(storage, "after-call.s3.CompleteMultipartUpload")
    data = os.urandom(6 * MiB)
    assert storage.put_if_absent("big", data) is True
    assert lost["n"] == 1
    assert storage.traffic.retries == 1
    assert storage.get("big") == data


# ---------------------------------------------------------------------------
# conditional puts


def test_put_if_absent_whose_answer_was_lost(make: Callable[..., S3Storage]) -> None:
    """The store made the object, the answer never came: the retry gets 412
    for our own object, and the call still says it made it."""
    storage = make(backoff=0.01)
    lost = cut_once(storage, "after-call.s3.PutObject")
    assert storage.put_if_absent("chunks/ab/abcd", b"chunk bytes") is True
    assert lost["n"] == 1 and storage.traffic.retries == 1
    assert storage.get("chunks/ab/abcd") == b"chunk bytes"


def test_put_if_absent_retried_over_someone_elses_object(make: Callable[..., S3Storage]) -> None:
    """A first attempt that never reached the store, and a 412 on the retry
    for another writer's object: not ours, False."""
    storage = make(backoff=0.01)
    storage.put("manifest", b"theirs")
    cut = cut_once(storage, "before-send.s3.PutObject", "cut")
    assert storage.put_if_absent("manifest", b"mine") is False
    assert cut["n"] == 1
    assert storage.traffic.retries == 1
    assert storage.get("manifest") == b"theirs"


def test_put_if_match(make: Callable[..., S3Storage]) -> None:
    storage = make("p", backoff=0.01)
    assert storage.etag("head") is None
    assert storage.put_if_match("head", b"v0", "0123456789abcdef0123456789abcdef") is False
    assert storage.stat("head") is None
    storage.put("head", b"v1")
    first = storage.etag("head")
    assert first == hashlib.md5(b"v1").hexdigest()
    assert storage.put_if_match("head", b"v2", first) is True
    assert storage.put_if_match("head", b"v3", first) is False  # stale
    assert storage.get("head") == b"v2"
    second = storage.etag("head")
    assert second is not None
    assert storage.put_if_match("head", b"v3", f'"{second}"') is True  # quoted: the same
    # A replacement whose answer was lost: the retry's 412 is for our bytes.
    lost = cut_once(storage, "after-call.s3.PutObject")
    assert storage.put_if_match("head", b"v4", hashlib.md5(b"v3").hexdigest()) is True
    assert lost["n"] == 1
    assert storage.get("head") == b"v4"


# ---------------------------------------------------------------------------
# times and traffic


def test_now_has_milliseconds_and_stat_whole_seconds(make: Callable[..., S3Storage]) -> None:
    storage = make("c")
    nows = []
    for _ in range(3):
        t0 = time.time()
        now = storage.now()
        assert t0 - 2 <= now <= time.time() + 2
        nows.append(now)
        time.sleep(0.011)
    assert any(n != int(n) for n in nows)  # listings give milliseconds
    assert list(storage.list("tmp/")) == []  # the probes are gone
    storage.put("obj", b"x")
    listed = next(iter(storage.list("obj")))
    stat = storage.stat("obj")
    assert stat is not None
    assert stat.mtime == int(listed.mtime)  # HEAD: whole seconds, truncated


def test_traffic_counts_each_request(make: Callable[..., S3Storage]) -> None:
    storage = make("t")
    storage.put("a", b"1" * 1000)  # the bucket looked at, then the PUT
    assert storage.traffic.snapshot().requests == 2
    before = storage.traffic.snapshot()
    storage.get("a")
    storage.get_range("a", 10, 100)
    storage.stat("a")
    assert list(storage.list("")) != []
    storage.delete("a")
    moved = storage.traffic.snapshot().since(before)
    assert moved.requests == 5
    assert moved.bytes_sent == 0
    assert moved.bytes_received > 1100  # the bodies, and the listing's XML
    assert moved.retries == 0


# ---------------------------------------------------------------------------
# failures and retries


def test_final_errors_name_the_object(make: Callable[..., S3Storage]) -> None:
    storage = make("e", backoff=0.01)

    def refuse(**_: Any) -> None:
        raise ClientError(
            {"Error": {"Code": "InvalidRequest", "Message": "no"},
             "ResponseMetadata": {"HTTPStatusCode": 400}},
            "PutObject",
        )  # fmt: skip

    storage.client.meta.events.register("before-send.s3.PutObject", refuse)
    with pytest.raises(IOFailure) as exc:
        storage.put("x/y", b"1")
    assert exc.value.errno == errno.EIO
    assert str(exc.value).startswith("EIO: s3://") and "/e/x/y: PUT: InvalidRequest" in str(
        exc.value
    )
    assert storage.traffic.retries == 0


def test_server_errors_are_retried(make: Callable[..., S3Storage]) -> None:
    storage = make(backoff=0.01)
    storage.put("k", b"v")
    failures = {"n": 0}

    def busy(**_: Any) -> None:
        if failures["n"] < 2:
            failures["n"] += 1
            raise ClientError(
                {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}},
                "GetObject",
            )

    storage.client.meta.events.register("before-send.s3.GetObject", busy)
    assert storage.get("k") == b"v"
    assert storage.traffic.retries == 2


def test_refused_connection_gives_eio_after_the_retries(s3_credentials: rgw.Gateway) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with closing(S3Storage("s3://bucket/repo", endpoint=url, retries=2, backoff=0.01)) as storage:
        with pytest.raises(IOFailure) as exc:
            storage.get("REPO.json")
        assert exc.value.errno == errno.EIO
        assert "s3://bucket/repo" in str(exc.value) and "after 3 attempts" in str(exc.value)
        counted = storage.traffic.snapshot()
        assert (counted.requests, counted.retries) == (3, 2)


def test_a_put_waits_out_an_outage_of_the_gateway(
    make: Callable[..., S3Storage], gateway: rgw.Gateway
) -> None:
    storage = make("o", retries=30, backoff=0.1, backoff_max=0.5)
    storage.put("before", b"1")
    data = os.urandom(MiB)
    outcome: dict[str, Any] = {}

    def put() -> None:
        try:
            outcome["made"] = storage.put_if_absent("during", data)
        except BaseException as exc:
            outcome["error"] = exc

    gateway.stop_gateway()
    try:
        writer = threading.Thread(target=put)
        writer.start()
        time.sleep(2)
        assert writer.is_alive()  # still trying
    finally:
        gateway.start_gateway()
    writer.join(60)
    assert not writer.is_alive()
    assert outcome == {"made": True}
    assert storage.traffic.retries >= 3
    assert storage.get("during") == data
    assert storage.get("before") == b"1"  # the cluster kept its data
