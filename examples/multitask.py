"""Multi-task learning with per-task Jacobian descent: three heads over one shared Hugging Face encoder.

Real, offline data: scikit-learn's bundled handwritten digits (1797 8×8 images). Three tasks share a
ViT encoder: ``digit`` (10 classes), ``parity`` (even / odd) and ``ink`` (regression of the amount of
ink, standardised). The model returns ``{"loss": {"digit": ..., "parity": ..., "ink": ...}}``;
with ``--jd_objectives per_task`` each task loss is one objective: the encoder receives the
aggregation (``--aggregator``, UPGrad by default) of the three task gradients, each head its own
task's plain gradient (the semantics of TorchJD's ``mtl_backward``).

    python examples/multitask.py --help
    python examples/multitask.py --output_dir outputs/multitask             # a small ViT, ~1 min on CPU
    python examples/multitask.py --model_name_or_path google/vit-base-patch16-224-in21k   # a Hub encoder
    python examples/multitask.py --config multitask --aggregator nash_mtl
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from torch import Tensor, nn
from transformers import AutoModel, HfArgumentParser, PreTrainedModel, ViTConfig, set_seed

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.cli import hub_access, parse_args_with_config, run_example, tiny_config

TASKS = {"digit": 10, "parity": 2, "ink": 1}  # name -> outputs (1: regression)


@dataclass
class ModelArguments:
    """The shared encoder."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Hub name or path of a vision encoder (digits are resized to its input); default: a small ViT."
        },
    )
    hidden_size: int = field(default=64, metadata={"help": "Width of the default ViT."})
    num_layers: int = field(default=2, metadata={"help": "Depth of the default ViT."})
    eval_fraction: float = field(default=0.2, metadata={"help": "Held-out fraction of the digits."})
    offline_smoke: bool = field(
        default=False, metadata={"help": "Offline smoke run: a tiny encoder, a few steps."}
    )


SMOKE_DEFAULTS = {"hidden_size": 16, "num_layers": 1}


def load_tasks(eval_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Digits scaled to [0, 1] with the three targets, split into train / eval."""
    from sklearn.datasets import load_digits  # scikit-learn: pip install "hf-jd[examples]"

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    ink = images.reshape(len(images), -1).mean(1)
    columns = {
        "pixel_values": images,
        "digit": digits.target,
        "parity": digits.target % 2,
        "ink": ((ink - ink.mean()) / ink.std()).astype(np.float32),
    }
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int((1 - eval_fraction) * len(images))

    def subset(indices: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {key: value[indices].tolist() for key, value in columns.items()}
        ).with_format("torch")

    return subset(order[:cut]), subset(order[cut:])


class MultiTaskModel(nn.Module):
    """A Hugging Face encoder, mean-pooled, and one linear head per task; returns a dict of task losses."""

    def __init__(self, encoder: PreTrainedModel) -> None:
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({name: nn.Linear(hidden, outputs) for name, outputs in TASKS.items()})

    def _fit(self, pixel_values: Tensor) -> Tensor:
        """Resize the 8×8 grey digits to what a pretrained encoder expects (size, channels)."""
        size, channels = getattr(self.config, "image_size", 8), getattr(self.config, "num_channels", 1)
        if pixel_values.shape[-1] != size:
            pixel_values = F.interpolate(
                pixel_values, size=(size, size), mode="bilinear", align_corners=False
            )
        return (
            pixel_values.expand(-1, channels, -1, -1) if channels != pixel_values.shape[1] else pixel_values
        )

    def forward(self, pixel_values: Tensor, digit: Tensor, parity: Tensor, ink: Tensor) -> dict:
        features = self.encoder(pixel_values=self._fit(pixel_values)).last_hidden_state.mean(1)
        logits = {name: head(features) for name, head in self.heads.items()}
        losses = {
            "digit": F.cross_entropy(logits["digit"], digit),
            "parity": F.cross_entropy(logits["parity"], parity),
            "ink": F.mse_loss(logits["ink"].squeeze(-1), ink),
        }
        return {"loss": losses, "logits": logits}


def build_encoder(model_args: ModelArguments) -> PreTrainedModel:
    if model_args.model_name_or_path and not model_args.offline_smoke:
        with hub_access(f"the model {model_args.model_name_or_path!r}"):
            return AutoModel.from_pretrained(model_args.model_name_or_path)
    sizes = {"hidden_size": model_args.hidden_size, "num_hidden_layers": model_args.num_layers}
    sizes.update(intermediate_size=2 * model_args.hidden_size, num_attention_heads=4)
    geometry = {"image_size": 8, "patch_size": 2, "num_channels": 1}
    if model_args.model_name_or_path:  # --offline_smoke with a Hub name: a tiny encoder of its family
        return AutoModel.from_config(tiny_config(model_args.model_name_or_path, **geometry, **sizes))
    return AutoModel.from_config(ViTConfig(**geometry, **sizes), add_pooling_layer=False)


@torch.no_grad()
def evaluate(model: MultiTaskModel, dataset: Dataset, batch_size: int = 256) -> dict[str, float]:
    """Accuracy of the two classification tasks and mean squared error of the regression."""
    model.eval()
    device = next(model.parameters()).device
    hits, squared, count = {"digit": 0.0, "parity": 0.0}, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = {key: value.to(device) for key, value in dataset[start : start + batch_size].items()}
        logits = model(**rows)["logits"]
        for name in hits:
            hits[name] += float((logits[name].argmax(-1) == rows[name]).sum())
        squared += float(((logits["ink"].squeeze(-1) - rows["ink"]) ** 2).sum())
        count += len(rows["digit"])
    return {
        "eval_digit_accuracy": hits["digit"] / count,
        "eval_parity_accuracy": hits["parity"] / count,
        "eval_ink_mse": squared / count,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train with per-task JD; return the train metrics and the per-task eval metrics."""
    parser = HfArgumentParser((ModelArguments, JDTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    model_args, training_args = parse_args_with_config(
        parser, ["--jd_objectives", "per_task", *argv], SMOKE_DEFAULTS
    )
    set_seed(training_args.seed)
    train, held_out = load_tasks(model_args.eval_fraction, training_args.seed)
    if model_args.offline_smoke:
        train, held_out = train.select(range(64)), held_out.select(range(32))
    model = MultiTaskModel(build_encoder(model_args))
    trainer = JDTrainer(model=model, args=training_args, train_dataset=train)
    metrics = dict(trainer.train().metrics)
    metrics.update(evaluate(model, held_out))
    trainer.log_metrics("all", metrics)
    trainer.save_model()  # the encoder and the heads (model.safetensors), with the model card
    return metrics


if __name__ == "__main__":
    raise SystemExit(run_example(main))
