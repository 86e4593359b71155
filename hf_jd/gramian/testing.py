r"""Test helper for Gramian-engine rules: :func:`assert_rule_exact`.

A rule is exact when, for per-example losses :math:`L_i` built through the module, the engine's
Gramian equals :math:`J J^\top` and its weighted gradient equals :math:`J^\top w`, where the rows
:math:`J_i = \partial L_i / \partial \theta` come from plain ``torch.autograd.grad`` of each loss in
turn (brute force, no assumption), and when the rule under test — not the generic rule or the
batched-autograd fallback, which are exact too — served the module's parameters
(:meth:`GramianEngine.coverage`). ``docs/gramian_rules.md`` shows it in use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ._engine import GramianEngine
from ._registry import registered_rule
from ._rule import Rule
from ._torch_ops import tree_flatten

__all__ = ["RuleCheck", "assert_rule_exact", "default_losses"]


@dataclass
class RuleCheck:
    """What :func:`assert_rule_exact` measured (all checks passed)."""

    #: :math:`\|G - J J^\top\| / \|J J^\top\|` (Frobenius).
    gramian_error: float
    #: :math:`\|g - J^\top w\| / \|J^\top w\|` for the gradient ``g`` the engine wrote.
    grad_error: float
    #: :meth:`GramianEngine.coverage` of the module's parameters, by their names in the module.
    coverage: dict[str, str]


class _Harness(nn.Module):
    """Holds the module as a child: the engine serves the root model's own parameters by the fallback."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.layer = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.layer(*args, **kwargs)


def default_losses(output: object, seed: int = 0) -> Tensor:
    r"""Per-example losses ``[B]`` from every floating-point output tensor whose dimension 0 is the batch:
    :math:`L_i = \sum_o \big(\langle o_i, c_o\rangle^2 + \langle o_i, d_o\rangle\big)` with fixed random
    :math:`c_o, d_o` (so that the gradient-outputs differ from example to example)."""
    generator = torch.Generator().manual_seed(seed)
    outputs = [o for o in tree_flatten(output)[0] if isinstance(o, Tensor) and o.is_floating_point()]
    if not outputs:
        raise ValueError("the module returned no floating-point tensor to build losses from.")
    total: Tensor | None = None
    for out in outputs:
        shape = out.shape[1:]
        c = torch.randn(shape, generator=generator, dtype=torch.float64).to(out.dtype).to(out.device)
        d = torch.randn(shape, generator=generator, dtype=torch.float64).to(out.dtype).to(out.device)
        dims = tuple(range(1, out.dim()))
        term = (out * c).sum(dim=dims) ** 2 + (out * d).sum(dim=dims)
        total = term if total is None else total + term
    assert total is not None
    return total


