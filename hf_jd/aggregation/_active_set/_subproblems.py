r"""The equality-constrained subproblems of the active-set iterations, solved for all rows at once."""

from __future__ import annotations

import torch
from torch import Tensor

from ._linalg import bordered_solve, factor_and_solve, mask_of, sorted_indices
from ._workspace import Chunk, Workspace, size_groups

SCHUR_MIN_CHANGES = 8  # a bordered update may change this many indices of the factorised system...
SCHUR_CHANGE_FRACTION = 0.1  # ... or this fraction of it, whichever is larger


class Subproblems:
    r"""Solves the equality-constrained subproblems of the active-set iterations.

    For row ``r`` with active set :math:`\mathcal A` the system is :math:`G_{\mathcal F\mathcal F}`
    (primal route) or :math:`H_{\mathcal A\mathcal A}` (dual route), whichever is smaller when the row
    is factorised. The systems are symmetric positive definite; they are gathered into a buffer and
    factorised there in place by Cholesky. Factors are kept: when the system of a later iteration
    differs from the factorised one by removing the indices :math:`R` and adding :math:`D`, the
    bordered system

    .. math:: \begin{pmatrix} K & X_{BD} & E_R \\ X_{DB} & X_{DD} & 0 \\ E_R^\top & 0 & 0
              \end{pmatrix} \begin{pmatrix} y_B \\ y_D \\ \mu \end{pmatrix} =
              \begin{pmatrix} b_B \\ b_D \\ 0 \end{pmatrix}

    (:math:`K = X_{BB}` the factorised system, :math:`E_R` selecting the removed indices, which the
    last block row pins to zero) is solved through its Schur complement of size :math:`|R| + |D|`,
    with the old factor only (:func:`~._linalg.bordered_solve`).
    """

    def __init__(self, G: Tensor, H: Tensor | None, k: int, workspace: Workspace) -> None:
        m = G.shape[0]
        self.m = m
        self.G = G
        self.H = H
        aug = G.new_zeros((1 if H is None else 2, m + 1, m + 1))
        aug[0, :m, :m] = G
        if H is not None:
            aug[1, :m, :m] = H
        self.aug = aug  # row and column m (the sink index used for padding) are zero
        self.flat = aug.reshape(-1)
        device = G.device
        self.chunk_of = torch.full((k,), -1, dtype=torch.long, device=device)
        self.slot_of = torch.zeros(k, dtype=torch.long, device=device)
        self.base_system = torch.zeros((k, m), dtype=torch.bool, device=device)
        self.base_dual = torch.zeros(k, dtype=torch.bool, device=device)
        self.base_size = torch.zeros(k, dtype=torch.long, device=device)
        self.chunks: dict[int, Chunk] = {}
        self.next_chunk = 0
        self.factorizations = 0
        self.workspace = workspace

    def solve(self, rows: Tensor, U: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``V`` (``v_A = u_A``, ``v_F`` minimising) for ``rows`` and a mask of failures."""
        n, m = U.shape
        has_base = self.chunk_of[rows] >= 0
        base_dual = self.base_dual[rows]
        changes = (torch.where(base_dual[:, None], A, ~A) ^ self.base_system[rows]).sum(dim=1)
        limit = (self.base_size[rows] * SCHUR_CHANGE_FRACTION).long().clamp(min=SCHUR_MIN_CHANGES)
        update = has_base & (changes <= limit)
        # Route: the factorised one for a bordered update, else the smaller system.
        n_active = A.sum(dim=1)
        if self.H is None:
            dual = torch.zeros(n, dtype=torch.bool, device=U.device)
        else:
            dual = torch.where(update, base_dual, n_active < m - n_active)
        system = torch.where(dual[:, None], A, ~A)
        U_active = U * A
        # Right-hand side of each system: u_A (dual route) or -(G u_A)_F (primal route).
        rhs = U.new_zeros((n, m + 1))  # the last entry is the sink's
        rhs[:, :m] = torch.where(dual[:, None], U_active, -(U_active @ self.G))
        Y = U.new_zeros((n, m + 1))
        failed = torch.zeros(n, dtype=torch.bool, device=U.device)

        if bool(update.any()):
            upd = update.nonzero().squeeze(1)
            chunk_ids = self.chunk_of[rows[upd]]
            for cid in torch.unique(chunk_ids).tolist():
                sel = upd[chunk_ids == cid]
                Y[sel], failed[sel] = self._update(self.chunks[cid], rows[sel], system[sel], rhs[sel])
            update = update & ~failed  # rows whose bordered system failed are factorised afresh
            failed.zero_()

        fresh = (~update).nonzero().squeeze(1)
        if fresh.numel():
            self.chunk_of[rows[fresh]] = -1
            self._release_unused()
            Y[fresh], failed[fresh] = self._factorize(rows[fresh], system[fresh], rhs[fresh], dual[fresh])

        Y = Y[:, :m]
        V = U_active + Y  # primal route: Y holds v_F and is zero on the active set
        if self.H is not None and bool(dual.any()):
            V = torch.where(dual[:, None], torch.where(A, U, Y @ self.H), V)  # dual route: Y = lambda
        return V, failed

    def release_all(self) -> None:
        """Return every buffer to the workspace."""
        self.chunk_of.fill_(-1)
        self._release_unused()

    def _release_unused(self) -> None:
        used = set(torch.unique(self.chunk_of).tolist())
        for cid in [c for c in self.chunks if c not in used]:
            self.workspace.give(self.chunks.pop(cid).buffer)

    def _factorize(self, rows: Tensor, system: Tensor, rhs: Tensor, dual: Tensor) -> tuple[Tensor, Tensor]:
        """Gather, factorise and solve the systems of ``rows`` afresh, by groups of similar size."""
        n, m = rhs.shape[0], self.m
        sizes = system.sum(dim=1)
        Y = rhs.new_zeros((n, m + 1))
        failed = torch.zeros(n, dtype=torch.bool, device=rhs.device)
        sorted_sizes, order = torch.sort(sizes, descending=True)
        for sel, size in size_groups(order, sorted_sizes.tolist()):
            if size == 0:
                continue  # empty system: the solution is u_A (primal) or lambda = 0 (dual)
            idx = sorted_indices(system[sel], size, m)
            route = dual[sel]
            buffer, M = self._gather(idx, route)
            b = rhs[sel].gather(1, idx)[:, :, None]
            factor, info, b = factor_and_solve(M, b)
            self.factorizations += sel.shape[0]
            y = b[:, :, 0]
            fail = (info != 0) | ~torch.isfinite(y).all(dim=1)
            Y[sel] = Y[sel].scatter_(1, idx, torch.where(fail[:, None], torch.zeros_like(y), y))
            failed[sel] = fail
            self._keep(Chunk(idx, buffer, factor, route.long()), rows[sel], ~fail, system[sel], sizes[sel])
        return Y, failed

    def _gather(self, idx: Tensor, route: Tensor) -> tuple[Tensor, Tensor]:
        """Copy the systems on the index lists ``idx`` ([n, s]) into a workspace buffer.

        Returns the buffer and the systems ``M`` ([n, s, s], a view of it), the identity on the padding.
        """
        m = self.m
        count, size = idx.shape
        numel = count * size * size
        # Flat positions of the entries of each system in the augmented [route, m+1, m+1] matrices
        # (int32: half the memory traffic of int64 indices).
        row_start = ((route.long()[:, None] * (m + 1) + idx) * (m + 1)).to(torch.int32)
        index_buffer = self.workspace.take(numel, torch.int32)
        flat_index = index_buffer[:numel].view(count, size, size)
        torch.add(row_start[:, :, None], idx.to(torch.int32)[:, None, :], out=flat_index)
        buffer = self.workspace.take(numel, torch.float64)
        M = buffer[:numel].view(count, size, size)
        torch.index_select(self.flat, 0, flat_index.view(-1), out=M.view(-1))
        self.workspace.give(index_buffer)
        M.diagonal(dim1=1, dim2=2).add_((idx == m).to(M.dtype))  # identity on the padding
        return buffer, M

    def _keep(self, chunk: Chunk, rows: Tensor, ok: Tensor, system: Tensor, sizes: Tensor) -> None:
        """Register ``chunk`` as the factorised systems of the ``rows`` where ``ok`` holds."""
        cid = self.next_chunk
        self.next_chunk += 1
        self.chunks[cid] = chunk
        registered = rows[ok]
        self.chunk_of[registered] = cid
        self.slot_of[registered] = torch.arange(rows.shape[0], device=rows.device)[ok]
        self.base_system[registered] = system[ok]
        self.base_dual[registered] = chunk.route.bool()[ok]
        self.base_size[registered] = sizes[ok]

    def _update(self, chunk: Chunk, rows: Tensor, system: Tensor, rhs: Tensor) -> tuple[Tensor, Tensor]:
        """Solve the modified systems of ``rows`` (all factorised in ``chunk``) by bordered solves."""
        m = self.m
        device = rhs.device
        slots = self.slot_of[rows]
        n_chunk = chunk.idx.shape[0]
        whole = 2 * slots.shape[0] >= n_chunk
        if not whole:
            base = self.base_system[rows]
            return bordered_solve(
                self.aug, chunk.factor[slots], chunk.idx[slots], chunk.route[slots], system, base, rhs
            )
        # Work on the whole chunk (cheaper than copying most of its factors); rows of the chunk
        # that are not updated get an empty right-hand side and are dropped afterwards.
        full_system = torch.zeros((n_chunk, m), dtype=torch.bool, device=device)
        full_base = torch.zeros((n_chunk, m), dtype=torch.bool, device=device)
        full_rhs = rhs.new_zeros((n_chunk, m + 1))
        full_system[slots], full_rhs[slots] = system, rhs
        full_base[slots] = self.base_system[rows]
        # Rows that are not updated keep their base system (no change, zero right-hand side).
        others = torch.ones(n_chunk, dtype=torch.bool, device=device)
        others[slots] = False
        full_system[others] = full_base[others] = mask_of(chunk.idx[others], m)
        Y, failed = bordered_solve(
            self.aug, chunk.factor, chunk.idx, chunk.route, full_system, full_base, full_rhs
        )
        return Y[slots], failed[slots]
