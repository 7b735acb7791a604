"""`python -m kodkod` is the `kodkod` command."""

import sys

from kodkod.cli import main

sys.exit(main())
