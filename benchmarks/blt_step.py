"""One training step (forward + backward + AdamW) of a tiny BLT (bytes pooled into entropy patches), padded vs packed.

    python benchmarks/blt_step.py                        # CPU, fp32, 1 thread

Model (random weights, built from a config): BLT-shaped, bytes (vocabulary 260); entropy model 2 layers of
hidden 64; local encoder 1 layer and local decoder 2 layers of hidden 128 (4 heads, sliding window 512); global
transformer 4 layers of hidden 256 (4 heads) over the patches; 2 cross-attention slots a patch; n-gram hashes
of 3 to 8 bytes into 2 x 6 tables of 4096. The entropy threshold is set at the 75th percentile of the model's
own byte entropies (random weights give near-uniform entropies), so a patch holds about 4 bytes, as BLT's.

Modes, on the same batches in the same order (`recurrent_step.py`'s harness):
- `padded`: `PaddedCollator` (right padding, attention_mask), transformers' sdpa and its own patching;
- `packcollate`: `PackedCollator` + `attn_implementation="packcollate"`, `packcollate.prepare`d: each example its
  own n-gram hashes and patches, the global transformer in patch units (`backend/patches.py`).

Data: FLAN-like lengths in bytes (lognormal, median 120, sigma 0.9, clipped to [8, 1024]), 8 examples a step.
Real (non-pad) bytes/s, the speed-up over padded and the ideal speed-up (padded bytes / real bytes), side by side.
"""

from __future__ import annotations

import _common as common
import recurrent_step
import torch

BYTES = 260


def blt_config():
    """The BLT above, its entropy threshold at the 75th percentile of its entropies on the benchmark's bytes."""
    from transformers import AutoConfig

    local = {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256, "vocab_size": BYTES}
    config = AutoConfig.for_model(
        "blt", vocab_size=BYTES, cross_attn_k=2, encoder_hash_byte_group_vocab=4096, max_position_embeddings=2048,
        patcher_config={"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                        "vocab_size": BYTES},
        encoder_config={**local, "num_hidden_layers": 1, "cross_attn_k": 2},
        decoder_config={**local, "num_hidden_layers": 2, "hidden_size_global": 256, "cross_attn_k": 2},
        global_config={"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 512},
        use_cache=False,
    )
    model = recurrent_step.build(config, "sdpa").model
    sample = torch.tensor([sum((e["input_ids"] for e in common.flan_like_batches(1, 8, BYTES)[0]), [])])
    with torch.no_grad():
        entropies = model.patcher(sample[:, :2048], patch_size=config.patch_size, threshold=0.0)[0]
    config.patching_threshold = float(torch.quantile(entropies.float(), 0.75))
    return config


def main(argv=None) -> dict:
    return recurrent_step.run("blt_step", __file__, __doc__, argv, BYTES, batches=2, batch_size=8,
                              models={"blt": blt_config})


if __name__ == "__main__":
    main()
