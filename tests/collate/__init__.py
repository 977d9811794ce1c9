"""Tests of `packcollate.collate`: the collators (text, features, labels, lengths, vision, preference)."""
