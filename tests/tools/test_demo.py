"""``blksnap demo``: the whole backup story passes its own checks, reports in
JSON, and leaves nothing behind (no mount, loop device, process or file)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blksnap.cli import app as cli
from blksnap.tools import sandbox


@pytest.mark.skipif(sandbox.why_not() is not None, reason=str(sandbox.why_not()))
def test_demo_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["--json", "demo", "--dir", str(tmp_path), "--size", "48M"])
    doc = json.loads(capsys.readouterr().out)
    assert doc["failed"] == [], doc["details"]
    assert rc == 0 and doc["ok"] is True
    checks = doc["checks"]
    # Every backup of every device restored, fsck-clean, with the files at take.
    assert sum("fsck-clean" in k for k in checks) == 6
    assert sum("exactly the files present at take" in k for k in checks) == 6
    assert sum("read only chunks holding changed blocks" in k for k in checks) == 6
    assert sum("stores only new chunks" in k for k in checks) == 2
    assert all(checks.values())
    report = next(s for s in doc["steps"] if s["title"] == "report")
    kinds = [b["kind"] for b in report["backups"]]
    # (the last: an incremental with the writer stopped, before the forced full)
    assert kinds == ["full", "incremental", "differential", "incremental"]
    full, inc, diff, last = report["backups"]
    assert full["read"] == 2 * (48 << 20)
    assert 0 < inc["read"] < full["read"] and 0 < diff["read"] < full["read"]
    assert 0 < last["read"] < full["read"]
    assert os.listdir(tmp_path) == []
    assert not sandbox.mounts_under(str(tmp_path)) and not sandbox.loops_under(str(tmp_path))


def test_demo_rejects_a_tiny_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--dir", str(tmp_path), "--size", "1M"]) == 1
    assert "EINVAL" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
