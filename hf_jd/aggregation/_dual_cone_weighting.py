r"""Shared base of the weightings that project onto the dual cone (UPGrad, DualProj)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from .._validation import ArgumentTypeError, check_non_negative_number
from ._attributes import Checked
from ._constant import ConstantWeighting
from ._dual_cone import ActiveSetState, project_weights, resolve_solver
from ._gramian_utils import normalize_gramian, regularize_gramian, symmetrize
from ._mean import MeanWeighting
from ._preference import PrefVector, pref_weights
from ._weighting_bases import Weighting, check_finite_gramian


def _projector_settings(owner: str, projector: Any) -> tuple[Any, Any, str]:
    """``(norm_eps, reg_eps, "quadprog")`` of a TorchJD ``QuadprogProjector`` (read by attribute)."""
    if not (hasattr(projector, "norm_eps") and hasattr(projector, "reg_eps")):
        raise ArgumentTypeError(
            f"{owner}'s projector must be TorchJD's QuadprogProjector (an object with norm_eps and reg_eps), "
            f"got {projector!r}; hf_jd solves the projection itself: choose it with solver=..."
        )
    return projector.norm_eps, projector.reg_eps, "quadprog"


def _check_solver(owner: str, name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{owner}'s {name} must be a string, got {value!r}.")
    resolve_solver(value)  # fail early on an unknown name
    return value


class DualConeWeighting(Weighting):
    r"""Holds the settings of a dual-cone weighting and solves its projections.

    The Gramian is prepared as :math:`\hat G = G / \mathrm{tr}(G) + \varepsilon I` (trace normalisation
    makes the weights invariant to the scale of :math:`J`; the ridge makes the QP strictly convex),
    then every right-hand side :math:`u` is projected: :math:`\arg\min_v v^\top \hat G v` s.t.
    :math:`v \succeq u` (arXiv:2406.16232, Proposition 1).

    Every argument is an attribute, checked again when assigned. ``weighting`` is the preference
    weighting (TorchJD's): ``ConstantWeighting(pref_vector)``, or ``MeanWeighting()`` when
    ``pref_vector`` is ``None``.

    Args:
        pref_vector: Preference weights ``p`` (one per objective); ``None`` for ``1/m``.
        norm_eps: Below this trace the Gramian is treated as zero.
        reg_eps: Ridge added to the normalised Gramian so the QP is strictly convex.
        solver: Dual-cone solver name (``"auto"`` picks the fastest exact one, ``"quadprog"`` is the
            reference).
        projector: TorchJD's ``projector`` argument, accepted so that TorchJD code runs unchanged: a
            ``QuadprogProjector(norm_eps=..., reg_eps=...)`` (any object with these two attributes)
            sets ``norm_eps``, ``reg_eps`` and ``solver="quadprog"``; ``None`` keeps the arguments above.
            The ``projector`` attribute is that object while these settings are still its own, ``None``
            otherwise (hf_jd's default: ``solver="auto"``, no projector object).
    """

    pref_vector = PrefVector(None, MeanWeighting, ConstantWeighting)
    norm_eps = Checked(None, check_non_negative_number)
    reg_eps = Checked(None, check_non_negative_number)
    solver = Checked(None, _check_solver)

    def __init__(
        self,
        pref_vector: Tensor | Sequence[float] | None = None,
        norm_eps: float = 1e-4,
        reg_eps: float = 1e-4,
        solver: str = "auto",
        projector: Any = None,
    ) -> None:
        super().__init__()
        self.pref_vector = pref_vector
        self.norm_eps = norm_eps
        self.reg_eps = reg_eps
        self.solver = solver
        self._projector: Any = None
        if projector is not None:
            self.projector = projector
        self._solver_state = ActiveSetState()  # warm-start data of the solver, never changes the result

    @property
    def projector(self) -> Any:
        """TorchJD's ``QuadprogProjector`` these settings came from, or ``None`` (see the class docstring)."""
        projector = self._projector
        if projector is None or self.solver != "quadprog":
            return None
        if (projector.norm_eps, projector.reg_eps) != (self.norm_eps, self.reg_eps):
            return None
        return projector

    @projector.setter
    def projector(self, projector: Any) -> None:
        if projector is not None:
            owner = type(self).__name__.removesuffix("Weighting")
            self.norm_eps, self.reg_eps, self.solver = _projector_settings(owner, projector)
        self._projector = projector

    def preference(self, gramian: Tensor) -> Tensor:
        """The preference weights ``p`` for this Gramian (validated against its size)."""
        return pref_weights(self.pref_vector, gramian)

    def project(self, U: Tensor, gramian: Tensor) -> Tensor:
        """Project every row of ``U`` with the prepared ``gramian``; returns ``V`` like ``U``."""
        check_finite_gramian(gramian)
        prepared = regularize_gramian(normalize_gramian(symmetrize(gramian), self.norm_eps), self.reg_eps)
        return project_weights(U, prepared, self.solver, self._solver_state)

    def arguments_repr(self) -> str:
        pref = None if self.pref_vector is None else self.pref_vector.tolist()
        projector = self.projector
        if projector is not None:
            return f"pref_vector={pref}, projector={projector!r}"
        return f"pref_vector={pref}, norm_eps={self.norm_eps}, reg_eps={self.reg_eps}, solver={self.solver!r}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.arguments_repr()})"
