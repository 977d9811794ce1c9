"""The `packcollate` command: `stats | check | bench | demo`.

    packcollate demo                       # padded vs packed fine-tuning on embedded data (CPU, < 60 s)
    packcollate stats DATA [...]           # length distribution, padding waste, recommended max_seq_length
    packcollate check MODEL [...]          # prove packed == unpacked on a tiny copy of the architecture
    packcollate bench [...]                # training throughput and memory: padded vs padding-free
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module that implements it, one-line help)
COMMANDS = {
    "stats": ("packcollate.stats", "length distribution of every split, padding waste, recommended max_seq_length"),
    "demo": ("packcollate.demo", "fine-tune a tiny model padded and packed on embedded data; compare speed and loss"),
    "check": ("packcollate.compat", "prove packed == unpacked on a tiny copy of an architecture (or --all of them)"),
    "bench": ("packcollate.benchmark", "training throughput and peak memory: padded vs padding-free modes, side by side"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="packcollate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=(module.__doc__ or help_text).strip(),
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.module.main(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
