"""``python -m neuroinit.cli``: run the command line."""

import sys

from neuroinit.cli import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
