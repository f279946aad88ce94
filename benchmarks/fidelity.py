"""Cache fidelity: ``geocache bench fidelity`` as a script (same options); see geocache/bench/fidelity.py.

    python benchmarks/fidelity.py [--arch moe|dense] [--steps 20,200] [--ks 8,16,...] [--ms 0,4,16]
"""

import sys

from geocache_cli.main import main

if __name__ == "__main__":
    main(["bench", "fidelity", *sys.argv[1:]])
