"""Example-major layout proofs from the autograd graph (``hf_jd.gramian._layout``): the op rules on
small graphs, and a window attention whose output projection sees ``[B·windows, N, C]`` rows."""

from __future__ import annotations

import pytest
import torch
from gramian_oracles import assert_exact, window_partition
from test_gramian_new_rules import DTYPES, rule_names
from torch import nn

from hf_jd.gramian._layout import FREE, ROWS, Layout, infer_layout, leading_dims

BATCH = 4


def layout_of(build) -> Layout:
    """Layout of ``build(source, weight)`` with ``source`` example-major ``[B, 3, 5]``."""
    x = torch.randn(BATCH, 3, 5, requires_grad=True)
    weight = nn.Parameter(torch.randn(5, 5))
    source = x * 2.0
    out = build(source, weight)
    start = (out.grad_fn, 0)
    return infer_layout(start, {(source.grad_fn, 0)}, BATCH, {})


@pytest.mark.parametrize(
    "build",
    [
        lambda s, w: s.reshape(BATCH * 3, 5),
        lambda s, w: s.permute(0, 2, 1).contiguous().view(-1, 3),
        lambda s, w: s.softmax(-1) * 3 + w[0],
        lambda s, w: torch.bmm(s, w.expand(BATCH, 5, 5)),
        lambda s, w: s.reshape(-1, 5) @ w,
        lambda s, w: torch.nn.functional.layer_norm(s, (5,)),
        lambda s, w: s.chunk(5, dim=-1)[2],
        lambda s, w: s.unsqueeze(1).expand(BATCH, 2, 3, 5),
        lambda s, w: s.reshape(BATCH, 3, 5, 1).permute(3, 0, 1, 2).unbind(0)[0],  # fused qkv heads
        lambda s, w: s.reshape(2, 2, 3, 5).permute(0, 2, 1, 3).transpose(1, 2).reshape(-1, 5),
        lambda s, w: torch.nn.functional.normalize(s, dim=-1) * torch.clamp(w[0], max=2.0).exp(),
        lambda s, w: s.mean(dim=-1).unsqueeze(-1) - s.sum(dim=1, keepdim=True),
    ],
    ids=[
        "reshape",
        "permute-rows-kept",
        "softmax-last",
        "bmm",
        "mm",
        "layer-norm",
        "chunk",
        "expand-inner",
        "permute-unbind",
        "split-batch-dims-restored",
        "normalize-clamp-exp",
        "feature-reductions",
    ],
)
def test_ops_that_keep_examples_in_row_blocks(build):
    assert layout_of(build) == ROWS


@pytest.mark.parametrize(
    "build",
    [
        lambda s, w: s.transpose(0, 1).reshape(BATCH * 3, 5),  # window-major rows
        lambda s, w: s.softmax(0),  # mixes examples
        lambda s, w: s.flip(0),  # not a known op
        lambda s, w: s.sum(0),
        lambda s, w: s.reshape(-1, 5).T @ s.reshape(-1, 5),
        lambda s, w: s.expand(2, BATCH, 3, 5).reshape(-1, 5),  # repeats the whole batch
        lambda s, w: s.reshape(2, 2, 3, 5).permute(1, 0, 2, 3).reshape(-1, 5),  # batch dims swapped
        lambda s, w: s.permute(1, 0, 2).reshape(-1, 5),
        lambda s, w: s.reshape(BATCH, 3, 5, 1).permute(3, 0, 1, 2).reshape(-1, 5),
    ],
    ids=[
        "transpose-rows",
        "softmax-batch",
        "flip",
        "sum-batch",
        "mm-over-rows",
        "expand-outer",
        "batch-dims-swapped",
        "permute-then-view",
        "moved-then-view",
    ],
)
def test_ops_that_lose_the_proof(build):
    assert layout_of(build) is None


def test_parameters_alone_are_batch_free():
    assert layout_of(lambda s, w: (w * 3).expand(BATCH, 5, 5)) == FREE


