"""``python -m facemetric ...``: the same command line as the ``facemetric`` script."""

import sys

from facemetric.cli import main

if __name__ == "__main__":
    sys.exit(main())
