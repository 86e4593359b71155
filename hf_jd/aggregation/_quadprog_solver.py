r"""Reference dual-cone solver: one Goldfarb–Idnani QP per right-hand side with ``quadprog``.

Solves :math:`\min_v v^\top G v \text{ s.t. } v \succeq u` exactly for every row ``u`` of ``U``
(Quinton & Rey, arXiv:2406.16232, Proposition 1). It is the test oracle of the fast solvers and the
fallback of :func:`~hf_jd.aggregation._active_set.solve_dual_cone_active_set`.
"""

from __future__ import annotations

import numpy as np
import torch
from quadprog import solve_qp
from torch import Tensor


def solve_dual_cone_quadprog(U: Tensor, gramian: Tensor, state: object = None) -> Tensor:
    """Exact reference: one Goldfarb–Idnani QP per right-hand side with ``quadprog`` (float64, CPU).

    Cost grows as ``k * m^3``; it is the oracle the fast solvers are tested against. ``state`` is
    accepted for signature compatibility and ignored.
    """
    G = gramian.detach().to(device="cpu", dtype=torch.float64).numpy()
    G = np.ascontiguousarray((G + G.T) / 2)
    m = G.shape[0]
    constraints = np.eye(m)
    linear = np.zeros(m)
    U_np = U.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1, m)
    V = np.empty_like(U_np)
    for i, u in enumerate(U_np):
        V[i] = solve_qp(G, linear, constraints, u, 0)[0]
    return torch.from_numpy(V).reshape(U.shape).to(device=U.device, dtype=U.dtype)
