"""One throwaway Ceph cluster with a RADOS Gateway for the whole session
(``blksnap/tools/rgw.py``): started at the first test that asks for it,
stopped at the end of the session whatever happens; skipped, with the
reason, only where Ceph is not installed and cannot be."""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from typing import Any

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
def s3_credentials(monkeypatch: pytest.MonkeyPatch, gateway: rgw.Gateway) -> rgw.Gateway:
    """The gateway's credentials in the environment, as a user would give
    them; no configuration file of this machine read; no endpoint from it."""
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "BLKSNAP_S3_ENDPOINT", "AWS_PROFILE",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", gateway.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", gateway.secret_key)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return gateway


@pytest.fixture
def s3env(s3_credentials: rgw.Gateway, monkeypatch: pytest.MonkeyPatch) -> rgw.Gateway:
    """Credentials, region and endpoint in the environment: what every S3
    client here, blksnap's CLI and the blksnapd a test starts read."""
    monkeypatch.setenv("AWS_DEFAULT_REGION", "default")
    monkeypatch.setenv("BLKSNAP_S3_ENDPOINT", s3_credentials.endpoint)
    return s3_credentials


@pytest.fixture
def bucket(gateway: rgw.Gateway) -> Iterator[str]:
    """A new bucket of its own for the test, emptied and removed after it."""
    client: Any = gateway.client()
    name = f"blksnap-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    try:
        yield name
    finally:
        empty_bucket(client, name)


def empty_bucket(client: Any, name: str) -> None:
    """Remove a bucket and everything in it (objects, unfinished uploads)."""
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=name):
        for up in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=up["Key"], UploadId=up["UploadId"])
    keys = [
        {"Key": o["Key"]}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name)
        for o in page.get("Contents", [])
    ]
    for i in range(0, len(keys), 1000):
        client.delete_objects(Bucket=name, Delete={"Objects": keys[i : i + 1000]})
    client.delete_bucket(Bucket=name)


def objects_of(s3env: rgw.Gateway, bucket: str, prefix: str = "") -> dict[str, bytes]:
    """Every object under ``prefix`` with its bytes."""
    client: Any = s3env.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = client.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()
    return out
