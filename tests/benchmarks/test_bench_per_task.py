"""``benchmarks/bench_per_task.py``: the timed JD variants compute the same update, and the quick run prints."""

from __future__ import annotations

import torch
from _load import load_script
from transformers import BertConfig


def test_the_jd_variants_write_the_same_gradients():
    bench = load_script("bench_per_task")
    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = bench.MultiHead(config, tasks=3)
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 50, (4, 6), generator=generator), "targets": torch.randn(4, 3)}
    grads = {}
    for name, step in bench.variants(model, batch).items():
        model.zero_grad(set_to_none=True)
        step()
        grads[name] = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    reference = grads.pop("hf_jd_autojac")
    # the representation Gramian's weights differ; each head still takes its own task's plain gradient
    heads = 2 * 3
    for got, expected in zip(grads.pop("hf_jd_representation")[-heads:], reference[-heads:]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(
        torch.cat([g.flatten() for g in grads.pop("sum_loss")]), torch.cat([g.flatten() for g in reference])
    )
    for name, values in grads.items():  # hf_jd_gramian (batched, looped), torchjd_autojac when installed
        assert len(values) == len(reference), name
        for got, expected in zip(values, reference):
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)


def test_quick_run_prints_a_row_per_variant_and_task_count(capsys):
    load_script("bench_per_task").main(["--quick"])
    out = capsys.readouterr().out
    for tasks in (2, 4):
        for name in ("sum_loss", "hf_jd_gramian", "hf_jd_representation", "hf_jd_autojac"):
            assert f"| {tasks} | {name} |" in out
