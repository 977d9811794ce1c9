"""Objectives over packed rows: per-example reductions from `cu_seq_lens`, sequence-weighted and summed losses, and
sequence-classification scores.

- `segments.py`: `segment_sum`, `segment_mean`, `segment_last`, `token_logprobs`, `to_padded`, …;
- `losses.py`: `sequence_weighted_loss`, `count_loss_examples`, `summed_token_loss` (open-instruct's `--reduce_loss sum`);
- `scores.py`: `packed_sequence_logits` (one score per packed example, at its last token).
"""
