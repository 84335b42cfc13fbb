"""`python -m twotower.cluster.cli`: the `twotower` command."""

import sys

from twotower.cluster.cli import main

sys.exit(main())
