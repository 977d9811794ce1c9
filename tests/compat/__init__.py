"""Tests of `packcollate.compat`: the proof that packed equals unpacked, its checks, the guard."""
