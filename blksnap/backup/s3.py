"""A repository in a bucket of an S3-compatible object store.

``s3://BUCKET`` or ``s3://BUCKET/PREFIX``: key ``chunks/3f/3fa4...`` is the
object ``PREFIX/chunks/3f/3fa4...`` of ``BUCKET``. The same operations as a
local directory (:class:`blksnap.backup.storage.DirStorage`), with the same
meaning, over HTTP:

* ``put`` is one ``PutObject`` (the object is whole or absent, and durable
  once the call returns); above :data:`MULTIPART_THRESHOLD` it is a
  multipart upload of :data:`PART_SIZE` parts, a few at once, aborted if any
  fails.
* ``put_if_absent`` is a ``PutObject`` with ``If-None-Match: *``: the store
  refuses it (412) when the key exists, so of two writers exactly one makes
  the object. A PUT may be retried after its answer was lost although the
  store made the object: the retry then gets 412 for our own object. A 412
  on a retried attempt is therefore checked: if the object there has our
  size and our MD5 (its ETag) it is ours and the call says True. Chunk keys
  are content-addressed, so an object with our bytes *is* our object
  whoever wrote it.
* Up to :data:`MAX_PUT` (5 GiB, the most one PUT may carry)
  ``put_if_absent`` is one conditional PUT, whatever its size, because
  that is the only exclusive way every store offers. Beyond it, a
  multipart upload: the object is looked up first (HEAD) and the upload's
  completion carries ``If-None-Match: *`` too. AWS honours it there; Ceph
  16's gateway ignores it (the completion replaces an existing object), so
  on such a store two writers of the same key above 5 GiB may both succeed,
  the last one's bytes winning. No repository object comes near that size.
* ``put_if_match`` replaces an object only if its ETag is still the one the
  caller read (412 otherwise). The ETag is sent without its quotes: Ceph 16
  compares ``If-Match`` with the bare ETag and never matches the quoted
  form; AWS accepts both.
* Listings are ``ListObjectsV2``, 1000 keys a page, in key order.
* Every request is retried when the store is unreachable, times out or
  answers 5xx / 429 / SlowDown: exponential backoff with jitter, from
  :data:`BACKOFF` up to :data:`BACKOFF_MAX`, :data:`RETRIES` times; then
  ``EIO``. botocore's own retries are off (a retry botocore made would hide
  a lost answer from the put-if-absent check above).
* Final answers: 404 is ``ENOENT``, 403 ``EACCES`` (credentials refused or
  no right), any other 4xx ``EIO`` naming the object and the store's code.
  The bucket is looked at (HEAD) at first use: a missing bucket is
  ``ENOENT`` naming it, never taken for an empty repository. Buckets are
  made only when asked (:meth:`S3Storage.create_bucket`, when a repository is made).

Times: ``LastModified`` comes with millisecond precision in listings but in
whole seconds (an HTTP date) from HEAD, so :meth:`S3Storage.stat` gives
whole seconds (truncated: up to 1 s earlier than the same object's time in
a listing) and :meth:`S3Storage.now` takes the time of a probe object from
a listing. The store's clock is what counts, never the host's.

Endpoint, region and credentials: the ``endpoint`` argument, else
``BLKSNAP_S3_ENDPOINT``, else botocore's own (``AWS_ENDPOINT_URL_S3``,
``AWS_ENDPOINT_URL``, ``~/.aws/config``); region and credentials through
boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION``, ``~/.aws/credentials`` and ``~/.aws/config``,
instance roles). On any endpoint but AWS's own, buckets are addressed by
path (``http://HOST/BUCKET/KEY``), which a gateway on an IP address needs.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import boto3
import botocore.exceptions as bex
from botocore.config import Config

from blksnap.backup.storage import Entry, NoBucket, Storage, check_key
from blksnap.errors import BlksnapError, Exists, InvalidArgument, IOFailure, NotFound

log = logging.getLogger(__name__)

T = TypeVar("T")

MiB = 1 << 20

#: Where the store is when no ``endpoint`` is given (else botocore's own).
ENDPOINT_ENV = "BLKSNAP_S3_ENDPOINT"
#: Retries of a request after the first attempt (store unreachable, 5xx ...).
RETRIES = 6
#: The first retry waits about this long (seconds); each next one twice as
#: long, up to :data:`BACKOFF_MAX`; each wait is drawn between half and all
#: of that (jitter: clients that failed together do not retry together).
BACKOFF = 0.2
BACKOFF_MAX = 10.0
#: Seconds to connect, and to wait for an answer once the request is sent.
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0
#: Objects larger than this are put as a multipart upload of PART_SIZE parts.
MULTIPART_THRESHOLD = 64 * MiB
PART_SIZE = 16 * MiB
#: The smallest part S3 accepts (all but the last); the most parts of one upload.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000
#: Parts of one multipart upload sent at once.
PART_THREADS = 4
#: The largest object one PUT may carry; a conditional put up to this size is
#: one PUT (exclusive on every store).
MAX_PUT = 5 << 30

#: Error codes worth another try whatever their HTTP status. AWS answers 409
#: ConditionalRequestConflict to a conditional write racing another one.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "OperationAborted",
        "ConditionalRequestConflict",
    }
)
#: Failures on the way: no connection, a connection cut, a time-out, a body
#: cut short or damaged.
_TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    bex.ConnectionError,
    bex.HTTPClientError,
    bex.IncompleteReadError,
    *((bex.FlexibleChecksumError,) if hasattr(bex, "FlexibleChecksumError") else ()),
)


def parse_url(url: str) -> tuple[str, str]:
    """``s3://BUCKET[/PREFIX]`` -> (bucket, prefix without slashes at its ends)."""
    if not url.startswith("s3://"):
        raise InvalidArgument(f"{url}: not an s3://BUCKET[/PREFIX] address")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    if not bucket or "." in (bucket[0], bucket[-1]) or any(c.isspace() for c in bucket):
        raise InvalidArgument(f"{url}: no valid bucket name after s3://")
    if prefix:
        try:
            check_key(prefix)
        except InvalidArgument:
            raise InvalidArgument(f"{url}: bad prefix {prefix!r}") from None
    return bucket, prefix


