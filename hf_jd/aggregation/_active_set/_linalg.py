r"""Batched linear algebra on gathered systems: Cholesky solves, bordered (Schur) solves, index lists.

A *gathered system* of row ``r`` is the principal submatrix :math:`X_{SS}` of :math:`X = G` (primal
route) or :math:`X = H = G^{-1}` (dual route) on an index list :math:`S`, padded with the sink index
``m`` (a zero row and column of the augmented matrices, the identity on the padding).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._threads import factorize_in_place, in_blocks


def cholesky_solve(R: Tensor, b: Tensor) -> Tensor:
    """Solve ``R^T R y = b`` for upper-triangular ``R`` ([n, s, s]) and ``b`` ([n, s, c])."""
    t = torch.linalg.solve_triangular(R.mT, b, upper=False)
    y: Tensor = torch.linalg.solve_triangular(R, t, upper=True)
    return y


def factor_and_solve(M: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Cholesky-factorise the symmetric systems ``M`` ([n, s, s]) and solve them for ``b`` ([n, s, 1]).

    Returns ``(R, info, y)`` with ``M = R^T R``, ``R`` upper triangular, and ``info`` LAPACK's status
    (non-zero where a system is not positive definite). On CPU, ``R`` overwrites ``M`` in its buffer
    and the factorisations are split across threads.
    """
    device = M.device
    if not factorize_in_place(device):
        factor, info = torch.linalg.cholesky_ex(M, upper=True)
        return factor, info, cholesky_solve(factor, b)
    # M is symmetric, so its transpose is the same matrix in the column-major layout LAPACK
    # factorises in place: M = R^T R with R upper triangular.
    factor = M.mT
    count = M.shape[0]
    info = torch.empty(count, dtype=torch.int32, device=device)

    def factor_and_solve_block(lo: int, hi: int) -> None:
        R = factor[lo:hi]
        torch.linalg.cholesky_ex(R, upper=True, out=(R, info[lo:hi]))
        b[lo:hi] = cholesky_solve(R, b[lo:hi])

    in_blocks(device, count, factor_and_solve_block)
    return factor, info, b


