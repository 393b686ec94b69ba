#!/usr/bin/env python
"""Training-step benchmark: ``python benchmarks/bench_train.py [options]`` is ``fastclip bench train [options]``.

With no options: the "tiny" model on CPU (ViT-B-16 on a GPU), samples/s and peak memory of one step
with the fastclip loss and with the reference loss, and the largest global batch that fits with and
without gradient caching. ``--help`` lists the options.
"""

import os
import sys

if __name__ == "__main__":
    try:
        import fastclip  # noqa: F401
    except ImportError:  # running from a checkout that is not installed
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from fastclip.cli import main

    sys.exit(main(["bench", "train", *sys.argv[1:]]))
