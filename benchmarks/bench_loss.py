#!/usr/bin/env python
"""Loss benchmark: ``python benchmarks/bench_loss.py [options]`` is ``fastclip bench loss [options]``.

With no options it runs the built-in sweep for the machine (CPU: fastclip-torch vs the materialized
reference at B = 4096..16384, D = 256 and 512, fp32; GPU: bf16, D = 768, B up to 1,048,576) and writes
JSON, CSV and PNG plots to ./fastclip-bench/ (``--out DIR`` elsewhere; ``make bench`` writes benchmarks/results/). ``--help`` lists the options.
"""

import os
import sys

if __name__ == "__main__":
    try:
        import fastclip  # noqa: F401
    except ImportError:  # running from a checkout that is not installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastclip.cli import main

    sys.exit(main(["bench", "loss", *sys.argv[1:]]))
