"""`python -m mammo_core ...`: see `mammo_core.cli`."""

import sys

from .cli import main

sys.exit(main())
