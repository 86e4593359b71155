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
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.autograd.graph import Node

from .._tensors import cuda_devices
from ._capture import OuterCall, ProbeLeads
from ._layout import ROWS, Layout, Output, infer_layout
from ._torch_ops import tree_map
from ._use import CallKey, Use

logger = logging.getLogger(__name__)

#: For each call, which input leaves and which output leaves follow the batch.
Follows = dict[CallKey, tuple[list[bool], list[bool]]]
#: For each call, whether its primary input is proven to hold examples in contiguous blocks of rows.
Flat = dict[CallKey, bool]

_T = TypeVar("_T")


def slice_batch(value: _T, batch: int) -> _T:
    """The first example of every tensor whose leading dimension is the batch."""
    return tree_map(
        lambda v: v[:1] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == batch else v, value
    )


def _follows(main: list[int | None], probe: list[int | None], batch: int) -> list[bool]:
    return [m == batch and p == 1 for m, p in zip(main, probe)]


def needs_probe(uses: list[Use[Any]], batch: int, cache: Follows) -> bool:
    if batch <= 1:
        return False
    for use in uses:
        # A leading dimension of B (or B·k: flattened rows, windows) may or may not be the batch.
        leads = [*use.in_lead, *(use.out_lead[j] for j in use.out_index)]
        ambiguous = any(lead is not None and lead > 0 and lead % batch == 0 for lead in leads)
        if ambiguous and use.key not in cache:
            return True
    return False


def update_cache(
    uses: list[Use[Any]], batch: int, probe_leads: ProbeLeads, cache: Follows, heuristic: bool
) -> None:
    """Record, for each call, which input / output leaves follow the batch."""
    for use in uses:
        if use.key in cache:
            continue
        if heuristic:
            cache[use.key] = (
                [lead == batch for lead in use.in_lead],
                [lead == batch for lead in use.out_lead],
            )
            continue
        seen = probe_leads.get(use.key)
        if seen is None or len(seen[0]) != len(use.in_lead) or len(seen[1]) != len(use.out_lead):
            # Not reproduced by the probe: conservatively non-batch (exact fallback).
            cache[use.key] = ([False] * len(use.in_lead), [False] * len(use.out_lead))
            continue
        cache[use.key] = (_follows(use.in_lead, seen[0], batch), _follows(use.out_lead, seen[1], batch))


def classify(uses: list[Use[Any]], batch: int, cache: Follows) -> None:
    """Set ``use.in_rows`` (inputs sliced per example) and ``use.batched`` for every captured call."""
    for use in uses:
        if batch <= 1:
            in_follow = [lead == 1 for lead in use.in_lead]
            out_follow = [lead == 1 for lead in use.out_lead]
        else:
            in_follow, out_follow = cache.get(
                use.key, ([False] * len(use.in_lead), [False] * len(use.out_lead))
            )
        use.in_rows = (
            [bool(f) and lead == batch for f, lead in zip(in_follow, use.in_lead)] if batch > 1 else in_follow
        )
        outputs_ok = all(
            expanded or (out_follow[j] and use.out_lead[j] == batch)
            for j, expanded in zip(use.out_index, use.expanded)
        )
        if not use.rule.keep_all_inputs:
            primary_ok = use.primary is not None and (
                use.in_rows[use.primary] or use.in_lead[use.primary] == 1
            )
        else:
            has_batched_output = not all(use.expanded)
            primary_ok = not has_batched_output or any(use.in_rows)
        use.batched = outputs_ok and primary_ok


def run_probe(
    outer_calls: list[OuterCall], batch: int, run: Callable[[Callable[[], None]], ProbeLeads]
) -> ProbeLeads | None:
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
    uses: list[Use[Any]],
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
    for use in uses:
        if use.key in cache or use.primary is None:
            continue
        lead = use.in_lead[use.primary]
        seen = probe_leads.get(use.key)
        base, probe_base = use.base_lead, probe_bases.get(use.key)
        cache[use.key] = bool(
            lead is not None
            and seen is not None
            and len(seen[0]) == len(use.in_lead)
            and lead % batch == 0
            and base is not None
            and probe_base is not None
            and base == (batch, probe_base[1])
            and probe_base[0] == 1
            and seen[0][use.primary] == lead // batch
        )


def row_sources(uses: list[Use[Any]], batch: int) -> set[Output]:
    """The outputs of the per-example calls (not expanded): their rows come in blocks, one per example."""
    return {
        (edge.node, edge.output_nr)
        for use in uses
        if use.batched
        for edge, j, expanded in zip(use.edges, use.out_index, use.expanded)
        if (lead := use.out_lead[j]) is not None and lead % batch == 0 and not expanded
    }


def classify_flat(uses: list[Use[Any]], batch: int, cache: Flat, by_graph: Flat) -> None:
    """Per-example rows for row-wise calls whose leading dimension is ``B·k``, examples contiguous.

    A call qualifies when its rule is row-wise, its outputs keep the input's leading dimension, and the
    layout is proven: by :func:`update_flat`; because its input is the output (through elementwise
    ops) of an earlier qualifying call with the same leading dimension; or because the graph between
    per-example calls and its input keeps the examples in contiguous blocks of rows
    (:mod:`hf_jd.gramian._layout`, verdict cached per call in ``by_graph``). Anything else keeps the
    exact path.
    """
    proven: dict[CallKey, int] = {}
    sources: set[Output] | None = None  # computed on the first graph proof this step needs
    memo: dict[Node, Layout] = {}
    for use in uses:
        if batch <= 1 or use.batched or not use.rule.row_wise or use.primary is None or any(use.expanded):
            continue
        lead = use.in_lead[use.primary]
        if lead is None or lead % batch or any(use.out_lead[j] != lead for j in use.out_index):
            continue
        if use.key not in by_graph and not cache.get(use.key, False) and use.primary_output is not None:
            if sources is None:
                sources = row_sources(uses, batch)
            by_graph[use.key] = infer_layout(use.primary_output, sources, batch, memo) == ROWS
        if (
            cache.get(use.key, False)
            or (use.source is not None and proven.get(use.source) == lead)
            or by_graph.get(use.key, False)
        ):
            use.in_rows[use.primary] = True
            use.batched = True
            proven[use.key] = lead
            if sources is not None:
                sources.update((edge.node, edge.output_nr) for edge in use.edges)
                memo.clear()
