"""The shared pieces of the paper benchmarks: rate selection by AUC, statistics, Δm%, the data builders."""

from __future__ import annotations

import math

import numpy as np
import pytest
from _load import BENCHMARKS  # noqa: F401  (puts benchmarks/ on sys.path)
from _paper._data import load_cancer_mtl_split, load_digits_split, load_multidigits_split, overlay_pairs
from _paper._selection import area_under_curve, log_grid, select_learning_rate
from _paper._stats import delta_m, format_mean_se, mean_and_standard_error


def test_log_grid_is_geometric_and_includes_both_ends():
    grid = log_grid(1e-3, 10.0, 9)
    assert grid[0] == pytest.approx(1e-3) and grid[-1] == pytest.approx(10.0)
    ratios = np.array(grid[1:]) / np.array(grid[:-1])
    assert np.allclose(ratios, math.sqrt(10))


def test_area_under_curve_is_the_mean_trapezoid_level_and_inf_when_diverged():
    assert area_under_curve([2.0, 1.0, 0.0]) == pytest.approx((1.5 + 0.5) / 2)
    assert area_under_curve([1.0, 1.0]) == pytest.approx(1.0)
    assert area_under_curve([1.0, math.nan]) == math.inf
    assert area_under_curve([1.0, math.inf]) == math.inf


def test_selection_takes_the_smallest_finite_area_and_flags_the_grid_edge():
    assert select_learning_rate({0.01: 2.0, 0.1: 1.0, 1.0: 1.5}) == (0.1, False)
    assert select_learning_rate({0.01: 2.0, 0.1: 1.0, 1.0: math.inf}) == (
        0.1,
        False,
    )  # next to divergence: fine
    assert select_learning_rate({0.01: 2.0, 0.1: 1.5, 1.0: 1.0}) == (1.0, True)
    assert select_learning_rate({0.01: 1.0, 0.1: 1.0}) == (0.01, True)  # ties: the smaller rate
    with pytest.raises(ValueError, match="diverged"):
        select_learning_rate({0.1: math.inf})


def test_mean_and_standard_error():
    mean, error = mean_and_standard_error([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0) and error == pytest.approx(1.0 / math.sqrt(3))
    assert math.isnan(mean_and_standard_error([1.0])[1])
    assert format_mean_se([0.5, 0.7], 1, scale=100) == "60.0 ± 10.0"
    assert format_mean_se([0.5, math.inf]) == "diverged"


def test_delta_m_is_the_mean_relative_drop():
    higher = {"acc": True, "mse": False}
    reference = {"acc": 0.8, "mse": 0.5}
    assert delta_m(reference, reference, higher) == 0.0
    # accuracy 10 % lower (a drop of +10 %) and MSE 10 % lower (a gain of -10 %): Δm = 0
    assert delta_m({"acc": 0.72, "mse": 0.45}, reference, higher) == pytest.approx(0.0)
    assert delta_m({"acc": 0.72, "mse": 0.5}, reference, higher) == pytest.approx(5.0)
    assert delta_m({"acc": 0.88, "mse": 0.5}, reference, higher) == pytest.approx(-5.0)


def test_overlay_pairs_places_the_left_digit_top_left_and_the_right_one_bottom_right():
    images = np.zeros((2, 8, 8), dtype=np.float32)
    images[0] = 1.0  # a full square, label 7
    labels = np.array([7, 3])
    canvas, left, right = overlay_pairs(images, labels, 20, np.random.default_rng(0))
    assert canvas.shape == (20, 12, 12) and canvas.max() <= 1.0
    for i in range(20):
        ink = canvas[i] > 0
        if left[i] == 7:
            assert ink[1:8, 1:8].all()  # within the 0–1 pixel offsets the square always covers [1, 8)
        if right[i] == 7:
            assert ink[4:11, 4:11].all()
        if left[i] == 3 and right[i] == 3:
            assert not ink.any()


def test_data_builders_are_offline_and_disjoint():
    digits = load_digits_split(train_size=1024)
    assert len(digits.train) == 1024 and len(digits.test) == 1797 - 1024
    assert digits.train[0]["x"].shape == (1, 8, 8)
    multi = load_multidigits_split(train_pairs=64, test_pairs=32)
    assert [t.name for t in multi.tasks] == ["left", "right"]
    assert multi.train.tensors["x"].shape == (64, 1, 12, 12)
    assert set(multi.train.tensors["left"].tolist()) <= set(range(10))
    cancer = load_cancer_mtl_split()
    assert [t.metric for t in cancer.tasks] == ["accuracy", "mse", "mse"]
    assert cancer.train.tensors["x"].shape[1] == 10
    assert abs(float(cancer.train.tensors["worst_texture"].mean())) < 1e-5  # standardised on train


def test_mnist1d_is_generated_locally():
    from _paper._data import load_mnist1d_split

    split = load_mnist1d_split(train_size=128, num_samples=500)
    assert split.train.tensors["x"].shape == (128, 1, 1, 40)
    assert len(split.test) == 100 and split.input_shape == (1, 1, 40)


def test_a_diverging_run_is_recorded_not_raised():
    import torch
    from _paper._data import load_breast_cancer_split
    from _paper._models import build_iwrm_model, per_example_cross_entropy
    from _paper._training import Method, Schedule, fit

    split = load_breast_cancer_split(train_size=64)
    model = build_iwrm_model("mlp", split.input_shape, 2, seed=0)
    with torch.no_grad():
        model.body[-1].weight.mul_(1e30)  # logits ~1e30: the first step's Jacobian overflows
    record = fit(
        model,
        split.train,
        Schedule(1e30, epochs=2),
        Method("aggregator", "upgrad"),
        lambda m: 1.0,
        compute_losses_func=per_example_cross_entropy,
    )
    assert record.diverged and record.error and len(record.curve) == 3
