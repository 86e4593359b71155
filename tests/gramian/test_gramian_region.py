"""Batch-free regions (``hf_jd.gramian._region``): parameters that meet the examples only through
tensors computed from parameters alone — a layer-normed table, projected by a layer that is also
called on the examples, split into heads and repeated over the batch (DeBERTa's relative attention)."""

from __future__ import annotations

import pytest
import torch
from gramian_oracles import assert_exact
from test_gramian_new_rules import DTYPES, rule_names
from torch import nn

BATCH = 4
HEADS = 2


class RelativeKeys(nn.Module):
    """``scores = bmm(q, repeat(heads(proj(norm(table)))).T)``, with ``proj`` also applied to the input.

    ``head_major`` lays the queries out head-major (``[heads·B, ...]``): the repeated table's rows are
    then not owned by the examples in blocks, and the region must not be used.
    """

    def __init__(self, dim: int = 4, positions: int = 5, head_major: bool = False) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(positions, dim))
        self.norm = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(positions, 1)
        self.head_major = head_major

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[n, T, dim]`` → ``[n·heads, T, dim/heads]`` (example-major) or ``[heads·n, ...]``."""
        n, tokens, dim = x.shape
        split = x.view(n, tokens, HEADS, dim // HEADS)
        order = (2, 0, 1, 3) if self.head_major else (0, 2, 1, 3)
        return split.permute(*order).reshape(-1, tokens, dim // HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        queries = self.heads(self.proj(x))  # per example
        keys = self.heads(self.proj(self.norm(self.table).unsqueeze(0)))  # batch-free
        keys = keys.repeat(queries.shape[0] // HEADS, 1, 1)
        scores = torch.bmm(queries, keys.transpose(-1, -2))  # [B·heads, T, positions]
        if self.head_major:
            scores = scores.view(HEADS, -1, *scores.shape[1:]).transpose(0, 1)
        per_example = self.out(torch.tanh(scores.reshape(x.shape[0], -1, scores.shape[-1])))
        return per_example.pow(2).flatten(1).sum(dim=1)


def inputs(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(BATCH, 3, 4, dtype=dtype, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_repeated_batch_free_keys(dtype, tol):
    torch.manual_seed(0)
    model = RelativeKeys().to(dtype)
    x = inputs(dtype)
    assert_exact(model, lambda: model(x), tol=tol, expand_broadcast=False)
    served = rule_names(model, lambda: model(x), expand_broadcast=False)
    assert {served[name] for name in ("table", "norm.weight", "norm.bias")} == {"region"}
    assert {served["proj.weight"], served["proj.bias"], served["out.weight"]} == {"linear"}


def test_head_major_queries_keep_the_exact_path():
    torch.manual_seed(0)
    model = RelativeKeys(head_major=True).double()
    x = inputs(torch.float64)
    assert_exact(model, lambda: model(x), tol=1e-10, expand_broadcast=False)
    served = rule_names(model, lambda: model(x), expand_broadcast=False)
    assert {served[name] for name in ("table", "norm.weight", "proj.weight")} == {"fallback"}


class ScaledBias(nn.Module):
    """A batch-free ``tanh(scale) * bias`` added to per-example activations: a non-shape op before
    the broadcast point, so only the region (not the shape-only broadcast path) serves it."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim))
        self.linear = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shift = torch.tanh(self.scale) * self.bias
        return torch.sin(self.linear(x) + shift).pow(2).flatten(1).sum(dim=1)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_a_batch_free_product_added_to_the_examples(dtype, tol):
    torch.manual_seed(0)
    model = ScaledBias().to(dtype)
    x = inputs(dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    served = rule_names(model, lambda: model(x))
    assert served["scale"] == served["bias"] == "region"


def test_an_unreadable_region_keeps_the_exact_fallback(monkeypatch, caplog):
    import hf_jd.gramian._broadcast_plan as plan

    def unreadable(*args, **kwargs):
        raise AttributeError("no _saved_repeats")

    monkeypatch.setattr(plan, "plan_region", unreadable)
    torch.manual_seed(0)
    model = RelativeKeys().double()
    x = inputs(torch.float64)
    with caplog.at_level("WARNING"):
        assert_exact(model, lambda: model(x), tol=1e-10, expand_broadcast=False)
    served = rule_names(model, lambda: model(x), expand_broadcast=False)
    assert served["table"] == "fallback"
    assert "batch-free regions skipped" in caplog.text


class ScaledAttention(nn.Module):
    """Swinv2's pattern: a module that owns ``logit_scale`` and uses it directly, ``exp(clamp(s))``
    times cosine similarities, around child linear layers (its own calls take the generic rule).
    ``matrix`` (optional) is used with the examples in a matmul: the region cannot serve it."""

    def __init__(self, dim: int = 4, with_matrix: bool = False) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.randn(HEADS, 1, 1) * 0.1)
        self.matrix = nn.Parameter(torch.randn(dim, dim)) if with_matrix else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, tokens, dim = x.shape
        q = self.query(x).view(n, tokens, HEADS, -1).transpose(1, 2)
        k = self.key(x).view(n, tokens, HEADS, -1).transpose(1, 2)
        cosine = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(
            k, dim=-1
        ).transpose(-1, -2)
        scores = cosine * torch.clamp(self.logit_scale, max=4.0).exp()
        out = scores.softmax(-1).sum(dim=(1, 3))
        if self.matrix is not None:
            out = out + (x @ self.matrix).sum(-1)
        return out.pow(2).sum(dim=1)


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_a_parameter_used_directly_by_a_generic_module(dtype, tol):
    torch.manual_seed(0)
    model = nn.Sequential(ScaledAttention()).to(dtype)  # not the root: its calls take the generic rule
    x = torch.randn(BATCH, 3, 4, dtype=dtype)
    assert_exact(model, lambda: model(x), tol=tol)
    served = rule_names(model, lambda: model(x))
    assert served["0.logit_scale"] == "region"
    assert served["0.query.weight"] == served["0.key.weight"] == "linear"


def test_a_generic_module_only_partly_batch_free_keeps_its_rule():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledAttention(with_matrix=True)).double()
    x = torch.randn(BATCH, 3, 4, dtype=torch.float64)
    assert_exact(model, lambda: model(x), tol=1e-10)
    served = rule_names(model, lambda: model(x))
    assert served["0.logit_scale"] == served["0.matrix"] == "generic"
