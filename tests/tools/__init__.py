"""Tests of `packcollate.tools`: the command line (stats, check, bench, demo) and the matrices."""
