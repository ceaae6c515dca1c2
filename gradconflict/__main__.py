"""``python -m gradconflict`` (also what torchrun launches with ``-m gradconflict``)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
