"""The command line and what it runs: `cli.py` (`packcollate stats | check | bench | demo`), the demo,
dataset statistics, the compatibility matrices, the benchmark and the toy data they use. Never
imported by `import packcollate`."""
