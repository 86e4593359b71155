"""Engine-level check of the global Gramian (``torch.distributed.run --nproc_per_node 2``): on every rank,
``GramianEngine.global_gramian`` of the rank's half of a batch == the single-process Gramian of the whole
batch, for every exchange strategy. Writes ``<out>/rank<r>.pt``."""

from __future__ import annotations

import os
import sys

import torch
from accelerate import PartialState

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from distributed._fixtures import SEQ, VOCAB, finish_worker, tiny_bert  # noqa: E402

from hf_jd.distributed import RankCollectives, rank, world_size  # noqa: E402
from hf_jd.gramian import (
    GramianEngine,  # noqa: E402
    _global,  # noqa: E402
)


def losses_of(model, ids, labels):
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits, labels, reduction="none")


def main() -> None:
    PartialState(cpu=True)
    torch.set_num_threads(1)
    model = tiny_bert()
    generator = torch.Generator().manual_seed(1)
    batch = 3 * world_size()
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    labels = torch.randint(0, 3, (batch,), generator=generator)
    reference_engine = GramianEngine(model)
    with reference_engine.capture():
        losses = losses_of(model, ids, labels)
    reference = reference_engine.gramian(losses)
    reference_engine.release()
    mine = slice(3 * rank(), 3 * rank() + 3)
    results = {}
    describe, prefer = _global._describe, _global.prefer_factors
    for strategy in ("auto", "factors", "rows"):
        if strategy == "factors":  # every affine layer and embedding through the all-gather of a, b
            _global.prefer_factors = lambda *args: True
        if strategy == "rows":  # every parameter through the all-to-all of per-example rows
            _global.prefer_factors, _global._describe = prefer, _rows_only(describe)
        engine = GramianEngine(model, collectives=RankCollectives())
        with engine.capture():
            local = losses_of(model, ids[mine], labels[mine])
        gramian, sizes = engine.global_gramian(local, verify_rows=[0, 2])
        engine.accumulate_grad(torch.ones(3), 1.0)
        results[strategy] = {"gramian": gramian, "sizes": sizes}
    _global._describe = describe
    model.zero_grad()
    torch.save({"reference": reference, **results}, os.path.join(sys.argv[1], f"rank{rank()}.pt"))
    finish_worker()


def _rows_only(describe):
    def wrapped(param, state):
        item = describe(param, state)
        if item.factors is not None:
            item.code, item.factors = _global.ROWS, None
        return item

    return wrapped


if __name__ == "__main__":
    main()
