"""Output of the ``blksnap`` commands: ``--json`` documents and text tables,
the same for every command module."""

from __future__ import annotations

import json
from typing import Any


class Out:
    """Where a command's result goes: one JSON document (``--json``) or text."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, doc: Any, text: str | None = None) -> None:
        if self.as_json:
            print(json.dumps(doc, indent=2, sort_keys=True))
        elif text is not None:
            print(text)

    def line(self, doc: Any, text: str) -> None:
        """One record of a stream (watch): a JSON line, or text."""
        if self.as_json:
            print(json.dumps(doc, sort_keys=True), flush=True)
        else:
            print(text, flush=True)


def table(rows: list[list[str]], header: list[str]) -> str:
    """Columns padded to their widest cell, the header first."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    for r in rows:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)
