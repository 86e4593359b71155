"""Stock layers subclassed with their own ``forward`` (``hf_jd.gramian._functional``): served by the
stock rule at the functional op they call, exact against row-by-row autograd; parameters used outside
that op stay exact on the fallback."""

from __future__ import annotations

import pytest
import torch
from gramian_oracles import assert_exact
from test_gramian_new_rules import DTYPES, rule_names
from torch import nn

BATCH = 4


class ChannelsFirstNorm(nn.LayerNorm):
    """ConvNeXt's pattern: a layer norm over the channels of ``[B, C, H, W]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class OffsetEmbedding(nn.Embedding):
    """OPT's and BART's pattern: positions from the mask, shifted by an offset."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        positions = torch.cumsum(mask, dim=1) * mask - 1
        return super().forward(positions + 2)


class ScaledLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * super().forward(x.flip(-1))


class WeightAlsoOutside(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.weight.sum()


class WeightInAMatmul(nn.LayerNorm):
    """The weight also enters a matmul with the examples: no rule or region covers that use."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) @ torch.diag(self.weight)


class ManualNorm(nn.LayerNorm):
    """Never calls ``F.layer_norm``: nothing is recorded; ``* weight + bias`` are broadcast points."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        return centred / (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt() * self.weight + self.bias


class Net(nn.Module):
    def __init__(self, norm: type[nn.LayerNorm] = ChannelsFirstNorm) -> None:
        super().__init__()
        self.positions = OffsetEmbedding(12, 3)
        self.conv = nn.Conv2d(3, 3, 1)
        self.norm = norm(3)
        self.head = ScaledLinear(3, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) + self.positions(mask).transpose(1, 2)[..., None]  # [B, 3, T, 1]
        h = (
            self.norm(h)
            if isinstance(self.norm, ChannelsFirstNorm)
            else self.norm(h.transpose(1, 3)).transpose(1, 3)
        )
        return self.head(torch.tanh(h).flatten(2).transpose(1, 2)).pow(2).sum(dim=(1, 2))


def batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 5, 1, dtype=dtype, generator=generator)
    mask = torch.ones(BATCH, 5, dtype=torch.long)
    mask[1, 3:] = 0
    return x, mask


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_subclassed_layers_are_served_at_their_op(dtype, tol):
    torch.manual_seed(0)
    model = Net().to(dtype)
    x, mask = batch(dtype)
    assert_exact(model, lambda: model(x, mask), tol=tol)
    served = rule_names(model, lambda: model(x, mask))
    assert served == {
        "positions.weight": "embedding",
        "conv.weight": "conv2d",
        "conv.bias": "conv2d",
        "norm.weight": "norm",
        "norm.bias": "norm",
        "head.weight": "linear",
        "head.bias": "linear",
    }


def test_per_task():
    torch.manual_seed(0)
    model = Net().double()
    x, mask = batch(torch.float64)

    def forward():
        per_example = model(x, mask)
        return torch.stack([per_example[:2].sum(), per_example.mean()])

    assert_exact(model, forward, tol=1e-10, objectives="per_task")


@pytest.mark.parametrize(
    "norm,weight,bias",
    [
        (WeightAlsoOutside, "norm", "norm"),  # plus its batch-free region (weight.sum() added to rows)
        (ManualNorm, "broadcast", "broadcast"),
        (WeightInAMatmul, "fallback", "norm"),
    ],
)
def test_parameters_used_outside_the_op_stay_exact(norm, weight, bias):
    torch.manual_seed(0)
    model = Net(norm).double()
    x, mask = batch(torch.float64)
    assert_exact(model, lambda: model(x, mask), tol=1e-10)
    served = rule_names(model, lambda: model(x, mask))
    assert (served["norm.weight"], served["norm.bias"]) == (weight, bias)
    assert served["head.weight"] == "linear"


def test_ops_are_watched_only_inside_the_subclassed_layers():
    from hf_jd.gramian import GramianEngine

    model = Net()
    x, mask = batch(torch.float32)
    with torch.no_grad():
        expected = model(x, mask)
    seen: dict[str, object] = {}

    def record(name):
        return lambda module, args, output: seen.__setitem__(
            name, torch.overrides._get_current_function_mode()
        )

    model.norm.register_forward_hook(record("norm"))  # runs inside the watched call
    model.conv.register_forward_hook(record("conv"))
    engine = GramianEngine(model)
    with engine.capture():
        losses = model(x, mask)
        assert torch.overrides._get_current_function_mode() is None
    assert seen["conv"] is None and seen["norm"] is not None
    assert torch.overrides._get_current_function_mode() is None
    torch.testing.assert_close(losses.detach(), expected)
    engine.release()


