r"""Batched exact dual-cone solver: a primal–dual active-set method over all right-hand sides at once.

Problem
-------
For a positive-definite Gramian :math:`G \in \mathbb{R}^{m \times m}` and right-hand sides
:math:`u_1, \dots, u_k \in \mathbb{R}^m` (the rows of ``U``), solve the ``k`` bound-constrained,
strictly convex quadratic programs

.. math:: v_r = \arg\min_v \tfrac12 v^\top G v \quad \text{s.t.} \quad v \succeq u_r .

This is the dual form of the projection onto the dual cone of the rows of a Jacobian (Quinton & Rey,
*Jacobian Descent for Multi-Objective Optimization*, arXiv:2406.16232, Proposition 1): UPGrad uses
:math:`u_i = p_i e_i` (``k = m``), DualProj a single :math:`u = p`.

Optimality (KKT) conditions, with the multiplier :math:`\lambda = G v`:

.. math:: \lambda \succeq 0, \qquad v \succeq u, \qquad \lambda \odot (v - u) = 0 .

For a guess :math:`\mathcal A` of the *active set* (the bounds that hold with equality) and its
complement, the free set :math:`\mathcal F`, the conditions other than the signs are linear:
:math:`v_{\mathcal A} = u_{\mathcal A}` and :math:`\lambda_{\mathcal F} = (G v)_{\mathcal F} = 0`, i.e.

.. math:: G_{\mathcal F \mathcal F}\, v_{\mathcal F} = - G_{\mathcal F \mathcal A}\, u_{\mathcal A}
          \qquad \text{(primal route, a system of size } |\mathcal F|\text{)},

or, equivalently with :math:`H = G^{-1}` and :math:`v = H \lambda`, :math:`\lambda_{\mathcal F} = 0`,

.. math:: H_{\mathcal A \mathcal A}\, \lambda_{\mathcal A} = u_{\mathcal A}
          \qquad \text{(dual route, a system of size } |\mathcal A|\text{)}.

Each right-hand side takes the smaller of the two systems, so no system is larger than ``m / 2``.
The problem is first equilibrated (:math:`G \to D^{-1/2} G D^{-1/2}` with :math:`D = \mathrm{diag}(G)`,
:math:`u \to D^{1/2} u`; bound constraints are invariant under this change of variables), which
makes the tolerances below meaningful for badly scaled Gramians.

Algorithm
---------
The primal–dual active-set method (Hintermüller, Ito & Kunisch, SIAM J. Optim. 13, 2002), which
for this problem is the block principal pivoting method for the linear complementarity problem
:math:`\mathrm{LCP}(G u, G)` in :math:`w = v - u` (Júdice & Pires, Comput. Oper. Res. 21, 1994;
Kim & Park, SIAM J. Sci. Comput. 33, 2011; see also Nocedal & Wright, *Numerical Optimization*,
ch. 16, and Bertsekas' projected Newton method for bound constraints):

1. solve the equality-constrained subproblem of every right-hand side for its current active set:
   a batched factorisation of the gathered systems (padded with the identity, grouped by size), or,
   when the set changed in only a few indices since the last factorisation, a bordered
   (Schur-complement) solve that reuses it (the Schur-complement update of active-set QP methods;
   Gill, Murray, Saunders & Wright, 1990; Nocedal & Wright, §16.5);
2. a free index with :math:`v_j < u_j` or an active index with :math:`\lambda_j < 0` is *infeasible*;
   exchange all of them (full block exchange) while the number of infeasibilities keeps decreasing,
   allow three non-improving full exchanges, then exchange only the infeasible index of largest
   position (Murty's single-pivot rule), which makes the method finite because :math:`G` is a
   P-matrix;
3. stop a right-hand side when its point satisfies the KKT conditions within a tolerance relative
   to :math:`G` and :math:`v` (the *certificate*, see :func:`kkt_residuals`).

Right-hand sides that are not certified within ``max_iter`` iterations (or whose subproblem could not
be factorised) are solved by the exact ``quadprog`` reference, so the result is exact either way.

Starting point. Warm: the previous call's active sets, when the Gramian is close to the previous one
(kept in the caller's :class:`ActiveSetState`). Cold: one active-set step from :math:`v = u`
(:math:`\mathcal A_0 = \{j : (G u)_j > 0\}`; for UPGrad, the objectives that do not conflict with
objective ``i``), followed by a few cheap *inexact* active-set steps whose subproblems are solved
approximately by a few float32 conjugate-gradient iterations (matrix products only), which usually
leaves one or two exact iterations to do. The starting point only changes the number of iterations,
never the result: the answer is whatever satisfies the certificate.

Large subproblems (``m >= 160`` and systems of at least about :math:`2 m^{2/3}` indices, e.g. nearly
orthogonal gradients, where about half of the bounds are free) first go through a phase without
factorisations (:mod:`._preconditioned`): the same active-set iterations, each subproblem solved by
conjugate gradients preconditioned with :math:`H_{\mathcal F\mathcal F}` (:math:`H = G^{-1}`, shared
by all rows), float32 matrix products for all rows at once, then mixed-precision iterative
refinement (residuals :math:`\lambda = G v` in float64) until the same KKT certificate holds. It
costs a few dozen :math:`[k, m] \times [m, m]` products instead of :math:`k |\mathcal F|^3 / 3`
for the factorisations. Rows it does not certify (ill-conditioned systems where CG is slow, systems
that turn out small) continue with the factorisations above.

Modules
-------
* ``_solver``: the entry points (input checks, scaling, quadprog fallback, result and info);
* ``_iterations``: the exact active-set loop and its block principal pivoting;
* ``_preconditioned``: the factorisation-free phase for large subproblems (preconditioned CG,
  float32 products, float64 refinement and certificate);
* ``_start``: the starting point (warm active sets from :class:`ActiveSetState`, cold guess and
  inexact steps);
* ``_kkt``: equilibration and the KKT certificate;
* ``_subproblems``: the batched equality-constrained subproblems (factorised or bordered solves);
* ``_linalg``: batched Cholesky and bordered (Schur-complement) solves on gathered systems;
* ``_workspace``: reusable buffers, the kept factors and their grouping by size;
* ``_threads``: splitting batched LAPACK calls across CPU threads.
"""

from ._kkt import KKTResiduals, kkt_residuals, kkt_tolerance
from ._solver import (
    DEFAULT_MAX_ITER,
    ActiveSetInfo,
    solve_dual_cone_active_set,
    solve_dual_cone_active_set_with_info,
)
from ._start import ActiveSetState

__all__ = [
    "DEFAULT_MAX_ITER",
    "ActiveSetInfo",
    "ActiveSetState",
    "KKTResiduals",
    "kkt_residuals",
    "kkt_tolerance",
    "solve_dual_cone_active_set",
    "solve_dual_cone_active_set_with_info",
]
