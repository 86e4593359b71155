r"""FSDP2 (``torch.distributed.fsdp.fully_shard``): sharding detection and row-sharded collectives.

``fully_shard`` replaces every parameter :math:`\theta_p \in \mathbb{R}^{d_0 \times \dots}` by a
``DTensor`` sharded on dimension 0 over the ``N`` ranks of a 1-D mesh: rank :math:`s` holds the rows
:math:`R_s = [s c, \min((s+1) c, d_0))` with :math:`c = \lceil d_0 / N \rceil` (``torch.chunk``). For a
forward or backward it all-gathers the full-size *unsharded* parameter, one FSDP unit at a time, and
frees it afterwards. The helpers below move full-size per-layer tensors into those row shards:

* :func:`reduce_scatter_rows`: rank :math:`s` receives :math:`\bigl(\sum_r U_r\bigr)_{R_s}` (or the mean
  over ranks) of every rank's full-size update :math:`U_r` — how :math:`J^\top w` reaches the shards;
* :func:`all_to_all_rows`: rank :math:`s` receives the rows :math:`R_s` of every rank's per-example
  gradients :math:`[m_r, d_0, \dots]`, i.e. the column shard :math:`J_{[:, R_s]}` of the global Jacobian;
* :func:`add_to_sharded_grad`: ``param.grad += local`` as the ``DTensor`` gradient FSDP itself writes.

Only the plain FSDP layout is served: one mesh dimension, ``Shard(0)``. HSDP (2-D meshes) and custom
shard placements are refused by :func:`sharded_parameters`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from ._collectives import all_to_all_on, reduce_scatter_on


def local_shard(tensor: Tensor) -> Tensor:
    """The local tensor of a ``DTensor`` (a parameter shard or its gradient)."""
    return cast(DTensor, tensor).to_local()


class ShardingError(ValueError):
    """A sharded layout hf_jd does not serve (FSDP1, HSDP, custom placements, unsharded parameters)."""


def is_fsdp2_model(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model`` or to one of its submodules."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


@dataclass(frozen=True)
class ShardedParameter:
    """One FSDP2 parameter: its ``DTensor`` shard, the full-size parameter FSDP all-gathers, its rows.

    Attributes:
        sharded: the ``nn.Parameter`` holding the local shard (``model.parameters()`` yields it).
        unsharded: the full-size parameter FSDP2 unshards into for forward and backward (its storage is
            freed between uses); the leaf the autograd graph of a forward reaches.
        group: the process group of the shard dimension.
        rank: this rank in ``group``; ``world``: its size.
        chunk: rows per rank, :math:`c = \\lceil d_0 / N \rceil`; ``local_rows``: the rows this rank holds.
    """

    sharded: nn.Parameter
    unsharded: nn.Parameter
    fsdp_param: Any
    group: dist.ProcessGroup
    rank: int
    world: int
    chunk: int
    local_rows: int

    @property
    def name(self) -> str:
        return str(self.fsdp_param._module_info.param_name)


def sharded_parameters(model: nn.Module) -> dict[int, ShardedParameter]:
    """Every FSDP2-managed parameter of ``model``, by ``id`` of its sharded ``nn.Parameter``.

    Call after a forward (FSDP2 creates the unsharded parameters lazily, on its first all-gather).
    """
    found: dict[int, ShardedParameter] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        group = module._get_fsdp_state()._fsdp_param_group
        for fsdp_param in group.fsdp_params if group is not None else []:
            sharded = cast(DTensor, fsdp_param.sharded_param)
            mesh = sharded.device_mesh
            if mesh.ndim != 1 or tuple(sharded.placements) != (Shard(0),):
                raise ShardingError(
                    f"{fsdp_param._module_info.param_name}: hf_jd serves FSDP2 parameters sharded on dimension 0 over "
                    f"a 1-D mesh; got placements {tuple(sharded.placements)} on a {mesh.ndim}-D mesh (HSDP and "
                    "custom shard_placement_fn are not supported)."
                )
            process_group = mesh.get_group()
            world = dist.get_world_size(process_group)
            if sharded.dim() == 0 or dist.get_world_size(process_group) != dist.get_world_size():
                raise ShardingError(
                    f"{fsdp_param._module_info.param_name}: hf_jd serves FSDP2 meshes that span every process and "
                    "parameters of at least one dimension."
                )
            rows = sharded.shape[0]
            found[id(sharded)] = ShardedParameter(
                sharded=fsdp_param.sharded_param,
                unsharded=fsdp_param.unsharded_param,
                fsdp_param=fsdp_param,
                group=process_group,
                rank=dist.get_rank(process_group),
                world=world,
                chunk=-(-rows // world),
                local_rows=sharded.to_local().shape[0],
            )
    return found


def check_all_sharded(params: Iterable[nn.Parameter], sharded: dict[int, ShardedParameter]) -> None:
    """Refuse trainable parameters that FSDP2 does not manage (they would need a separate all-reduce)."""
    missing = [tuple(p.shape) for p in params if id(p) not in sharded]
    if missing:
        raise ShardingError(
            f"{len(missing)} trainable parameter(s) (shapes {missing[:3]}) are not managed by fully_shard: apply "
            "fully_shard to the root module too, so that every trainable parameter is sharded."
        )


def _padded_rows(full: Tensor, info: ShardedParameter, dim: int) -> Tensor:
    """``full`` with dimension ``dim`` (the parameter's first) zero-padded to ``world * chunk`` rows."""
    missing = info.world * info.chunk - full.shape[dim]
    if missing == 0:
        return full
    pad = [0, 0] * (full.dim() - dim - 1) + [0, missing]
    return F.pad(full, pad)


def reduce_scatter_rows(full: Tensor, info: ShardedParameter, mean: bool) -> Tensor:
    """This rank's rows of :math:`\\sum_r U_r` (``mean``: divided by ``N``) for full-size ``U_r`` of every rank.

    ``full`` is ``[d_0, ...]`` (the parameter's rows first); the result is ``[local_rows, ...]``.
    """
    flat = full.reshape(full.shape[0], -1)
    padded = _padded_rows(flat.contiguous(), info, 0)
    out = torch.empty(info.chunk, flat.shape[1], dtype=flat.dtype, device=flat.device)
    reduce_scatter_on(out, padded, info.group)
    if mean:
        out.div_(info.world)
    return out[: info.local_rows].reshape(info.local_rows, *full.shape[1:])


def all_to_all_rows(rows: Tensor, info: ShardedParameter, sizes: list[int]) -> Tensor:
    """The column shard of the global Jacobian: ``[Σ_r m_r, chunk, ...]`` from every rank's ``[m_r, d_0, ...]``.

    Rank ``s`` receives rows ``R_s`` of the parameter from every rank, in rank order (``sizes[r] = m_r``);
    the padding rows beyond ``d_0`` are zero and add nothing to a Gramian.
    """
    m, most = rows.shape[0], max(sizes)
    flat = rows.reshape(m, rows.shape[1] if rows.dim() > 1 else 1, -1)
    padded = _padded_rows(flat, info, 1)  # [m, world * chunk, cols]
    send = torch.zeros(info.world, most, info.chunk, flat.shape[2], dtype=rows.dtype, device=rows.device)
    send[:, :m] = padded.view(m, info.world, info.chunk, -1).transpose(0, 1)
    receive = torch.empty_like(send)
    all_to_all_on(receive, send, info.group)
    return torch.cat([receive[source, : sizes[source]] for source in range(info.world)], dim=0)


def add_to_sharded_grad(info: ShardedParameter, local: Tensor) -> None:
    """``sharded.grad += local`` where ``local`` is this rank's shard (``.grad`` is created as FSDP does)."""
    param = info.sharded
    local = local.detach().to(param.dtype)
    if param.grad is None:
        param.grad = info.fsdp_param.to_sharded_dtensor(local.contiguous())
    else:
        local_shard(param.grad).add_(local)
