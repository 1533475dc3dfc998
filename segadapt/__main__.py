"""``python -m segadapt``: the same command line as the ``segadapt`` script."""

import sys

from segadapt.cli import main

if __name__ == "__main__":  # importing the module (documentation tools do) runs nothing
    sys.exit(main())
