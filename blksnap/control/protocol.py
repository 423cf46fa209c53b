"""The control protocol between ``blksnap`` (or :class:`blksnap.Client`) and
``blksnapd``: length-prefixed JSON over a Unix stream socket.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON, one object. A request is::

    {"version": 1, "id": 7, "op": "snapshot.take", "args": {"id": "...", "loop": true}}

and its reply carries the same ``id``, and either ``"ok": true, "result": ...``
or ``"ok": false, "error": "EBUSY", "errno": 16, "message": "..."``.

Every request is checked against the schema of its ``op`` before anything
runs: unknown ops (``ENOSYS``), unknown or missing arguments and wrong types
(``EINVAL``), a version the daemon does not speak (``EPROTONOSUPPORT``),
malformed JSON (``EBADMSG``). A request larger than :data:`MAX_REQUEST` is
answered with ``EMSGSIZE`` and the connection closed, since its body cannot
be skipped safely. The daemon carries on in every case.
"""

from __future__ import annotations

import errno
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from blksnap.errors import BlksnapError, InvalidArgument

VERSION = 1
HEADER = struct.Struct(">I")
#: Largest request the daemon reads.
MAX_REQUEST = 1 << 20
#: Largest reply a client accepts (a CBT map of 2**21 blocks, base64, fits).
MAX_REPLY = 64 << 20


class ProtocolError(BlksnapError):
    """A malformed frame or message (the errno says how)."""


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> dict[str, Any]:
    try:
        msg = json.loads(body.decode("utf-8"))
    except RecursionError:
        # '[' * 100000: the decoder's recursion limit, not a crash of ours.
        raise ProtocolError("malformed message: JSON nested too deeply", errno.EBADMSG) from None
    except ValueError as exc:
        # JSONDecodeError, UnicodeDecodeError, and integers of too many digits.
        raise ProtocolError(f"malformed message: {exc}", errno.EBADMSG) from None
    if not isinstance(msg, dict):
        raise ProtocolError("a message must be a JSON object", errno.EBADMSG)
    return msg


def check_length(length: int, limit: int) -> None:
    if length == 0:
        raise ProtocolError("empty message", errno.EBADMSG)
    if length > limit:
        raise ProtocolError(f"message of {length} bytes exceeds {limit}", errno.EMSGSIZE)


def error_reply(req_id: Any, exc: BlksnapError) -> dict[str, Any]:
    return {
        "version": VERSION,
        "id": req_id if isinstance(req_id, int) and not isinstance(req_id, bool) else None,
        "ok": False,
        "error": exc.errname,
        "errno": exc.errno,
        "message": exc.message,
    }


def ok_reply(req_id: int, result: Any) -> dict[str, Any]:
    return {"version": VERSION, "id": req_id, "ok": True, "result": result}


