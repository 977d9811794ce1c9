"""One training step (forward + backward + AdamW) of a tiny Qwen4-Exp, padded vs packed.

    python benchmarks/qwen4_exp_step.py                  # CPU, fp32, 1 thread

Model (random weights, built from a config): Qwen4-Exp-shaped, 4 layers (3 gated delta-net + 1 indexed
attention, its 3:1 pattern), hidden 128, 4 hyper-connection streams, 4 heads / 2 key-value heads of 32, MoE
of 4 experts (2 per token), a sparse indexer (budget 64 tokens, blocks of 4), PLE n-gram embeddings and the
dilated convolution on the first layer; vocabulary 4096.

Modes, on the same batches in the same order (`recurrent_step.py`'s harness):
- `padded`: `PaddedCollator` (right padding, attention_mask), transformers' sdpa and its own layers;
- `packcollate`: `PackedCollator` + `attn_implementation="packcollate"`, `packcollate.prepare`d: the indexed
  attention runs one bucket per example length (the indexer picks its top-k inside each example), the
  gated delta nets and the PLE layer run their examples apart in length buckets.

Data: FLAN-like lengths (lognormal, median 120, sigma 0.9, clipped to [8, 1024]), 8 examples a step (the
indexer loops over its queries in Python, so padded steps are slow). Real (non-pad) tokens/s, the
speed-up over padded and the ideal speed-up (padded tokens / real tokens), measured side by side.
"""

from __future__ import annotations

import recurrent_step


def qwen4_exp_config():
    from transformers import AutoConfig

    return AutoConfig.for_model(
        "qwen4_exp_text", vocab_size=recurrent_step.VOCAB, hidden_size=128, num_hidden_layers=4,
        layer_types=["linear_attention"] * 3 + ["indexed_attention"], num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32,
        linear_value_head_dim=32, moe_intermediate_size=128, shared_expert_intermediate_size=128, num_experts=4,
        num_experts_per_tok=2, hc_lowrank=64, indexer_n_heads=2, indexer_kv_heads=1, indexer_head_dim=32, indexer_budget=64,
        indexer_compress_ratio=4, ple_layer_ids=[1], ple_embed_dim=128, ngram_vocab_size_base=4096, eos_token_id=2, number_of_conv_states=3,
        max_position_embeddings=2048, use_cache=False,
    )


def main(argv=None) -> dict:
    return recurrent_step.run("qwen4_exp_step", __file__, __doc__, argv, recurrent_step.VOCAB, batches=2, batch_size=8,
                              models={"qwen4_exp": qwen4_exp_config})


if __name__ == "__main__":
    main()
