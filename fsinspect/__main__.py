"""`python -m fsinspect` is the `fsinspect` command."""

import sys

from fsinspect.cli import main

sys.exit(main())
