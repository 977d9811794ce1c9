"""packcollate: padding-free training for transformer language models.

    from packcollate import PackedCollator
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=PackedCollator())
"""

from .backend import attention
from .backend import restart as recurrent
from .collate.text import CollateStats, PackedCollator, PaddedCollator
from .compat import assert_packing_safe, check_model
from .batching.sampler import TokenBudgetBatchSampler
from .batching.stream import TokenBudgetStream

attention.register()
recurrent.register()

__version__ = "0.1.0"

__all__ = [
    "CollateStats",
    "PackedCollator",
    "PaddedCollator",
    "TokenBudgetBatchSampler",
    "TokenBudgetStream",
    "__version__",
    "assert_packing_safe",
    "check_model",
]
