"""The public rule API: registration (``register_rule``), lookup order, claimed children, coverage by
rule name, and the test helper (``hf_jd.gramian.testing.assert_rule_exact``) on user-defined rules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hf_jd.gramian import (
    GramianEngine,
    GramianEngineError,
    PerRowRule,
    Rule,
    _registry,
    register_rule,
    registered_rules,
    unregister_rule,
)
from hf_jd.gramian._conv import GroupedConvRule
from hf_jd.gramian._embedding import EmbeddingRule
from hf_jd.gramian._linear import Conv2dRule, LinearRule
from hf_jd.gramian._mha import MultiheadAttentionRule
from hf_jd.gramian._norm import GroupNormRule, NormRule
from hf_jd.gramian._rule import PerRowCache
from hf_jd.gramian._use import Use
from hf_jd.gramian._utils import Context
from hf_jd.gramian.testing import assert_rule_exact


@pytest.fixture(autouse=True)
def user_rules(monkeypatch):
    """Each test starts with no user rule and leaves none behind."""
    monkeypatch.setattr(_registry, "_USER", [])


class Gated(nn.Module):
    """``y = x ⊙ gate + proj(x)``, with ``proj``'s parameters read through ``F.linear``: the child
    ``proj`` is never called, so nothing records its input and output unless the parent's rule claims it."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gate + F.linear(x, self.proj.weight, self.proj.bias)


class GatedRule(PerRowRule):
    r"""Per-example gradients of :class:`Gated` from ``(a, b)``: :math:`\sum_t b_t \odot a_t` for the gate,
    :math:`\sum_t b_t a_t^\top` and :math:`\sum_t b_t` for the claimed ``proj``."""

    name = "gated"

    @classmethod
    def claims(cls, module: nn.Module) -> list[nn.Module]:
        assert isinstance(module, Gated)
        return [module.proj]

    def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
        return len(use.edges) == 1 and not ctx.per_task

    def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
        a = use.primary_input.to(ctx.dtype).reshape(ctx.rows, -1, use.primary_input.shape[-1])
        b = use.output_grad.to(ctx.dtype).reshape(ctx.rows, -1, use.output_grad.shape[-1])
        rows = {
            "gate": (a * b).sum(dim=1),
            "proj.weight": torch.bmm(b.transpose(1, 2), a),
            "proj.bias": b.sum(dim=1),
        }
        return {name: rows[name] for name in self.params}


def gated_inputs() -> tuple[Tensor]:
    return (torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64),)


def test_a_user_rule_that_claims_a_child_serves_its_parameters():
    torch.manual_seed(0)
    module = Gated(4).double()
    register_rule(Gated)(GatedRule)
    check = assert_rule_exact(module, gated_inputs, tol=1e-10)
    assert check.coverage == {"gate": "gated", "proj.weight": "gated", "proj.bias": "gated"}


def test_without_the_rule_the_unclaimed_child_takes_the_fallback():
    """Exact still (the generic rule serves the gate, the fallback the child), but not by one rule."""
    torch.manual_seed(0)
    module = Gated(4).double()
    with pytest.raises(AssertionError, match="not served by the rule 'generic'") as caught:
        assert_rule_exact(module, gated_inputs, rule="generic", tol=1e-10)
    assert "'proj.weight': 'fallback'" in str(caught.value)


def test_a_claimed_child_is_neither_hooked_nor_given_a_rule():
    register_rule(Gated)(GatedRule)
    model = nn.Sequential(Gated(4), nn.Linear(4, 1))
    engine = GramianEngine(model)
    hooked = [module for module, _ in engine._recorder.owners]
    assert model[0] in hooked and model[0].proj not in hooked
    (rule,) = [rule for module, rule in engine._recorder.owners if module is model[0]]
    assert set(rule.params) == {"gate", "proj.weight", "proj.bias"}


def test_claiming_a_module_outside_the_subtree_is_refused():
    outsider = nn.Linear(4, 4)

    @register_rule(Gated)
    class Stray(GatedRule):
        name = "stray"

        @classmethod
        def claims(cls, module: nn.Module) -> list[nn.Module]:
            return [outsider]

    with pytest.raises(GramianEngineError, match="not a descendant"):
        GramianEngine(nn.Sequential(Gated(4), outsider))


class Scale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight


def test_a_predicate_selects_modules():
    @register_rule(lambda module: type(module).__name__ == "Scale")
    class ScaleRule(PerRowRule):
        name = "scale_by_predicate"

        def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
            return not ctx.per_task

        def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
            a = use.primary_input.to(ctx.dtype).reshape(ctx.rows, -1, use.primary_input.shape[-1])
            b = use.output_grad.to(ctx.dtype).reshape(ctx.rows, -1, use.output_grad.shape[-1])
            return {"weight": (a * b).sum(dim=1)}

    torch.manual_seed(0)
    check = assert_rule_exact(Scale(4).double(), gated_inputs, tol=1e-10)
    assert check.coverage == {"weight": "scale_by_predicate"}


