"""Objectives over packed rows: per-example reductions from `cu_seq_lens`, sequence-weighted losses, and
sequence-classification scores.

- `segments.py`: `segment_sum`, `segment_mean`, `segment_last`, `token_logprobs`, `to_padded`, …;
- `losses.py`: `sequence_weighted_loss`, `count_loss_examples`;
- `scores.py`: `packed_sequence_logits` (one score per packed example, at its last token).
"""
