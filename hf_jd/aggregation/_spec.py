"""One declarative spec per aggregator: its name, paper, kind and test arguments, next to its class.

A method module declares its aggregator once::

    @aggregator_spec(
        name="modo",
        summary="one projected step of MGDA's weights per call",
        papers=(Paper("Chen et al.", "Three-Way Trade-Off in Multi-Objective Learning: ...", "NeurIPS", 2023,
                      "2305.20057"),),
        state="weights",
    )
    class MoDo(Stateful, GramianWeightedAggregator): ...

and everything that lists the aggregators is generated from the specs: the name registry behind
``--aggregator`` (:mod:`._registry` finds the specs in the package's modules), the ``hf-jd aggregators``
table, the README tables (:mod:`._tables`) and the parameters of the tests. The decorator checks the
spec against the class when the module is imported, so a spec cannot drift from its class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .._name_registry import normalised_name
from ._aggregator_bases import Aggregator, GramianWeightedAggregator
from ._stateful import LossAware, Stateful

_A = TypeVar("_A", bound=type[Aggregator])


@dataclass(frozen=True)
class Paper:
    """A paper as the tables cite it.

    Args:
        authors: As cited: ``"Quinton & Rey"``, ``"Liu et al."``.
        title: The full title.
        venue: Where it appeared (``"NeurIPS"``, ``"ICML"``), or ``""`` for a preprint.
        year: The year of that venue, or of the preprint.
        arxiv: The arXiv identifier (``"2406.16232"``), or ``""`` when there is none.
    """

    authors: str
    title: str
    venue: str
    year: int
    arxiv: str = ""

    def short(self) -> str:
        """``Quinton & Rey 2024, arXiv:2406.16232`` (the ``hf-jd aggregators`` column)."""
        text = f"{self.authors} {self.year}"
        return f"{text}, arXiv:{self.arxiv}" if self.arxiv else text

    def reference(self) -> str:
        """``Liu et al., NeurIPS 2021, arXiv:2110.14048`` (the README's citation)."""
        text = f"{self.authors}, {self.venue} {self.year}" if self.venue else f"{self.authors} {self.year}"
        return f"{text}, arXiv:{self.arxiv}" if self.arxiv else text


def _no_kwargs(m: int) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class AggregatorSpec:
    """What the package says about one aggregator, declared next to its class by :func:`aggregator_spec`.

    Args:
        name: The ``--aggregator`` name (lower case, ``_`` between words).
        summary: What the method does, in one line (the README's *method* column, ``hf-jd aggregators -v``).
        papers: The papers it comes from, the main one first (none for plain averages).
        needs_jacobian: ``True`` when it needs the explicit Jacobian (it is not Gramian-weighted).
        state: What it keeps from one step to the next (``"EMA targets"``), ``""`` when it is stateless.
        loss_aware: ``True`` when it also uses the loss values (``set_losses``).
        example_kwargs: The keyword arguments that build it for ``m`` objectives in the tests (e.g. the
            weights that ``constant`` needs, a seed); its defaults are used otherwise.
        cls: The class, set by :func:`aggregator_spec`.
    """

    name: str
    summary: str
    papers: tuple[Paper, ...] = ()
    needs_jacobian: bool = False
    state: str = ""
    loss_aware: bool = False
    example_kwargs: Callable[[int], Mapping[str, Any]] = field(default=_no_kwargs, compare=False, repr=False)
    cls: type[Aggregator] | None = field(default=None, compare=False)

    @property
    def stateful(self) -> bool:
        """Whether it keeps a state between steps (saved in checkpoints, cleared by ``reset()``)."""
        return bool(self.state)

    @property
    def path(self) -> str:
        """``hf_jd.aggregation._upgrad:UPGrad``: where the class is defined."""
        if self.cls is None:
            return ""
        return f"{self.cls.__module__}:{self.cls.__qualname__}"

    def build(self, m: int, **kwargs: Any) -> Aggregator:
        """An instance for ``m`` objectives: :attr:`example_kwargs`, updated with ``kwargs``."""
        if self.cls is None:
            raise TypeError(f"The spec {self.name!r} is not attached to a class (use @aggregator_spec).")
        return self.cls(**{**self.example_kwargs(m), **kwargs})


def aggregator_spec(
    *,
    name: str,
    summary: str,
    papers: tuple[Paper, ...] = (),
    needs_jacobian: bool = False,
    state: str = "",
    loss_aware: bool = False,
    example_kwargs: Callable[[int], Mapping[str, Any]] = _no_kwargs,
) -> Callable[[_A], _A]:
    """Class decorator: attach an :class:`AggregatorSpec` to an aggregator class (as ``cls.spec``).

    The spec is checked against the class at once: ``needs_jacobian`` must be ``True`` exactly when the
    class is not a :class:`GramianWeightedAggregator`, ``state`` must be non-empty exactly when it is
    :class:`Stateful`, ``loss_aware`` exactly when it is :class:`LossAware`; a mismatch raises
    ``TypeError`` when the module is imported. Built-in classes (in ``hf_jd.aggregation``) are then
    found by the registry; another class becomes available with ``register_aggregator``.
    """

    def attach(cls: _A) -> _A:
        spec = AggregatorSpec(name, summary, papers, needs_jacobian, state, loss_aware, example_kwargs, cls)
        problems = spec_problems(spec)
        if problems:
            raise TypeError(f"The spec of {cls.__qualname__} does not fit the class: {'; '.join(problems)}.")
        cls.spec = spec  # type: ignore[attr-defined]
        return cls

    return attach


def spec_problems(spec: AggregatorSpec) -> list[str]:
    """What in ``spec`` contradicts its class (empty when they agree)."""
    cls = spec.cls
    if not (isinstance(cls, type) and issubclass(cls, Aggregator)):
        return [f"{cls!r} is not an Aggregator subclass"]
    problems = []
    if spec.name != normalised_name(spec.name) or not spec.name:
        problems.append(
            f"the name {spec.name!r} is not lower case with '_' (write {normalised_name(spec.name)!r})"
        )
    if spec.needs_jacobian == issubclass(cls, GramianWeightedAggregator):
        problems.append(
            f"needs_jacobian={spec.needs_jacobian} but the class is "
            f"{'' if spec.needs_jacobian else 'not '}a GramianWeightedAggregator"
        )
    if spec.stateful != issubclass(cls, Stateful):
        problems.append(f"state={spec.state!r} but the class is {'not ' if spec.stateful else ''}Stateful")
    if spec.loss_aware != issubclass(cls, LossAware):
        problems.append(
            f"loss_aware={spec.loss_aware} but the class is {'not ' if spec.loss_aware else ''}LossAware"
        )
    return problems


def spec_of(cls: type) -> AggregatorSpec | None:
    """The spec declared on ``cls`` itself (a subclass does not inherit its base's), or ``None``."""
    spec = vars(cls).get("spec")
    return spec if isinstance(spec, AggregatorSpec) else None
