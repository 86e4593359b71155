r"""PCD: Priority-Constrained Descent, a stateful weighting of the Gramian.

Varam & AlHajri, *Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical
Multi-Objective Optimization*, TMLR 2026 (arXiv:2606.29521). The quadratic program is solved exactly
with the dual active-set method of Goldfarb & Idnani (*A numerically stable dual method for solving
strictly convex quadratic programs*, Math. Programming 27, 1983), written for an identity Hessian so
that every quantity it needs is an entry of the Gramian.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import numpy as np
import torch
from torch import Tensor

from .._validation import ArgumentTypeError, check_integer, check_non_negative_number, check_number_in
from ._aggregator_bases import GramianWeightedAggregator
from ._attributes import Checked, Delegated
from ._spec import Paper, aggregator_spec
from ._stateful import Stateful, counter, cpu_tensor, warn_restart
from ._weighting_bases import Weighting, check_finite_gramian

# A constraint counts as satisfied when it is violated by at most this fraction of the largest squared
# norm of the normalised gradients: well above the round-off of the slacks, far below any tau > 0.
_VIOLATION_TOL = 1e-10


def _rate_below_one(owner: str, name: str, value: object) -> float:
    rate = check_number_in(owner, name, value, 0.0, 1.0)
    if rate == 1.0:
        raise ValueError(
            f"{owner}'s {name} must be < 1 ({name} = 1 never averages a gradient norm), got 1.0."
        )
    return rate


def _as_tau(tau: object) -> float | Tensor:
    """``tau`` as a float in [0, 1], or as a 1-D tensor of values in [0, 1]: a float tensor is kept as
    it is (TorchJD: ``aggregator.tau is tensor``), anything else becomes a float64 CPU tensor."""
    if isinstance(tau, Tensor) and tau.is_floating_point() and not tau.requires_grad and tau.dim() == 1:
        if not bool(((tau >= 0.0) & (tau <= 1.0)).all()):
            raise ValueError(f"PCD's tau must be in [0, 1], got {tau.tolist()}.")
        return tau
    if isinstance(tau, (Tensor, Sequence)) and not isinstance(tau, str):
        try:
            # float64 from the start: a list of Python floats must not pass through float32.
            vector = torch.as_tensor(tau, dtype=torch.float64, device="cpu").detach()
        except (TypeError, ValueError, RuntimeError) as error:
            raise ArgumentTypeError(
                f"PCD's tau must be a number or a vector of numbers, got {tau!r}."
            ) from error
        if vector.dim() != 1:
            raise ValueError(
                f"PCD's tau must be a number or a vector (1-D), got shape {tuple(vector.shape)}."
            )
        if not bool(((vector >= 0.0) & (vector <= 1.0)).all()):
            raise ValueError(f"PCD's tau must be in [0, 1], got {vector.tolist()}.")
        return vector.clone()
    return check_number_in("PCD", "tau", tau, 0.0, 1.0)


def solve_pcd(G: np.ndarray, taus: np.ndarray, dependence_tol: float) -> np.ndarray:
    r"""Weights :math:`w = (1, \mu)` of the solution :math:`d = g_1 + \sum_{j \ge 2} \mu_j g_j` of

    .. math:: \min_d \tfrac12 \|d - g_1\|^2 \quad \text{s.t.} \quad g_j^\top d \ge \tau_j \|g_j\|^2
              \quad (j = 2, \dots, m),

    given the Gramian ``G`` of :math:`g_1, \dots, g_m` (row 0 is :math:`g_1`); :math:`\mu \ge 0` are
    the multipliers of the constraints. Returns :math:`e_1` when the constraints are infeasible.

    Goldfarb–Idnani dual active-set method with an identity Hessian: start from the unconstrained
    minimiser :math:`d = g_1` (:math:`\mu = 0`), then repeatedly take the most violated constraint
    :math:`p` and move :math:`d` along :math:`z`, the part of :math:`g_p` orthogonal to the gradients
    of the active constraints (:math:`z = g_p - \sum_{j \in A} r_j g_j`, :math:`G_{AA} r = G_{Ap}`),
    raising :math:`\mu_p` and lowering :math:`\mu_A` by :math:`r` per unit step. The step stops when
    constraint :math:`p` holds (then :math:`p` joins the active set) or when an active multiplier
    reaches zero (that constraint leaves, and :math:`p` is tried again). If neither can happen —
    :math:`z = 0` and no multiplier decreases — the constraints are infeasible. The slacks
    :math:`g_j^\top d - \tau_j \|g_j\|^2 = G_{j1} + (G_{SS}\mu)_j - \tau_j G_{jj}` and
    :math:`\|z\|^2 = G_{pp} - G_{pA} r` are read from ``G``. :math:`z` counts as zero when
    :math:`\|z\|^2 \le` ``dependence_tol`` :math:`\cdot\, G_{pp}` (then :math:`g_p` is a combination
    of the active gradients, up to the precision of ``G``).

    The dual objective increases strictly at every full step, so the method stops after finitely
    many steps (about :math:`m` in practice); a cap of :math:`10 m + 10` steps only guards against
    cycling caused by round-off (the current iterate is then returned).
    """
    m = G.shape[0]
    weights = np.zeros(m)
    weights[0] = 1.0
    if m == 1:
        return weights
    S = G[1:, 1:]
    offset = G[1:, 0] - taus * S.diagonal()  # slacks at mu = 0; negative means g_1 violates it
    mu = np.zeros(m - 1)
    active: list[int] = []
    atol = _VIOLATION_TOL * max(float(G.diagonal().max()), np.finfo(np.float64).tiny)
    steps_left = 10 * m + 10
    while steps_left > 0:
        slacks = offset + S @ mu
        slacks[active] = 0.0  # active constraints hold with equality, up to round-off
        p = int(np.argmin(slacks))
        if slacks[p] >= -atol:
            break
        while steps_left > 0:
            steps_left -= 1
            slack_p = float(offset[p] + S[p] @ mu)
            if active:
                r = np.linalg.solve(S[np.ix_(active, active)], S[active, p])
                z_sq_norm = float(S[p, p] - S[p, active] @ r)
                shrinking = r > 0
                ratios = np.full(len(active), math.inf)
                ratios[shrinking] = mu[active][shrinking] / r[shrinking]
                leaving = int(np.argmin(ratios))
                partial = float(ratios[leaving])
            else:
                r, z_sq_norm, leaving, partial = np.zeros(0), float(S[p, p]), -1, math.inf
            full = -slack_p / z_sq_norm if z_sq_norm > dependence_tol * S[p, p] else math.inf
            step = min(partial, full)
            if math.isinf(step):
                return weights  # infeasible: no direction raises g_p·d without breaking an active one
            if active:
                mu[active] -= step * r
            mu[p] += step
            if full <= partial:
                active.append(p)
                break
            mu[active[leaving]] = 0.0
            del active[leaving]
    weights[1:] = np.clip(mu, 0.0, None)
    return weights


class PCDWeighting(Stateful, Weighting):
    r"""Weights of :class:`PCD` (TorchJD's ``PCDWeighting``).

    With :math:`g_1` the primary gradient (row ``primary``, default ``0``) and :math:`g_2, \dots,
    g_m` the secondary ones (the other rows, in order), each gradient is normalised,
    :math:`\tilde g_i = s_i g_i` with :math:`s_i = 1/\sqrt{\hat v_i + \epsilon}` and :math:`\hat v_i`
    the bias-corrected exponential moving average (decay :math:`\beta`) of :math:`\|g_i\|^2 = G_{ii}`
    over the calls (:math:`s_i = 0` when :math:`\hat v_i + \epsilon = 0`), and

    .. math:: \tilde d = \arg\min_d \tfrac12 \|d - \tilde g_1\|^2 \quad \text{s.t.} \quad
              \tilde g_j^\top d \ge \tau_j \|\tilde g_j\|^2 \ (j \ge 2),
              \qquad d = \frac{\|g_1\|}{\|\tilde d\|}\, \tilde d ,

    i.e. the primary direction with the least distortion that gives every secondary objective at
    least the fraction :math:`\tau_j` of the first-order progress of a step along its own normalised
    gradient (Varam & AlHajri, arXiv:2606.29521). With :math:`\tilde d = \sum_i u_i \tilde g_i`
    (from :func:`solve_pcd`, exact, on the normalised Gramian :math:`s_i s_j G_{ij}` in float64 on the
    CPU), the weights are :math:`w_i = u_i s_i \|g_1\| / \|\tilde d\|`. Special cases: :math:`g_1 = 0`
    gives :math:`w = 0`; infeasible constraints (possible for :math:`m \ge 3`, e.g. two opposite
    secondary gradients) are dropped, :math:`w = e_1`; :math:`\tilde d = 0` up to the precision of the
    Gramian gives :math:`w = 0`. "Up to precision" uses :math:`\delta = \max(10^{-9}, 10\,
    \varepsilon_{\text{dtype}})`: a squared norm below :math:`\delta` times its scale is zero.

    Stateful: the moving average (float64, CPU) and the number of calls are part of
    :meth:`state_dict` and cleared by :meth:`reset`; they restart with a warning when the number of
    objectives changes. A non-finite Gramian raises ``ValueError`` and leaves the average unchanged.

    Args:
        tau: :math:`\tau \in [0, 1]` (default ``0.02``), one float for every secondary objective or a
            vector of :math:`m - 1` values (secondary objectives in row order).
        beta: Decay :math:`\beta \in [0, 1)` of the moving average (default ``0.999``).
        eps: :math:`\epsilon \ge 0` added to the average before its inverse square root
            (default ``1e-8``).
        primary: Row of the primary objective (keyword only, default ``0``, TorchJD's convention).
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    tau = Checked("PCD", lambda owner, name, value: _as_tau(value))
    beta = Checked("PCD", _rate_below_one)
    eps = Checked("PCD", check_non_negative_number)
    primary = Checked("PCD", partial(check_integer, minimum=0))
    sq_norm_ema = cpu_tensor()  # the moving average of the squared norms, in row order
    n_steps = counter()  # calls since the average started

    def __init__(
        self,
        tau: float | Tensor | Sequence[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        *,
        primary: int = 0,
    ) -> None:
        super().__init__()
        self.tau = tau
        self.beta = beta
        self.eps = eps
        self.primary = primary

    def _taus(self, m: int) -> np.ndarray:
        if isinstance(self.tau, Tensor):
            if self.tau.numel() != m - 1:
                raise ValueError(
                    f"PCD's tau has {self.tau.numel()} values but there are {m - 1} secondary objectives: give "
                    "one value per secondary objective, or a single float."
                )
            return self.tau.detach().to(device="cpu", dtype=torch.float64).numpy()
        return np.full(m - 1, self.tau)

    def forward(self, gramian: Tensor) -> Tensor:
        check_finite_gramian(gramian)
        m = gramian.shape[0]
        if self.primary >= m:
            raise ValueError(
                f"PCD(primary={self.primary}) got {m} objectives: the primary objective must be one of the "
                f"rows 0..{m - 1}."
            )
        taus = self._taus(m)
        order = [self.primary] + [i for i in range(m) if i != self.primary]
        G = gramian.detach().to(device="cpu", dtype=torch.float64)
        G = ((G + G.T) / 2)[order][:, order]
        sq_norms = G.diagonal()
        if self.sq_norm_ema is None or self.sq_norm_ema.numel() != m:
            if self.sq_norm_ema is not None:
                warn_restart("PCD", self.sq_norm_ema.numel(), m, "moving average of squared norms")
            self.sq_norm_ema, self.n_steps = torch.zeros(m, dtype=torch.float64), 0
        # The state is kept in row order; the computation uses the primary-first order.
        ema = (
            self.beta * self.sq_norm_ema
            + (1.0 - self.beta) * gramian.detach().to(device="cpu", dtype=torch.float64).diagonal()
        )
        self.sq_norm_ema, self.n_steps = ema, self.n_steps + 1
        denominators = (ema[order] / (1.0 - self.beta**self.n_steps) + self.eps).sqrt()
        scales = torch.where(denominators > 0, 1.0 / denominators, torch.zeros_like(denominators))
        precision = max(1e-9, 10.0 * torch.finfo(gramian.dtype).eps)
        weights = torch.zeros(m, dtype=torch.float64)
        if sq_norms[0] > 0:
            normalized = (G * torch.outer(scales, scales)).numpy()
            u = solve_pcd(normalized, taus, dependence_tol=precision)
            direction_sq_norm = float(u @ normalized @ u)
            magnitude = float(np.abs(u) @ np.sqrt(np.clip(normalized.diagonal(), 0.0, None))) ** 2
            if direction_sq_norm > precision * magnitude:
                scaled = torch.from_numpy(u) * scales * math.sqrt(float(sq_norms[0]) / direction_sq_norm)
                weights[order] = scaled
        return weights.to(dtype=gramian.dtype, device=gramian.device)

    def arguments_repr(self) -> str:
        tau = self.tau.tolist() if isinstance(self.tau, Tensor) else self.tau
        primary = "" if self.primary == 0 else f", primary={self.primary}"  # hf_jd's: shown when set
        return f"tau={tau}, beta={self.beta}, eps={self.eps}{primary}"

    def __repr__(self) -> str:
        return f"PCDWeighting({self.arguments_repr()})"


@aggregator_spec(
    name="pcd",
    summary="Priority-Constrained Descent: closest to the primary row (row 0) while each other objective gets a fraction `tau` of its normalised progress, exact active set",
    papers=(
        Paper(
            "Varam & AlHajri",
            "Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical Multi-Objective Optimization",
            "TMLR",
            2026,
            "2606.29521",
        ),
    ),
    state="EMA of squared norms, counter",
)
class PCD(Stateful, GramianWeightedAggregator):
    r"""Priority-Constrained Descent (Varam & AlHajri, *Not All Objectives Are Born Equal:
    Priority-Constrained Descent for Hierarchical Multi-Objective Optimization*, TMLR 2026,
    arXiv:2606.29521; TorchJD's ``PCD``).

    The first row (or row ``primary``) is the primary objective, the others are secondary: the update
    follows the primary gradient as closely as possible while each secondary objective gets at least
    a fraction :math:`\tau` of the first-order progress of a step along its own normalised gradient
    (gradients normalised by a moving average of their norms, so :math:`\tau` is scale-free), and has
    the norm of the primary gradient. Solved exactly on the Gramian (see :class:`PCDWeighting`).
    Gramian-only; stateful (``state_dict()``/``load_state_dict()``/``reset()``); not invariant to the
    order of the rows — use it with objectives whose order is fixed (per-task losses).
    Hyper-parameters ``tau=0.02``, ``beta=0.999``, ``eps=1e-8``, ``primary=0``.
    """

    differentiable = False  # weights from a solver or a state: no autograd graph (TorchJD)

    gramian_weighting: PCDWeighting
    tau = Delegated[float | Tensor]()
    beta = Delegated[float]()
    eps = Delegated[float]()
    primary = Delegated[int]()

    def __init__(
        self,
        tau: float | Tensor | Sequence[float] = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        *,
        primary: int = 0,
    ) -> None:
        super().__init__(PCDWeighting(tau=tau, beta=beta, eps=eps, primary=primary))

    def __repr__(self) -> str:
        return f"PCD({self.gramian_weighting.arguments_repr()})"
