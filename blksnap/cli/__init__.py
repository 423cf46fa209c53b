"""The ``blksnap`` command line (see :mod:`blksnap.cli.app`)."""

from blksnap.cli.app import main

__all__ = ["main"]