def test_a_later_user_rule_takes_precedence_over_the_builtin_one():
    @register_rule(nn.Linear)
    class MyLinear(LinearRule):
        name = "my_linear"

    def inputs():
        return torch.randn(5, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    torch.manual_seed(0)
    linear = nn.Linear(4, 2).double()
    assert assert_rule_exact(linear, inputs, tol=1e-10).coverage == {
        "weight": "my_linear",
        "bias": "my_linear",
    }

    @register_rule(nn.Linear)
    class Newer(LinearRule):
        name = "newer_linear"

    assert set(assert_rule_exact(linear, inputs, tol=1e-10).coverage.values()) == {"newer_linear"}
    assert unregister_rule(Newer) and unregister_rule(MyLinear)
    assert not unregister_rule(MyLinear)
    assert set(assert_rule_exact(linear, inputs, tol=1e-10).coverage.values()) == {"linear"}


def test_builtin_rules_keep_the_order_of_the_former_rules_tuple():
    builtin = [entry.rule for entry in registered_rules() if entry.builtin]
    assert builtin == [
        LinearRule,
        Conv2dRule,
        GroupedConvRule,
        EmbeddingRule,
        NormRule,
        GroupNormRule,
        MultiheadAttentionRule,
    ]


def test_builtin_rules_accept_disjoint_modules():
    """Their order therefore never decides between two of them."""
    modules = [
        nn.Linear(2, 2),
        nn.Conv1d(2, 2, 1),
        nn.Conv1d(2, 2, 1, groups=2),
        nn.Conv2d(2, 2, 1),
        nn.Conv2d(2, 2, 1, groups=2),
        nn.Embedding(3, 2),
        nn.LayerNorm(2),
        nn.RMSNorm(2),
        nn.GroupNorm(1, 2),
        nn.MultiheadAttention(2, 1),
        nn.MultiheadAttention(2, 1).out_proj,
        nn.BatchNorm1d(2),
    ]
    for module in modules:
        accepting = [entry.rule for entry in registered_rules() if entry.builtin and entry.accepts(module)]
        assert len(accepting) <= 1, (module, accepting)


def test_a_subclass_with_its_own_forward_is_not_served_by_the_stock_rule():
    class Doubled(nn.MultiheadAttention):
        def forward(self, *args, **kwargs):  # type: ignore[override]
            out, weights = super().forward(*args, **kwargs)
            return 2 * out, weights

    assert _registry.registered_rule(Doubled(4, 1)) is None  # the generic rule then
    assert _registry.registered_rule(nn.MultiheadAttention(4, 1)) is MultiheadAttentionRule


@pytest.mark.parametrize("name", ["generic", "fallback", "linear", "rule"])
def test_rule_names_must_be_unique_and_not_reserved(name):
    class Named(GatedRule):
        pass

    Named.name = name
    with pytest.raises(ValueError, match="name"):
        register_rule(Gated)(Named)


def test_selectors_are_checked():
    with pytest.raises(TypeError):
        register_rule(42)(GatedRule)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        register_rule(Gated)(int)  # type: ignore[type-var]
    with pytest.raises(TypeError):
        register_rule((Gated, int))(GatedRule)  # type: ignore[arg-type]


def test_rule_base_class_is_public_and_abstract():
    with pytest.raises(TypeError):
        Rule(nn.Linear(1, 1), {})  # type: ignore[abstract]


def test_the_helper_fails_on_an_inexact_rule():
    class Wrong(GatedRule):
        name = "wrong"

        def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
            rows = super().compute_rows(use, ctx)
            return {name: 1.01 * value for name, value in rows.items()}

    register_rule(Gated)(Wrong)
    torch.manual_seed(0)
    with pytest.raises(AssertionError, match="relative error"):
        assert_rule_exact(Gated(4).double(), gated_inputs, tol=1e-10)


class Borrower(nn.Module):
    """No parameter of its own: it reads its child's through ``F.linear`` without calling the child."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.inner = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(F.linear(x, self.inner.weight, self.inner.bias))


def test_a_module_without_parameters_of_its_own_is_served_through_its_claim():
    @register_rule(Borrower)
    class BorrowerRule(PerRowRule):
        name = "borrower"
        keep_all_inputs = False

        @classmethod
        def claims(cls, module: nn.Module) -> list[nn.Module]:
            return [module.inner]

        def supports(self, use: Use[PerRowCache], ctx: Context) -> bool:
            return not ctx.per_task

        def compute_rows(self, use: Use[PerRowCache], ctx: Context) -> dict[str, Tensor]:
            module = self.module
            assert isinstance(module, Borrower)
            x = use.primary_input.to(ctx.dtype)
            y = torch.tanh(F.linear(x, module.inner.weight.to(ctx.dtype), module.inner.bias.to(ctx.dtype)))
            b = (use.output_grad.to(ctx.dtype) * (1 - y**2)).reshape(ctx.rows, -1, y.shape[-1])
            a = x.reshape(ctx.rows, -1, x.shape[-1])  # through tanh: b is the pre-activation gradient
            return {"inner.weight": torch.bmm(b.transpose(1, 2), a), "inner.bias": b.sum(dim=1)}

    torch.manual_seed(0)
    check = assert_rule_exact(Borrower(4).double(), gated_inputs, tol=1e-10)
    assert check.coverage == {"inner.weight": "borrower", "inner.bias": "borrower"}
