"""The :class:`Stateful` and :class:`LossAware` bases, the checks of a loaded state and of user-given loss values.

An aggregator or weighting is stateful when its output depends on the previous calls (moving
averages, learned weights, a random generator). Its state is its module ``extra_state``: only tensors
and plain values, so that a checkpoint is read with ``torch.load(weights_only=True)``.

A stateful class declares its state once, as class attributes::

    class MoDoWeighting(Stateful, Weighting):
        lambd = cpu_tensor()  # the weights, float64 on the CPU (None until the first call)

and :class:`Stateful` does the rest: :meth:`Stateful.reset` puts every field back to its initial
value, ``state_dict()`` saves the fields in declaration order (``get_extra_state``) and
``load_state_dict()`` checks and restores them (``set_extra_state``, through :func:`read_state`).
"""

from __future__ import annotations

import warnings
from abc import ABC
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor, nn

from .._validation import ArgumentTypeError
from ._attributes import owner_name

_T = TypeVar("_T")


def cpu64(tensor: Tensor | None) -> Tensor | None:
    """A detached float64 CPU copy of ``tensor`` (``None`` stays ``None``)."""
    return None if tensor is None else tensor.detach().to(device="cpu", dtype=torch.float64).clone()


def _detached_copy(tensor: Tensor | None) -> Tensor | None:
    """A detached copy of ``tensor`` on its device, in its dtype (``None`` stays ``None``)."""
    return None if tensor is None else tensor.detach().clone()


def _same(value: _T) -> _T:
    return value


class StateField(Generic[_T]):
    """One field of a stateful module's state: an attribute with an initial value, saved by ``state_dict()``.

    Reads give the initial value until the first assignment (and again after :meth:`Stateful.reset`).
    ``copy`` is applied to the value when it is saved and when it is loaded (e.g. a float64 CPU copy).
    ``saved=False`` is for a value that lives until the next call only (the pending loss values): reset
    and cleared by a load, never saved. ``ndim`` also checks a loaded tensor's number of dimensions.

    Use the constructors :func:`counter`, :func:`cpu_tensor`, :func:`jacobian_tensor` and :func:`pending`.
    """

    def __init__(
        self,
        types: tuple[type, ...],
        initial: _T,
        copy: Callable[[Any], Any] = _same,
        *,
        saved: bool = True,
        ndim: int | None = None,
    ) -> None:
        self.types = types
        self.initial = initial
        self.copy = copy
        self.saved = saved
        self.ndim = ndim
        self.name = ""

    def __set_name__(self, cls: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, cls: Any = None) -> _T:
        if instance is None:
            return self  # type: ignore[return-value]
        return instance.__dict__.get(self.name, self.initial)  # type: ignore[no-any-return]

    def __set__(self, instance: Any, value: _T) -> None:
        instance.__dict__[self.name] = value

    def reset(self, instance: Any) -> None:
        """Put the field of ``instance`` back to its initial value."""
        instance.__dict__.pop(self.name, None)


def counter() -> StateField[int]:
    """A saved call counter, ``0`` at first."""
    return StateField((int,), 0)


def cpu_tensor(ndim: int | None = None) -> StateField[Tensor | None]:
    """A saved tensor kept in float64 on the CPU (weights, averages), ``None`` at first."""
    return StateField((Tensor, type(None)), None, cpu64, ndim=ndim)


def jacobian_tensor() -> StateField[Tensor | None]:
    """A saved Jacobian-shaped tensor kept on the Jacobian's device and in its dtype, ``None`` at first."""
    return StateField((Tensor, type(None)), None, _detached_copy)


def pending() -> StateField[Tensor | None]:
    """A value for the next call only (not saved; cleared by a reset and by a load), ``None`` at first."""
    return StateField((Tensor, type(None)), None, saved=False)


def _has_methods(cls: type, names: tuple[str, ...]) -> bool:
    """Whether ``cls`` or a base defines every method of ``names`` (``collections.abc``'s check)."""
    for name in names:
        owner = next((base for base in cls.__mro__ if name in vars(base)), None)
        if owner is None or vars(owner)[name] is None:
            return False
    return True


