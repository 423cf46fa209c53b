"""The real S3 endpoint the S3 repository backend is built and tested on: a
throwaway Ceph RADOS Gateway. What the backend relies on is checked here
against it, so a gateway that lacks it fails here first: put-if-absent
(``If-None-Match: *`` -> 412), publication by a conditional put
(``If-Match`` on a stale ETag -> 412), ranged reads, listings paginated and
by delimiter, multipart upload and abort, batch delete."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest

from blksnap.tools import rgw
from tests.s3.conftest import empty_bucket

MiB = 1 << 20


def code_of(exc: BaseException) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code"))


@pytest.fixture
def bucket(gateway: rgw.Gateway):
    s3 = gateway.client()
    name = f"blksnap-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    try:
        yield s3, name
    finally:
        empty_bucket(s3, name)


def test_put_if_absent_and_conditional_publication(bucket) -> None:
    from botocore.exceptions import ClientError

    s3, b = bucket
    body = os.urandom(4 * MiB)
    s3.put_object(Bucket=b, Key="chunks/ab/abcd", Body=body, IfNoneMatch="*")
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=b, Key="chunks/ab/abcd", Body=b"other", IfNoneMatch="*")
    assert code_of(exc.value) == "PreconditionFailed"
    got = s3.get_object(Bucket=b, Key="chunks/ab/abcd")["Body"].read()
    assert hashlib.sha256(got).digest() == hashlib.sha256(body).digest()
    # Publication: replace only what one read (its ETag); a stale ETag fails.
    # This gateway (Ceph 16) compares a PUT's If-Match with the ETag *without*
    # its quotes: the standard quoted form never matches, so the backend
    # must send it bare (shown here, so that a gateway that changes fails).
    first = s3.put_object(Bucket=b, Key="head", Body=b"v1")["ETag"]
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=b, Key="head", Body=b"v2", IfMatch=first)
    assert code_of(exc.value) == "PreconditionFailed"
    second = s3.put_object(Bucket=b, Key="head", Body=b"v2", IfMatch=first.strip('"'))["ETag"]
    with pytest.raises(ClientError) as exc:
        s3.put_object(Bucket=b, Key="head", Body=b"v3", IfMatch=first.strip('"'))
    assert code_of(exc.value) == "PreconditionFailed"
    assert s3.get_object(Bucket=b, Key="head")["Body"].read() == b"v2"
    assert s3.head_object(Bucket=b, Key="head")["ETag"] == second


def test_ranged_reads_and_listings(bucket) -> None:
    s3, b = bucket
    body = bytes(range(256)) * 4096  # 1 MiB
    s3.put_object(Bucket=b, Key="blob", Body=body)
    part = s3.get_object(Bucket=b, Key="blob", Range="bytes=1000-5095")["Body"].read()
    assert part == body[1000:5096]
    for fan in ("00", "01", "ff"):
        for i in range(3):
            s3.put_object(Bucket=b, Key=f"chunks/{fan}/{fan}{i:062x}", Body=b"x")
    keys = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=b, Prefix="chunks/", PaginationConfig={"PageSize": 4}
        )
        for o in page.get("Contents", [])
    ]
    assert len(keys) == 9 and keys == sorted(keys)
    top = s3.list_objects_v2(Bucket=b, Prefix="chunks/", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == [
        "chunks/00/", "chunks/01/", "chunks/ff/"
    ]  # fmt: skip


def test_multipart_upload_and_abort(bucket) -> None:
    s3, b = bucket
    parts = [os.urandom(5 * MiB), os.urandom(5 * MiB), os.urandom(MiB)]
    up = s3.create_multipart_upload(Bucket=b, Key="index")
    done = [
        {"PartNumber": i + 1, "ETag": s3.upload_part(
            Bucket=b, Key="index", UploadId=up["UploadId"], PartNumber=i + 1, Body=p
        )["ETag"]}
        for i, p in enumerate(parts)
    ]  # fmt: skip
    s3.complete_multipart_upload(
        Bucket=b, Key="index", UploadId=up["UploadId"], MultipartUpload={"Parts": done}
    )
    assert s3.get_object(Bucket=b, Key="index")["Body"].read() == b"".join(parts)
    cut = s3.create_multipart_upload(Bucket=b, Key="cut")
    s3.upload_part(Bucket=b, Key="cut", UploadId=cut["UploadId"], PartNumber=1, Body=parts[0])
    s3.abort_multipart_upload(Bucket=b, Key="cut", UploadId=cut["UploadId"])
    assert s3.list_multipart_uploads(Bucket=b).get("Uploads", []) == []
    assert s3.list_objects_v2(Bucket=b, Prefix="cut").get("KeyCount") == 0


def test_the_gateway_runs_only_its_own_processes(gateway: rgw.Gateway) -> None:
    """Its monitor, OSD and gateway, each started with its own conf file
    (so that stopping it, by these pids, touches nothing else)."""
    pids = {name: p.pid for name, p in gateway.procs.items()}
    assert sorted(pids) == ["mon", "osd", "rgw"]
    for pid in pids.values():
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert str(gateway.conf).encode() in f.read().split(b"\0")
