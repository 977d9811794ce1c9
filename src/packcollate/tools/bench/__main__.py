"""`python -m packcollate.tools.bench`: the same command as `packcollate bench`."""

import argparse
import sys

from .. import bench
from .run import add_arguments, main

parser = argparse.ArgumentParser(prog="python -m packcollate.tools.bench", description=bench.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
add_arguments(parser)
sys.exit(main(parser.parse_args()))
