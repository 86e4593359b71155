"""The full shape of a parameter, whole or a DeepSpeed ZeRO-3 partition (``ds_shape``)."""

from __future__ import annotations

import torch
from torch import nn

from hf_jd.gramian._rule import rows_and_row_shape
from hf_jd.gramian._utils import full_numel, full_shape


def test_a_whole_parameter_is_its_own_shape():
    param = nn.Parameter(torch.zeros(3, 4))
    assert full_shape(param) == (3, 4) and full_numel(param) == 12
    assert rows_and_row_shape(param) == (3, (4,))
    assert rows_and_row_shape(nn.Parameter(torch.zeros(()))) == (1, ())


def test_a_zero3_partition_reads_its_ds_shape():
    partition = nn.Parameter(torch.empty(0))  # what ZeRO-3 leaves outside the module's forward and backward
    partition.ds_shape = torch.Size([5, 2, 3])
    assert full_shape(partition) == (5, 2, 3) and full_numel(partition) == 30
    assert rows_and_row_shape(partition) == (5, (2, 3))