class _Replaced(Exception):
    """The object changed between two ranged reads of it."""


def _total_of(content_range: str | None, got: int) -> int:
    """The object's size from a ranged answer's ``Content-Range: bytes a-b/TOTAL``
    (no header: the store sent the object whole)."""
    if not content_range or "/" not in content_range:
        return got
    tail = content_range.rsplit("/", 1)[1]
    return int(tail) if tail.isdigit() else got


def _status(exc: bex.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: bex.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or _status(exc))


def _describe(exc: bex.ClientError) -> str:
    message = exc.response.get("Error", {}).get("Message")
    text = f"{_code(exc)} (HTTP {_status(exc)})"
    return f"{text}: {message}" if message else text


def _transient(exc: bex.ClientError) -> bool:
    status = _status(exc)
    return status >= 500 or status == 429 or _code(exc) in _TRANSIENT_CODES


def _bare(etag: str) -> str:
    return etag.strip('"')


def _md5_etag(body: bytes, part_size: int | None) -> str:
    """The ETag a store gives an object with these bytes: their MD5, or for a
    multipart upload the MD5 of its parts' MD5s and ``-PARTS``."""
    if part_size is None:
        return hashlib.md5(body, usedforsecurity=False).hexdigest()
    view = memoryview(body)
    digests = [
        hashlib.md5(view[at : at + part_size], usedforsecurity=False).digest()
        for at in range(0, len(body), part_size)
    ]
    whole = hashlib.md5(b"".join(digests), usedforsecurity=False).hexdigest()
    return f"{whole}-{len(digests)}"


