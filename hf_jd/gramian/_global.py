r"""The Gramian of the *global* per-example Jacobian across processes, from the Gramian engine.

Rank :math:`r` holds the :math:`B_r` examples of its micro-batch; the objectives are the
:math:`B = \sum_r B_r` examples of every rank, and the global Gramian has blocks
:math:`G_{rs} = J_r J_s^\top` (rows ordered rank by rank). Its diagonal blocks :math:`G_{rr}` are the
local Gramians the engine computes anyway (every rule, the fallback, the exactness self-check on local
rows). The cross blocks are summed parameter by parameter, :math:`G_{rs} = \sum_p J^{(p)}_r J^{(p)\top}_s`,
with, for each parameter, the exchange that moves fewer bytes (counted from every rank's shapes):

* **factors** (all-gather): a parameter owned by one call of an affine layer (Linear, Conv1D, Conv2d)
  or an embedding has per-example gradients :math:`g_i = \sum_t b_{it} a_{it}^\top` (ids one-hot for an
  embedding), so the cross block is the ghost product of Li et al. (ICLR 2022)

  .. math:: (G^{(p)}_{rs})_{ij} = \sum_{t,t'} (a_{it} \cdot a_{jt'})\,(b_{it} \cdot b_{jt'})
     \quad(\text{embedding: } [x_{it} = x_{jt'}]\,(b_{it} \cdot b_{jt'})),

  i.e. :math:`(A_r A_s^\top)\circ(B_r B_s^\top)` summed over token pairs; every rank sends its
  :math:`a, b` (``B_r·T·(d_in + d_out)`` numbers) and the pair :math:`\{r, s\}` is computed once, by one
  of its two ranks (alternating between parameters);
* **rows** (all-to-all): any other parameter (norms, biases, the generic rule, the fallback, tied
  weights) sends its per-example gradient rows ``[B_r, n_p]`` to the rank that owns the parameter
  (balanced by size), which then holds the column block :math:`J^{(p)}` of every rank and forms its
  cross blocks :math:`J^{(p)}_r J^{(p)\top}_s` (``B_r·n_p`` numbers, :math:`(N-1)/N` of them sent).

Each rank adds what it computed (its diagonal block, its cross blocks) into a zero ``[B, B]`` matrix and
one all-reduce sums them: every rank holds the same bits of :math:`G`, hence the same weights
:math:`w`. Then each rank writes :math:`J_r^\top w_r` from its own capture and the caller's all-reduce
of ``.grad`` sums them (:math:`J^\top w = \sum_r J_r^\top w_r`).

A failure on one rank (the self-check, an unsupported call) is made everybody's before any exchange:
every rank raises, with the same exception class, so ``jd_engine="auto"`` falls back identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ._embedding import EmbeddingRule
from ._errors import GramianEngineError
from ._linear import LinearRule
from ._rule import PerRowRule, chunked_rows, rows_and_row_shape
from ._step import StepState
from ._use import Use
from ._utils import full_numel, full_shape
from ._verify import GramianMismatchError

if TYPE_CHECKING:
    from ._engine import GramianEngine

#: How a parameter's cross blocks can be formed on a rank (metadata codes, identical on every rank).
ROWS, LINEAR, EMBEDDING, EMPTY = 0, 1, 2, 3
_OK, _FAILED, _MISMATCH = 0, 1, 2
_EXACT_FLOAT32_IDS = 2**24


class Collectives(Protocol):
    """The collectives of the global step (``hf_jd.distributed.RankCollectives`` implements them)."""

    def world_size(self) -> int: ...

    def rank(self) -> int: ...

    def gather_ints(self, values: Sequence[int], device: torch.device) -> list[list[int]]:
        """Every rank's integers (same count on every rank), in rank order."""
        ...

    def gather_flat(self, vector: Tensor, sizes: Sequence[int]) -> list[Tensor]:
        """Every rank's 1-D ``vector`` (``sizes[r]`` elements on rank ``r``), in rank order."""
        ...

    def all_to_all(self, parts: Sequence[Tensor], receive_sizes: Sequence[int]) -> list[Tensor]:
        """Send ``parts[d]`` to rank ``d``; return what each rank sent here."""
        ...

    def all_reduce_sum_(self, tensor: Tensor) -> None: ...


