"""The attention backend and the model-side machinery that keeps packed examples apart.

- `attention.py`: `packcollate_attention`, the function registered as `attn_implementation="packcollate"`
  (`register`), its kernel dispatch and `describe()`;
- `mask.py`: `packcollate_mask`, its mask function (`AttentionMaskInterface`);
- `kernels.py`, `buckets.py`: exact per-sequence attention over length buckets, flash-attn's and
  PyTorch's varlen kernels; `traced.py`: the same under `torch.compile`;
- `preparation.py`, `restart.py`, `state.py`: `prepare(model)`, recurrent / convolutional layers and attention
  written inside the model restarted at every packed example, with the layout travelling with the call.
"""

from .attention import describe, packcollate_attention, register
from .mask import packcollate_mask
from .preparation import prepare, use_backend

__all__ = ["describe", "packcollate_attention", "packcollate_mask", "prepare", "register", "use_backend"]
