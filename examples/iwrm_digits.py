"""Instance-wise risk minimisation on scikit-learn's bundled digits, ERM vs Jacobian descent.

Trains the same small ViT twice with the same seed and budget: once with the stock ``Trainer``
(empirical risk minimisation: the mean loss) and once with ``JDTrainer`` (one objective per example,
aggregated by UPGrad). Prints a comparison table and saves a plot of the quantiles of the
per-example training losses over the steps.

    python examples/iwrm_digits.py                       # defaults: runs in about a minute on 2 cores
    python examples/iwrm_digits.py --aggregator dualproj --num_train_epochs 5
    python examples/iwrm_digits.py --offline_smoke       # seconds: a tinier ViT, 3 steps, *-smoke outputs
    python examples/iwrm_digits.py recipes/iwrm_digits.yaml   # the same run from a YAML recipe
    python examples/iwrm_digits.py --config iwrm_digits --aggregator mgda   # shipped recipe + override

Needs scikit-learn (the data) and matplotlib (the plot): ``pip install "hf-jd[examples]"``; without
matplotlib the table is printed and the plot skipped. The two trained models are saved to
``<output_dir>/erm`` and ``<output_dir>/jd`` (the JD one with its model card).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

# Small matrices: on a few cores one thread per process is several times faster than one per core
# (measured on 2 cores: 22 s instead of 176 s). Set before torch loads; an explicit setting wins.
_USER_THREADS = "OMP_NUM_THREADS" in os.environ
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_jd import JDTrainer, JDTrainingArguments  # noqa: E402
from hf_jd.cli import missing_extra, parse_args_with_config, run_example, smoke_path  # noqa: E402
from hf_jd.losses import per_example_losses  # noqa: E402

QUANTILES = (0.0, 0.25, 0.5, 0.75, 0.9, 1.0)
DATASET = "scikit-learn's digits (1797 8x8 images, 10 classes)"


@dataclass
class DigitsArguments:
    """What to train on and where to put the report."""

    hidden_size: int = field(default=48, metadata={"help": "Hidden size of the small ViT."})
    num_layers: int = field(default=2, metadata={"help": "Number of transformer layers of the ViT."})
    train_fraction: float = field(
        default=0.8, metadata={"help": "Fraction of the 1797 digits used for training."}
    )
    probe_size: int = field(
        default=512, metadata={"help": "Training examples whose losses are tracked for the plot."}
    )
    probe_every: int = field(
        default=5, metadata={"help": "Track the per-example losses every this many steps."}
    )
    plot_path: str = field(
        default="outputs/iwrm_digits.png", metadata={"help": "Where to save the quantile plot."}
    )
    offline_smoke: bool = field(
        default=False, metadata={"help": "Smoke run: a tinier ViT, a few steps (the data is bundled anyway)."}
    )


def load_splits(train_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Digits (8x8 grey images, 10 classes) scaled to [0, 1], split into train/eval."""
    from sklearn.datasets import load_digits  # scikit-learn: pip install "hf-jd[examples]"

    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None]  # [N, 1, 8, 8]
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(train_fraction * len(images))

    def subset(indices: np.ndarray) -> Dataset:
        return Dataset.from_dict(
            {"pixel_values": images[indices].tolist(), "labels": digits.target[indices].tolist()}
        ).with_format("torch")

    return subset(order[:cut]), subset(order[cut:])


