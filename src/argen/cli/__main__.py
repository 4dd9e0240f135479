"""`python -m argen.cli`: the same as the `argen` command."""

import sys

from argen.cli import main

sys.exit(main())