def test_a_failing_subclassed_layer_leaves_no_mode_behind():
    from hf_jd.gramian import GramianEngine

    class Failing(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            super().forward(x)
            raise ValueError("boom")

    model = nn.Sequential(nn.Linear(3, 3), Failing(3))
    engine = GramianEngine(model)
    with pytest.raises(ValueError, match="boom"), engine.capture():
        model(torch.randn(BATCH, 3))
    assert torch.overrides._get_current_function_mode() is None


def test_a_recording_failure_never_breaks_the_forward(monkeypatch, caplog):
    from hf_jd.gramian._capture import Recorder

    def broken(self, index, output, first):
        raise RuntimeError("recording failed")

    monkeypatch.setattr(Recorder, "_op_call", broken)
    torch.manual_seed(0)
    model = Net().double()
    x, mask = batch(torch.float64)
    with caplog.at_level("WARNING"):
        assert_exact(model, lambda: model(x, mask), tol=1e-10)
    served = rule_names(model, lambda: model(x, mask))
    # Unrecorded at their ops, the layers keep the module-level record: the exact generic rule.
    assert served["norm.weight"] == served["positions.weight"] == "generic"
    assert "was not recorded" in caplog.text


class TiedScaledEmbeddings(nn.Module):
    """BART's pattern: ``shared``, the encoder's and the decoder's embeddings are three modules with one
    tied weight, each a subclassed ``nn.Embedding``; ``shared`` itself is never called."""

    def __init__(self) -> None:
        super().__init__()
        self.shared = ScaledEmbedding(12, 4)
        self.encoder = ScaledEmbedding(12, 4)
        self.decoder = ScaledEmbedding(12, 4)
        self.encoder.weight = self.decoder.weight = self.shared.weight
        self.head = nn.Linear(4, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = torch.tanh(self.encoder(ids)).mean(dim=1, keepdim=True) + self.decoder(ids.flip(1))
        return self.head(hidden).pow(2).sum(dim=(1, 2))


class ScaledEmbedding(nn.Embedding):
    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(ids) * 2.0


class NoOpInside(nn.LayerNorm):
    """A subclass that never calls ``F.layer_norm`` (Falcon's linear layers do their own matmul): it keeps
    the module-level record, the exact generic rule."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.bias


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_tied_subclassed_embeddings_are_attributed_to_the_running_module(dtype, tol):
    torch.manual_seed(0)
    model = TiedScaledEmbeddings().to(dtype)
    ids = torch.randint(0, 12, (BATCH, 5), generator=torch.Generator().manual_seed(3))
    assert_exact(model, lambda: model(ids), tol=tol)
    assert rule_names(model, lambda: model(ids))["shared.weight"] == "embedding"


def test_a_subclass_without_the_op_keeps_its_module_record():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), NoOpInside(4), nn.Linear(4, 1)).double()
    x = torch.randn(BATCH, 2, 3, dtype=torch.float64)
    forward = lambda: model(x).pow(2).sum(dim=(1, 2))  # noqa: E731
    assert_exact(model, forward, tol=1e-10)
    assert rule_names(model, forward)["1.weight"] in ("generic", "broadcast")


class MatmulLinear(nn.Linear):
    """Falcon's pattern: ``x @ self.weight.T``, then the bias added outside the product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_matmul_with_the_transposed_weight(dtype, tol, bias):
    torch.manual_seed(0)
    model = nn.Sequential(MatmulLinear(3, 4, bias=bias), nn.Tanh(), MatmulLinear(4, 2, bias=bias)).to(dtype)
    x = torch.randn(BATCH, 5, 3, dtype=dtype)
    forward = lambda: model(x).pow(2).sum(dim=(1, 2))  # noqa: E731
    assert_exact(model, forward, tol=tol)
    served = rule_names(model, forward)
    assert served["0.weight"] == served["2.weight"] == "linear"
    if bias:
        assert served["0.bias"] == served["2.bias"] == "broadcast"
