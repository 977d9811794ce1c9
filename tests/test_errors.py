"""The error family (`packcollate.errors`): every refusal is a `PackcollateError` and also the built-in
exception callers already catch, raised with one line naming what was expected and what was given."""

import pytest
import torch

from packcollate import PackedCollator, TokenBudgetBatchSampler, errors
from packcollate.backend import packcollate_attention
from packcollate.objectives.segments import segment_sum

FAMILY = [
    (errors.InputError, ValueError),
    (errors.MissingKeyError, KeyError),
    (errors.InputTypeError, TypeError),
    (errors.LayoutError, ValueError),
    (errors.UnsupportedError, ValueError),
    (errors.BackendRefused, ValueError),
    (errors.NotPreparedError, RuntimeError),
    (errors.LaunchError, RuntimeError),
    (errors.PackingUnsafeError, RuntimeError),
]


@pytest.mark.parametrize("error, builtin", FAMILY)
def test_every_error_is_of_the_family_and_a_builtin(error, builtin):
    assert issubclass(error, errors.PackcollateError) and issubclass(error, builtin)
    with pytest.raises(builtin, match="expected a thing"):
        raise error("expected a thing, got another")


class Attention(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("call, error", [
    (lambda: PackedCollator()([{"input_ids": [1, 2], "labels": [1]}]), errors.InputError),
    (lambda: PackedCollator()([{"labels": [1, 2]}]), errors.MissingKeyError),
    (lambda: PackedCollator()({"input_ids": [1, 2]}), errors.InputTypeError),
    (lambda: TokenBudgetBatchSampler([3, 0, 2], max_tokens=8), errors.InputError),
    (lambda: segment_sum(torch.ones(5), torch.tensor([0, 3])), errors.LayoutError),
    (lambda: packcollate_attention(Attention(), *[torch.ones(1, 2, 6, 4)] * 3, None,
                                   cu_seq_lens_q=torch.tensor([0, 2, 5], dtype=torch.int32)), errors.LayoutError),
])
def test_each_layer_raises_its_family_member(call, error):
    """A refusal from the collators, the batching, the objectives and the backend is the family member
    that says what kind it is (and the built-in subclass callers caught before)."""
    with pytest.raises(error, match="expected"):
        call()

