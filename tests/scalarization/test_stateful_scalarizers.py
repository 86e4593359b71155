"""DWA, FAMO and Random: their protocols against brute force, reset, and exact resumption from a state
dict saved and loaded with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.testing import assert_close

from hf_jd.scalarization import DWA, FAMO, IMTLL, Random, UncertaintyWeighting

EPOCHS = [  # epoch -> batches -> losses (3 objectives)
    [[1.0, 2.0, 4.0], [3.0, 2.0, 2.0]],
    [[1.0, 1.5, 3.0], [1.0, 1.5, 1.0], [1.0, 0.0, 2.0]],
    [[0.5, 1.0, 1.0]],
]


def _round_trip(module: torch.nn.Module, fresh: torch.nn.Module) -> torch.nn.Module:
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def _dwa_weights(averages, temperature=2.0):
    older, newer = averages[-2], averages[-1]
    e = [math.exp(n / o / temperature) for n, o in zip(newer, older)]
    return [len(e) * x / sum(e) for x in e]


def test_dwa_follows_the_epoch_averages():
    dwa = DWA()
    averages = []
    probe = [2.0, 1.0, 0.5]
    for epoch in EPOCHS:
        weights = _dwa_weights(averages) if len(averages) >= 2 else [1.0, 1.0, 1.0]
        for batch in epoch:
            losses = torch.tensor(batch, dtype=torch.float64)
            assert math.isclose(dwa(losses).item(), sum(w * x for w, x in zip(weights, batch)), rel_tol=1e-6)
        averages.append([sum(col) / len(epoch) for col in zip(*epoch)])
        dwa.step()
    expected = _dwa_weights(averages)
    losses = torch.tensor(probe, requires_grad=True)
    dwa(losses).backward()
    assert_close(losses.grad, torch.tensor(expected), rtol=1e-6, atol=1e-6)  # the weights carry no gradient
    assert math.isclose(sum(expected), 3.0)


def test_dwa_temperature_flattens_the_weights():
    sharp, flat = DWA(temperature=0.5), DWA(temperature=50.0)
    for dwa in (sharp, flat):
        for epoch in EPOCHS[:2]:
            for batch in epoch:
                dwa(torch.tensor(batch))
            dwa.step()
    assert (flat.weights(3) - 1).abs().max() < (sharp.weights(3) - 1).abs().max()


def test_dwa_step_sums_over_ranks_with_the_given_reduction():
    # Two "ranks" see different batches; the reduction adds the other rank's packed [sum..., count].
    rank0, rank1 = DWA(), DWA()
    for epoch in EPOCHS[:2]:
        half = len(epoch) // 2 or 1
        for batch in epoch[:half]:
            rank0(torch.tensor(batch))
        for batch in epoch[half:]:
            rank1(torch.tensor(batch))
        p0 = torch.cat([rank0._loss_sum, torch.tensor([float(rank0._count)])])
        p1 = torch.cat([rank1._loss_sum, torch.tensor([float(rank1._count)])])
        rank0.step(lambda t, other=p1: t + other)
        rank1.step(lambda t, other=p0: t + other)
    single = DWA()
    for epoch in EPOCHS[:2]:
        for batch in epoch:
            single(torch.tensor(batch))
        single.step()
    assert_close(rank0.weights(3), single.weights(3))
    assert_close(rank1.weights(3), single.weights(3))


def test_dwa_state_round_trip_mid_epoch_and_reset():
    dwa = DWA(temperature=1.5)
    for epoch in EPOCHS[:2]:
        for batch in epoch:
            dwa(torch.tensor(batch))
        dwa.step()
    dwa(torch.tensor(EPOCHS[2][0]))  # mid-epoch: a running sum in the state
    resumed = _round_trip(dwa, DWA(temperature=1.5))
    for module in (dwa, resumed):
        module(torch.tensor([0.3, 0.2, 0.1]))
        module.step()
    probe = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(dwa(probe), resumed(probe))
    assert_close(dwa.weights(3), resumed.weights(3), rtol=0, atol=0)
    assert not torch.equal(dwa.weights(3), torch.ones(3))
    dwa.reset()
    assert torch.equal(dwa.weights(3), torch.ones(3)) and dwa.get_extra_state()["count"] == 0


def test_dwa_refuses_a_zero_epoch_average_and_a_changing_count():
    dwa = DWA()
    for losses in ([0.0, 1.0], [1.0, 1.0]):
        dwa(torch.tensor(losses))
        dwa.step()
    with pytest.raises(ValueError, match="not finite"):
        dwa(torch.tensor([1.0, 1.0]))
    dwa = DWA()
    dwa(torch.tensor([1.0, 1.0]))
    with pytest.raises(ValueError, match="must not change"):
        dwa(torch.tensor([1.0, 1.0, 1.0]))


def test_dwa_refuses_a_foreign_state():
    with pytest.raises(ValueError, match="Invalid state for DWA"):
        DWA().set_extra_state({"history": "nope"})


def _famo_oracle_step(logits, before, after, w_lr, gamma):
    """The logits after one update: autograd through softmax and torch.optim.Adam (the paper's recipe)."""
    xi = torch.nn.Parameter(logits.clone())
    adam = torch.optim.Adam([xi], lr=w_lr, weight_decay=gamma)
    delta = torch.log(before + 1e-8) - torch.log(after + 1e-8)
    (xi.grad,) = torch.autograd.grad(torch.softmax(xi, dim=0), xi, grad_outputs=delta)
    adam.step()
    return xi.detach(), adam


def test_famo_update_is_one_adam_step_on_the_softmax_vjp():
    famo = FAMO(3, w_lr=0.1, gamma=0.01)
    before, after = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([0.6, 1.9, 0.45])
    xi = torch.nn.Parameter(torch.zeros(3))
    adam = torch.optim.Adam([xi], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        famo(before)
        famo.update(after)
        delta = torch.log(before + 1e-8) - torch.log(after + 1e-8)
        (xi.grad,) = torch.autograd.grad(torch.softmax(xi, dim=0), xi, grad_outputs=delta)
        adam.step()
        assert_close(famo.logits, xi.detach(), rtol=1e-5, atol=1e-7)
        before, after = after, after * torch.tensor([0.9, 0.99, 0.95])
    # the task that decreased least (the second) gains weight
    assert famo.weights.argmax() == 1


def test_famo_explicit_losses_before_and_errors():
    famo = FAMO(2)
    with pytest.raises(RuntimeError, match="needs losses_before"):
        famo.update(torch.tensor([1.0, 1.0]))
    famo.update(torch.tensor([0.5, 0.9]), losses_before=torch.tensor([1.0, 1.0]))
    expected, _ = _famo_oracle_step(
        torch.zeros(2), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 0.9]), 0.025, 0.01
    )
    assert_close(famo.logits, expected, rtol=1e-5, atol=1e-7)
    famo(torch.tensor([1.0, 1.0]))
    famo.update(torch.tensor([0.9, 0.9]))
    with pytest.raises(RuntimeError):  # the stored losses were consumed by the update
        famo.update(torch.tensor([0.9, 0.9]))
    with pytest.raises(ValueError, match="not above"):
        FAMO(2, min_losses=[0.5, 0.0])(torch.tensor([0.4, 1.0]))
    with pytest.raises(ValueError, match="non-finite"):
        famo.update(torch.tensor([float("nan"), 1.0]), losses_before=torch.tensor([1.0, 1.0]))


