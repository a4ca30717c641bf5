"""`python -m jeidnn.cli` is the `jeidnn` command."""

import sys

from jeidnn.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
