"""Tests of `packcollate.integrations`: the Trainer, TRL, plain loops, streams, evaluation, preflight checks."""
