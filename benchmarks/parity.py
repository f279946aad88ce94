"""Cached vs live training: ``geocache bench parity`` as a script (same options); see geocache/bench/parity.py.

    python benchmarks/parity.py [--arch moe|dense] [--steps 200]
"""

import sys

from geocache_cli.main import main

if __name__ == "__main__":
    main(["bench", "parity", *sys.argv[1:]])