def test_leading_dims():
    assert leading_dims((BATCH * 3, 5), BATCH) == 1
    assert leading_dims((6, 2, 7), BATCH) == 2
    assert leading_dims((3, 5), BATCH) is None


class WindowAttention(nn.Module):
    """Swin-like: ``[B, H, W, C]`` → ``B·windows`` windows → attention with a relative-position bias
    table (indexed, broadcast over the ``B·windows`` rows) → ``proj``
    on ``[B·windows, N, C]`` rows. ``window_major`` puts the rows in window-major order before ``proj``:
    not example-major, so ``proj`` must keep the exact path."""

    def __init__(
        self, dim: int = 4, window: int = 2, window_major: bool = False, masked: bool = False
    ) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.window = window
        self.window_major = window_major
        tokens = window * window
        self.bias_table = nn.Parameter(torch.randn(2 * tokens - 1, 2))  # relative-position bias, 2 heads
        offsets = torch.arange(tokens)[:, None] - torch.arange(tokens)[None, :] + tokens - 1
        self.register_buffer("bias_index", offsets.reshape(-1), persistent=False)
        #: Swin's shifted windows: a constant mask per window, combined with the bias before the scores.
        self.masked = masked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, dim, w = x.shape[0], x.shape[-1], self.window
        windows = window_partition(self.norm(x), w)
        q, k, v = self.qkv(windows).view(windows.shape[0], w * w, 3, 2, dim // 2).permute(2, 0, 3, 1, 4)
        bias = (
            self.bias_table[self.bias_index].view(w * w, w * w, 2).permute(2, 0, 1).contiguous().unsqueeze(0)
        )
        if self.masked:
            n_windows = windows.shape[0] // batch
            mask = torch.arange(n_windows * (w * w) ** 2, dtype=x.dtype).view(n_windows, 1, w * w, w * w) % 3
            bias = bias + (-mask).unsqueeze(0).expand(batch, -1, -1, -1, -1).reshape(-1, 1, w * w, w * w)
        scores = (q @ k.transpose(-1, -2) + bias).softmax(-1)
        out = (scores @ v).transpose(1, 2).reshape(windows.shape[0], w * w, dim)
        if self.window_major:
            out = out.view(batch, -1, w * w, dim).transpose(0, 1).reshape(-1, w * w, dim)
        y = torch.tanh(self.proj(out))
        if self.window_major:
            y = y.view(-1, batch, w * w, dim).transpose(0, 1)
        return y.reshape(batch, -1).pow(2).sum(dim=1)


@pytest.mark.parametrize("masked", [False, True], ids=["plain", "shifted-window-mask"])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_window_attention_output_projection(dtype, tol, masked):
    torch.manual_seed(0)
    model = WindowAttention(masked=masked).to(dtype)
    x = torch.randn(BATCH, 4, 4, 4, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    served = rule_names(model, lambda: model(x))
    assert served.pop("bias_table") == "broadcast"
    assert set(served.values()) == {"linear", "norm"}


def test_window_major_rows_keep_the_exact_path():
    torch.manual_seed(0)
    model = WindowAttention(window_major=True).double()
    x = torch.randn(BATCH, 4, 4, 4, dtype=torch.float64)
    assert_exact(model, lambda: model(x), tol=1e-10)
    served = rule_names(model, lambda: model(x))
    assert served["qkv.weight"] == "linear"
    assert served["bias_table"] == "broadcast"
    assert served["proj.weight"] == served["proj.bias"] == "fallback"


def test_an_unreadable_graph_is_unknown(monkeypatch):
    import hf_jd.gramian._layout as layout

    def unreadable(*args, **kwargs):
        raise IndexError("no metadata")

    monkeypatch.setattr(layout, "_infer_layout", unreadable)
    assert layout_of(lambda s, w: s.reshape(BATCH * 3, 5)) is None
    torch.manual_seed(0)
    model = WindowAttention().double()
    x = torch.randn(BATCH, 4, 4, 4, dtype=torch.float64)
    assert_exact(model, lambda: model(x), tol=1e-10)
    assert rule_names(model, lambda: model(x))["proj.weight"] == "fallback"
