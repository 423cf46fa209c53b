"""One throwaway Ceph cluster with a RADOS Gateway for the whole session
(``blksnap/tools/rgw.py``): started at the first test that asks for it,
stopped at the end of the session whatever happens; skipped, with the
reason, only where Ceph is not installed and cannot be."""

from __future__ import annotations

import tempfile
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
