"""``blksnap demo``: the scenario passes, reports in text and JSON, fails loudly
when a check fails, and leaves nothing behind in any case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import blksnap
from blksnap import cli


def test_demo_text(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "FAIL" not in out
    assert "demo OK" in out
    assert "incremental" in out
    assert os.listdir(tmp_path) == []


def test_demo_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", "demo", "--dir", str(tmp_path)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is True
    assert doc["failed"] == []
    assert doc["checks"] and all(v is True for v in doc["checks"].values())
    assert doc["device_size"] == 64 << 20
    # The incremental read only the changed blocks, and fewer than a full backup.
    inc = next(s for s in doc["steps"] if "incremental" in s)["incremental"]
    assert set(inc) == {"disk0", "disk1"}
    for d in inc.values():
        assert 0 < d["blocks_changed"] <= d["blocks_total"]
        assert d["bytes_read"] < d["bytes_full"] == 64 << 20
    assert os.listdir(tmp_path) == []


def test_demo_small_odd_size_and_new_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A size that is no multiple of the chunk, in a directory the demo makes."""
    where = tmp_path / "not-yet"
    assert cli.main(["--json", "demo", "--dir", str(where), "--size", "3000K"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and doc["device_size"] == 3000 * 1024
    assert not where.exists()
    assert os.listdir(tmp_path) == []


def test_demo_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--json", "demo", "--dir", str(tmp_path), "--size", "12"]) == 1
    err = json.loads(capsys.readouterr().err)
    assert err["error"] == "EINVAL"
    assert os.listdir(tmp_path) == []


def test_demo_reports_a_wrong_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """If images read wrong, the checks say so, the exit code is 1, and the
    demo still removes everything."""
    real_read = blksnap.Image.read

    def bad_read(self: blksnap.Image, offset: int, length: int) -> bytes:
        data = real_read(self, offset, length)
        if offset == 0 and length:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    monkeypatch.setattr(blksnap.Image, "read", bad_read)
    assert cli.main(["--json", "demo", "--dir", str(tmp_path), "--size", "2M"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] is False
    assert doc["failed"]
    assert all(not doc["checks"][name] for name in doc["failed"])
    assert any("image disk0 == disk0 at take" in name for name in doc["failed"])
    assert os.listdir(tmp_path) == []


def test_demo_cleans_up_after_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_take(self: blksnap.Engine, sid: str) -> None:
        raise blksnap.IOFailure("injected failure")

    monkeypatch.setattr(blksnap.Engine, "snapshot_take", broken_take)
    assert cli.main(["--json", "demo", "--dir", str(tmp_path), "--size", "2M"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["checks"]["scenario ran to the end"] is False
    assert "injected failure" in doc["error"]
    assert doc["checks"]["everything the demo made is removed"] is True
    assert os.listdir(tmp_path) == []


def test_console_script(tmp_path: Path) -> None:
    """The installed ``blksnap`` script, as ``make demo`` runs it (temp dir under TMPDIR)."""
    script = Path(sys.executable).parent / "blksnap"
    if not script.exists():
        pytest.skip(f"no console script next to {sys.executable} (run make setup)")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [str(script), "demo"], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo OK" in proc.stdout
    assert os.listdir(tmp_path) == []