# -- argument schemas -----------------------------------------------------------------


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _str(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 4096 and "\0" not in v


def _uint(v: Any) -> bool:
    return _is_int(v) and 0 <= v < 1 << 63


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _names(v: Any) -> bool:
    return isinstance(v, list) and 0 < len(v) <= 256 and all(_str(x) for x in v)


def _ranges(v: Any) -> bool:
    return (
        isinstance(v, list)
        and len(v) <= 65536
        and all(
            isinstance(r, list) and len(r) == 2 and _uint(r[0]) and _uint(r[1]) and r[1] > 0
            for r in v
        )
    )


def _opts(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and len(v) <= 64
        and all(_str(k) and isinstance(x, str) and len(x) <= 4096 for k, x in v.items())
    )


def _arg(v: Any) -> bool:
    return v is None or (isinstance(v, str) and len(v) <= 65536)


def _hexkey(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


def _timeout(v: Any) -> bool:
    return _is_int(v) and 0 <= v <= 24 * 3600 * 1000


Check = Callable[[Any], bool]


@dataclass(frozen=True)
class Field:
    check: Check
    required: bool = False
    doc: str = ""


def F(check: Check, required: bool = False, doc: str = "") -> Field:
    return Field(check, required, doc)


#: op -> its arguments. The daemon refuses anything not listed here.
SCHEMAS: dict[str, dict[str, Field]] = {
    "version": {},
    "daemon.status": {},
    "daemon.stop": {"force": F(_bool, doc="stop even with file systems mounted on its devices")},
    "daemon.restart": {"force": F(_bool, doc="accepted and ignored (snapshots carry on)")},
    "device.add": {
        "path": F(_str, True, "backing file or block device"),
        "name": F(_str, True),
        "loop": F(_bool),
    },
    "device.remove": {"name": F(_str, True)},
    "device.list": {},
    "filter.attach": {"device": F(_str, True), "filter": F(_str), "opts": F(_opts)},
    "filter.detach": {"device": F(_str, True), "filter": F(_str)},
    "filter.ctl": {
        "device": F(_str, True),
        "filter": F(_str, True),
        "cmd": F(_str, True, "the filter's control command"),
        "arg": F(_arg, doc="its argument, if it takes one"),
    },
    "filter.list": {},
    "cbt.info": {"device": F(_str, True)},
    "cbt.map": {"device": F(_str, True)},
    "cbt.markdirty": {"device": F(_str, True), "ranges": F(_ranges, True)},
    "snapshot.create": {
        "id": F(_str),
        "devices": F(_names, True),
        "storage": F(_str),
        "limit": F(_uint),
        "ranges": F(_ranges),
    },
    "snapshot.appendstorage": {
        "id": F(_str, True),
        "path": F(_str, True),
        "size": F(_uint),
        "ranges": F(_ranges),
    },
    "snapshot.take": {"id": F(_str, True), "loop": F(_bool)},
    "snapshot.info": {"device": F(_str, True)},
    "snapshot.collect": {"id": F(_str)},
    "snapshot.waitevent": {"id": F(_str, True), "timeout_ms": F(_timeout, True)},
    "snapshot.destroy": {"id": F(_str, True), "force": F(_bool, doc="even with images in use")},
    "backup.mount": {
        "repo": F(_str, True, "repository directory or s3:// URL"),
        "backup": F(_str, True, "backup id or latest"),
        "device": F(_str, True),
        "key": F(_hexkey, doc="master key of an encrypted repository, hex"),
        "key_file": F(_str, doc="key file of an encrypted repository"),
        "loop": F(_bool),
    },
    "backup.umount": {"backup": F(_str, True), "device": F(_str, True), "force": F(_bool)},
    "backup.mounts": {},
    "restore.instant": {
        "repo": F(_str, True, "repository directory or s3:// URL"),
        "backup": F(_str, True, "backup id or latest"),
        "device": F(_str, True, "the device's name in the backup, and as served"),
        "target": F(_str, True, "file or block device the device is restored onto"),
        "key": F(_hexkey, doc="master key of an encrypted repository, hex"),
        "key_file": F(_str, doc="key file of an encrypted repository"),
        "loop": F(_bool),
        "rate": F(_str, doc="hydration rate limit, SIZE per second"),
        "paused": F(_bool, doc="start with the background copy paused"),
        "force": F(_bool, doc="overwrite a target that holds data"),
    },
}


def validate_request(msg: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """(id, op, args) of a well-formed request, or a ProtocolError/InvalidArgument."""
    version = msg.get("version")
    if version != VERSION:
        raise ProtocolError(
            f"protocol version {version!r} is not spoken here (this daemon speaks {VERSION})",
            errno.EPROTONOSUPPORT,
        )
    req_id = msg.get("id")
    if not _uint(req_id):
        raise InvalidArgument("request id must be a non-negative integer")
    op = msg.get("op")
    extra = set(msg) - {"version", "id", "op", "args"}
    if extra:
        raise InvalidArgument(f"unknown request field(s): {', '.join(sorted(extra))}")
    if not isinstance(op, str) or op not in SCHEMAS:
        raise ProtocolError(f"unknown operation {op!r}", errno.ENOSYS)
    args = msg.get("args", {})
    if not isinstance(args, dict):
        raise InvalidArgument("args must be an object")
    schema = SCHEMAS[op]
    unknown = set(args) - set(schema)
    if unknown:
        raise InvalidArgument(f"{op}: unknown argument(s): {', '.join(sorted(unknown))}")
    for name, field in schema.items():
        if name not in args or args[name] is None:
            if field.required:
                raise InvalidArgument(f"{op}: argument {name!r} is required")
            continue
        if not field.check(args[name]):
            raise InvalidArgument(f"{op}: bad value for {name!r}: {args[name]!r:.80}")
    return req_id, op, {k: v for k, v in args.items() if v is not None}
