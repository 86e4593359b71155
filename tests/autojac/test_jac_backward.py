"""`jac` and `backward` against brute force (torch.func.jacrev and a row-by-row autograd loop)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hf_jd import autojac

CHUNKS = [None, 1, 2, 3]


def _mlp_losses(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return ((model(x) - y) ** 2).sum(dim=1)


def _data(batch: int = 5) -> tuple[Tensor, Tensor]:
    return torch.randn(batch, 3), torch.randn(batch, 2)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_jac_shared_twice_matches_jacrev_and_row_loop(chunk, models, jacrev_oracle, row_loop):
    model = models["shared_twice"]()
    x, y = _data()
    params = list(model.parameters())
    expected = jacrev_oracle(model, lambda out: ((out - y) ** 2).sum(dim=1), x)

    losses = _mlp_losses(model, x, y)
    loop = row_loop([losses], params)
    jacobians = autojac.jac(losses, params, parallel_chunk_size=chunk)

    assert len(jacobians) == len(params)
    for (name, p), j, ref in zip(model.named_parameters(), jacobians, loop):
        assert j.shape == (5, *p.shape)
        torch.testing.assert_close(j, expected[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(j, ref, rtol=1e-5, atol=1e-6)
    # The unused parameter gets a zero Jacobian, and the shared weight a non-zero one (both uses summed).
    by_name = dict(zip([n for n, _ in model.named_parameters()], jacobians))
    assert torch.equal(by_name["unused"], torch.zeros(5, 5))
    assert by_name["shared"].abs().sum() > 0


@pytest.mark.parametrize("chunk", CHUNKS)
def test_backward_tied_modules_matches_jacrev(chunk, models, jacrev_oracle):
    model = models["tied"]()
    x = torch.randn(7, 4)
    expected = jacrev_oracle(model, lambda out: out**2, x)
    autojac.backward(model(x) ** 2, parallel_chunk_size=chunk)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.jac, expected[name], rtol=1e-5, atol=1e-6)
        assert p.grad is None  # backward fills .jac only
    # The tied weight is one tensor: it has one .jac holding the sum over both modules.
    assert model.b.weight.jac is model.a.weight.jac


def test_gru_with_row_loop(models, jacrev_oracle, row_loop):
    model = models["gru"]()
    x = torch.randn(4, 6, 3)
    params = list(model.parameters())
    losses = model(x) ** 2
    loop = row_loop([losses], params)
    expected = jacrev_oracle(model, lambda out: out**2, x)
    autojac.backward(losses, parallel_chunk_size=1)
    for (name, p), ref in zip(model.named_parameters(), loop):
        torch.testing.assert_close(p.jac, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p.jac, expected[name], rtol=1e-5, atol=1e-6)


def test_chunk_size_one_is_a_plain_loop_without_vmap(monkeypatch):
    calls: list[dict] = []
    real_grad = torch.autograd.grad

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    x = torch.randn(6, 3)

    autojac.backward(model(x), parallel_chunk_size=1)
    assert len(calls) == 6
    assert not any(c.get("is_grads_batched", False) for c in calls)

    calls.clear()
    for p in model.parameters():
        del p.jac
    autojac.backward(model(x), parallel_chunk_size=4)  # chunks of 4 and 2 rows: both batched
    assert len(calls) == 2
    assert all(c.get("is_grads_batched", False) for c in calls)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_several_outputs_of_different_shapes_give_rows_in_order(chunk, row_loop):
    a = torch.randn(3, 2, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    outputs = [(a**2).sum(dim=1), (a.sum() * b).sum(), torch.outer(b[:2], a[0])]  # 3 + 1 + 4 rows
    ref_a, ref_b = row_loop(outputs, [a, b])
    ja, jb = autojac.jac(outputs, [a, b], parallel_chunk_size=chunk)
    assert ja.shape == (8, 3, 2) and jb.shape == (8, 4)
    torch.testing.assert_close(ja, ref_a)
    torch.testing.assert_close(jb, ref_b)


def test_jac_returns_one_result_per_input_even_repeated():
    x = torch.randn(3, requires_grad=True)
    y = x * torch.tensor([1.0, 2.0, 3.0])
    j1, j2 = autojac.jac(y, [x, x])
    torch.testing.assert_close(j1, torch.diag(torch.tensor([1.0, 2.0, 3.0])))
    assert torch.equal(j1, j2)


def test_jac_with_respect_to_an_intermediate_tensor_and_chain_rule():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    h = x**2
    y1 = h.sum()
    y2 = torch.tensor([1.0, -1.0]) @ h
    (jac_h,) = autojac.jac([y1, y2], [h], retain_graph=True)
    torch.testing.assert_close(jac_h, torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    for chunk in CHUNKS:
        (chained,) = autojac.jac(h, x, jac_outputs=jac_h, retain_graph=True, parallel_chunk_size=chunk)
        torch.testing.assert_close(chained, torch.tensor([[2.0, 4.0], [2.0, -4.0]]))
    (direct,) = autojac.jac([y1, y2], x)
    torch.testing.assert_close(direct, torch.tensor([[2.0, 4.0], [2.0, -4.0]]))


def test_backward_with_jac_tensors_left_multiplies_the_jacobian():
    w = torch.randn(3, 4, requires_grad=True)
    y = w @ torch.randn(4)  # Jacobian of y w.r.t. w: [3, 3, 4]
    seed = torch.randn(2, 3)
    (plain,) = autojac.jac(y, w, retain_graph=True)
    autojac.backward(y, jac_tensors=seed, parallel_chunk_size=1)
    torch.testing.assert_close(w.jac, torch.einsum("ri,ijk->rjk", seed, plain))


def test_backward_accumulates_jac_across_calls(row_loop):
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0))
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    params = list(model.parameters())
    ref1 = row_loop([model(x1)], params)
    ref2 = row_loop([model(x2) ** 2], params)
    autojac.backward(model(x1))
    first = [p.jac.clone() for p in params]
    autojac.backward(model(x2) ** 2, parallel_chunk_size=3)
    for p, f, r1, r2 in zip(params, first, ref1, ref2):
        torch.testing.assert_close(f, r1)
        torch.testing.assert_close(p.jac, r1 + r2)


def test_backward_default_inputs_are_the_leaves_the_losses_depend_on():
    lin = nn.Linear(3, 2)
    frozen = nn.Linear(2, 2)
    frozen.requires_grad_(False)
    unused = nn.Parameter(torch.randn(3))
    x = torch.randn(4, 3, requires_grad=True)  # a leaf input requiring grad is a leaf too
    autojac.backward(frozen(lin(x)).sum(dim=1))
    assert lin.weight.jac.shape == (4, 2, 3) and lin.bias.jac.shape == (4, 2)
    assert x.jac.shape == (4, 4, 3)
    assert not hasattr(frozen.weight, "jac") and not hasattr(unused, "jac")


def test_backward_explicit_inputs_including_unused_and_retained_non_leaf():
    w = torch.randn(2, 3, requires_grad=True)
    unused = torch.randn(5, requires_grad=True)
    h = w * 2
    h.retain_grad()
    y = (h**2).sum(dim=1)
    autojac.backward(y, inputs=[w, unused, h, w])  # w repeated: filled once
    expected_w = torch.zeros(2, 2, 3)
    expected_w[0, 0], expected_w[1, 1] = 8 * w[0].detach(), 8 * w[1].detach()
    torch.testing.assert_close(w.jac, expected_w)
    assert torch.equal(unused.jac, torch.zeros(2, 5))
    expected_h = torch.zeros(2, 2, 3)
    expected_h[0, 0], expected_h[1, 1] = 2 * h[0].detach(), 2 * h[1].detach()
    torch.testing.assert_close(h.jac, expected_h)


def test_chunked_backward_keeps_the_graph_until_the_last_chunk_then_frees_it():
    w = torch.randn(5, 3, requires_grad=True)
    y = torch.tanh(w @ torch.randn(3))
    autojac.backward(y, parallel_chunk_size=2)  # three chunks: the first two must retain the graph
    assert w.jac.shape == (5, 5, 3)
    with pytest.raises(RuntimeError, match="second time"):
        autojac.backward(y)


def test_retain_graph_allows_a_second_call():
    w = torch.randn(4, requires_grad=True)
    y = torch.sin(w) * 3
    autojac.backward(y, retain_graph=True)
    autojac.backward(y)
    torch.testing.assert_close(w.jac, 2 * torch.diag(3 * torch.cos(w.detach())))


def test_jac_tensors_are_not_aliased_into_jac():
    # An output that is itself the input: autograd hands back the seed tensor unchanged.
    p = torch.randn(3, requires_grad=True)
    seed = torch.eye(3)
    autojac.backward(p, jac_tensors=seed)
    autojac.backward(p, jac_tensors=seed)
    torch.testing.assert_close(p.jac, 2 * torch.eye(3))
    assert torch.equal(seed, torch.eye(3))


def test_vmap_failure_is_reraised_with_a_hint_and_chunk_one_works():
    class ItemInBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a: Tensor) -> Tensor:
            return a * 2

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:
            scale = 2.0 if grad.abs().sum().item() >= 0 else 0.0  # .item(): no vmap batching rule
            return grad * scale

    w = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="parallel_chunk_size=1"):
        autojac.backward(ItemInBackward.apply(w) ** 2, parallel_chunk_size=2)
    autojac.backward(ItemInBackward.apply(w) ** 2, parallel_chunk_size=1)
    torch.testing.assert_close(w.jac, torch.diag(8 * w.detach()))


def test_empty_outputs_give_empty_jacobians():
    w = torch.randn(3, requires_grad=True)
    (j,) = autojac.jac((w * 2)[:0], w)
    assert j.shape == (0, 3)


def test_compiled_backward_refusing_retain_graph_gets_a_hint():
    # What a torch.compile'd backward with donated buffers raises on retain_graph=True (simulated:
    # compiling takes too long for a unit test).
    class Donated(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a: Tensor) -> Tensor:
            return a * 2

        @staticmethod
        def backward(ctx, grad: Tensor) -> Tensor:
            raise RuntimeError("This backward function was compiled with non-empty donated buffers")

    w = torch.randn(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="donated_buffer = False"):
        autojac.backward(Donated.apply(w), parallel_chunk_size=1)
