"""A longer fuzz run of the shard reader than CI's: the properties of `tests/test_reader.py`
(every mutated shard ends within the time bound with samples or one UserError line) with many
more examples, randomized (CI's run is derandomized and shorter).

    python -m benchmarks.fuzz_reader [--examples 5000]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

PROPERTIES = 4  # the test_fuzz_* functions of tests/test_reader.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000, help="per property")
    args = parser.parse_args()
    env = {**os.environ, "READER_FUZZ_EXAMPLES": str(args.examples), "READER_FUZZ_RANDOM": "1"}
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/test_reader.py", "-k", "fuzz",
         "-p", "no:cacheprovider", "--hypothesis-show-statistics"], env=env, check=False,
    )
    print(f"{PROPERTIES} properties x {args.examples} cases in "
          f"{time.perf_counter() - started:.0f} s: exit {result.returncode}")
    raise SystemExit(result.returncode)


if __name__ == "__main__":
    main()
