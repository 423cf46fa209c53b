"""``blksnapd``: the daemon that serves devices and images (not built yet).

Today it only prints its usage; the engine it will own is
:class:`blksnap.Engine`, usable in-process now.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="blksnapd",
        description="blksnap daemon: serves protected devices and snapshot images "
        "over FUSE files and NBD. Not available yet: use blksnap.Engine in-process.",
    )
    p.add_argument("--state-dir", default="/var/lib/blksnap")
    p.add_argument("--mount", default="/run/blksnap/mnt")
    p.add_argument("--socket", default="/run/blksnap/blksnapd.sock")
    p.add_argument("--nbd", default=None)
    p.parse_args(argv)
    print("blksnapd: the daemon is not built yet (ENOSYS)", file=sys.stderr)
    return 38


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
