"""The rules that keep grouped convolutions, flattened batches, parent-owned parameters and relative
position biases off the slow paths: each against row-by-row autograd, in float64 and float32."""

from __future__ import annotations

import pytest
import torch
from gramian_oracles import assert_exact
from torch import nn

from hf_jd.gramian import GramianEngine

DTYPES = [pytest.param(torch.float64, 1e-10, id="float64"), pytest.param(torch.float32, 1e-5, id="float32")]
BATCH = 5


def rule_names(model: nn.Module, forward) -> dict[str, str]:
    """``{parameter name: how the engine served it}`` — a rule name, or ``"fallback"``."""
    engine = GramianEngine(model)
    with engine.capture():
        losses = forward()
    engine.gramian(losses)
    state = engine._state
    assert state is not None
    served = {id(p): "fallback" for p in engine.params if id(p) in state.fallback}
    for pid, pairs in state.param_uses.items():
        served.setdefault(pid, pairs[0][0].rule.name)
    engine.release()
    return {name: served.get(id(p), "unreached") for name, p in model.named_parameters()}


class ConvNet(nn.Module):
    def __init__(self, conv: nn.Module, dims: int) -> None:
        super().__init__()
        self.conv = conv
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(self.conv(x))
        return (y**2).flatten(1).sum(dim=1)


CONVS = {
    "conv1d-grouped": (lambda: nn.Conv1d(6, 9, 3, groups=3, stride=2, padding=1), (6, 11)),
    "conv1d-depthwise": (lambda: nn.Conv1d(4, 8, 5, groups=4, padding=2, dilation=2, bias=False), (4, 13)),
    "conv2d-grouped": (lambda: nn.Conv2d(4, 6, (3, 2), groups=2, stride=(2, 1), padding=(1, 0)), (4, 7, 6)),
    "conv2d-depthwise": (lambda: nn.Conv2d(5, 5, 7, groups=5, padding=3), (5, 9, 9)),
}


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind", list(CONVS))
def test_grouped_convolutions(kind, dtype, tol):
    torch.manual_seed(0)
    build, shape = CONVS[kind]
    model = ConvNet(build(), len(shape) - 1).to(dtype)
    x = torch.randn(BATCH, *shape, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    assert set(rule_names(model, lambda: model(x)).values()) == {"grouped_conv"}
