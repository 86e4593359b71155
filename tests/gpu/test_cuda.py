"""CUDA-only checks (skipped without a GPU): fp16 GradScaler and bf16 autocast through JDTrainer, and the
dual-cone solver on CUDA tensors. ``benchmarks/gpu_check.sh`` runs them when a GPU machine is available."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.aggregation import UPGrad

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _model(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def _dataset() -> Dataset:
    generator = torch.Generator().manual_seed(0)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(0, 64, (16, 8), generator=generator).tolist(),
            "labels": torch.randint(0, 3, (16,), generator=generator).tolist(),
        }
    )


def _train(tmp_path, name: str, engine: str, **precision) -> torch.Tensor:
    model = _model()
    args = JDTrainingArguments(
        output_dir=str(tmp_path / name),
        per_device_train_batch_size=8,
        max_steps=2,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
        aggregator="upgrad",
        jd_engine=engine,
        **precision,
    )
    JDTrainer(model=model, args=args, train_dataset=_dataset()).train()
    return torch.cat([p.detach().float().reshape(-1).cpu() for p in model.parameters()])


@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
@pytest.mark.parametrize("precision", [{"fp16": True}, {"bf16": True}], ids=["fp16-scaler", "bf16-autocast"])
def test_mixed_precision_step_follows_the_float32_step(tmp_path, engine, precision):
    initial = torch.cat([p.detach().reshape(-1) for p in _model().parameters()])
    reference = _train(tmp_path, "fp32", engine) - initial
    mixed = _train(tmp_path, "mixed", engine, **precision) - initial
    cosine = torch.nn.functional.cosine_similarity(mixed, reference, dim=0)
    assert torch.isfinite(mixed).all()
    assert cosine > 0.99, f"the {precision} step points elsewhere than the float32 step (cosine {cosine:.4f})"


@pytest.mark.parametrize("m", [8, 64, 256])
def test_upgrad_on_cuda_equals_cpu(m):
    generator = torch.Generator().manual_seed(m)
    matrix = torch.randn(m, 3 * m, generator=generator, dtype=torch.float64)
    expected = UPGrad()(matrix)
    got = UPGrad()(matrix.cuda())
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-6, atol=1e-9)
