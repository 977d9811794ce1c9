"""`packcollate bench`: training throughput and peak memory, padded vs padding-free, side by side.

    packcollate bench                                   # CPU: tiny Llama, FLAN-like lengths, fp32
    packcollate bench --preset llama-1b --dataset orcamath --batch-size 8    # GPU, bf16
    packcollate bench --preset ./my-model --dataset data.jsonl --tokenizer ./my-model

Real training steps (forward, backward, AdamW) of a model built from a config (random weights unless
`--load-weights`; nothing is downloaded), on the same examples in every mode:

| mode | batches | collator | attention |
| --- | --- | --- | --- |
| `padded` | `--batch-size` examples in dataset order | `PaddedCollator` (right padding) | sdpa |
| `padded-grouped` | the same examples, sorted by length inside mega-batches, then batched (HF `group_by_length`) | `PaddedCollator` | sdpa |
| `hf-flatten` | as `padded` | transformers' `DataCollatorWithFlattening` | sdpa (flash_attention_2 on CUDA when installed), `use_cache=False` |
| `packcollate` | as `padded` | `PackedCollator` | `packcollate` |
| `packcollate-budget` | `TokenBudgetBatchSampler(max_tokens)` | `PackedCollator` | `packcollate` |
| `trl-bfd` | rows of TRL's `pack_dataset(strategy="bfd", seq_length=max_tokens)`, one row a step | `PackedCollator` (reads `seq_lengths`) | `packcollate` |

`max_tokens` is the mean number of real tokens of a fixed batch (`--max-tokens` overrides), so a
budget step does the same work as a packed fixed step, with every step close to that size.
`trl-bfd` needs TRL and `datasets`; it is skipped with a note when they are missing.

What is measured, per mode:
- real (non-pad) tokens/s: every batch of the epoch is timed `--repeats` times after `--warmup`
  untimed steps; tokens/s = real tokens of the epoch / sum over batches of each batch's median
  time (with `--repeats 1`, the epoch's tokens over its time). Modes with other batch compositions
  (grouped, budget, bfd) process the same examples, so this is a like-for-like rate. Collation is
  done once before timing and reported apart (`collate_s_per_step`).
- interleaving: on CPU every mode has its own copy of the model and the modes take turns step by
  step, each at the same fraction of its epoch, so machine noise hits them alike. On CUDA the modes
  run one after the other on one model reloaded with the initial weights: a 1B model with its
  AdamW state takes ~10 GB, several copies would distort each other's peak memory, and a dedicated
  GPU's step time is steady after warm-up (`--interleave` overrides).
- peak memory: CUDA: `torch.cuda.max_memory_allocated()`, reset before each mode's warm-up, with
  only that mode's model resident: weights + gradients + AdamW state + activations (plus the
  collated token batches of every mode, moved to the GPU before timing: a few MB, the same for
  all). CPU: each mode trains on its largest batches (`--memory-steps`, default 2: the two batches that compute the most
  tokens, the largest last) in a forked child process (one thread) that resets
  the kernel's peak-RSS counter (`/proc/self/clear_refs`), copies the initial model and trains; the
  figure is the child's peak resident memory (`VmHWM`) less file-backed pages (library code) over
  its anonymous memory before the copy: weights + gradients + AdamW state + activations + allocator
  overhead. A fresh fork per mode: every mode starts from the same process state and no mode's
  freed memory hides another's peak. Linux only; elsewhere memory is not measured.
- padded-token fraction, and the ideal speed-up: padded tokens / real tokens.
- loss: the first step's loss (initial weights) must agree between modes that see the same batches
  (`padded`, `hf-flatten`, `packcollate`); and, for every mode, the token-mean loss over the whole
  epoch of examples at the initial weights (evaluated, no optimizer step, in fp32) must agree to
  1e-4 whatever the batch composition: no mode may let examples see each other.

Length distributions (synthetic token ids; the parameters are modelled, not measured):
- `flan`: lognormal, median 120 tokens, sigma 0.9, clipped to [8, 1024]. Modelled on FLAN-v2
  instruction mixtures as used by the IBM / Hugging Face packing study (arXiv 2407.09105, a FLAN
  subset): mostly short prompts and answers with a heavy tail of long ones. Per-example lengths
  were not published; these parameters reproduce that shape (mean ~180, p99 ~1000).
- `orcamath`: lognormal, median 260 tokens, sigma 0.45, clipped to [32, 2048]. Modelled on
  microsoft/orca-math-word-problems-200k: its dataset card gives 200,035 examples in 225,322,861
  bytes, ~1,130 characters of question + worked answer each, ~280 Llama tokens at ~4 characters a
  token; answers of one generator in one style, hence a narrow spread.
- `uniform`: uniform integers in [32, 512].
- `arithmetic`: the shipped word problems (`packcollate.tools.toy`), character tokenizer, completion-only.
- a `.jsonl` file or a `datasets` directory (`save_to_disk`) with `--tokenizer DIR`: rows with a
  `text` field (every token trained), `prompt` + `completion` (completion-only), or `messages`
  (the tokenizer's chat template; assistant-only loss when the template marks generation).
"""

from ..versions import library_versions
from .config import (
    BUILTIN_DATASETS,
    DISTRIBUTIONS,
    DTYPES,
    MODES,
    PRESETS,
    SAME_BATCHES,
    TARGETS,
)
from .data import Data, load_data, synthetic_lengths, tokenize_rows
from .measure import (
    epoch_loss,
    fork_memory_available,
    peak_rss_in_child,
    round_robin_summary,
    time_round_robin,
    train_step,
)
from .modes import (
    ModeRun,
    build_model,
    build_modes,
    fixed_batches,
    length_grouped_batches,
)
from .report import device_name, format_table, plot_result, save_result
from .run import add_arguments, main, run_benchmark

__all__ = [
    "BUILTIN_DATASETS", "DISTRIBUTIONS", "DTYPES", "MODES", "PRESETS", "SAME_BATCHES", "TARGETS",
    "Data", "ModeRun", "add_arguments", "build_model", "build_modes", "device_name", "epoch_loss",
    "fixed_batches", "fork_memory_available", "format_table", "length_grouped_batches", "library_versions",
    "load_data", "main", "peak_rss_in_child", "plot_result", "round_robin_summary", "run_benchmark", "save_result",
    "synthetic_lengths", "time_round_robin", "tokenize_rows", "train_step",
]
