"""Published values of the added aggregators on J = [[-4, 1, 1], [6, 1, 1]] (arXiv:2406.16232's example).

The values are those of TorchJD's documentation for the same methods (CAGrad, ConFIG, AlignedMTL,
NashMTL) and, for GradVac, PCGrad's value: its targets start at 0, where GradVac is PCGrad.
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from hf_jd.aggregation import AlignedMTL, CAGrad, ConFIG, GradVac, NashMTL, PCGrad

PAPER_J = torch.tensor([[-4.0, 1.0, 1.0], [6.0, 1.0, 1.0]])


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: CAGrad(c=0.5), [0.1835, 1.2041, 1.2041]),
        (ConFIG, [0.1588, 2.0706, 2.0706]),
        (GradVac, [0.5848, 3.8012, 3.8012]),
        (AlignedMTL, [0.2133, 0.9673, 0.9673]),
        (lambda: NashMTL(n_tasks=2), [0.0542, 0.7061, 0.7061]),
    ],
    ids=["CAGrad(c=0.5)", "ConFIG()", "GradVac()", "AlignedMTL()", "NashMTL(n_tasks=2)"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_published_values(build, expected, dtype):
    """Fresh instances: GradVac and NashMTL are stateful."""
    result = build()(PAPER_J.to(dtype))
    assert result.dtype == dtype
    assert_close(result, torch.tensor(expected, dtype=dtype), atol=1e-4, rtol=0)


def test_gradvac_first_step_is_pcgrad():
    assert_close(GradVac()(PAPER_J), PCGrad()(PAPER_J))
