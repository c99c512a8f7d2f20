"""``python -m animatediff_lite``: the same command line as ``animatediff-lite``."""

import sys

from .cli import main

sys.exit(main())
