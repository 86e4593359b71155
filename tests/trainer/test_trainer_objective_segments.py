"""``compute_losses`` returning ``ObjectiveLosses.segments``: one loss per sequence of a packed row.

A tiny Llama from config reads one packed row of three sequences (``position_ids`` restarting per
sequence, a 4-D block-causal mask confining attention to each sequence; sdpa). The trainer's update is
compared with UPGrad on the brute-force Jacobian of the sequence losses (one ``torch.autograd.grad`` per
loss). Without the mask and the restarts (plain causal attention over the row), attention crosses
sequences: the Gramian engine's self-check must refuse the step, and ``jd_engine="auto"`` must fall back
to the explicit Jacobian, which is exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _trainer_fixtures import base_args
from datasets import Dataset
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from hf_jd import JDTrainer, JDTrainingArguments, ObjectiveLosses
from hf_jd.aggregation import UPGrad
from hf_jd.gramian import GramianMismatchError

VOCAB = 31
LENGTHS = [5, 3, 4]


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def packed_dataset() -> Dataset:
    """One packed row: token ids, each token's sequence, and positions restarting per sequence."""
    ids = torch.randint(1, VOCAB, (sum(LENGTHS),), generator=torch.Generator().manual_seed(0))
    segments = torch.cat([torch.full((n,), s) for s, n in enumerate(LENGTHS)])
    positions = torch.cat([torch.arange(n) for n in LENGTHS])
    return Dataset.from_dict(
        {"input_ids": [ids.tolist()], "segments": [segments.tolist()], "position_ids": [positions.tolist()]}
    )


def sequence_losses(model: nn.Module, inputs: dict[str, Tensor], confined: bool = True) -> Tensor:
    """``L_s``: the mean next-token cross-entropy of sequence ``s`` (``[K]``)."""
    ids, segments = inputs["input_ids"], inputs["segments"]
    seg = segments[0]
    mask, positions = None, None  # not confined: one sequence of positions 0..T-1, causal attention over all
    if confined:
        causal = torch.ones(seg.numel(), seg.numel(), dtype=torch.bool).tril()
        mask, positions = (causal & (seg[:, None] == seg[None, :]))[None, None], inputs["position_ids"]
    logits = model(input_ids=ids, position_ids=positions, attention_mask=mask).logits
    token_loss = F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    same = seg[:-1] == seg[1:]
    return torch.stack([token_loss[same & (seg[:-1] == s)].mean() for s in range(len(LENGTHS))])


class PackedJD(JDTrainer):
    confined = True

    def compute_losses(self, model, inputs):
        return ObjectiveLosses.segments(sequence_losses(model, inputs, self.confined), inputs["segments"])


class Leaky(PackedJD):
    confined = False


def flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])


def brute_upgrad(confined: bool) -> Tensor:
    model = tiny_llama()
    batch = {key: torch.tensor(packed_dataset()[key]) for key in ("input_ids", "segments", "position_ids")}
    losses = sequence_losses(model, batch, confined)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for k in range(losses.numel()):
        grads = torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
            )
        )
    return UPGrad()(torch.stack(rows))


def one_step(trainer_class, tmp_path, engine: str) -> tuple[Tensor, str]:
    model = tiny_llama()
    before = flat(model)
    args = JDTrainingArguments(
        **base_args(
            tmp_path,
            max_steps=1,
            per_device_train_batch_size=1,
            learning_rate=0.5,
            optim="sgd",
            lr_scheduler_type="constant",
            max_grad_norm=0.0,
            remove_unused_columns=False,
        ),
        aggregator="upgrad",
        jd_engine=engine,
    )
    trainer = trainer_class(model=model, args=args, train_dataset=packed_dataset())
    trainer.train()
    assert trainer.jd_engine is not None
    return (before - flat(model)) / 0.5, trainer.jd_engine.name


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_upgrad_step_on_a_packed_row_equals_brute_force(tmp_path, engine):
    expected = brute_upgrad(confined=True)
    update, name = one_step(PackedJD, tmp_path, engine)
    assert name == engine
    assert rel_err(update, expected) <= 1e-5, rel_err(update, expected)


def test_gramian_engine_self_check_catches_attention_across_sequences(tmp_path):
    with pytest.raises(GramianMismatchError):
        one_step(Leaky, tmp_path, "gramian")


def test_auto_falls_back_to_the_explicit_jacobian_when_attention_crosses_sequences(tmp_path):
    expected = brute_upgrad(confined=False)
    with pytest.warns(RuntimeWarning, match="GramianMismatchError"):
        update, name = one_step(Leaky, tmp_path, "auto")
    assert name == "jacobian"
    assert rel_err(update, expected) <= 1e-5, rel_err(update, expected)
