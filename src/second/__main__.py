"""``python -m second``."""

import sys

from .cli import main

sys.exit(main())