def _rel(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def assert_rule_exact(
    module: nn.Module,
    inputs: Callable[[], Any],
    *,
    kwargs: dict[str, Any] | None = None,
    rule: str | type[Rule[Any]] | None = None,
    losses: Callable[[Any], Tensor] | None = None,
    objectives: Literal["per_example", "per_task"] = "per_example",
    tasks: int = 3,
    tol: float = 1e-5,
    seed: int = 0,
    **engine_kwargs: Any,
) -> RuleCheck:
    r"""Check a rule on ``module``: exact Gramian and weighted gradient, and served by that rule.

    Runs ``module(*inputs(), **kwargs)`` once inside :meth:`GramianEngine.capture` (the module held
    as the child of a small wrapper model), forms the losses, and compares

    * ``engine.gramian(losses)`` with :math:`J J^\top`, and
    * the gradient ``engine.accumulate_grad(w, scale)`` writes with :math:`\text{scale} \cdot J^\top w`
      (random positive weights :math:`w`),

    where :math:`J` is computed row by row with ``torch.autograd.grad`` on the same graph (so dropout
    masks are shared), both to relative Frobenius error ``tol``; then checks that
    :meth:`GramianEngine.coverage` names the rule under test for every trainable parameter of
    ``module`` that the losses reach. ``.grad`` of the parameters is left as it was.

    Args:
        module: the layer (its trainable parameters are the ones checked).
        inputs: returns the positional arguments of the call (a tuple, or a single tensor).
        kwargs: keyword arguments of the call.
        rule: the rule expected to serve the parameters (its class or its ``name``); default: the
            registered rule that serves ``module`` (:func:`hf_jd.gramian.register_rule`).
        losses: maps the module's output to the losses ``[B]`` (one per example; dimension 0 of the
            outputs need not be the batch then); default: :func:`default_losses`.
        objectives: ``"per_example"``, or ``"per_task"``: ``tasks`` losses, each a positive random
            combination of the per-example losses.
        tol: the relative tolerance (``1e-5`` suits float32; float64 modules reach ~1e-12).
        seed: seeds the weights :math:`w` and the per-task combinations.
        engine_kwargs: passed to :class:`GramianEngine` (``linear_strategy``, ``memory_budget_mb``).

    Returns:
        the measured errors and the coverage of ``module``'s parameters.

    Raises:
        AssertionError: an error above ``tol``, or a parameter served by another rule.
        ValueError: no rule is given and none is registered for ``module``.
    """
    expected = _expected_name(module, rule)
    model = _Harness(module)
    engine = GramianEngine(model, objectives=objectives, **engine_kwargs)
    engine.check_supported()
    params = engine.params
    saved = [p.grad for p in params]
    for p in params:
        p.grad = None
    try:
        with engine.capture():
            args = inputs()
            output = model(*(args if isinstance(args, tuple) else (args,)), **(kwargs or {}))
        per_example = (losses or default_losses)(output)
        generator = torch.Generator().manual_seed(seed)
        if objectives == "per_task":
            mix = torch.rand(tasks, per_example.numel(), generator=generator, dtype=torch.float64) + 0.1
            loss_vector = mix.to(per_example) @ per_example
        else:
            loss_vector = per_example
        jacobian = _jacobian(loss_vector, params)
        gramian = engine.gramian(loss_vector)
        served = engine.coverage()
        weights = torch.rand(loss_vector.numel(), generator=generator, dtype=torch.float64) + 0.1
        scale = 0.7
        engine.accumulate_grad(weights.to(gramian.dtype), scale)
        grad = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
    finally:
        engine.release()
        for p, g in zip(params, saved):
            p.grad = g
    reference = jacobian @ jacobian.T
    gramian_error = _rel(gramian.to(reference.dtype), reference)
    grad_error = _rel(grad.to(jacobian.dtype), scale * (weights.to(jacobian.dtype) @ jacobian))
    coverage = {name.removeprefix("layer."): how for name, how in served.items()}
    assert gramian_error <= tol, f"Gramian: relative error {gramian_error:.3g} > {tol:.3g} against autograd"
    assert grad_error <= tol, (
        f"weighted gradient: relative error {grad_error:.3g} > {tol:.3g} against autograd"
    )
    wrong = {name: how for name, how in coverage.items() if how not in (expected, "unreached")}
    assert not wrong, f"parameters not served by the rule {expected!r}: {wrong}"
    assert any(how == expected for how in coverage.values()), f"the losses reach no parameter of {expected!r}"
    return RuleCheck(gramian_error, grad_error, coverage)


def _expected_name(module: nn.Module, rule: str | type[Rule[Any]] | None) -> str:
    if isinstance(rule, str):
        return rule
    if rule is not None:
        return rule.name
    registered = registered_rule(module)
    if registered is None:
        raise ValueError(f"no registered rule serves {type(module).__name__}: pass rule=... or register one.")
    return registered.name


def _jacobian(losses: Tensor, params: list[nn.Parameter]) -> Tensor:
    """``J`` (``[m, n]``, float64) by one ``torch.autograd.grad`` per loss on the retained graph."""
    rows = []
    for i in range(losses.numel()):
        grads = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            ).to(torch.float64)
        )
    return torch.stack(rows)