def bordered_solve(
    aug: Tensor, factor: Tensor, idx: Tensor, route: Tensor, system: Tensor, base: Tensor, rhs: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Solve modified systems with the Cholesky factors of the systems they were modified from.

    For each row, the factorised system :math:`K = X_{BB}` (``factor`` :math:`R`, :math:`K = R^\top R`,
    on the sink-padded indices ``idx`` of the mask ``base``, matrix ``aug[route]``) became the system
    on the mask ``system``, by removing the indices :math:`R` and adding :math:`D`. The bordered system

    .. math:: \begin{pmatrix} K & X_{BD} & E_R \\ X_{DB} & X_{DD} & 0 \\ E_R^\top & 0 & 0
              \end{pmatrix} \begin{pmatrix} y_B \\ y_D \\ \mu \end{pmatrix} =
              \begin{pmatrix} b_B \\ b_D \\ 0 \end{pmatrix}

    (:math:`E_R` selecting the removed indices, which the last block row pins to zero) is solved
    through its Schur complement of size :math:`|R| + |D|`, with the old factor only.

    Returns the solutions scattered to ``[n, m + 1]`` and a mask of the rows whose Schur complement
    was singular or whose solution is not finite.
    """
    m = aug.shape[-1] - 1
    device = rhs.device
    n, s = idx.shape
    idx_d, idx_r, local_r, in_removed = _changed_indices(idx, system, base, m)
    n_added, n_removed = idx_d.shape[1], idx_r.shape[1]
    q = n_added + n_removed
    # Right-hand sides [b_B, X_BD, E_R] of the factorised system, solved together.
    B = rhs.new_zeros((n, s, 1 + q))
    B[:, :, 0] = rhs.gather(1, idx).masked_fill(in_removed, 0.0)
    if n_added:
        B[:, :, 1 : 1 + n_added] = aug[route[:, None, None], idx[:, :, None], idx_d[:, None, :]]
    if n_removed:
        E_r = rhs.new_zeros((n, s + 1, n_removed)).scatter_(1, local_r[:, None, :], 1.0)
        B[:, :, 1 + n_added :] = E_r[:, :s]

    # With K = R^T R: T = R^{-T} [b, W], so that W^T K^{-1} W = T_w^T T_w and W^T K^{-1} b =
    # T_w^T T_b; then y_B = R^{-1} (T_b - T_w eta).
    def forward(lo: int, hi: int) -> None:
        B[lo:hi] = torch.linalg.solve_triangular(factor[lo:hi].mT, B[lo:hi], upper=False)

    in_blocks(device, n, forward)
    T_b, T_w = B[:, :, :1], B[:, :, 1:]
    Y = rhs.new_zeros((n, m + 1))
    eta_d: Tensor | None
    if q == 0:
        z, eta_d, info = T_b, None, torch.zeros(n, dtype=torch.int32, device=device)
    else:
        eta, info = _solve_schur_complement(aug, route, idx_d, idx_r, T_b, T_w, rhs)
        z = T_b - T_w @ eta
        eta_d = eta[:, :n_added, 0]

    def backward(lo: int, hi: int) -> None:
        z[lo:hi] = torch.linalg.solve_triangular(factor[lo:hi], z[lo:hi], upper=True)

    z = z.contiguous()
    in_blocks(device, n, backward)
    y = z[:, :, 0]
    y = y.masked_fill(in_removed, 0.0)
    Y.scatter_(1, idx, y)
    if eta_d is not None:
        Y.scatter_(1, idx_d, eta_d)
    failed = (info != 0) | ~torch.isfinite(Y).all(dim=1)
    return Y, failed


def _changed_indices(
    idx: Tensor, system: Tensor, base: Tensor, m: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The indices added to (``idx_d``) and removed from (``idx_r``) the factorised systems, sink-padded.

    Also returns the local positions of the removed indices in the factorised systems (``s`` for the
    padding) and the mask of those positions (``[n, s]``).
    """
    n, s = idx.shape
    device = idx.device
    added = system & ~base
    removed = base & ~system
    n_added = int(added.sum(dim=1).max())
    n_removed = int(removed.sum(dim=1).max())
    idx_d = sorted_indices(added, n_added, m)
    idx_r = sorted_indices(removed, n_removed, m)
    # Local position of each removed index in the factorised system (s for padding).
    local = torch.full((n, m + 1), s, dtype=torch.long, device=device)
    local.scatter_(1, idx, torch.arange(s, device=device).expand(n, s).contiguous())
    local[:, m] = s
    local_r = local.gather(1, idx_r)
    in_removed = torch.zeros((n, s + 1), dtype=torch.bool, device=device)
    in_removed.scatter_(1, local_r, True)
    return idx_d, idx_r, local_r, in_removed[:, :s]


def _solve_schur_complement(
    aug: Tensor, route: Tensor, idx_d: Tensor, idx_r: Tensor, T_b: Tensor, T_w: Tensor, rhs: Tensor
) -> tuple[Tensor, Tensor]:
    """Solve the Schur complement system for the border unknowns ``eta = [y_D, mu]``; with LAPACK's status."""
    m = aug.shape[-1] - 1
    n, n_added, n_removed = idx_d.shape[0], idx_d.shape[1], idx_r.shape[1]
    q = n_added + n_removed
    C = rhs.new_zeros((n, q, q))
    C[:, :n_added, :n_added] = aug[route[:, None, None], idx_d[:, :, None], idx_d[:, None, :]]
    # Identity on the padding of both blocks (the block of removed indices is zero otherwise).
    C.diagonal(dim1=1, dim2=2).add_(torch.cat((idx_d == m, idx_r == m), dim=1).to(rhs.dtype))
    schur = C - T_w.mT @ T_w
    c = rhs.new_zeros((n, q, 1))
    c[:, :n_added, 0] = rhs.gather(1, idx_d)
    eta, info = torch.linalg.solve_ex(schur, c - T_w.mT @ T_b)
    return eta, info


def sorted_indices(mask: Tensor, width: int, sink: int) -> Tensor:
    """Per row, the indices where ``mask`` holds, increasing, padded with ``sink`` to ``width``."""
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    valid = torch.arange(width, device=mask.device) < mask.sum(dim=1, keepdim=True)
    return torch.where(valid, order, torch.full_like(order, sink))


def mask_of(idx: Tensor, m: int) -> Tensor:
    """Boolean ``[n, m]`` mask of the (sink-padded) index lists ``idx``."""
    mask = torch.zeros((idx.shape[0], m + 1), dtype=torch.bool, device=idx.device)
    return mask.scatter_(1, idx, True)[:, :m]


SPARSE_PRODUCT_MAX_DENSITY = 0.05  # below this fraction of non-zeros, X @ M goes through a sparse X


def sparse_aware_product(X: Tensor, M: Tensor) -> Tensor:
    """``X @ M`` for ``X`` of shape ``[n, m]``, through a sparse ``X`` when few of its entries are non-zero.

    Used where ``X`` changes ``v`` in a few bounds per row (newly active bounds, UPGrad's right-hand
    sides ``u_i = p_i e_i``): the product then costs ``nnz(X) * m`` instead of ``n * m^2``.
    """
    if X.numel() == 0 or X.device.type != "cpu":
        return X @ M
    nnz = int(torch.count_nonzero(X))
    if nnz > SPARSE_PRODUCT_MAX_DENSITY * X.numel():
        return X @ M
    return torch.sparse.mm(X.to_sparse(), M)
