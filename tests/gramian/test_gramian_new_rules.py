"""The rules that keep grouped convolutions, flattened batches, parent-owned parameters and relative
position biases off the slow paths: each against row-by-row autograd, in float64 and float32."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gramian_oracles import assert_exact, window_partition
from torch import nn

from hf_jd.gramian import GramianEngine

DTYPES = [pytest.param(torch.float64, 1e-10, id="float64"), pytest.param(torch.float32, 1e-5, id="float32")]
BATCH = 5


def rule_names(model: nn.Module, forward, **engine_kwargs) -> dict[str, str]:
    """``{parameter name: how the engine served it}`` — a rule name, or ``"fallback"``."""
    engine = GramianEngine(model, **engine_kwargs)
    with engine.capture():
        losses = forward()
    engine.gramian(losses)
    served = engine.coverage()
    engine.release()
    return served


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
    "conv2d-strided-dilated": (
        lambda: nn.Conv2d(4, 6, 3, groups=2, stride=(2, 3), dilation=(2, 1), padding=(2, 1)),
        (4, 11, 10),
    ),
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


class ParentOwned(nn.Module):
    """Parameters used directly by their owner: a layer scale, a class token, position embeddings."""

    def __init__(self, dim: int = 6, tokens: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.scale = nn.Parameter(torch.randn(dim))
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim))
        self.shift = nn.Parameter(torch.randn(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1) + self.pos
        h = self.scale * torch.tanh(h) - self.shift
        return (h**2).sum(dim=(1, 2))


class RelativeBias(nn.Module):
    """A relative-position bias table: an embedding of a ``[T, T]`` bucket matrix, broadcast over the batch."""

    def __init__(self, dim: int = 6, heads: int = 2, buckets: int = 5, causal: bool = False) -> None:
        super().__init__()
        self.qk = nn.Linear(dim, 2 * heads * dim)
        self.bias = nn.Embedding(buckets, heads)
        self.heads, self.buckets, self.causal = heads, buckets, causal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        q, k = self.qk(x).view(batch, tokens, 2, self.heads, dim).permute(2, 0, 3, 1, 4)
        relative = torch.arange(tokens)[None, :] - torch.arange(tokens)[:, None]
        bias = self.bias(relative.clamp(-2, 2) + 2).permute(2, 0, 1).unsqueeze(0)
        if self.causal:
            bias = torch.where(torch.ones(tokens, tokens, dtype=torch.bool).tril(), bias, -3.0)
        scores = q @ k.transpose(-1, -2) + bias
        return scores.softmax(-1).pow(2).sum(dim=(1, 2, 3))


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_parent_owned_parameters(dtype, tol):
    torch.manual_seed(0)
    model = ParentOwned().to(dtype)
    x = torch.randn(BATCH, 4, 6, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    served = rule_names(model, lambda: model(x))
    assert {served[n] for n in ("scale", "cls", "pos", "shift")} == {"broadcast"}


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tokens", [BATCH, 7])  # tokens == batch: the bucket matrix's leading dim equals B
def test_relative_position_bias(tokens, causal, dtype, tol):
    torch.manual_seed(0)
    model = RelativeBias(causal=causal).to(dtype)
    x = torch.randn(BATCH, tokens, 6, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    assert rule_names(model, lambda: model(x))["bias.weight"] == "embedding"


def test_a_parameter_with_another_use_stays_exact():
    # scale is also used by a matmul: not a broadcast point, so it keeps its exact path.
    class Mixed(ParentOwned):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + (x @ self.scale).sum(dim=1)

    torch.manual_seed(0)
    model = Mixed().double()
    x = torch.randn(BATCH, 4, 6, dtype=torch.float64)
    assert_exact(model, lambda: model(x), tol=1e-10)
    assert rule_names(model, lambda: model(x))["scale"] == "fallback"


class Flattened(nn.Module):
    """OPT's feed-forward: LayerNorm, fc1, GELU, dropout, fc2 on ``[B·T, H]`` (or ``T``-major when ``interleaved``)."""

    def __init__(self, dim: int = 6, interleaved: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(0.2)
        self.interleaved = interleaved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        x = self.inp(x) + x  # a fresh contiguous tensor, as OPT's residual sum
        # token-major rows (interleaved): the examples are not contiguous
        flat = x.transpose(0, 1).contiguous().view(-1, dim) if self.interleaved else x.reshape(-1, dim)
        h = self.fc2(self.drop(nn.functional.gelu(self.fc1(self.norm(flat)))))
        if self.interleaved:
            h = h.view(tokens, batch, dim).transpose(0, 1)
        return (h.reshape(batch, tokens, dim) ** 2).sum(dim=(1, 2))


class Windowed(nn.Module):
    """Swin's window attention input: ``[B, H, W, C]`` partitioned into ``B·windows`` windows."""

    def __init__(self, dim: int = 4, window: int = 2) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        windows = window_partition(self.norm(x), self.window)
        q, k, v = self.qkv(windows).chunk(3, dim=-1)
        out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return out.reshape(x.shape[0], -1).pow(2).sum(dim=1)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_flattened_batch_linear(dtype, tol):
    torch.manual_seed(0)
    model = Flattened().to(dtype)
    x = torch.randn(BATCH, 3, 6, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    served = rule_names(model, lambda: model(x))
    assert {served[f"{m}.{p}"] for m in ("fc1", "fc2") for p in ("weight", "bias")} == {"linear"}
    assert served["norm.weight"] == "norm"


@pytest.mark.parametrize("tokens", [BATCH, 3])  # tokens == batch: the token-major base has leading dim B
def test_interleaved_rows_keep_the_exact_path(tokens):
    torch.manual_seed(0)
    model = Flattened(interleaved=True).double()
    x = torch.randn(BATCH, tokens, 6, dtype=torch.float64)
    assert_exact(model, lambda: model(x), tol=1e-10)
    served = rule_names(model, lambda: model(x))
    assert {served[f"{m}.weight"] for m in ("norm", "fc1", "fc2")} == {"fallback"}


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_windowed_linear(dtype, tol):
    torch.manual_seed(0)
    model = Windowed().to(dtype)
    x = torch.randn(BATCH, 4, 4, 4, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    assert set(rule_names(model, lambda: model(x)).values()) == {"linear", "norm"}


@pytest.mark.parametrize("kind", ["conv1d-grouped", "conv2d-depthwise"])
def test_grouped_convolutions_per_task(kind):
    # Per task, the input is shared by the rows: one weight gradient per task.
    torch.manual_seed(0)
    build, shape = CONVS[kind]
    model = ConvNet(build(), len(shape) - 1).double()
    x = torch.randn(BATCH, *shape, dtype=torch.float64)

    def forward():
        per_example = model(x)
        return torch.stack([per_example[:3].sum(), per_example.pow(2).mean()])

    assert_exact(model, forward, tol=1e-10, objectives="per_task")


PATCHIFY = {
    "square": (lambda: nn.Conv2d(3, 5, 4, stride=4), (3, 10, 11)),  # the remainder rows/columns are dropped
    "rectangular": (lambda: nn.Conv2d(2, 4, (2, 3), stride=(2, 3), bias=False), (2, 6, 9)),
    "overlapping": (lambda: nn.Conv2d(2, 4, 3, stride=2, padding=1), (2, 7, 7)),  # im2col path
}


@pytest.mark.parametrize("kind", list(PATCHIFY))
def test_patchify_convolution_patches(kind):
    from hf_jd.gramian._linear import _patches

    build, shape = PATCHIFY[kind]
    conv = build()
    x = torch.randn(BATCH, *shape)
    expected = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    assert torch.equal(_patches(x, conv, conv.padding), expected.transpose(1, 2))


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind", list(PATCHIFY))
def test_patchify_convolution_exact(kind, dtype, tol):
    torch.manual_seed(0)
    build, shape = PATCHIFY[kind]
    model = ConvNet(build(), 2).to(dtype)
    x = torch.randn(BATCH, *shape, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    assert set(rule_names(model, lambda: model(x)).values()) == {"conv2d"}


GROUP_NORMS = {
    "2d-groups": (lambda: nn.GroupNorm(2, 6), (6, 3, 4)),
    "1d-one-group": (lambda: nn.GroupNorm(1, 4, eps=1e-3), (4, 7)),
    "channels-only": (lambda: nn.GroupNorm(3, 3), (3,)),
}


class NormNet(nn.Module):
    def __init__(self, norm: nn.Module, channels: int) -> None:
        super().__init__()
        self.scale = nn.Linear(channels, channels)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.scale(x.movedim(1, -1)).movedim(-1, 1)
        return torch.tanh(self.norm(h)).pow(2).flatten(1).sum(dim=1)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind", list(GROUP_NORMS))
def test_group_norm(kind, dtype, tol):
    torch.manual_seed(0)
    build, shape = GROUP_NORMS[kind]
    model = NormNet(build(), shape[0]).to(dtype)
    x = torch.randn(BATCH, *shape, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    served = rule_names(model, lambda: model(x))
    assert served["norm.weight"] == served["norm.bias"] == "group_norm"


def test_group_norm_per_task():
    torch.manual_seed(0)
    build, shape = GROUP_NORMS["2d-groups"]
    model = NormNet(build(), shape[0]).double()
    x = torch.randn(BATCH, *shape, dtype=torch.float64)

    def forward():
        per_example = model(x)
        return torch.stack([per_example[:2].sum(), per_example.pow(2).mean()])

    assert_exact(model, forward, tol=1e-10, objectives="per_task")
