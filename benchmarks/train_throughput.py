"""Training throughput and peak memory, padded vs padding-free: a thin wrapper of `packcollate bench`.

    python benchmarks/train_throughput.py                                  # CPU: tiny Llama, FLAN-like, fp32
    python benchmarks/train_throughput.py --preset llama-1b --dataset flan --batch-size 8      # GPU, bf16
    python benchmarks/train_throughput.py --help                           # every option

The implementation, its modes, metrics and the way peak memory is measured are documented in
`packcollate.tools.bench` (src/packcollate/benchmark/). Results go to benchmarks/results/<device>/
as train_throughput_<preset>_<dataset>.json and .png unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import sys

from packcollate.tools import bench as benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_throughput.py", description=benchmark.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    benchmark.add_arguments(parser)
    return benchmark.main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
