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
    "stats": ("packcollate.tools.stats", "length distribution of every split, padding waste, recommended max_seq_length"),
    "demo": ("packcollate.tools.demo", "fine-tune a tiny model padded and packed on embedded data; compare speed and loss"),
    "check": ("packcollate.tools.check", "prove packed == unpacked on a tiny copy of an architecture (or --all of them)"),
    "bench": ("packcollate.tools.bench", "training throughput and peak memory: padded vs padding-free modes, side by side"),
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


#: Errors that describe bad input (a path, a flag, a data row): one line, no traceback.
INPUT_ERRORS = (ValueError, KeyError, FileNotFoundError, ImportError)


def console_main(argv: list[str] | None = None) -> int:
    """The `packcollate` console script: `main`, with input errors printed as one line (exit status 2)."""
    try:
        return main(argv)
    except INPUT_ERRORS as error:
        command = " ".join(["packcollate", *(sys.argv[1:2] if argv is None else argv[:1])])
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"{command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(console_main())