def build_model(config: DigitsArguments, seed: int) -> ViTForImageClassification:
    torch.manual_seed(seed)
    vit = ViTConfig(
        image_size=8,
        patch_size=2,
        num_channels=1,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=4,
        intermediate_size=2 * config.hidden_size,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(vit)


def probe_losses(model: torch.nn.Module, probe: Dataset) -> torch.Tensor:
    """Per-example losses of ``model`` (in eval mode) on every example of ``probe``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = probe[:]
    batch = {key: rows[key].to(device) for key in ("pixel_values", "labels")}
    with torch.no_grad():
        losses = per_example_losses(model(**batch), batch, "image_classification")
    model.train(was_training)
    return losses.float().cpu()


class LossQuantileProbe(TrainerCallback):
    """Every ``every`` steps, records quantiles of the per-example losses on a fixed training subset."""

    def __init__(self, probe: Dataset, every: int) -> None:
        self.probe = probe
        self.every = every
        self.steps: list[int] = []
        self.quantiles: list[list[float]] = []

    def _record(self, step: int, model: torch.nn.Module) -> None:
        self.steps.append(step)
        self.quantiles.append(
            torch.quantile(probe_losses(model, self.probe), torch.tensor(QUANTILES)).tolist()
        )

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._record(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._record(state.global_step, model)


def accuracy(trainer: Trainer, dataset: Dataset) -> float:
    output = trainer.predict(dataset)
    return float((output.predictions.argmax(-1) == output.label_ids).mean())


def train_one(
    name: str,
    trainer_cls: type[Trainer],
    args: TrainingArguments,
    config: DigitsArguments,
    train: Dataset,
    evaluation: Dataset,
    probe: Dataset,
    save_dir: str,
) -> dict:
    model = build_model(config, args.seed)
    tracker = LossQuantileProbe(probe, config.probe_every)
    trainer = trainer_cls(model=model, args=args, train_dataset=train, callbacks=[tracker])
    if trainer_cls is Trainer:
        trainer.model_accepts_loss_kwargs = False  # plain mean loss, divided by the accumulation steps
    print(f"\n== {name} ==")
    trainer.train()
    if tracker.steps[-1] != trainer.state.global_step:
        tracker._record(trainer.state.global_step, model)
    final = tracker.quantiles[-1]
    trainer.save_model(save_dir)  # JDTrainer also writes its model card (README.md)
    return {
        "name": name,
        "train_loss_mean": float(probe_losses(model, probe).mean()),
        "train_loss_max": final[-1],
        "train_loss_q90": final[QUANTILES.index(0.9)],
        "eval_accuracy": accuracy(trainer, evaluation),
        "steps": tracker.steps,
        "quantiles": tracker.quantiles,
    }


def plot(results: list[dict], path: str) -> Any:
    """Save the per-example loss quantiles of each run over the steps to ``path``; return the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), sharey=True)
    for axis, result in zip(np.atleast_1d(axes), results):
        values = np.array(result["quantiles"])
        for column, q in enumerate(QUANTILES):
            axis.plot(result["steps"], values[:, column], label=f"q{int(q * 100)}")
        axis.set_yscale("log")
        axis.set_title(result["name"])
        axis.set_xlabel("optimizer step")
        axis.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("per-example training loss")
    np.atleast_1d(axes)[-1].legend(title="quantile")
    figure.suptitle(f"Per-example training-loss quantiles, small ViT on {DATASET}")
    figure.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return figure


DEFAULTS = {
    "output_dir": "outputs/iwrm_digits",
    "per_device_train_batch_size": 32,
    "num_train_epochs": 3,
    "learning_rate": 3e-3,
    "warmup_steps": 10,
    "weight_decay": 0.0,
    "logging_steps": 20,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
}
SMOKE_DEFAULTS = {"hidden_size": 16, "num_layers": 1, "probe_size": 64, "probe_every": 1}


def choose_threads() -> None:
    """One intra-op thread unless the user set ``OMP_NUM_THREADS`` (also when torch was loaded before
    this module, as under ``hf-jd demo``)."""
    if not _USER_THREADS:
        torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> list[dict]:
    choose_threads()
    parser = HfArgumentParser((DigitsArguments, JDTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        argv = ["--config", argv[0]]  # `python examples/iwrm_digits.py recipes/iwrm_digits.yaml`
    config, jd_args = parse_args_with_config(parser, argv, SMOKE_DEFAULTS, defaults=DEFAULTS)
    if config.offline_smoke:  # never over the real run's plot (the output_dir is already a -smoke one)
        config.plot_path = smoke_path(config.plot_path, is_file=True)
    train, evaluation = load_splits(config.train_fraction, jd_args.seed)
    probe = train.select(range(min(config.probe_size, len(train))))
    erm_args = TrainingArguments(
        **{
            key: value
            for key, value in jd_args.to_dict().items()
            if key in TrainingArguments.__dataclass_fields__
            and TrainingArguments.__dataclass_fields__[key].init
        }
    )
    results = [
        train_one(
            "ERM (Trainer, mean loss)",
            Trainer,
            erm_args,
            config,
            train,
            evaluation,
            probe,
            os.path.join(jd_args.output_dir, "erm"),
        ),
        train_one(
            f"JD (JDTrainer, {jd_args.aggregator})",
            JDTrainer,
            jd_args,
            config,
            train,
            evaluation,
            probe,
            os.path.join(jd_args.output_dir, "jd"),
        ),
    ]
    if jd_args.process_index == 0:  # one report, also under torchrun / accelerate launch
        print("\n| run | mean train loss | q90 train loss | max train loss | eval accuracy |")
        print("|---|---|---|---|---|")
        for result in results:
            print(
                f"| {result['name']} | {result['train_loss_mean']:.4f} | {result['train_loss_q90']:.4f} | "
                f"{result['train_loss_max']:.4f} | {result['eval_accuracy']:.4f} |"
            )
        os.makedirs(os.path.dirname(config.plot_path) or ".", exist_ok=True)
        with open(os.path.splitext(config.plot_path)[0] + ".json", "w") as handle:
            json.dump(results, handle)
        try:
            plot(results, config.plot_path)
            print(f"\nPlot of the per-example loss quantiles: {config.plot_path}")
        except ImportError as error:
            extra = missing_extra(error, "The plot")
            if extra is None:
                raise
            print(f"\n{extra} (the table above has the results)")
    return results


if __name__ == "__main__":
    raise SystemExit(run_example(main))
