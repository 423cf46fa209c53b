"""``python -m blksnap.cli``."""

import sys

from blksnap.cli.app import main

sys.exit(main())
