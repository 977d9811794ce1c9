"""Tests of `packcollate.objectives`: per-example reductions, sequence-weighted losses, sequence scores."""
