"""packcollate: padding-free training for transformer language models.

    import packcollate                      # registers attn_implementation="packcollate"; patches nothing
    from packcollate import PackedCollator
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=PackedCollator())

The package's layers, each importing only from those above it in this list: `errors`, `layout` (the
packed layout) and `unwrap` (the model inside its wrappers), `collate/` and `batching/`, `backend/` (attention, mask, `prepare`), `objectives/`,
`compat/` (the proof), `integrations/` (Trainer, TRL, loops); `tools/` (CLI, demo, benchmark) is never
imported by `import packcollate`.
"""

from .backend import prepare, register
from .batching import TokenBudgetBatchSampler, TokenBudgetStream
from .collate import CollateStats, PackedCollator, PackedVisionCollator, PaddedCollator
from .compat import assert_packing_safe, check_model

register()

__version__ = "0.1.0"

__all__ = [
    "CollateStats",
    "PackedCollator",
    "PackedVisionCollator",
    "PaddedCollator",
    "TokenBudgetBatchSampler",
    "TokenBudgetStream",
    "__version__",
    "assert_packing_safe",
    "check_model",
    "prepare",
]