class S3Storage(Storage):
    """The objects of a repository in an S3 bucket, under an optional prefix
    (see the module docstring). Thread-safe: one boto3 client, shared.

    ``client``: a boto3 S3 client to use instead of making one (the storage
    then leaves it open on :meth:`close`). ``retries``, ``backoff``,
    ``backoff_max``, ``multipart_threshold``, ``part_size``, ``max_put``
    override the module's defaults of the same names."""

    atomic_puts = True
    local_path = None
    parallelism = 16

    def __init__(
        self,
        url: str,
        endpoint: str | None = None,
        *,
        client: Any = None,
        retries: int = RETRIES,
        backoff: float = BACKOFF,
        backoff_max: float = BACKOFF_MAX,
        multipart_threshold: int = MULTIPART_THRESHOLD,
        part_size: int = PART_SIZE,
        max_put: int = MAX_PUT,
    ) -> None:
        super().__init__()
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}" + (f"/{self.prefix}" if self.prefix else "")
        self._base = f"{self.prefix}/" if self.prefix else ""
        if part_size < MIN_PART_SIZE:
            raise InvalidArgument(f"part size {part_size} is below S3's minimum {MIN_PART_SIZE}")
        self.retries = retries
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.multipart_threshold = max(multipart_threshold, part_size)
        self.part_size = part_size
        self.max_put = max_put
        self._owns_client = client is None
        if client is None:
            client = self._make_client(endpoint or os.environ.get(ENDPOINT_ENV) or None)
        self.client: Any = client
        self.endpoint: str = str(client.meta.endpoint_url)
        self._bucket_seen = False
        # Bytes of every answer's body but an object's (counted where read).
        self._hook_id = f"blksnap-traffic-{id(self)}"
        client.meta.events.register("after-call.s3", self._count_answer, unique_id=self._hook_id)

    def _make_client(self, endpoint: str | None) -> Any:
        """A client of its own session (boto3's default one is not safe to
        share between threads making clients). Buckets addressed by path on
        any endpoint but AWS's own, wherever the endpoint came from (the
        argument, ``AWS_ENDPOINT_URL``, ``~/.aws/config``): a gateway on an
        IP address or a name without wildcard DNS knows no other way."""

        def make(style: str) -> Any:
            config = Config(
                s3={"addressing_style": style},
                max_pool_connections=self.parallelism + PART_THREADS + 4,
                connect_timeout=CONNECT_TIMEOUT,
                read_timeout=READ_TIMEOUT,
                retries={"total_max_attempts": 1, "mode": "standard"},
                tcp_keepalive=True,
            )
            return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)

        if endpoint:
            return make("path")
        client = make("auto")
        if ".amazonaws.com" in str(client.meta.endpoint_url):
            return client
        client.close()
        return make("path")

    # -- requests --------------------------------------------------------------

    def where(self, key: str | None = None) -> str:
        """``s3://BUCKET/PREFIX/KEY``, for messages."""
        return f"{self.url}/{key}" if key else self.url

    def _key(self, key: str) -> str:
        return self._base + check_key(key)

    def _count_answer(self, http_response: Any = None, model: Any = None, **_: Any) -> None:
        if http_response is None or model is None or model.has_streaming_output:
            return
        self.traffic.count(requests=0, received=len(http_response.content or b""))

    def _delay(self, attempt: int) -> float:
        top = min(self.backoff_max, self.backoff * 2 ** (attempt - 1))
        return top / 2 + random.uniform(0, top / 2)

    def _call(self, op: str, key: str | None, fn: Callable[[int], T], sent: int = 0) -> T:
        """``fn(attempt)`` (attempts from 1), again while the failure is one
        worth another try and tries are left; then EIO. An answer that is
        final (4xx) is raised as botocore's ClientError for the caller to
        read; no credentials at all is EACCES."""
        attempt = 0
        while True:
            attempt += 1
            self.traffic.count(requests=1, sent=sent)
            try:
                return fn(attempt)
            except bex.ClientError as exc:
                if not _transient(exc):
                    raise
                what = _describe(exc)
            except _TRANSIENT_ERRORS as exc:
                what = str(exc) or type(exc).__name__
            except (bex.NoCredentialsError, bex.PartialCredentialsError) as exc:
                raise BlksnapError(
                    f"{self.where(key)}: {op}: {exc} (AWS_ACCESS_KEY_ID and"
                    " AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials)",
                    errno.EACCES,
                ) from None
            if attempt > self.retries:
                raise IOFailure(f"{self.where(key)}: {op}: {what} after {attempt} attempts")
            delay = self._delay(attempt)
            log.debug("%s: %s: %s; again in %.2f s", self.where(key), op, what, delay)
            self.traffic.retried()
            time.sleep(delay)

    def _error(self, exc: bex.ClientError, op: str, key: str | None) -> BlksnapError:
        """The blksnap error for a store's final answer."""
        code, status = _code(exc), _status(exc)
        if code == "NoSuchBucket":
            return self._no_bucket()
        if status == 404 or code in ("NoSuchKey", "NotFound"):
            return NotFound(f"{self.where(key)}: no such object")
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return BlksnapError(
                f"{self.where(key)}: {op}: access denied: {_describe(exc)}", errno.EACCES
            )
        return IOFailure(f"{self.where(key)}: {op}: {_describe(exc)}")

    def _no_bucket(self) -> NotFound:
        return NoBucket(
            f"s3://{self.bucket}: no such bucket at {self.endpoint}"
            " (the first 'blksnap backup' or 'blksnap key create' into it makes it)"
        )

    def _ready(self) -> None:
        """At first use: is the bucket there and may we use it? (A missing
        bucket would otherwise look like a missing object to a HEAD.)"""
        if self._bucket_seen:
            return
        try:
            self._call("HEAD bucket", None, lambda _: self.client.head_bucket(Bucket=self.bucket))
        except bex.ClientError as exc:
            if _status(exc) == 404:
                raise self._no_bucket() from None
            raise self._error(exc, "HEAD bucket", None) from None
        self._bucket_seen = True

    def create_bucket(self) -> None:
        """Make the bucket unless it exists and is ours (when a repository is made)."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        region = self.client.meta.region_name
        # AWS wants the region named, except its first one; a gateway of its
        # own endpoint takes the default placement.
        if region and region != "us-east-1" and ".amazonaws.com" in self.endpoint:
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._call("create bucket", None, lambda _: self.client.create_bucket(**kwargs))
        except bex.ClientError as exc:
            code = _code(exc)
            if code == "BucketAlreadyExists":
                raise Exists(f"s3://{self.bucket}: the bucket belongs to someone else") from None
            if code != "BucketAlreadyOwnedByYou":
                raise self._error(exc, "create bucket", None) from None
        self._bucket_seen = True

    # -- reading ---------------------------------------------------------------

    def _read(self, answer: dict[str, Any]) -> bytes:
        data: bytes = answer["Body"].read()
        self.traffic.count(requests=0, received=len(data))
        return data

    def get(self, key: str) -> bytes:
        """The object; one request up to :attr:`part_size`, a larger one in
        ranged parts, a few at once (each part checked against the first
        part's ETag: an object replaced meanwhile is read again whole)."""
        name = self._key(key)
        self._ready()
        first_span = f"bytes=0-{self.part_size - 1}"
        for _ in range(3):
            try:
                answer, first = self._call("GET", key, lambda _: self._ranged(name, first_span))
            except bex.ClientError as exc:
                if _status(exc) != 416:
                    raise self._error(exc, "GET", key) from None
                return self._get_whole(key, name)  # an empty object has no byte 0
            total = _total_of(answer.get("ContentRange"), len(first))
            if total <= len(first):
                return first
            try:
                etag = _bare(str(answer["ETag"]))
                return first + self._get_rest(key, name, etag, len(first), total)
            except _Replaced:
                continue
        raise IOFailure(f"{self.where(key)}: GET: the object changed while it was read")

    def _ranged(self, name: str, span: str) -> tuple[dict[str, Any], bytes]:
        answer = self.client.get_object(Bucket=self.bucket, Key=name, Range=span)
        return answer, self._read(answer)

    def _get_whole(self, key: str, name: str) -> bytes:
        try:
            return self._call(
                "GET",
                key,
                lambda _: self._read(self.client.get_object(Bucket=self.bucket, Key=name)),
            )
        except bex.ClientError as exc:
            raise self._error(exc, "GET", key) from None

    def _get_rest(self, key: str, name: str, etag: str, start: int, total: int) -> bytes:
        spans = [(o, min(total, o + self.part_size)) for o in range(start, total, self.part_size)]

        def part(span: tuple[int, int]) -> bytes:
            lo, hi = span
            try:
                return self._call(
                    "GET",
                    key,
                    lambda _: self._read(
                        self.client.get_object(
                            Bucket=self.bucket, Key=name, Range=f"bytes={lo}-{hi - 1}", IfMatch=etag
                        )
                    ),
                )
            except bex.ClientError as exc:
                if _status(exc) == 412:
                    raise _Replaced() from None
                raise self._error(exc, "GET", key) from None

        with ThreadPoolExecutor(PART_THREADS, thread_name_prefix="blksnap-s3-get") as pool:
            return b"".join(pool.map(part, spans))

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise InvalidArgument(f"{self.where(key)}: bad range {offset}+{length}")
        if length == 0:  # "bytes=N-(N-1)" is no range: the store would send it all
            if self.stat(key) is None:
                raise NotFound(f"{self.where(key)}: no such object")
            return b""
        name = self._key(key)
        self._ready()
        span = f"bytes={offset}-{offset + length - 1}"
        try:
            return self._call(
                "GET",
                key,
                lambda _: self._read(
                    self.client.get_object(Bucket=self.bucket, Key=name, Range=span)
                ),
            )
        except bex.ClientError as exc:
            if _status(exc) == 416:  # it starts at or past the end (the object exists)
                return b""
            raise self._error(exc, "GET", key) from None

    def _head(self, key: str) -> dict[str, Any] | None:
        name = self._key(key)
        self._ready()
        try:
            answer: dict[str, Any] = self._call(
                "HEAD", key, lambda _: self.client.head_object(Bucket=self.bucket, Key=name)
            )
        except bex.ClientError as exc:
            if _status(exc) == 404:
                return None
            raise self._error(exc, "HEAD", key) from None
        return answer

    def stat(self, key: str) -> Entry | None:
        """The object's entry (its time in whole seconds: HEAD's precision)."""
        head = self._head(key)
        if head is None:
            return None
        return Entry(key, int(head["ContentLength"]), head["LastModified"].timestamp())

    def etag(self, key: str) -> str | None:
        """The object's ETag without quotes (what :meth:`put_if_match` takes),
        or None if there is no object."""
        head = self._head(key)
        return None if head is None else _bare(str(head["ETag"]))

    def list(self, prefix: str) -> Iterator[Entry]:
        full = self._base + prefix
        cut = len(self._base)
        self._ready()
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._list_page(prefix, kwargs)
            for item in page.get("Contents", []):
                name = str(item["Key"])
                if name.endswith("/"):  # a "folder" some consoles make: no object of ours
                    continue
                yield Entry(name[cut:], int(item["Size"]), item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def _list_page(self, prefix: str, kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            page: dict[str, Any] = self._call(
                "LIST", prefix or None, lambda _: self.client.list_objects_v2(**kwargs)
            )
        except bex.ClientError as exc:
            raise self._error(exc, "LIST", prefix or None) from None
        return page

    def list_dirs(self, prefix: str) -> list[str]:
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        full = self._base + prefix
        self._ready()
        names: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._list_page(prefix, kwargs)
            for common in page.get("CommonPrefixes", []):
                name = str(common["Prefix"])[len(full) :].rstrip("/")
                if name:
                    names.append(name)
            if not page.get("IsTruncated"):
                return sorted(names)
            token = page["NextContinuationToken"]

    # -- writing ---------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> None:
        """Make or replace the object (durable when the call returns, whatever
        ``durable`` says)."""
        name = self._key(key)
        body = bytes(data) if not isinstance(data, bytes) else data
        self._ready()
        if len(body) > self.multipart_threshold:
            self._put_multipart(key, name, body, {})
            return
        try:
            self._call(
                "PUT",
                key,
                lambda _: self.client.put_object(Bucket=self.bucket, Key=name, Body=body),
                sent=len(body),
            )
        except bex.ClientError as exc:
            raise self._error(exc, "PUT", key) from None

    def put_if_absent(self, key: str, data: bytes | memoryview, *, durable: bool = True) -> bool:
        """Make the object unless one has that key; True if this call made it
        (or an earlier attempt of it whose answer was lost: see the module
        docstring)."""
        name = self._key(key)
        body = bytes(data) if not isinstance(data, bytes) else data
        self._ready()
        if len(body) > self.max_put:
            # A look first, then an upload whose completion is conditional
            # where the store honours it (not Ceph 16: a race is possible).
            if self._head(key) is not None:
                return False
            return self._put_multipart(key, name, body, {"IfNoneMatch": "*"})
        return self._put_conditional(key, name, body, {"IfNoneMatch": "*"})

    def put_if_match(self, key: str, data: bytes | memoryview, etag: str) -> bool:
        """Replace the object only if its ETag is still ``etag`` (as
        :meth:`etag` gave it); False if it changed or is gone."""
        name = self._key(key)
        body = bytes(data) if not isinstance(data, bytes) else data
        condition = {"IfMatch": _bare(etag)}
        self._ready()
        if len(body) > self.max_put:
            if self.etag(key) != _bare(etag):
                return False
            return self._put_multipart(key, name, body, condition)
        return self._put_conditional(key, name, body, condition)

    def _put_conditional(self, key: str, name: str, body: bytes, condition: dict[str, str]) -> bool:
        def attempt(n: int) -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=name, Body=body, **condition)
            except bex.ClientError as exc:
                if _status(exc) == 412 or (_status(exc) == 404 and "IfMatch" in condition):
                    # Refused; after a retry, maybe because an earlier
                    # attempt of ours made it and its answer was lost.
                    return n > 1 and self._holds(key, body, None)
                raise
            return True

        try:
            return self._call("PUT", key, attempt, sent=len(body))
        except bex.ClientError as exc:
            raise self._error(exc, "PUT", key) from None

    def _holds(self, key: str, body: bytes, part_size: int | None) -> bool:
        """Has the object there our bytes (size and ETag)?"""
        head = self._head(key)
        return (
            head is not None
            and int(head["ContentLength"]) == len(body)
            and _bare(str(head["ETag"])) == _md5_etag(body, part_size)
        )

    def _put_multipart(self, key: str, name: str, body: bytes, condition: dict[str, str]) -> bool:
        """A multipart upload of ``body``, parts a few at once; the upload is
        aborted if it does not complete. False if the store refused the
        completion's condition (412)."""
        part_size = max(self.part_size, -(-len(body) // MAX_PARTS))
        op = "multipart upload"
        try:
            upload_id: str = self._call(
                op,
                key,
                lambda _: self.client.create_multipart_upload(Bucket=self.bucket, Key=name)[
                    "UploadId"
                ],
            )
        except bex.ClientError as exc:
            raise self._error(exc, op, key) from None
        view = memoryview(body)
        starts = range(0, len(body), part_size)
        parts: list[dict[str, Any]] = []

        def send(number: int) -> dict[str, Any]:
            start = starts[number - 1]
            part = bytes(view[start : start + part_size])
            answer = self._call(
                f"{op} part {number}",
                key,
                lambda _: self.client.upload_part(
                    Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=part
                ),
                sent=len(part),
            )
            return {"PartNumber": number, "ETag": answer["ETag"]}

        def complete(n: int) -> bool:
            try:
                self.client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=name,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    **condition,
                )
            except bex.ClientError as exc:
                if _status(exc) == 412:
                    return n > 1 and self._holds(key, body, part_size)
                # An earlier attempt completed it and its answer was lost?
                if _code(exc) == "NoSuchUpload" and n > 1 and self._holds(key, body, part_size):
                    return True
                raise
            return True

        completed = False
        pool = ThreadPoolExecutor(
            max_workers=min(PART_THREADS, len(starts)), thread_name_prefix="blksnap-s3-part"
        )
        try:
            try:
                parts.extend(pool.map(send, range(1, len(starts) + 1)))
            finally:  # a part failed: the parts not yet begun are not sent
                pool.shutdown(wait=True, cancel_futures=True)
            completed = self._call(f"{op} completion", key, complete)
            return completed
        except bex.ClientError as exc:
            raise self._error(exc, op, key) from None
        finally:
            if not completed:
                self._abort(key, name, upload_id)

    def _abort(self, key: str, name: str, upload_id: str) -> None:
        try:
            self._call(
                "abort multipart upload",
                key,
                lambda _: self.client.abort_multipart_upload(
                    Bucket=self.bucket, Key=name, UploadId=upload_id
                ),
            )
        except (bex.ClientError, BlksnapError) as exc:
            # Parts left behind cost space until a lifecycle rule or a
            # later abort removes them; the upload's own failure matters more.
            log.warning("%s: cannot abort multipart upload %s: %s", self.where(key), upload_id, exc)

    def delete(self, key: str) -> None:
        name = self._key(key)
        self._ready()
        try:
            self._call(
                "DELETE", key, lambda _: self.client.delete_object(Bucket=self.bucket, Key=name)
            )
        except bex.ClientError as exc:
            if _status(exc) == 404 and _code(exc) != "NoSuchBucket":
                return
            raise self._error(exc, "DELETE", key) from None

    # -- the rest --------------------------------------------------------------

    def now(self) -> float:
        """The store's clock: the time it gives a probe object put in
        ``tmp/``, read from a listing (milliseconds; a HEAD or a ``Date``
        header gives whole seconds), then the probe is removed."""
        key = f"tmp/clock-{os.getpid()}-{secrets.token_hex(4)}"
        self.put(key, b"")
        try:
            for entry in self.list(key):
                if entry.key == key:
                    return entry.mtime
            # A store whose listings lag its writes: HEAD's whole seconds.
            found = self.stat(key)
            if found is None:
                raise IOFailure(f"{self.where(key)}: the clock probe just put is not there")
            return found.mtime
        finally:
            try:
                self.delete(key)
            except BlksnapError as exc:  # gc removes old probes
                log.warning("%s: cannot remove the clock probe: %s", self.url, exc.message)

    def flush(self, dirs: bool = False) -> None:
        """Nothing: a put is durable when it returns."""

    def close(self) -> None:
        """Close the connections (a client given to the storage stays open)."""
        self.client.meta.events.unregister("after-call.s3", unique_id=self._hook_id)
        if self._owns_client:
            self.client.close()


__all__ = [
    "BACKOFF",
    "BACKOFF_MAX",
    "ENDPOINT_ENV",
    "MAX_PUT",
    "MULTIPART_THRESHOLD",
    "PART_SIZE",
    "RETRIES",
    "S3Storage",
    "parse_url",
]
