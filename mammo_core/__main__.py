"""`python -m mammo_core ...`: see `mammo_core.cli`."""

import sys

from mammo_core.cli import main

sys.exit(main())
