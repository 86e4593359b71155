"""The contract of a per-module rule: a new rule is one class (and its cache), registered by ``register_rule``."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from gramian_oracles import assert_exact
from torch import Tensor, nn

from hf_jd.gramian import _registry, register_rule
from hf_jd.gramian._rule import PerRowCache, PerRowRule, Rule
from hf_jd.gramian._use import Use
from hf_jd.gramian._utils import Context


class Scale(nn.Module):
    """``y = x * w`` over the last dimension: no built-in rule knows it (the generic rule would)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


@dataclass
class ScaleCache:
    per_row: Tensor | None = None  # [m, dim]


class ScaleRule(Rule[ScaleCache]):
    """A rule written against the base class only: the Gramian comes from its default (row chunks)."""

    name = "scale"
    calls = 0

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return type(module) is Scale

    def supports(self, use: Use[ScaleCache], ctx: Context) -> bool:
        return isinstance(use.inputs[use.primary] if use.primary is not None else None, Tensor)

    def new_cache(self) -> ScaleCache:
        return ScaleCache()

    def _per_row(self, use: Use[ScaleCache], ctx: Context) -> Tensor:
        cache = self.cache_of(use)
        if cache.per_row is None:
            type(self).calls += 1
            a = use.primary_input.to(ctx.dtype).expand_as(use.output_grad)
            b = use.output_grad.to(ctx.dtype)
            cache.per_row = (a * b).reshape(ctx.rows, -1, a.shape[-1]).sum(dim=1)
        return cache.per_row

    def add_param_rows(
        self, use: Use[ScaleCache], ctx: Context, name: str, start: int, stop: int, out: Tensor
    ) -> None:
        out += self._per_row(use, ctx)[:, start:stop]

    def param_weighted(self, use: Use[ScaleCache], ctx: Context, name: str, weights: Tensor) -> Tensor:
        return weights.to(ctx.dtype) @ self._per_row(use, ctx)


class ScalePerRowRule(PerRowRule):
    """The same rule as a :class:`PerRowRule`: only ``compute_rows`` besides ``matches``/``supports``."""

    name = "scale_rows"
    calls = 0

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return type(module) is Scale

    def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
        return isinstance(use.inputs[use.primary] if use.primary is not None else None, Tensor)

    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        type(self).calls += 1
        a = use.primary_input.to(ctx.dtype).expand_as(use.output_grad)
        b = use.output_grad.to(ctx.dtype)
        return {"weight": (a * b).reshape(ctx.rows, -1, a.shape[-1]).sum(dim=1)}


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), Scale(6), nn.Tanh(), Scale(6), nn.Linear(6, 1))


@pytest.mark.parametrize("rule", [ScaleRule, ScalePerRowRule])
def test_a_new_registered_rule_is_used_and_exact(monkeypatch, rule):
    monkeypatch.setattr(_registry, "_USER", [])  # registered for this test only
    register_rule(Scale)(rule)
    rule.calls = 0
    net = model()
    x, y = torch.randn(5, 3, 4), torch.randn(5)
    assert_exact(net, lambda: (net(x).sum(dim=(1, 2)) - y) ** 2)
    assert rule.calls == 2  # both Scale calls went through the new rule


def test_rules_are_abstract():
    class Incomplete(Rule[ScaleCache]):
        @classmethod
        def matches(cls, module: nn.Module) -> bool:
            return True

    with pytest.raises(TypeError):
        Incomplete(nn.Linear(1, 1), {})  # type: ignore[abstract]
    with pytest.raises(TypeError):
        Rule(nn.Linear(1, 1), {})  # type: ignore[abstract]
