"""Sizes: parsing ``64M`` style arguments, sector arithmetic."""

from __future__ import annotations

import re

from blksnap.errors import InvalidArgument

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT
KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

_SUFFIX = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """``"64M"`` -> 67108864. Suffixes K/M/G/T are powers of 1024."""
    if isinstance(text, int):
        if text < 0:
            raise InvalidArgument(f"negative size {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise InvalidArgument(f"not a size: {text!r} (use a number with K, M, G or T)")
    return int(m.group(1)) * _SUFFIX[m.group(2).upper()]


def parse_sector_range(text: str) -> tuple[int, int]:
    """``"2048:4096"`` (first sector, sector count) -> byte (offset, length)."""
    try:
        first, count = (int(part, 0) for part in text.split(":"))
    except ValueError:
        raise InvalidArgument(
            f"{text}: not a sector range; give SECTOR:COUNT (512-byte sectors)"
        ) from None
    if first < 0:
        raise InvalidArgument(f"{text}: sector must be >= 0; give SECTOR:COUNT")
    if count <= 0:
        raise InvalidArgument(f"{text}: sector count must be > 0; give SECTOR:COUNT")
    return first << SECTOR_SHIFT, count << SECTOR_SHIFT


def format_size(n: int) -> str:
    for unit, factor in (("TiB", TiB), ("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"
