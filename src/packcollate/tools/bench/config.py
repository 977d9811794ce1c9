"""The benchmark's fixed choices: modes, model presets, length distributions, targets, tolerances."""

from __future__ import annotations

import torch

MODES = ("padded", "padded-grouped", "hf-flatten", "packcollate", "packcollate-budget", "trl-bfd")
#: Modes whose batches hold exactly the examples of `padded`'s batches: their first losses must agree.
SAME_BATCHES = ("padded", "hf-flatten", "packcollate")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

#: Model presets: Llama-shaped configs (random weights).
PRESETS = {
    # for tests: a few hundred thousand parameters
    "micro": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),
    # CPU: 5.1 M parameters, grouped-query attention 8/2. The vocabulary is sized so that the LM head
    # does about the share of a step's matrix work it does in Llama-3.2-1B (~25% here, ~21% there):
    # a larger one would make the CPU step a memory-bound logits benchmark.
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096),
    # GPU: Llama-3.2-1B's shape (1.24 B parameters, tied embeddings, rope theta 500k)
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                     tie_word_embeddings=True, rms_norm_eps=1e-5,
                     rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
}

#: Synthetic length distributions (see the module docstring for their source).
DISTRIBUTIONS = {
    "flan": {"kind": "lognormal", "median": 120, "sigma": 0.9, "min": 8, "max": 1024,
             "source": "modelled on FLAN-v2 instruction data (IBM/HF packing study, arXiv 2407.09105): "
                       "short, very uneven; not measured"},
    "orcamath": {"kind": "lognormal", "median": 260, "sigma": 0.45, "min": 32, "max": 2048,
                 "source": "modelled on microsoft/orca-math-word-problems-200k (~1,130 characters a row "
                           "per its dataset card, ~280 Llama tokens): longer, more even; not measured"},
    "uniform": {"kind": "uniform", "min": 32, "max": 512, "source": "uniform integers"},
}
BUILTIN_DATASETS = (*DISTRIBUTIONS, "arithmetic")

#: Targets the published numbers are checked against: (device type, preset, dataset) -> mode ->
#: (speed-up >= a number or >= the speed-up of the mode named, memory <=).
TARGETS = {
    ("cpu", "tiny", "flan"): {"packcollate": (2.5, None), "packcollate-budget": ("packcollate", None)},
    ("cuda", "llama-1b", "flan"): {"packcollate": (2.0, 0.8)},
    ("cuda", "llama-1b", "orcamath"): {"packcollate": (1.4, 0.95)},
}

#: Median relative spread between repeats of a batch above which the timings are reported as noisy.
NOISY_SPREAD = 0.15

EPOCH_LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 1e-2}
STEP_LOSS_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 2e-2}
