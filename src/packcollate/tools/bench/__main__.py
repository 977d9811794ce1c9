"""`python -m packcollate.tools.bench`: the same command as `packcollate bench`."""

import argparse
import sys

from . import __doc__ as description
from .run import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m packcollate.tools.bench", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