def test_famo_state_round_trip_reset_and_no_optimizer_needed():
    famo = FAMO(3, w_lr=0.05)
    losses = torch.tensor([1.0, 2.0, 3.0])
    for scale in (0.9, 0.8, 0.7):
        famo(losses)
        famo.update(losses * torch.tensor([scale, 1.0, 0.95]))
        losses = losses * torch.tensor([scale, 1.0, 0.95])
    famo(losses)  # the stored losses are part of the state too
    resumed = _round_trip(famo, FAMO(3, w_lr=0.05))
    for module in (famo, resumed):
        module.update(losses * 0.9)
        module(losses * 0.9)
        module.update(losses * 0.8)
    probe = torch.tensor([0.5, 0.6, 0.7])
    assert torch.equal(famo(probe), resumed(probe))
    assert torch.equal(famo.logits, resumed.logits) and int(famo.adam_step) == 5
    famo.reset()
    assert torch.equal(famo.logits, torch.zeros(3)) and int(famo.adam_step) == 0
    assert torch.equal(famo.exp_avg_sq, torch.zeros(3))


def test_random_same_seed_same_weights_state_round_trip_and_reset():
    probe = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(11)
    expected = [
        torch.softmax(torch.randn(4, generator=generator, dtype=torch.float64), dim=0) for _ in range(3)
    ]
    rlw = Random(seed=11)
    for weights in expected:
        assert_close(rlw(probe), (weights * probe).sum(), rtol=1e-12, atol=0)
    other = Random(seed=11)
    assert torch.equal(other(probe), Random(seed=11)(probe))
    assert not torch.equal(Random(seed=12)(probe), Random(seed=11)(probe))
    resumed = _round_trip(rlw, Random(seed=999))
    assert torch.equal(resumed(probe), rlw(probe))
    rlw.reset()
    assert_close(rlw(probe), (expected[0] * probe).sum(), rtol=1e-12, atol=0)


def test_random_leaves_the_global_random_state_alone():
    state = torch.get_rng_state()
    Random(seed=1)(torch.ones(3))
    Random()(torch.ones(3))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    ("make", "name"), [(lambda: UncertaintyWeighting(3), "log_var"), (lambda: IMTLL(3), "log_scale")]
)
def test_learned_scales_round_trip(make, name):
    trained = make()
    with torch.no_grad():
        getattr(trained, name).copy_(torch.tensor([0.1, -0.2, 0.3]))
    resumed = _round_trip(trained, make())
    probe = torch.tensor([1.0, 2.0, 3.0])
    assert torch.equal(trained(probe), resumed(probe))
