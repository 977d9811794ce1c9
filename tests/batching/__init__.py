"""Tests of `packcollate.batching`: which examples share a batch (bins, sampler, stream, lengths)."""
