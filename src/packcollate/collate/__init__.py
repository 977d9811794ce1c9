"""Collators: a batch of examples in, one packed row out (or the padded baseline), with the labels,
the length policy and the vision and preference inputs each family needs.

- `text.py`: `PackedCollator`, `PaddedCollator`, `CollateStats`;
- `features.py`: validating examples and flattening them into numpy arrays;
- `labels.py`: completion-only labels (masks, response/instruction templates);
- `lengths.py`: the length policy (`max_seq_length`, `overflow`);
- `vision.py`: `PackedVisionCollator` (image and video inputs in example order, per-example rotary positions);
- `preference.py`: `PackedPreferenceCollator` (DPO) and `PackedPairCollator` (reward models).
"""

from .preference import PackedPairCollator, PackedPreferenceCollator
from .text import CollateStats, PackedCollator, PaddedCollator
from .vision import PackedVisionCollator

__all__ = ["CollateStats", "PackedCollator", "PackedPairCollator", "PackedPreferenceCollator", "PackedVisionCollator",
           "PaddedCollator"]