@dataclass
class _Local:
    """What this rank contributes for one parameter."""

    code: int
    factors: tuple[Tensor, Tensor] | None = None  # (a or ids, b), each [B_r, T, d]
    pairs: list[tuple[Use[Any], str]] | None = None


def global_gramian(
    engine: GramianEngine,
    losses: Tensor,
    collectives: Collectives,
    verify_rows: Sequence[int] = (),
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, list[int]]:
    """The global ``[B, B]`` Gramian (identical on every rank) and every rank's row count.

    The engine keeps its capture for ``accumulate_grad(w[local rows], scale)``.
    """
    failure: Exception | None = None
    engine.defer_compaction = True
    try:
        local = engine.gramian(losses, verify_rows=verify_rows, dtype=dtype)
    except Exception as error:  # made every rank's failure below
        failure, local = error, torch.zeros(0)
    finally:
        engine.defer_compaction = False
    state = engine.step_state
    params = engine.params
    contributions = [_describe(p, state) for p in params] if failure is None and state else []
    header = [_code(failure), local.shape[0]]
    body = [0] * (4 * len(params))
    for index, item in enumerate(contributions):
        body[4 * index : 4 * index + 4] = _metadata(item)
    device = losses.device
    table = collectives.gather_ints(header + body, device)
    worst = max(row[0] for row in table)
    if worst != _OK:
        engine.release()
        if failure is not None:
            raise failure
        error_class = GramianMismatchError if worst == _MISMATCH else GramianEngineError
        raise error_class("The Gramian engine failed on another rank for this micro-batch (see its error).")
    assert state is not None
    try:
        with torch.no_grad():
            return _assemble(collectives, table, params, contributions, local, state), [
                row[1] for row in table
            ]
    except BaseException:
        engine.release()
        raise


def _code(failure: Exception | None) -> int:
    if failure is None:
        return _OK
    return _MISMATCH if isinstance(failure, GramianMismatchError) else _FAILED


def _describe(param: nn.Parameter, state: StepState) -> _Local:
    pid = id(param)
    if not state.shared.get(pid, True):
        return _Local(EMPTY)
    pairs = state.param_uses.get(pid, [])
    if pid in state.fallback_rows:
        return _Local(ROWS, pairs=None)
    if not pairs:
        return _Local(EMPTY)
    if len(pairs) == 1:
        factors = _factors(pairs[0], state)
        if factors is not None:
            kind, a_mat, b_mat = factors
            return _Local(kind, factors=(a_mat, b_mat), pairs=pairs)
    return _Local(ROWS, pairs=pairs)


def _factors(pair: tuple[Use[Any], str], state: StepState) -> tuple[int, Tensor, Tensor] | None:
    """``(kind, a, b)`` with ``a, b`` as ``[B_r, T, d]`` when the call's cross blocks are a ghost product."""
    use, name = pair
    rule = use.rule
    ctx = state.ctx
    if use.input_shared(ctx) or name == "bias":
        return None
    if isinstance(rule, LinearRule) and name == "weight":
        a_mat, b_mat = rule._matrices(use, ctx)
        return (LINEAR, a_mat, b_mat) if a_mat.shape[0] == ctx.rows else None
    if isinstance(rule, EmbeddingRule):
        if rule.module.scale_grad_by_freq:  # the id counts are the whole batch's: not a per-rank product
            return None
        if ctx.dtype != torch.float64 and rule.module.num_embeddings > _EXACT_FLOAT32_IDS:
            return None
        id_mat, b_mat = rule._matrices(use, ctx)
        if id_mat.shape[0] != ctx.rows:
            return None
        return EMBEDDING, id_mat.to(ctx.dtype).reshape(ctx.rows, -1, 1), b_mat
    return None


def _metadata(item: _Local) -> list[int]:
    """``[code, tokens, d_a, d_b]`` of one parameter on this rank."""
    if item.factors is None:
        return [item.code, 0, 0, 0]
    a_mat, b_mat = item.factors
    return [item.code, b_mat.shape[1], a_mat.shape[-1], b_mat.shape[-1]]


