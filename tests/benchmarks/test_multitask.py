"""``benchmarks/multitask.py --quick``: per-task JD, scalarizers and single-task baselines, with Δm%."""

from __future__ import annotations

import json
import math

import pytest
from _load import run_quick


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("multitask")
    return run_quick("multitask", out), out


def test_outputs_are_written(quick):
    report, out = quick
    results = out / "results"
    assert (results / "multitask_curves.png").stat().st_size > 5000
    assert json.loads((results / "multitask.json").read_text())["settings"] == report["settings"]
    table = (results / "multitask.md").read_text()
    assert "### multidigits" in table and "### cancer_mtl" in table and "Δm%" in table
    assert not (out / "figures").exists()


def test_every_method_is_reported_for_every_task_and_seed(quick):
    report, _ = quick
    s = report["settings"]
    expected = [
        "single-task",
        *s["aggregators"],
        *(f"{name} (representation Gramian)" for name in s["representation"]),
        *(f"{name} (scalarizer)" for name in s["scalarizers"]),
    ]
    for dataset in s["datasets"]:
        d = report["summary"][dataset]
        assert list(d["methods"]) == expected
        for values in d["methods"].values():
            for task in d["tasks"]:
                assert len(values[task["name"]]) == s["seeds"]
                if task["metric"] == "accuracy":
                    assert all(0.0 <= v <= 1.0 for v in values[task["name"]])
                else:
                    assert all(v > 0 for v in values[task["name"]])
            assert all(math.isfinite(v) for v in values["delta_m"])


def test_single_task_delta_m_is_zero_on_average(quick):
    report, _ = quick
    for d in report["summary"].values():
        deltas = d["methods"]["single-task"]["delta_m"]
        assert sum(deltas) / len(deltas) == pytest.approx(0.0, abs=1e-9)


def test_per_task_jd_runs_through_jdtrainer_and_learns(quick):
    report, _ = quick
    runs = [r for r in report["runs"] if r["kind"] in ("aggregator", "representation")]
    assert {(r["kind"], r["name"]) for r in runs} == {
        *(("aggregator", name) for name in report["settings"]["aggregators"]),
        *(("representation", name) for name in report["settings"]["representation"]),
    }
    for r in runs:
        assert not r["diverged"]
        assert r["curve"][-1] < r["curve"][0]
