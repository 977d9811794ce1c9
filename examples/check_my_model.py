"""Prove, on your own architecture, that packed batches equal the same examples unpacked.

    python examples/check_my_model.py llama                # a model type: transformers' default config
    python examples/check_my_model.py ./my-model           # a folder with config.json (weights unused)
    python examples/check_my_model.py my-org/my-model      # a model id already in the local HF cache

A tiny random copy of the architecture (same attention pattern, GQA, windows, experts …) runs a packed
batch and the same examples one at a time, for every attention backend available here, with and without
a cache. Nothing is downloaded. Exit status 0 when the packcollate backend is exact: put it in your CI.
The same from the command line: `packcollate check MODEL`.
"""

import sys

from packcollate import check_model

report = check_model(sys.argv[1] if len(sys.argv) > 1 else "llama", max_seq_length=2048)
print(report.format_table())
sys.exit(0 if report.ok_for("packcollate") else 1)