def _assemble(
    collectives: Collectives,
    table: list[list[int]],
    params: list[nn.Parameter],
    contributions: list[_Local],
    local: Tensor,
    state: StepState,
) -> Tensor:
    size, me = collectives.world_size(), collectives.rank()
    sizes = [row[1] for row in table]
    starts = [sum(sizes[:r]) for r in range(size)]
    total = sum(sizes)
    ctx = state.ctx
    device = local.device
    gramian = torch.zeros(total, total, dtype=ctx.dtype, device=device)
    gramian[starts[me] : starts[me] + sizes[me], starts[me] : starts[me] + sizes[me]] = local
    ghost: list[int] = []
    rows: list[int] = []
    for index, param in enumerate(params):
        codes = {row[2 + 4 * index] for row in table} - {EMPTY}
        if not codes:
            continue
        if len(codes) == 1 and codes != {ROWS}:
            ghost_numel = sum(
                m * row[3 + 4 * index] * (row[4 + 4 * index] + row[5 + 4 * index])
                for m, row in zip(sizes, table)
            )
            if prefer_factors(size, ghost_numel, total * full_numel(param)):
                ghost.append(index)
                continue
        rows.append(index)
    if ghost:
        _ghost_blocks(collectives, table, ghost, contributions, gramian, starts, ctx.dtype, device)
    if rows:
        _row_blocks(collectives, params, rows, contributions, gramian, starts, sizes, state)
    collectives.all_reduce_sum_(gramian)
    return gramian


def prefer_factors(world: int, factor_numel: int, row_numel: int) -> bool:
    """Whether the all-gather of the factors (``factor_numel`` numbers over all ranks, each sent to the
    ``N - 1`` other ranks) moves fewer bytes than the all-to-all of the rows (``row_numel`` numbers over
    all ranks, ``(N - 1)/N`` of them sent): ``N · factor_numel < row_numel``."""
    return world * factor_numel < row_numel


def _ghost_blocks(
    collectives: Collectives,
    table: list[list[int]],
    ghost: list[int],
    contributions: list[_Local],
    gramian: Tensor,
    starts: list[int],
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """All-gather every rank's factors of the ghost parameters; add the cross blocks this rank owns."""
    size, me = collectives.world_size(), collectives.rank()
    sizes = [row[1] for row in table]
    pieces = []
    for index in ghost:
        mine = contributions[index].factors
        if mine is not None:
            pieces += [mine[0].reshape(-1), mine[1].reshape(-1)]
    payload = torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype, device=device)
    counts = [
        sum(m * row[3 + 4 * i] * (row[4 + 4 * i] + row[5 + 4 * i]) for i in ghost)
        for m, row in zip(sizes, table)
    ]
    gathered = collectives.gather_flat(payload.to(dtype), counts)
    offsets = [0] * size
    for turn, index in enumerate(ghost):
        factors: list[tuple[Tensor, Tensor]] = []
        for source, row in enumerate(table):
            tokens, d_a, d_b = row[3 + 4 * index], row[4 + 4 * index], row[5 + 4 * index]
            m = sizes[source]
            a_numel, b_numel = m * tokens * d_a, m * tokens * d_b
            flat = gathered[source][offsets[source] : offsets[source] + a_numel + b_numel]
            offsets[source] += a_numel + b_numel
            factors.append((flat[:a_numel].view(m, tokens, d_a), flat[a_numel:].view(m, tokens, d_b)))
        embedding = any(row[2 + 4 * index] == EMBEDDING for row in table)
        for r in range(size):
            for s in range(r + 1, size):
                if (r, s)[(turn + r + s) % 2] != me or not factors[r][1].numel() or not factors[s][1].numel():
                    continue
                block = ghost_cross(factors[r], factors[s], embedding)
                rows_r = slice(starts[r], starts[r] + sizes[r])
                rows_s = slice(starts[s], starts[s] + sizes[s])
                gramian[rows_r, rows_s] += block
                gramian[rows_s, rows_r] += block.T


