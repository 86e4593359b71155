"""``benchmarks/paper_iwrm.py --quick`` runs through JDTrainer and writes sane tables, curves and a figure."""

from __future__ import annotations

import json
import math

import pytest
from _load import run_quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("paper_iwrm")
    return run_quick("paper_iwrm", out), out


def test_outputs_are_written(quick):
    report, out = quick
    results = out / "results"
    assert (results / "paper_iwrm_curves.png").stat().st_size > 5000
    saved = json.loads((results / "paper_iwrm.json").read_text())
    assert saved["settings"] == report["settings"]
    table = (results / "paper_iwrm.md").read_text()
    assert "### digits-cnn" in table and "### mnist1d-cnn" in table and "relative to `mean`" in table
    assert not (out / "figures").exists()  # quick runs never overwrite the committed figures


def test_every_aggregator_has_a_grid_rate_and_every_seed(quick):
    report, _ = quick
    settings = report["settings"]
    for experiment in settings["experiments"]:
        per = report["summary"][experiment]
        assert list(per) == settings["aggregators"]
        for s in per.values():
            assert s["learning_rate"] in s["grid_auc"]
            assert s["seeds"] == list(range(settings["seeds"][experiment]))
            assert all(len(c) == settings["epochs"] + 1 for c in s["curves"])
            assert all(0.0 <= a <= 1.0 for a in s["test_accuracy"])
            assert s["seconds_per_epoch"] > 0
            # the selected rate has the smallest AUC of the seed-0 grid runs
            assert s["grid_auc"][s["learning_rate"]] == min(s["grid_auc"].values())


def test_sgd_baseline_decreases_the_training_loss(quick):
    report, _ = quick
    for experiment in report["settings"]["experiments"]:
        for curve in report["summary"][experiment]["mean"]["curves"]:
            assert all(math.isfinite(v) for v in curve)
            assert curve[-1] < curve[0]
            area = report["summary"][experiment]["mean"]["auc"][0]
            assert min(curve) <= area <= max(curve)
