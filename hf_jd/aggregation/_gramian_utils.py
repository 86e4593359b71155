"""Numerical preparation of Gramians shared by the dual-cone weightings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def normalize_gramian(gramian: Tensor, eps: float) -> Tensor:
    r"""Divide :math:`G = J J^\top` by :math:`\mathrm{tr}(G) = \|J\|_F^2`.

    This makes the projection invariant to the scale of :math:`J`. When the trace is below ``eps``
    the Jacobian is treated as zero and a zero matrix is returned (reference behaviour of TorchJD).
    """
    trace = gramian.diagonal().sum()
    return torch.where(trace < eps, torch.zeros_like(gramian), gramian / trace)


def regularize_gramian(gramian: Tensor, eps: float) -> Tensor:
    """Add ``eps * I`` so that the (normalised) Gramian is positive definite despite round-off."""
    return gramian + eps * torch.eye(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


def symmetrize(gramian: Tensor) -> Tensor:
    """Return ``(G + Gᵀ) / 2`` to remove round-off asymmetry."""
    return (gramian + gramian.T) / 2


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype Gramians are accumulated in: float64 stays float64, everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def gramian_of_blocks(blocks: Sequence[Tensor], dtype: torch.dtype) -> Tensor:
    r""":math:`G = \sum_p J_p J_p^\top` for non-empty column blocks ``J_p`` of shape ``[m, ...]``.

    Summing per-block Gramians gives the Gramian of the concatenation ``[J_1 ... J_P]`` without ever
    building it.
    """
    first = blocks[0]
    gramian = torch.zeros(first.shape[0], first.shape[0], dtype=dtype, device=first.device)
    for block in blocks:
        matrix = block.reshape(block.shape[0], -1).to(dtype)
        gramian.addmm_(matrix, matrix.T)
    return gramian
