"""Engine benchmark (same as `dsv4 bench`); see dsv4/engine/bench.py for the stated workload. Last line is JSON.

    python benchmarks/bench_engine.py --report benchmarks/results
"""

from __future__ import annotations

import sys

from dsv4.engine.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
