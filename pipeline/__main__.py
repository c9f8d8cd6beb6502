"""`python -m pipeline promote|sample|compare ...`: see `pipeline.cli.commands`."""

import sys

from pipeline.cli.commands import main

if __name__ == "__main__":
    main(sys.argv[1:])
