"""The exactness self-check (``hf_jd/gramian/_verify.py``): its reference equals the row-by-row Gram
matrix, it never holds more than one parameter's gradient at a time, writes no ``.grad``, and still
catches the losses that break the per-example assumption."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gramian_oracles import VOCAB, causal_lm_losses, jacobian, token_ids
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from transformers import GPT2Config, GPT2LMHeadModel

from hf_jd.gramian import GramianEngine, GramianMismatchError, default_rows
from hf_jd.gramian._verify import (
    HALF_PRECISION_TOLERANCE,
    check_block,
    reference_block,
    reference_norms,
    reference_passes,
)


def tiny_gpt2(dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """One GPT-2 block, tied input/output embeddings (a parameter reached twice per backward)."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=16)
    return GPT2LMHeadModel(config).to(dtype)


class TwoPaths(nn.Module):
    """Example ``i`` goes through ``left`` when ``i`` is even, ``right`` when odd, then a shared head:
    some rows do not reach some parameters, and ``unused`` is reached by none."""

    def __init__(self) -> None:
        super().__init__()
        self.left = nn.Linear(5, 4)
        self.right = nn.Linear(5, 4)
        self.head = nn.Linear(4, 1)
        self.unused = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        even = torch.arange(x.shape[0]) % 2 == 0
        hidden = torch.where(even[:, None], self.left(x), self.right(x))
        return self.head(torch.tanh(hidden)).squeeze(-1) ** 2


class Encoder(nn.Module):
    def __init__(self, sparse: bool = False) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, 8, sparse=sparse)
        self.proj = nn.Linear(8, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj(torch.tanh(self.tokens(ids).mean(dim=1)))


def per_example(z: torch.Tensor) -> torch.Tensor:
    return (z**2).sum(dim=1)


def in_batch(z: torch.Tensor) -> torch.Tensor:
    """Each example's loss is a softmax over its similarity to every example of the batch."""
    return F.cross_entropy(z @ z.T, torch.arange(z.shape[0]), reduction="none")


def row_gram(losses: torch.Tensor, rows: list[int], params: list[nn.Parameter]) -> torch.Tensor:
    """The oracle: ``J_R J_Rᵀ`` from the materialised rows of ``J`` (float64)."""
    J = jacobian(losses, params)[rows].to(torch.float64)
    return J @ J.T


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.diagonal().abs().max())


# ---------------------------------------------------------------- the reference is the row-by-row Gram matrix
@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_reference_block_equals_the_row_by_row_gram_of_a_tied_embedding_lm(batch, dtype, tol):
    model = tiny_gpt2(dtype)
    ids = token_ids(batch, 6)
    losses = causal_lm_losses(model(input_ids=ids).logits, ids)
    params = list(model.parameters())
    rows = default_rows(batch)
    block = reference_block(reference_norms(losses, rows, params), [True] * len(params), len(rows))
    assert block.shape == (len(rows), len(rows))
    assert relative(block, row_gram(losses, rows, params)) <= tol
    assert len(reference_passes(len(rows))) == len(rows) * (len(rows) + 1) // 2


def test_rows_that_miss_parameters_and_kept_subsets_match_the_oracle():
    torch.manual_seed(0)
    model = TwoPaths()
    losses = model(torch.randn(6, 5))
    params = list(model.parameters())
    rows = [0, 1, 4]  # even, odd, even: rows 0 and 1 share no first-layer parameter
    norms = reference_norms(losses, rows, params)
    assert norms[params.index(model.unused)] is None  # reached by no pass
    for keep in ([True] * len(params), [p is not model.head.weight for p in params], [False] * len(params)):
        kept = [p for p, k in zip(params, keep) if k]
        expected = row_gram(losses, rows, kept) if kept else torch.zeros(3, 3, dtype=torch.float64)
        block = reference_block(norms, keep, len(rows))
        torch.testing.assert_close(block, expected, rtol=1e-5, atol=1e-9)


