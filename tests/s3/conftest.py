"""One throwaway Ceph cluster with a RADOS Gateway for the whole session
(``blksnap/tools/rgw.py``): started at the first test that asks for it,
stopped at the end of the session whatever happens; skipped, with the
reason, only where Ceph is not installed and cannot be."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator

import pytest

from blksnap.tools import rgw


@pytest.fixture(scope="session")
def gateway() -> Iterator[rgw.Gateway]:
    why = rgw.why_not()
    if why:
        pytest.skip(why)
    pytest.importorskip("boto3", reason="boto3 is not installed (make setup installs it)")
    root = tempfile.mkdtemp(prefix="blksnap-rgw-", dir="/var/tmp")
    gw = rgw.Gateway.start(root)
    try:
        yield gw
    finally:
        gw.stop()
        import shutil

        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3env(gateway: rgw.Gateway, monkeypatch: pytest.MonkeyPatch) -> rgw.Gateway:
    """The AWS variables every S3 client here (and blksnap's CLI) reads."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", gateway.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", gateway.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "default")
    monkeypatch.setenv("BLKSNAP_S3_ENDPOINT", gateway.endpoint)
    for var in ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(var, raising=False)
    return gateway


@pytest.fixture
def bucket(s3env: rgw.Gateway) -> Iterator[str]:
    """A new bucket, emptied and removed after the test."""
    name = f"blksnap-{uuid.uuid4().hex[:12]}"
    client = s3env.client()
    client.create_bucket(Bucket=name)  # type: ignore[attr-defined]
    try:
        yield name
    finally:
        empty_bucket(client, name)


def empty_bucket(client: object, name: str) -> None:
    paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    for page in paginator.paginate(Bucket=name):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=name, Delete={"Objects": keys})  # type: ignore[attr-defined]
    client.delete_bucket(Bucket=name)  # type: ignore[attr-defined]


def objects_of(s3env: rgw.Gateway, bucket: str, prefix: str = "") -> dict[str, bytes]:
    client = s3env.client()
    out = {}
    paginator = client.get_paginator("list_objects_v2")  # type: ignore[attr-defined]
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()  # type: ignore[attr-defined]
            out[o["Key"]] = body
    return out