def ghost_cross(left: tuple[Tensor, Tensor], right: tuple[Tensor, Tensor], embedding: bool) -> Tensor:
    r""":math:`C_{ij} = \sum_{t,t'} k(a_{it}, a_{jt'})\,(b_{it} \cdot b_{jt'})`, ``[B_r, B_s]``.

    ``k`` is the dot product (affine layers) or the id equality :math:`[x_{it} = x_{jt'}]` (embeddings,
    ``a`` holding the ids); ``left``/``right`` are ``(a, b)`` of shapes ``[B, T, d]`` (``T`` may differ).
    """
    (a_left, b_left), (a_right, b_right) = left, right
    m_left, t_left, _ = b_left.shape
    m_right, t_right, _ = b_right.shape
    a_l, a_r = a_left.reshape(m_left * t_left, -1), a_right.reshape(m_right * t_right, -1)
    kernel_a = (a_l == a_r.T).to(b_left.dtype) if embedding else a_l @ a_r.T
    kernel_b = b_left.reshape(m_left * t_left, -1) @ b_right.reshape(m_right * t_right, -1).T
    return (kernel_a * kernel_b).view(m_left, t_left, m_right, t_right).sum(dim=(1, 3))


def _row_blocks(
    collectives: Collectives,
    params: list[nn.Parameter],
    rows: list[int],
    contributions: list[_Local],
    gramian: Tensor,
    starts: list[int],
    sizes: list[int],
    state: StepState,
) -> None:
    """All-to-all the per-example rows of each parameter to its owner; the owner adds its cross blocks."""
    size, me = collectives.world_size(), collectives.rank()
    numels = [full_numel(params[index]) for index in rows]
    owners = assign_owners(numels, size)
    ctx = state.ctx
    m = sizes[me]
    parts = []
    for destination in range(size):
        mine = [
            per_example_rows(params[index], contributions[index], state).reshape(m, -1)
            for index, owner in zip(rows, owners)
            if owner == destination
        ]
        part = torch.cat(mine, dim=1) if mine else torch.zeros(m, 0, dtype=ctx.dtype, device=gramian.device)
        parts.append(part.reshape(-1))
    width = sum(numel for numel, owner in zip(numels, owners) if owner == me)
    received = collectives.all_to_all(parts, [sizes[source] * width for source in range(size)])
    if not width:
        return
    shard = torch.cat([part.view(sizes[source], width) for source, part in enumerate(received)])
    cross = shard @ shard.T
    for r in range(size):  # the diagonal blocks are the ranks' local Gramians
        cross[starts[r] : starts[r] + sizes[r], starts[r] : starts[r] + sizes[r]] = 0
    gramian += cross


def assign_owners(numels: Sequence[int], num_ranks: int) -> list[int]:
    """Greedy balanced assignment of parameters to ranks (largest first); the same on every rank."""
    loads = [0] * num_ranks
    owners = [0] * len(numels)
    for index in sorted(range(len(numels)), key=lambda i: -numels[i]):
        owner = min(range(num_ranks), key=lambda r: loads[r])
        owners[index] = owner
        loads[owner] += numels[index]
    return owners


def per_example_rows(param: nn.Parameter, item: _Local, state: StepState) -> Tensor:
    """The per-example gradients ``[B_r, *param.shape]`` of ``param`` on this rank (zeros if unreached)."""
    ctx = state.ctx
    pid = id(param)
    if pid in state.fallback_rows:
        return state.fallback_rows[pid].to(ctx.dtype)
    pairs = item.pairs or []
    if not pairs:
        return torch.zeros(ctx.rows, *full_shape(param), dtype=ctx.dtype, device=param.device)
    if len(pairs) == 1:
        use, name = pairs[0]
        rule = use.rule
        if isinstance(rule, PerRowRule):
            return rule.per_row(use, ctx)[name]
        cached = getattr(use.cache, "rows", None)
        if isinstance(cached, dict) and name in cached:
            return cached[name]
    n_rows, shape = rows_and_row_shape(param)
    out = torch.empty(ctx.rows, n_rows, *shape, dtype=ctx.dtype, device=param.device)
    start = 0
    for block in chunked_rows(pairs, param, ctx):
        stop = start + block.shape[1]
        out[:, start:stop] = block
        start = stop
    return out