def test_reference_in_bfloat16_is_far_inside_the_half_precision_tolerance():
    model = tiny_gpt2(torch.bfloat16)
    ids = token_ids(4, 6)
    losses = causal_lm_losses(model(input_ids=ids).logits, ids)
    params = list(model.parameters())
    rows = default_rows(4)
    block = reference_block(reference_norms(losses, rows, params), [True] * len(params), len(rows))
    assert relative(block, row_gram(losses, rows, params)) <= HALF_PRECISION_TOLERANCE / 20


# ---------------------------------------------------------------- memory: one parameter's gradient at a time
class GradientSpy:
    """Hooks registered on every parameter *before* the check's own (so every parameter, the tied one
    too, is reduced by the check's tensor hook): each sees the gradient autograd produced and records how many gradients seen earlier (any parameter, any pass) still have their
    memory — a weak reference to the storage, so that a view or a detached alias still counts."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.seen: list[StorageWeakRef] = []
        self.most_alive_before = 0
        self.handles = [p.register_hook(self.hook) for p in params]

    def alive(self) -> int:
        return sum(not ref.expired() for ref in self.seen)

    def hook(self, grad: torch.Tensor) -> None:
        self.most_alive_before = max(self.most_alive_before, self.alive())
        self.seen.append(StorageWeakRef(grad.untyped_storage()))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def test_the_check_never_holds_two_parameter_gradients_and_writes_no_grad():
    model = tiny_gpt2()
    engine = GramianEngine(model)
    ids = token_ids(4, 6)
    with engine.capture():
        losses = causal_lm_losses(model(input_ids=ids).logits, ids)
    spy = GradientSpy(engine.params)
    try:
        engine.gramian(losses, verify_rows=default_rows(4))
    finally:
        spy.remove()
    served = engine.coverage()
    engine.release()
    # Only the check back-propagates to the parameters here (no parameter on the engine's own fallback
    # path), and it did.
    assert "fallback" not in served.values()
    assert len(spy.seen) >= len(engine.params)
    # Each gradient was freed before autograd produced the next: never a full per-row gradient.
    assert spy.most_alive_before == 0
    assert spy.alive() == 0
    assert all(p.grad is None for p in model.parameters())
    assert len(spy.seen) == len(reference_passes(3)) * len(engine.params)  # once per pass and parameter


def edges_into(losses: torch.Tensor, param: nn.Parameter) -> list[tuple[object, int]]:
    """The ``(node, slot)`` edges of the graph of ``losses`` that feed ``param``'s ``AccumulateGrad``."""
    found, seen, stack = [], set(), [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for slot, (child, _) in enumerate(node.next_functions):
            if child is not None:
                if getattr(child, "variable", None) is param:
                    found.append((node, slot))
                stack.append(child)
    return found


def test_a_tied_embedding_is_reduced_from_its_two_contributions_never_their_sum():
    model = tiny_gpt2()
    tied = model.transformer.wte.weight
    assert model.lm_head.weight is tied
    engine = GramianEngine(model)
    ids = token_ids(4, 6)
    with engine.capture():
        losses = causal_lm_losses(model(input_ids=ids).logits, ids)
    producers = edges_into(losses, tied)
    assert len(producers) == 2  # the output projection, then the embedding lookup
    seen: list[tuple[str, StorageWeakRef]] = []
    most_alive = []

    def record(kind: str, grad: torch.Tensor) -> None:
        most_alive.append([name for name, ref in seen if not ref.expired()])
        seen.append((kind, StorageWeakRef(grad.untyped_storage())))

    def node_spy(slot: int):
        def hook(grad_inputs, grad_outputs):
            if grad_inputs[slot] is not None:
                record("tied", grad_inputs[slot])

        return hook

    handles = [node.register_hook(node_spy(slot)) for node, slot in producers]
    handles += [
        p.register_hook(lambda grad: record("other", grad)) for p in engine.params if p is not tied
    ]  # hooks on the other parameters only: the tied one keeps no hook of its own
    try:
        engine.gramian(losses, verify_rows=default_rows(4))
    finally:
        for handle in handles:
            handle.remove()
        engine.release()
    passes = len(reference_passes(3))
    assert sum(kind == "tied" for kind, _ in seen) == 2 * passes
    # Alive whenever a gradient arrives: nothing but, from the output projection down to the embedding
    # lookup, the tied parameter's first contribution, which waits for its second (the two are reduced
    # together, then dropped; autograd never builds their sum).
    assert all(alive in ([], ["tied"]) for alive in most_alive), most_alive
    assert ["tied"] in most_alive
    assert all(ref.expired() for _, ref in seen)
    assert all(p.grad is None for p in model.parameters())


def test_the_first_steps_calibration_forward_is_not_kept_to_the_end_of_the_step():
    """The first ``gramian()`` re-runs the model on one example (batch classification, broadcast points);
    that graph (a quarter of the activations at batch 4) must be gone before the backward passes, not
    held until ``accumulate_grad`` releases the step."""
    model = tiny_gpt2()
    engine = GramianEngine(model)
    ids = token_ids(4, 6)
    with engine.capture():
        losses = causal_lm_losses(model(input_ids=ids).logits, ids)
    persistent = [*model.parameters(), *model.buffers(), ids]
    known = {t.untyped_storage().data_ptr() for t in persistent}
    saved: list[StorageWeakRef] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() not in known:  # activations, not weights or inputs
            saved.append(StorageWeakRef(tensor.untyped_storage()))
        return tensor.detach()  # not the tensor itself: a saved output would then hold its own node

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            engine.gramian(losses, verify_rows=default_rows(4))
        assert saved  # the calibration forward ran (the step's own forward was recorded before)
        assert all(ref.expired() for ref in saved)
    finally:
        engine.release()


# ---------------------------------------------------------------- what the check catches, through the engine
def _check(model: nn.Module, loss, ids: torch.Tensor, **engine_kwargs) -> torch.Tensor:
    engine = GramianEngine(model, **engine_kwargs)
    with engine.capture():
        losses = loss(model(ids))
    try:
        return engine.gramian(losses, verify_rows=default_rows(losses.numel()))
    finally:
        engine.release()


@pytest.mark.parametrize("sparse", [False, True])
def test_per_example_losses_pass_and_an_in_batch_loss_is_caught(sparse):
    torch.manual_seed(0)
    model = Encoder(sparse=sparse)
    ids = token_ids(6, 5)
    _check(model, per_example, ids)
    with pytest.raises(GramianMismatchError, match="loss i must depend on example i only"):
        _check(model, in_batch, ids)
    assert all(p.grad is None for p in model.parameters())


def test_per_task_check_compares_the_shared_parameters_only():
    torch.manual_seed(0)
    encoder, heads = Encoder(), nn.ModuleList(nn.Linear(8, 1) for _ in range(3))
    model = nn.ModuleDict({"encoder": encoder, "heads": heads})
    ids = token_ids(4, 5)
    engine = GramianEngine(model, objectives="per_task")
    with engine.capture():
        z = encoder(ids)
        losses = torch.stack([(head(z) ** 2).mean() for head in heads])
    expected = row_gram(losses, [0, 1, 2], list(encoder.parameters()))  # each head is one task's own
    try:
        gramian = engine.gramian(losses, verify_rows=[0, 1, 2])
    finally:
        engine.release()
    torch.testing.assert_close(gramian.to(torch.float64), expected, rtol=1e-4, atol=0)


def test_check_block_still_flags_a_block_off_by_more_than_the_tolerance():
    reference = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    check_block(reference + 3e-3, [0, 1], reference, low_precision=False, per_task=False)  # 7.5e-4 < 1e-3
    with pytest.raises(GramianMismatchError):
        check_block(reference + 5e-3, [0, 1], reference, low_precision=False, per_task=False)
    check_block(reference + 0.1, [0, 1], reference, low_precision=True, per_task=False)  # 2.5e-2 < 5e-2
