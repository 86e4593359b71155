"""``benchmarks/bench_step.py``: the llama/vit/swin/t5/deberta workloads build, run and report coverage."""

from __future__ import annotations

import argparse

import pytest
import torch
from _load import load_script

from hf_jd.losses import per_example_losses

NEW_MODELS = ("llama", "vit", "swin", "t5", "deberta")


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_step")


def tiny_options(**overrides) -> argparse.Namespace:
    settings = {
        "batch": 3,
        "seq": 8,
        "layers": 2,
        "hidden": 32,
        "heads": 2,
        "intermediate": 64,
        "vocab": 50,
        "image": 32,
        "seed": 0,
    }
    return argparse.Namespace(**{**settings, **overrides})


@pytest.mark.parametrize("name", NEW_MODELS)
def test_the_workload_gives_a_finite_loss_and_one_loss_per_example(bench, name):
    options = tiny_options()
    workload = bench.make_workload(name, options, torch.device("cpu"))
    model = workload.build()
    outputs = model(**workload.batch)
    assert torch.isfinite(outputs.loss)
    losses = per_example_losses(outputs, workload.batch, workload.loss_type)
    assert losses.shape == (options.batch,)
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("image", [16, 32, 64, 224])
def test_the_swin_layout_keeps_every_stage_at_least_one_window_wide(bench, image):
    layout = bench.swin_layout(tiny_options(image=image, hidden=256, heads=4, layers=4, intermediate=1024))
    grid = -(-image // layout["patch_size"])
    assert grid % layout["window_size"] == 0 and layout["window_size"] <= 7
    side = grid
    for _ in layout["depths"][1:]:
        side = -(-side // 2)
    assert side >= layout["window_size"]
    assert len(layout["num_heads"]) == len(layout["depths"])
    assert layout["embed_dim"] % layout["num_heads"][0] == 0


@pytest.mark.parametrize("name", ["llama", "swin"])
def test_the_coverage_counts_every_trainable_tensor(bench, name):
    workload = bench.make_workload(name, tiny_options(), torch.device("cpu"))
    coverage = bench.gramian_coverage(workload)
    assert coverage["status"] == "ok", coverage
    trainable = [n for n, p in workload.build().named_parameters() if p.requires_grad]
    assert coverage["parameter_tensors"] == len(trainable) == sum(coverage["by_rule"].values())
    assert coverage["fallback"] == len(coverage["fallback_names"])
    assert coverage["generic"] == len(coverage["generic_names"])
    assert isinstance(coverage["expand_broadcast"], bool)
    line = bench.coverage_line(coverage)
    assert line.startswith("Gramian engine coverage") and f"{len(trainable)} parameter tensors" in line


def test_quick_keeps_explicit_flags(bench):
    quick = bench.parse_args(["--quick"])
    assert (quick.batch, quick.seq, quick.vocab) == (4, 32, 1000)
    larger = bench.parse_args(["--quick", "--batch", "64", "--models", "swin"])
    assert (larger.batch, larger.seq, larger.models) == (64, 32, ["swin"])
    assert bench.parse_args([]).models == ["bert", "gpt2"]
