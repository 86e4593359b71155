"""Per-task Gramian: k task losses over a shared encoder, task-specific heads get plain gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from gramian_oracles import jacobian, labels, rel_err, tiny_bert_config, token_ids
from torch import nn
from transformers import BertModel

from hf_jd.gramian import GramianEngine


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        config = tiny_bert_config()
        self.encoder = BertModel(config, add_pooling_layer=False)
        self.head_a = nn.Linear(32, 3)
        self.head_b = nn.Linear(32, 1)

    def forward(self, ids, y, targets):
        features = self.encoder(input_ids=ids).last_hidden_state[:, 0]
        return torch.stack(
            [
                F.cross_entropy(self.head_a(features), y),
                F.mse_loss(self.head_b(features).squeeze(-1), targets),
            ]
        )


def test_two_heads_over_a_shared_encoder():
    model = TwoHeads()
    ids, y = token_ids(5, 9), labels(5)
    targets = torch.randn(5, generator=torch.Generator().manual_seed(2))
    engine = GramianEngine(model, objectives="per_task")
    engine.check_supported()
    named = dict(model.named_parameters())
    shared = [p for n, p in named.items() if n.startswith("encoder.")]
    with engine.capture():
        losses = model(ids, y, targets)
    J = jacobian(losses, shared)
    head_grads = {
        n: torch.autograd.grad(losses[0 if n.startswith("head_a") else 1], p, retain_graph=True)[0]
        for n, p in named.items()
        if n.startswith("head")
    }
    G = engine.gramian(losses)
    assert all(p.grad is None for p in model.parameters())
    assert G.shape == (2, 2)
    assert rel_err(G, J @ J.T) <= 1e-5
    weights = torch.tensor([0.25, 1.5])
    engine.accumulate_grad(weights, 0.5)
    update = torch.cat([p.grad.reshape(-1) for p in shared])
    assert rel_err(update, 0.5 * weights @ J) <= 1e-5
    for name, expected in head_grads.items():  # mtl_backward semantics: plain task gradient, not weighted
        assert rel_err(named[name].grad, 0.5 * expected) <= 1e-6, name


def test_per_task_with_a_parameter_used_outside_its_module():
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 6)
            self.body = nn.Linear(6, 6)
            self.heads = nn.ModuleList([nn.Linear(6, 1) for _ in range(3)])

        def forward(self, ids):
            hidden = torch.tanh(self.body(self.emb(ids))).mean(dim=1)
            hidden = hidden + F.linear(hidden, self.emb.weight[:6])  # table read outside its module
            return torch.stack([head(hidden).pow(2).mean() for head in self.heads])

    model = Model()
    ids = torch.randint(0, 20, (4, 5))
    engine = GramianEngine(model, objectives="per_task")
    with engine.capture():
        losses = model(ids)
    shared = [model.emb.weight, model.body.weight, model.body.bias]
    J = jacobian(losses, shared)
    G = engine.gramian(losses)
    assert rel_err(G, J @ J.T) <= 1e-5
    weights = torch.tensor([1.0, 0.2, 0.7])
    engine.accumulate_grad(weights, 1.0)
    update = torch.cat([p.grad.reshape(-1) for p in shared])
    assert rel_err(update, weights @ J) <= 1e-5
