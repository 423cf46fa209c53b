"""Errors carrying an errno, as the kernel module returns them.

Every failure the engine reports is a :class:`BlksnapError` whose ``errno``
is a standard value from :mod:`errno`; the CLI prints its symbolic name
(``EBUSY``, ``ENOENT`` ...) and the control socket sends it over the wire.
"""

from __future__ import annotations

import errno as _errno
import os


class BlksnapError(Exception):
    """Base class: an operation failed with ``errno``."""

    errno: int = _errno.EIO

    def __init__(self, message: str = "", errno: int | None = None) -> None:
        if errno is not None:
            self.errno = errno
        super().__init__(message or os.strerror(self.errno))

    @property
    def errname(self) -> str:
        return _errno.errorcode.get(self.errno, f"E{self.errno}")

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""

    def __str__(self) -> str:
        return f"{self.errname}: {self.message}"


class InvalidArgument(BlksnapError):
    errno = _errno.EINVAL


class NoSpace(BlksnapError):
    errno = _errno.ENOSPC


class NotFound(BlksnapError):
    errno = _errno.ENOENT


class Busy(BlksnapError):
    errno = _errno.EBUSY


class AlreadyDone(BlksnapError):
    errno = _errno.EALREADY


class Exists(BlksnapError):
    errno = _errno.EEXIST


class NotSupported(BlksnapError):
    errno = _errno.ENOTTY


class IOFailure(BlksnapError):
    errno = _errno.EIO


class NoDevice(BlksnapError):
    errno = _errno.ENODEV


_BY_ERRNO: dict[int, type[BlksnapError]] = {
    cls.errno: cls
    for cls in (
        InvalidArgument,
        NoSpace,
        NotFound,
        Busy,
        AlreadyDone,
        Exists,
        NotSupported,
        IOFailure,
        NoDevice,
    )
}


def error(err: int, message: str = "") -> BlksnapError:
    """The most specific error class for ``err``."""
    cls = _BY_ERRNO.get(err, BlksnapError)
    return cls(message, err) if cls is BlksnapError else cls(message)


def from_oserror(exc: OSError, context: str = "") -> BlksnapError:
    """Wrap an :class:`OSError` from the backing store, keeping its errno."""
    err = exc.errno if exc.errno else _errno.EIO
    text = exc.strerror or str(exc)
    return error(err, f"{context}: {text}" if context else text)
