"""The ``nn.MultiheadAttention`` rule (``hf_jd/gramian/_mha.py``) against row-by-row autograd, with the
public test helper: every configuration it serves, in float64 and float32, and the ones it leaves to the
exact fallback."""

from __future__ import annotations

import pytest
import torch
from gramian_oracles import assert_exact
from torch import nn

from hf_jd.gramian import GramianEngine
from hf_jd.gramian._mha import MultiheadAttentionRule
from hf_jd.gramian.testing import assert_rule_exact

BATCH, TARGET, SOURCE, EMBED, HEADS = 4, 5, 6, 8, 2

#: name -> (constructor keywords, whether the call is cross-attention with other key / value widths)
CONFIGS = {
    "self": ({}, False),
    "no-bias": ({"bias": False}, False),
    "bias-kv": ({"add_bias_kv": True}, False),
    "zero-attn": ({"add_zero_attn": True}, False),
    "dropout": ({"dropout": 0.4}, False),
    "kdim-vdim": ({"kdim": 3, "vdim": 7}, True),
    "cross": ({}, True),
}


def inputs(cross: bool, kdim: int, vdim: int, dtype: torch.dtype, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    query = torch.randn(BATCH, TARGET, EMBED, generator=generator, dtype=dtype)
    if not cross:
        return lambda: (query, query, query)
    key = torch.randn(BATCH, SOURCE, kdim, generator=generator, dtype=dtype)
    value = torch.randn(BATCH, SOURCE, vdim, generator=generator, dtype=dtype)
    return lambda: (query, key, value)


def attention(dtype: torch.dtype, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(EMBED, HEADS, batch_first=True, **kwargs).to(dtype)


@pytest.mark.parametrize("objectives", ["per_example", "per_task"])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_mha_rule_is_exact(config, need_weights, objectives):
    kwargs, cross = CONFIGS[config]
    module = attention(torch.float64, **kwargs)
    check = assert_rule_exact(
        module,
        inputs(cross, kwargs.get("kdim", EMBED), kwargs.get("vdim", EMBED), torch.float64),
        kwargs={"need_weights": need_weights},
        rule=MultiheadAttentionRule,
        objectives=objectives,
        tol=1e-10,
    )
    # out_proj is claimed: its parameters are the attention rule's, as are the attention's own.
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(check.coverage) == expected and "out_proj.weight" in expected
    assert set(check.coverage.values()) == {"multihead_attention"}


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize(
    "masks",
    ["key-padding", "bool-2d", "float-3d", "causal", "causal+key-padding"],
)
def test_mha_rule_masks(masks, average):
    module = attention(torch.float64)
    padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
    padding[1, -2:] = True
    padding[3, -1] = True
    call: dict[str, object] = {"need_weights": True, "average_attn_weights": average}
    if "key-padding" in masks:
        call["key_padding_mask"] = padding
    if masks == "bool-2d":
        call["attn_mask"] = torch.rand(TARGET, TARGET, generator=torch.Generator().manual_seed(3)) > 0.7
        call["attn_mask"][:, 0] = False  # every query sees at least one key
    if masks == "float-3d":  # one mask per example and head
        call["attn_mask"] = torch.randn(BATCH * HEADS, TARGET, TARGET, dtype=torch.float64)
    if masks.startswith("causal"):
        call["attn_mask"] = torch.ones(TARGET, TARGET, dtype=torch.bool).triu(
            1
        )  # the key-padding mask's type
        call["is_causal"] = True
        call["need_weights"] = False
    assert_rule_exact(module, inputs(False, EMBED, EMBED, torch.float64), kwargs=call, tol=1e-10)


@pytest.mark.parametrize("strategy", ["ghost", "materialize"])
def test_mha_rule_float32_both_gramian_strategies(strategy):
    module = attention(torch.float32, dropout=0.2)
    check = assert_rule_exact(
        module, inputs(True, EMBED, EMBED, torch.float32), linear_strategy=strategy, tol=1e-5
    )
    assert check.gramian_error <= 1e-5 and check.grad_error <= 1e-5


def test_frozen_in_projection_leaves_out_proj_to_the_rule():
    module = attention(torch.float64)
    module.in_proj_weight.requires_grad_(False)
    check = assert_rule_exact(module, inputs(False, EMBED, EMBED, torch.float64), tol=1e-10)
    assert set(check.coverage) == {"in_proj_bias", "out_proj.weight", "out_proj.bias"}


class SequenceFirst(nn.Module):
    """Batch-first data through a ``batch_first=False`` attention (the batch is its dimension 1)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(EMBED, HEADS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.transpose(0, 1)
        return (self.attn(h, h, h)[0] ** 2).sum(dim=(0, 2))


def test_sequence_first_per_example_stays_exact_on_the_fallback():
    """``batch_first=False``: dimension 0 of the call is not the batch, so per example the call is not
    classified per example and its parameters (``out_proj``'s too) take the exact fallback."""
    model = SequenceFirst().double()
    x = torch.randn(BATCH, TARGET, EMBED, dtype=torch.float64)
    assert_exact(model, lambda: model(x), tol=1e-10)
    engine = GramianEngine(model)
    with engine.capture():
        losses = model(x)
    engine.gramian(losses)
    assert set(engine.coverage().values()) == {"fallback"}
    engine.release()


def test_sequence_first_per_task_is_served_by_the_rule():
    """Per task the rows are tasks: the layout of the batch does not matter."""
    torch.manual_seed(0)
    module = nn.MultiheadAttention(EMBED, HEADS).double()
    x = torch.randn(TARGET, BATCH, EMBED, dtype=torch.float64)

    def losses(output):
        return (output[0] ** 2).sum(dim=(0, 2))  # one loss per example (dimension 1), mixed into tasks

    assert_rule_exact(module, lambda: (x, x, x), objectives="per_task", losses=losses, tol=1e-10)


class Encoder(nn.Module):
    """A stock transformer encoder layer (its ``self_attn`` is a ``nn.MultiheadAttention``) and a head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, EMBED)
        self.layer = nn.TransformerEncoderLayer(EMBED, HEADS, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(EMBED, 1)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        hidden = self.layer(self.embed(ids), src_key_padding_mask=padding)
        return self.head(hidden).squeeze(-1).sum(dim=1) ** 2


def test_transformer_encoder_layer_is_served_by_the_rule():
    model = Encoder().double()
    ids = torch.randint(0, 20, (BATCH, TARGET), generator=torch.Generator().manual_seed(0))
    padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
    padding[0, -2:] = True
    assert_exact(model, lambda: model(ids, padding), tol=1e-10)
    engine = GramianEngine(model)
    with engine.capture():
        losses = model(ids, padding)
    engine.gramian(losses)
    served = engine.coverage()
    engine.release()
    attention_params = {n: how for n, how in served.items() if n.startswith("layer.self_attn.")}
    assert set(attention_params) == {
        "layer.self_attn.in_proj_weight",
        "layer.self_attn.in_proj_bias",
        "layer.self_attn.out_proj.weight",
        "layer.self_attn.out_proj.bias",
    }
    assert set(attention_params.values()) == {"multihead_attention"}
    assert "fallback" not in served.values()


@pytest.mark.parametrize("objectives", ["per_example", "per_task"])
@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_rule_appended_keys_with_masks(need_weights, objectives):
    """``bias_k`` / ``bias_v`` and the zero attention append keys: the masks are padded to match."""
    module = attention(torch.float64, add_bias_kv=True, add_zero_attn=True, dropout=0.2)
    padding = torch.zeros(BATCH, TARGET, dtype=torch.bool)
    padding[1, -2:] = True
    blocked = torch.zeros(TARGET, TARGET, dtype=torch.bool)
    blocked[:, 3] = True
    call = {"key_padding_mask": padding, "attn_mask": blocked, "need_weights": need_weights}
    check = assert_rule_exact(
        module, inputs(False, EMBED, EMBED, torch.float64), kwargs=call, objectives=objectives, tol=1e-10
    )
    assert {"bias_k", "bias_v"} <= set(check.coverage)


def test_the_rule_declares_that_it_recomputes_the_call():
    """The FSDP2 engine refuses rules that re-run a module with its (freed) full parameters."""
    assert MultiheadAttentionRule.recomputes and MultiheadAttentionRule.keep_all_inputs
