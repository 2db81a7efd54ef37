"""`python -m jobsite_crawler --listen ENDPOINT [--slots N] [--token T] [--noop] [--allow-private]`."""

import sys

from .cli import main

sys.exit(main())
