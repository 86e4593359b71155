"""Which dimensions are the batch: per-example classification of the captured calls.

Dimension 0 of a module's input or output is not always the batch: T5's relative attention bias
embeds a ``[q_len, k_len]`` bucket matrix, and ``q_len`` may equal the batch size. A calibration
forward (RNG untouched) of the same outer call on its first example tells them apart: a
leading dimension that follows the batch goes from ``B`` to 1, one that merely equals ``B`` does not.
The result is cached per ``(module, call index)``, so the probe runs once (and again only when new
calls appear). A call whose outputs do not follow the batch is "non-batch": its parameters go to the
exact batched-autograd fallback — unless its rule is row-wise and its leading dimension is proven to be
``B·k`` rows with the examples contiguous (OPT's ``[B·T, H]`` feed-forward, Swin's windows):
:func:`classify_flat`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor
from torch.autograd.graph import Node

from .._tensors import cuda_devices
from ._capture import OuterCall, ProbeLeads, ProbeRecord
from ._layout import ROWS, Layout, Output, infer_layout
from ._plan import CallDecision, CallKey, Pass, Route, decision_of
from ._torch_ops import tree_map
from ._use import Call

logger = logging.getLogger(__name__)

#: For each call, which input leaves and which output leaves follow the batch.
Follows = dict[CallKey, tuple[list[bool], list[bool]]]
#: For each call, whether its primary input is proven to hold examples in contiguous blocks of rows.
Flat = dict[CallKey, bool]
#: The decisions of the batch and layout passes, by call.
Decisions = dict[CallKey, CallDecision]

_T = TypeVar("_T")


def slice_batch(value: _T, batch: int) -> _T:
    """The first example of every tensor whose leading dimension is the batch."""
    return tree_map(
        lambda v: v[:1] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch else v, value
    )


def _follows(main: list[int | None], probe: list[int | None], batch: int) -> list[bool]:
    return [m == batch and p == 1 for m, p in zip(main, probe)]


def needs_probe(calls: list[Call], batch: int, cache: Follows) -> bool:
    if batch <= 1:
        return False
    for call in calls:
        # A leading dimension of B (or B·k: flattened rows, windows) may or may not be the batch.
        leads = [*call.in_lead, *(call.out_lead[j] for j in call.out_index)]
        ambiguous = any(lead is not None and lead > 0 and lead % batch == 0 for lead in leads)
        if ambiguous and call.key not in cache:
            return True
    return False


def update_cache(
    calls: list[Call], batch: int, probe_leads: ProbeLeads, cache: Follows, heuristic: bool
) -> None:
    """Record, for each call, which input / output leaves follow the batch."""
    for call in calls:
        if call.key in cache:
            continue
        if heuristic:
            cache[call.key] = (
                [lead == batch for lead in call.in_lead],
                [lead == batch for lead in call.out_lead],
            )
            continue
        seen = probe_leads.get(call.key)
        if seen is None or len(seen[0]) != len(call.in_lead) or len(seen[1]) != len(call.out_lead):
            # Not reproduced by the probe: conservatively non-batch (exact fallback).
            cache[call.key] = ([False] * len(call.in_lead), [False] * len(call.out_lead))
            continue
        cache[call.key] = (_follows(call.in_lead, seen[0], batch), _follows(call.out_lead, seen[1], batch))


def classify(calls: list[Call], batch: int, cache: Follows) -> Decisions:
    """The batch pass: for every captured call, which inputs hold one slice per example (``in_rows``)
    and whether its outputs follow the batch (route ``RULE``, else ``NOT_BATCHED``)."""
    decisions: Decisions = {}
    for call in calls:
        if batch <= 1:
            in_follow = [lead == 1 for lead in call.in_lead]
            out_follow = [lead == 1 for lead in call.out_lead]
        else:
            in_follow, out_follow = cache.get(
                call.key, ([False] * len(call.in_lead), [False] * len(call.out_lead))
            )
        in_rows = (
            [bool(f) and lead == batch for f, lead in zip(in_follow, call.in_lead)]
            if batch > 1
            else in_follow
        )
        outputs_ok = all(
            expanded or (out_follow[j] and call.out_lead[j] == batch)
            for j, expanded in zip(call.out_index, call.expanded)
        )
        if not call.rule.keep_all_inputs:
            primary_ok = call.primary is not None and (
                in_rows[call.primary] or call.in_lead[call.primary] == 1
            )
        else:
            has_batched_output = not all(call.expanded)
            primary_ok = not has_batched_output or any(in_rows)
        route = Route.RULE if outputs_ok and primary_ok else Route.NOT_BATCHED
        decisions[call.key] = decision_of(route, Pass.BATCH, tuple(in_rows))
    return decisions


def run_probe(
    outer_calls: list[OuterCall], batch: int, run: Callable[[Callable[[], None]], ProbeRecord]
) -> ProbeRecord | None:
    """Re-run the outer calls on their first example; ``None`` if the model refuses."""

    def body() -> None:
        for module, args, kwargs in outer_calls:
            module(*slice_batch(args, batch), **slice_batch(kwargs, batch))

    try:  # with gradients, so that the ops producing tensors can be compared (``base_lead``)
        with torch.random.fork_rng(devices=cuda_devices()), torch.enable_grad():
            return run(body)
    except Exception as error:  # noqa: BLE001 - the model refused a one-example batch
        logger.warning(
            "Gramian engine: the one-example calibration forward failed (%s); assuming that every leading "
            "dimension equal to the batch size is the batch.",
            error,
        )
        return None


def update_flat(
    calls: list[Call],
    batch: int,
    probe_leads: ProbeLeads,
    probe_bases: dict[CallKey, tuple[int, str] | None],
    cache: Flat,
) -> None:
    """Record, for each call, whether its primary input is a reshape of a tensor that follows the batch.

    Evidence: the input of ``B·k`` rows is a contiguous reshape of a tensor of leading dimension ``B``
    (:func:`hf_jd.gramian._capture.base_lead`), and on the first example alone (the probe) of ``k`` rows,
    a reshape of a tensor of leading dimension 1 made by the same op.
    """
    for call in calls:
        if call.key in cache or call.primary is None:
            continue
        lead = call.in_lead[call.primary]
        seen = probe_leads.get(call.key)
        base, probe_base = call.base_lead, probe_bases.get(call.key)
        cache[call.key] = bool(
            lead is not None
            and seen is not None
            and len(seen[0]) == len(call.in_lead)
            and lead % batch == 0
            and base is not None
            and probe_base is not None
            and base == (batch, probe_base[1])
            and probe_base[0] == 1
            and seen[0][call.primary] == lead // batch
        )


def row_sources(calls: list[Call], decisions: Decisions, batch: int) -> set[Output]:
    """The outputs of the per-example calls (not expanded): their rows come in blocks, one per example."""
    return {
        (edge.node, edge.output_nr)
        for call in calls
        if decisions[call.key].batched
        for edge, j, expanded in zip(call.edges, call.out_index, call.expanded)
        if (lead := call.out_lead[j]) is not None and lead % batch == 0 and not expanded
    }


def classify_flat(
    calls: list[Call], decisions: Decisions, batch: int, cache: Flat, by_graph: Flat
) -> Decisions:
    """The layout pass: per-example rows for the row-wise calls that the batch pass (``decisions``) left
    not batched, whose leading dimension is ``B·k`` with the examples contiguous. Returns ``decisions``
    with theirs replaced (route ``RULE``, the primary input in rows, decided by ``LAYOUT``).

    A call qualifies when its rule is row-wise, its outputs keep the input's leading dimension, and the
    layout is proven: by :func:`update_flat`; because its input is the output (through elementwise
    ops) of an earlier qualifying call with the same leading dimension; or because the graph between
    per-example calls and its input keeps the examples in contiguous blocks of rows
    (:mod:`hf_jd.gramian._layout`, verdict cached per call in ``by_graph``). Anything else keeps the
    exact path.
    """
    original = decisions
    proven: dict[CallKey, int] = {}
    sources: set[Output] | None = None  # computed on the first graph proof this step needs
    memo: dict[Node, Layout] = {}
    for call in calls:
        decision = decisions[call.key]
        if (
            batch <= 1
            or decision.batched
            or not call.rule.row_wise
            or call.primary is None
            or any(call.expanded)
        ):
            continue
        lead = call.in_lead[call.primary]
        if lead is None or lead % batch or any(call.out_lead[j] != lead for j in call.out_index):
            continue
        if call.key not in by_graph and not cache.get(call.key, False) and call.primary_output is not None:
            if sources is None:
                sources = row_sources(calls, decisions, batch)
            by_graph[call.key] = infer_layout(call.primary_output, sources, batch, memo) == ROWS
        if (
            cache.get(call.key, False)
            or (call.source is not None and proven.get(call.source) == lead)
            or by_graph.get(call.key, False)
        ):
            in_rows = list(decision.in_rows)
            in_rows[call.primary] = True
            if decisions is original:  # copied on the first change only (most steps change nothing)
                decisions = dict(original)
            decisions[call.key] = decision_of(Route.RULE, Pass.LAYOUT, tuple(in_rows))
            proven[call.key] = lead
            if sources is not None:
                sources.update((edge.node, edge.output_nr) for edge in call.edges)
                memo.clear()
    return decisions
