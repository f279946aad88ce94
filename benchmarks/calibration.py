"""The calibration experiment: ``geocache bench calibration`` as a script (same options); see
geocache/bench/calibration.py.

    python benchmarks/calibration.py [--arch moe|dense] [--steps 200]
"""

import sys

from geocache_cli.main import main

if __name__ == "__main__":
    main(["bench", "calibration", *sys.argv[1:]])
