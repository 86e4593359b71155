"""``benchmarks/bench_trl.py``: its two JD routes of DPO take the same step, and the quick run reports every
variant with the engine that served it."""

from __future__ import annotations

import json

import pytest
import torch
from _load import load_script

pytest.importorskip("trl")


def one_step(bench, variant: str, options, tmp_path) -> torch.Tensor:
    """The parameter change of one step of ``variant`` on the DPO data (2 pairs), flattened."""
    tokenizer = bench.build_tokenizer(options)
    model = bench.build_model(options, tokenizer)
    with torch.no_grad():  # a policy away from its reference: the pair gradients differ
        generator = torch.Generator().manual_seed(3)
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer = bench.make_trainer("dpo", variant, model, options, 2, str(tmp_path / variant))
    trainer.args.max_steps = 1
    trainer.args.learning_rate = 0.5
    trainer.args.max_grad_norm = 0.0
    trainer.train()
    return torch.cat([p.detach().flatten() for p in model.parameters()]) - before


def test_the_per_task_route_and_the_pair_objectives_take_the_same_step(tmp_path):
    bench = load_script("bench_trl")
    options = bench.parse_options(["--quick", "--out-dir", str(tmp_path)])
    pairs = one_step(bench, "jd", options, tmp_path)
    per_task = one_step(bench, "jd_per_task", options, tmp_path)
    stock = one_step(bench, "stock", options, tmp_path)
    assert float(pairs.norm()) > 0
    assert float((pairs - per_task).norm() / pairs.norm()) <= 1e-4
    assert float((pairs - stock).norm() / pairs.norm()) > 1e-3  # UPGrad is not the mean: the check can fail


def test_quick_run_reports_every_variant(tmp_path):
    report = load_script("bench_trl").main(["--quick", "--out-dir", str(tmp_path)])
    kinds = [(workload["kind"], workload["batch"]) for workload in report["workloads"]]
    assert kinds == [("sft", 4), ("dpo", 2), ("dpo", 4)]
    for workload in report["workloads"]:
        for name, entry in workload["variants"].items():
            assert "error" not in entry, (workload["kind"], name, entry.get("error"))
            assert len(entry["times"]) == 3  # 1 warm-up + 2 timed steps
            if name != "stock":
                assert entry["engine"] in ("gramian", "jacobian")
                assert entry["ratio"] > 0 and entry["paired_rounds"] == 2
    saved = json.loads((tmp_path / "bench_trl.json").read_text())
    assert saved["workloads"] == json.loads(json.dumps(report["workloads"]))
    table = (tmp_path / "bench_trl.md").read_text()
    assert "| SFT | 4 sequences | jd |" in table and "| DPO | 4 pairs | jd_per_task |" in table
