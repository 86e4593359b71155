"""Numerical preparation of Gramians shared by the dual-cone weightings."""

from __future__ import annotations

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
