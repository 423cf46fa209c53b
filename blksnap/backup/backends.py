"""Which storage a repository URL names: a local directory, or
``s3://BUCKET/PREFIX`` in an S3-compatible object store
(:mod:`blksnap.backup.storage`, :mod:`blksnap.backup.s3`)."""

from __future__ import annotations

import os
from urllib.parse import unquote

from blksnap.backup.storage import DirStorage, Storage
from blksnap.errors import InvalidArgument


def is_s3(url: str | os.PathLike[str]) -> bool:
    return os.fspath(url).startswith("s3://")


def open_storage(url: str | os.PathLike[str], *, endpoint: str | None = None) -> Storage:
    """The storage at ``url``: ``s3://BUCKET[/PREFIX]`` (``endpoint``, else
    ``BLKSNAP_S3_ENDPOINT`` / ``AWS_ENDPOINT_URL``, for an S3-compatible
    service), or a local directory path."""
    url = os.fspath(url)
    if is_s3(url) and "?" in url:  # (a locator: see Repository.locator)
        url, _, query = url.partition("?")
        key, _, value = query.partition("=")
        if key != "endpoint" or not value:
            raise InvalidArgument(f"{url}: unknown option {query!r} (only endpoint=URL)")
        endpoint = endpoint or unquote(value)
    if is_s3(url):
        from blksnap.backup.s3 import S3Storage  # boto3 only when asked for

        return S3Storage(url, endpoint=endpoint)
    if "://" in url:
        raise InvalidArgument(
            f"{url}: unknown repository scheme (a directory, or s3://BUCKET/PREFIX)"
        )
    return DirStorage(url)
