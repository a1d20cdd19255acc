"""`python -m msif ...` is the same as the `msif` command (and what `torchrun -m msif` launches)."""

import sys

from msif.cli import main

sys.exit(main())
