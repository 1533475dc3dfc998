"""``python -m segadapt``: the same command line as the ``segadapt`` script."""

import sys

from segadapt.cli import main

sys.exit(main())
