r"""The registry of per-module rules: which :class:`~hf_jd.gramian.Rule` serves which module.

A rule is registered by decorating its class (the pattern of Opacus' ``register_grad_sampler``: one
class per layer type, registered where it is defined)::

    @register_rule(MyLayer)
    class MyLayerRule(PerRowRule):
        name = "my_layer"
        ...

The selector is a module type (or a tuple of types: ``isinstance``), or a predicate
``(module) -> bool``; a module is served by a registered rule when the selector accepts it *and* the
rule's own :meth:`~hf_jd.gramian.Rule.matches` does (the place to check, for example, that a
subclass did not override ``forward``).

Lookup order, first match wins:

1. user rules (:func:`register_rule`), the most recently registered first — so a user rule for a type
   takes precedence over the built-in rule of that type;
2. the built-in rules of ``hf_jd.gramian`` (registered with :func:`builtin_rule`), in the order their
   modules are imported by ``hf_jd/gramian/__init__.py``: ``_linear`` (Linear / Conv1D, Conv2d),
   ``_conv`` (grouped convolutions), ``_embedding``, ``_norm`` (LayerNorm / RMSNorm, GroupNorm),
   ``_mha`` (MultiheadAttention) — the order of the former hand-kept ``RULES`` tuple. Built-in rules
   accept disjoint sets of modules (a test checks it), so this order never decides between two;
3. no registered rule: the engine's exact generic rule (:mod:`hf_jd.gramian._generic`).

Rule names appear in :meth:`GramianEngine.coverage`: a registered rule needs its own ``name``, one no
other registered rule and none of the engine's own labels (:data:`RESERVED_NAMES`) uses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import nn

from ._rule import Rule

#: A module type, a tuple of them, or a predicate on a module.
Selector = type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[nn.Module], bool]
#: Names that :meth:`GramianEngine.coverage` already uses for something other than a registered rule.
RESERVED_NAMES = frozenset({"rule", "generic", "fallback", "unreached", "broadcast", "region"})

_R = TypeVar("_R", bound=type[Rule[Any]])


@dataclass(frozen=True)
class Registration:
    """One registered rule and the modules it was registered for."""

    rule: type[Rule[Any]]
    selector: Selector
    builtin: bool

    def accepts(self, module: nn.Module) -> bool:
        """Whether this registration serves ``module``: the selector, then the rule's ``matches``."""
        selector = self.selector
        if isinstance(selector, (type, tuple)):
            selected = isinstance(module, selector)
        else:
            selected = bool(selector(module))
        return selected and self.rule.matches(module)


_USER: list[Registration] = []  # most recent first
_BUILTIN: list[Registration] = []  # in registration order


def _check(rule: type[Rule[Any]], selector: Selector) -> None:
    if not (isinstance(rule, type) and issubclass(rule, Rule)):
        raise TypeError(f"register_rule decorates a subclass of hf_jd.gramian.Rule, got {rule!r}.")
    if isinstance(selector, tuple):
        valid = bool(selector) and all(isinstance(s, type) and issubclass(s, nn.Module) for s in selector)
    elif isinstance(selector, type):
        valid = issubclass(selector, nn.Module)
    else:
        valid = callable(selector)
    if not valid:
        raise TypeError(
            f"register_rule needs an nn.Module subclass, a tuple of them or a predicate, got {selector!r}."
        )
    if rule.name in RESERVED_NAMES:
        raise ValueError(
            f"{rule.__name__}.name is {rule.name!r}, a name the engine uses for itself: give the rule its own name."
        )
    for other in (*_USER, *_BUILTIN):
        if other.rule is not rule and other.rule.name == rule.name:
            raise ValueError(
                f"{rule.__name__}.name {rule.name!r} is already the name of {other.rule.__name__}: "
                "GramianEngine.coverage() reports rules by name, so give the rule its own name."
            )


def register_rule(selector: Selector) -> Callable[[_R], _R]:
    """Class decorator: serve the modules that ``selector`` accepts with the decorated rule.

    Args:
        selector: an ``nn.Module`` subclass (its instances, subclasses included), a tuple of them, or a
            predicate ``(module) -> bool``. The rule's :meth:`~hf_jd.gramian.Rule.matches` must accept
            the module too.

    A rule registered later takes precedence over every rule registered before it and over the
    built-in rules (see :mod:`hf_jd.gramian._registry` for the order). Registering the same class
    again moves it to the front. Engines built before the registration keep the rules they chose.

    Raises:
        TypeError: ``selector`` or the decorated class is not what is described above.
        ValueError: the rule's ``name`` is reserved or already used by another registered rule.
    """

    def decorate(rule: _R) -> _R:
        _check(rule, selector)
        unregister_rule(rule)
        _USER.insert(0, Registration(rule, selector, builtin=False))
        return rule

    return decorate


def builtin_rule(selector: Selector) -> Callable[[_R], _R]:
    """:func:`register_rule` for the rules shipped with ``hf_jd.gramian``: after every user rule."""

    def decorate(rule: _R) -> _R:
        _check(rule, selector)
        if not any(entry.rule is rule for entry in _BUILTIN):
            _BUILTIN.append(Registration(rule, selector, builtin=True))
        return rule

    return decorate


def unregister_rule(rule: type[Rule[Any]]) -> bool:
    """Remove a user rule from the registry; whether it was registered (built-in rules stay)."""
    before = len(_USER)
    _USER[:] = [entry for entry in _USER if entry.rule is not rule]
    return len(_USER) != before


def registered_rules() -> list[Registration]:
    """Every registration, in lookup order (user rules, most recent first, then the built-in ones)."""
    return [*_USER, *_BUILTIN]


def registered_rule(module: nn.Module) -> type[Rule[Any]] | None:
    """The rule class that serves ``module``: the first registration accepting it, else ``None``."""
    for entry in registered_rules():
        if entry.accepts(module):
            return entry.rule
    return None


__all__ = [
    "RESERVED_NAMES",
    "Registration",
    "Selector",
    "builtin_rule",
    "register_rule",
    "registered_rule",
    "registered_rules",
    "unregister_rule",
]
