"""The loss-type table of ``per_example_losses``: one entry per ``jd_loss_type``, clear errors."""

import pytest
import torch

from hf_jd.losses import per_example_losses
from hf_jd.losses._per_example import _LOSS_FUNCTIONS
from hf_jd.training_args import JD_LOSS_TYPES


def test_table_covers_every_loss_type_of_the_arguments():
    assert set(_LOSS_FUNCTIONS) == set(JD_LOSS_TYPES) - {"auto"}


def test_unknown_loss_type_lists_the_valid_ones():
    batch = {"labels": torch.tensor([0, 1])}
    with pytest.raises(ValueError, match=r"Unknown loss type 'nope'; valid: .*causal_lm.*regression"):
        per_example_losses({"logits": torch.zeros(2, 3)}, batch, "nope")