class Stateful(ABC):  # noqa: B024 (an ABC for __subclasshook__: the structural isinstance)
    """A stateful aggregator or weighting (TorchJD's ``Stateful``): mix it into an ``nn.Module`` subclass.

    ``state_dict()`` / ``load_state_dict()`` save and restore the state (tensors and plain values),
    :meth:`reset` forgets it: the next call behaves like the first call of a fresh instance.

    The state is declared once, as :class:`StateField` class attributes (:func:`counter`,
    :func:`cpu_tensor`, :func:`jacobian_tensor`, :func:`pending`). A class that declares saved fields
    gets ``get_extra_state`` / ``set_extra_state``: the saved state is the dict of those fields, in
    declaration order, checked on load by :func:`read_state`. A class without fields of its own (an
    aggregator whose state is its weighting's) saves nothing itself; its sub-modules save theirs.
    :meth:`reset` resets the fields, then every stateful sub-module.

    ``isinstance(x, Stateful)`` is also true for any class that defines ``state_dict``,
    ``load_state_dict`` and ``reset`` without deriving from this one (the check of the former
    ``typing.Protocol``).
    """

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is Stateful:
            return _has_methods(other, ("state_dict", "load_state_dict", "reset"))
        return NotImplemented

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = [value for value in vars(cls).values() if isinstance(value, StateField) and value.saved]
        if own and "get_extra_state" not in vars(cls):
            # Only then: nn.Module saves an ``_extra_state`` entry for every class that overrides these.
            cls.get_extra_state = Stateful._get_state  # type: ignore[attr-defined]
            cls.set_extra_state = Stateful._set_state  # type: ignore[attr-defined]

    @classmethod
    def state_fields(cls) -> tuple[StateField[Any], ...]:
        """Every :class:`StateField` of the class, the bases' first, each in declaration order."""
        fields: dict[str, StateField[Any]] = {}
        for base in reversed(cls.__mro__):
            for name, value in vars(base).items():
                if isinstance(value, StateField):
                    fields[name] = value
        return tuple(fields.values())

    def reset(self) -> None:
        """Forget the state: every field back to its initial value, then every stateful sub-module reset."""
        for field in self.state_fields():
            field.reset(self)
        if isinstance(self, nn.Module):
            for child in self.children():
                if isinstance(child, Stateful):
                    child.reset()

    def _get_state(self) -> dict[str, Any]:
        return {
            field.name: field.copy(getattr(self, field.name)) for field in self.state_fields() if field.saved
        }

    def _set_state(self, state: Any) -> None:
        fields = self.state_fields()
        owner = type(self).__name__
        state = read_state(owner, state, {field.name: field.types for field in fields if field.saved})
        for field in fields:
            value = state[field.name] if field.saved else field.initial
            if field.ndim is not None and isinstance(value, Tensor) and value.dim() != field.ndim:
                raise ValueError(
                    f"Invalid state for {owner}: {field.name!r} must be a {field.ndim}-D tensor, as produced by "
                    f"its state_dict(), got shape {tuple(value.shape)}."
                )
        for field in fields:
            setattr(self, field.name, field.copy(state[field.name]) if field.saved else field.initial)


class LossAware(Stateful):
    """A stateful method that also uses the objectives' loss values, given by :meth:`set_losses` before a call.

    The losses wait in the :func:`pending` field ``_losses`` for the next call (which takes them with
    ``losses, self._losses = self._losses, None``); a reset or a load clears them. An aggregator whose
    weighting is the loss-aware part passes them on: :meth:`set_losses` gives them to its loss-aware
    sub-modules when it has any. ``JDTrainer`` calls :meth:`set_losses` before every step.

    ``isinstance(x, LossAware)`` is true for any class with a ``set_losses`` method, derived from this
    one or not (what the trainer checked before this base existed).
    """

    _losses = pending()

    @classmethod
    def __subclasshook__(cls, other: type) -> bool:
        if cls is LossAware:
            return _has_methods(other, ("set_losses",))
        return NotImplemented

    def set_losses(self, losses: Tensor | Sequence[float]) -> None:
        """Give the loss values of the objectives (one per row, in row order) for the next call."""
        inner = (
            [child for child in self.children() if isinstance(child, LossAware)]
            if isinstance(self, nn.Module)
            else []
        )
        if inner:
            for child in inner:
                child.set_losses(losses)
        else:
            self._losses = as_losses(owner_name(None, self), losses)


def read_state(owner: str, state: Any, spec: Mapping[str, tuple[type, ...]]) -> dict[str, Any]:
    """Return ``state`` if it is a dict with one entry of the given types per key of ``spec``.

    ``type(None)`` in a key's types allows ``None``; ``bool`` is never taken for ``int``. Raises a
    ``ValueError`` naming ``owner`` and the expected entries otherwise.
    """

    def fits(value: Any, types: tuple[type, ...]) -> bool:
        if isinstance(value, bool) and bool not in types:
            return False
        return isinstance(value, types)

    if isinstance(state, dict) and all(key in state and fits(state[key], t) for key, t in spec.items()):
        return state
    expected = ", ".join(
        f"{key!r} ({' or '.join('None' if t is type(None) else t.__name__ for t in types)})"
        for key, types in spec.items()
    )
    got = f"a dict with keys {sorted(state)}" if isinstance(state, dict) else type(state).__name__
    raise ValueError(
        f"Invalid state for {owner}: expected a dict with {expected}, as produced by its state_dict(), "
        f"got {got}."
    )


def as_losses(owner: str, losses: Tensor | Sequence[float]) -> Tensor:
    """The loss values given to ``set_losses``: a finite, non-empty 1-D float64 CPU tensor."""
    try:
        vector = torch.as_tensor(losses).detach().to(device="cpu", dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ArgumentTypeError(
            f"{owner}.set_losses needs a 1-D tensor of loss values, got {losses!r} ({error})."
        ) from None
    if vector.numel() == 0 or not bool(torch.isfinite(vector).all()):
        raise ValueError(f"{owner}.set_losses needs finite loss values, got {vector.tolist()}.")
    return vector.clone()


def check_loss_count(owner: str, losses: Tensor, m: int) -> None:
    """Raise unless there is one loss value per objective."""
    if losses.numel() != m:
        raise ValueError(
            f"{owner} was given {losses.numel()} loss values (set_losses) but the Jacobian has {m} rows: "
            "give one loss per objective, in the order of the rows."
        )


def warn_restart(owner: str, before: int, now: int, what: str) -> None:
    """Warn that the state restarts because the number of objectives changed."""
    warnings.warn(
        f"{owner}: the number of objectives changed from {before} to {now}; its {what} restart(s) "
        "from the initial value.",
        stacklevel=3,
    )


def warn_shape_restart(owner: str, before: torch.Size, now: torch.Size, what: str) -> None:
    """Warn that the Jacobian-shaped state restarts because the Jacobian's shape changed."""
    warnings.warn(
        f"{owner}: the Jacobian's shape changed from {tuple(before)} to {tuple(now)}; its {what}.",
        stacklevel=3,
    )
