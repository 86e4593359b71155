"""Time and peak memory of one optimizer step: stock ``Trainer`` vs ``JDTrainer`` vs TorchJD.

On the same model and the same batch (random token ids and labels, or random pixels), each model
built from the size flags (``--hidden``, ``--layers``, ``--heads``, ``--intermediate``, ``--seq``,
``--batch``, ``--vocab``, ``--image``) with the per-example loss ``JDTrainer`` derives for it:

* ``bert``      ``BertForSequenceClassification`` (2 labels);
* ``deberta``   ``DebertaV2ForSequenceClassification`` (2 labels), DeBERTa-v3's attention: relative
  attention with 64 position buckets, ``pos_att_type=["p2c", "c2p"]``, shared key projections;
* ``gpt2``, ``opt``, ``llama``  causal LMs (``GPT2LMHeadModel``, ``OPTForCausalLM``,
  ``LlamaForCausalLM`` with as many key/value heads as heads), labels = input ids;
* ``t5``        ``T5ForConditionalGeneration``, ``layers // 2`` blocks (at least 1) in the encoder and in
  the decoder, random target ids as long as the input (loss type ``seq2seq_lm``: token cross entropy
  averaged per example);
* ``convnext``, ``vit``, ``swin``  image classifiers (2 labels) on ``--image`` pixels a side: ConvNeXt
  with stage widths ``hidden/8 … hidden``; ViT with patches of 16 (4 below 64 pixels); Swin with
  patches of 4 and the stages/window of :func:`swin_layout`.

The variants:

* ``trainer_mean``        stock :class:`transformers.Trainer`, mean loss (the reference of every ratio);
* ``jd_gramian``          :class:`hf_jd.JDTrainer`, ``jd_engine="gramian"``, UPGrad, one loss per example;
* ``jd_jacobian``         :class:`hf_jd.JDTrainer`, ``jd_engine="jacobian"``, UPGrad;
* ``loop_mean``           a plain PyTorch loop, mean loss (shows what the Trainer itself costs);
* ``torchjd_autogram``    plain loop: ``torchjd.autogram.Engine`` Gramian → UPGrad weights →
  ``losses.backward(weights)``;
* ``torchjd_autojac``     plain loop: ``torchjd.autojac.backward`` + ``torchjd.autojac.jac_to_grad``.

TorchJD's own ``UPGrad`` needs ``qpsolvers``, which is not installed here, so both TorchJD variants use
*hf_jd's* ``UPGradWeighting`` on TorchJD's Gramian (for ``autojac``: wrapped in TorchJD's
``GramianWeightedAggregator``). What is timed for them is TorchJD's differentiation engines, with the
same dual-cone solver as hf_jd.

Every step is: forward, (JD) backward, gradient clipping at 1.0, SGD step, ``zero_grad``. Time per
step is the median over ``--steps`` timed steps after ``--warmup`` steps (``--jacobian-steps`` after
``--jacobian-warmup`` for the two explicit-Jacobian variants, 10-30x slower); for the Trainer variants
a ``TrainerCallback`` measures ``on_step_begin`` → ``on_step_end``. All timings of a model come from one
process, each variant from the same initial weights; by default the variants are interleaved step by
step (one thread per variant, a round-robin token lets one run at a time), ``--schedule sequential``
runs them one after the other.

Peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` during a step minus the memory allocated at
its start. On CPU, every variant runs again in a fresh subprocess of this script (``--single-variant
NAME``) that reports its peak RSS (``VmHWM``, reset after set-up; see :func:`peak_rss_bytes` for why not
``ru_maxrss``) minus its RSS right after model and batch creation: an approximation (it includes
allocator slack, the ``.grad`` tensors and the Trainer's own objects).

Gramian engine coverage: when ``jd_gramian`` runs, the report also says, per model, how
``hf_jd.gramian.GramianEngine`` serves each trainable parameter tensor on the batch
(:func:`gramian_coverage`: ``GramianEngine.coverage()`` after one captured forward and ``gramian()``,
with ``expand_broadcast=False`` when ``True`` raises or fails the self-check, as ``JDTrainer`` falls
back): how many tensors
use the exact batched-autograd fallback and the generic per-example path, and which.

Usage::

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_step.py
    .venv/bin/python benchmarks/bench_step.py --quick          # smoke run, a few seconds per variant
    .venv/bin/python benchmarks/bench_step.py --models llama vit swin t5 deberta \\
        --variants trainer_mean jd_gramian torchjd_autogram --no-memory

Writes ``<out-dir>/bench_step.json`` and ``<out-dir>/bench_step.md``. No assertion on timings.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import source_fingerprint, write_report  # noqa: E402
from _trainer_settings import LEARNING_RATE, MAX_GRAD_NORM, timed_trainer_arguments  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

REFERENCE = "trainer_mean"
VARIANTS: dict[str, str] = {
    "trainer_mean": "stock Trainer, mean loss",
    "jd_gramian": "JDTrainer, jd_engine=gramian, UPGrad",
    "jd_jacobian": "JDTrainer, jd_engine=jacobian, UPGrad",
    "loop_mean": "plain loop, mean loss",
    "torchjd_autogram": "TorchJD autogram + UPGrad weights (hf_jd solver)",
    "torchjd_autojac": "TorchJD autojac + jac_to_grad (hf_jd UPGrad weighting)",
}
TRAINER_VARIANTS = ("trainer_mean", "jd_gramian", "jd_jacobian")
# Variants that materialise the Jacobian: 10-30x a stock step on CPU, so they get fewer steps by default.
JACOBIAN_VARIANTS = ("jd_jacobian", "torchjd_autojac")
DEFAULT_VOCAB = {"bert": 30522, "gpt2": 8192}
MODELS = ("bert", "gpt2", "opt", "convnext", "llama", "vit", "swin", "t5", "deberta")
IMAGE_MODELS = ("convnext", "vit", "swin")
RESULT_MARKER = "BENCH_STEP_RESULT "
#: What ``--quick`` sets (unless the flag is given).
QUICK_SETTINGS: dict[str, int] = {
    "batch": 4,
    "seq": 32,
    "layers": 2,
    "hidden": 64,
    "heads": 2,
    "intermediate": 128,
    "vocab": 1000,
    "warmup": 1,
    "steps": 2,
    "memory_steps": 1,
    "jacobian_warmup": 1,
    "jacobian_steps": 2,
}


class VariantUnavailable(RuntimeError):
    """The variant cannot run in this environment (missing package or engine)."""


@dataclass
class Workload:
    """A model family with its configuration and one fixed batch."""

    name: str
    build: Callable[[], nn.Module]
    batch: dict[str, Tensor]
    loss_type: str
    bf16: bool = False  # train under bf16 autocast (``--bf16``; the GPU check)


# ----------------------------------------------------------------------------------- set-up
def vit_patch_size(image: int) -> int:
    """ViT's patch side: 16 (ViT-B/16's) from 64 pixels up, 4 below."""
    return 16 if image >= 64 else 4


def swin_layout(options: argparse.Namespace) -> dict[str, Any]:
    """Swin's stages for ``--image``/``--hidden``/``--heads``/``--layers``/``--intermediate``.

    Patches of 4 pixels (Swin's); ``embed_dim = max(16, hidden // 8)`` rounded up to a multiple of
    ``heads``, doubled at every stage with the heads (so the last of 4 stages is ``hidden`` wide by
    default); depths ``[1, 1, max(1, layers - 2), 1]``, cut to the stages that keep every stage's patch
    grid at least one window wide (transformers' Swin sizes its relative-position table for
    ``window_size`` and fails on a stage smaller than the window). The window is the largest side ≤ 7
    (Swin's) that divides the patch grid and still leaves 3 stages where the grid allows them:
    224 pixels → grid 56, window 7, 4 stages; 64 → grid 16, window 4, 3 stages (16, 8, 4 patches);
    32 → grid 8, window 2, 3 stages.
    """
    patch = 4
    grid = -(-options.image // patch)  # Swin pads the image to a multiple of the patch

    def stages_for(window: int) -> int:
        stages, side = 1, grid
        while stages < 4 and side > 1 and -(-side // 2) >= window:  # merging halves the grid (pads odd sides)
            side = -(-side // 2)
            stages += 1
        return stages

    windows = [side for side in range(7, 0, -1) if grid % side == 0]
    wanted = min(3, stages_for(1))
    window = next(side for side in windows if stages_for(side) >= wanted)
    stages = stages_for(window)
    embed_dim = max(16, options.hidden // 8)
    embed_dim = -(-embed_dim // options.heads) * options.heads
    return {
        "patch_size": patch,
        "embed_dim": embed_dim,
        "depths": [1, 1, max(1, options.layers - 2), 1][:stages],
        "num_heads": [options.heads * 2**stage for stage in range(stages)],
        "window_size": window,
        "mlp_ratio": options.intermediate / options.hidden,
    }


def _image_workload(
    name: str, options: argparse.Namespace, generator: torch.Generator
) -> tuple[Any, Any, dict[str, Tensor]]:
    """An image classifier (2 labels) on random ``[B, 3, image, image]`` pixels.

    ConvNeXt: stage widths ``hidden/8 … hidden``; ViT: ``hidden``/``layers``/``heads``/``intermediate``,
    patches of :func:`vit_patch_size`; Swin: :func:`swin_layout`.
    """
    from transformers import (
        ConvNextConfig,
        ConvNextForImageClassification,
        SwinConfig,
        SwinForImageClassification,
        ViTConfig,
        ViTForImageClassification,
    )

    config: Any
    if name == "convnext":
        widths = [
            max(8, options.hidden // 8),
            max(8, options.hidden // 4),
            max(8, options.hidden // 2),
            options.hidden,
        ]
        config = ConvNextConfig(
            num_channels=3,
            hidden_sizes=widths,
            depths=[1, 1, max(1, options.layers - 2), 1],
            image_size=options.image,
            num_labels=2,
        )
        model_class: Any = ConvNextForImageClassification
    elif name == "vit":
        config = ViTConfig(
            image_size=options.image,
            patch_size=vit_patch_size(options.image),
            num_channels=3,
            hidden_size=options.hidden,
            num_hidden_layers=options.layers,
            num_attention_heads=options.heads,
            intermediate_size=options.intermediate,
            num_labels=2,
        )
        model_class = ViTForImageClassification
    elif name == "swin":
        config = SwinConfig(image_size=options.image, num_channels=3, num_labels=2, **swin_layout(options))
        model_class = SwinForImageClassification
    else:
        raise ValueError(f"{name!r} is not an image model.")
    pixels = torch.randn(options.batch, 3, options.image, options.image, generator=generator)
    labels = torch.randint(0, 2, (options.batch,), generator=generator)
    return config, model_class, {"pixel_values": pixels, "labels": labels}


def make_workload(name: str, options: argparse.Namespace, device: torch.device) -> Workload:
    """Build the model factory and the batch of ``name`` (one of :data:`MODELS`)."""
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}; choose one of {', '.join(MODELS)}.")
    vocab = options.vocab if options.vocab is not None else DEFAULT_VOCAB.get(name, 8192)
    generator = torch.Generator().manual_seed(options.seed)
    input_ids = torch.randint(0, vocab, (options.batch, options.seq), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    #: The size fields that BERT's, DeBERTa's and Llama's configurations share.
    sizes = dict(
        vocab_size=vocab,
        hidden_size=options.hidden,
        num_hidden_layers=options.layers,
        num_attention_heads=options.heads,
        intermediate_size=options.intermediate,
        max_position_embeddings=max(512, options.seq),
    )
    config: Any
    if name in ("bert", "deberta"):
        if name == "bert":
            config = BertConfig(
                **sizes,
                num_labels=2,
            )
            model_class: Any = BertForSequenceClassification
        else:
            # DeBERTa-v3's attention: disentangled relative attention (content→position and
            # position→content) over log-bucketed relative positions, shared key projections, no
            # absolute position embedding.
            config = DebertaV2Config(
                **sizes,
                relative_attention=True,
                position_buckets=64,
                max_relative_positions=-1,
                pos_att_type=["p2c", "c2p"],
                position_biased_input=False,
                share_att_key=True,
                norm_rel_ebd="layer_norm",
                num_labels=2,
            )
            model_class = DebertaV2ForSequenceClassification
        batch["labels"] = torch.randint(0, 2, (options.batch,), generator=generator)
        loss_type = "sequence_classification"
    elif name in ("gpt2", "opt", "llama"):
        if name == "gpt2":
            config = GPT2Config(
                vocab_size=vocab,
                n_embd=options.hidden,
                n_layer=options.layers,
                n_head=options.heads,
                n_inner=options.intermediate,
                n_positions=max(1024, options.seq),
            )
            model_class = GPT2LMHeadModel
        elif name == "opt":
            config = OPTConfig(
                vocab_size=vocab,
                hidden_size=options.hidden,
                num_hidden_layers=options.layers,
                num_attention_heads=options.heads,
                ffn_dim=options.intermediate,
                word_embed_proj_dim=options.hidden,
                max_position_embeddings=max(512, options.seq),
                pad_token_id=1,
            )
            model_class = OPTForCausalLM
        else:
            config = LlamaConfig(**sizes, num_key_value_heads=options.heads)
            model_class = LlamaForCausalLM
        batch["labels"] = input_ids.clone()
        loss_type = "causal_lm"
    elif name == "t5":
        # Encoder-decoder: layers // 2 blocks each side; the decoder input is the labels shifted right.
        depth = max(1, options.layers // 2)
        config = T5Config(
            vocab_size=vocab,
            d_model=options.hidden,
            d_kv=options.hidden // options.heads,
            d_ff=options.intermediate,
            num_layers=depth,
            num_decoder_layers=depth,
            num_heads=options.heads,
            pad_token_id=0,
            decoder_start_token_id=0,
        )
        batch["labels"] = torch.randint(0, vocab, (options.batch, options.seq), generator=generator)
        model_class = T5ForConditionalGeneration
        loss_type = "seq2seq_lm"
    else:  # convnext, vit, swin
        config, model_class, batch = _image_workload(name, options, generator)
        loss_type = "image_classification"

    def build() -> nn.Module:
        torch.manual_seed(options.seed)
        return model_class(config).to(device)

    batch_on_device = {key: value.to(device) for key, value in batch.items()}
    return Workload(name, build, batch_on_device, loss_type, bf16=bool(getattr(options, "bf16", False)))


class _FixedBatch(torch.utils.data.Dataset):
    """The examples of one batch: with ``per_device_train_batch_size = len``, every step sees them all."""

    def __init__(self, batch: dict[str, Tensor]) -> None:
        self.columns = {key: value.cpu() for key, value in batch.items()}
        self.length = next(iter(self.columns.values())).shape[0]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {key: value[index] for key, value in self.columns.items()}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------- scheduling
class Turns:
    """Round-robin token between worker threads: exactly one runs at a time, switching between steps.

    This interleaves the variants step by step inside one process, so that slow drifts of the machine
    (other processes, thermal state) affect every variant alike.
    """

    def __init__(self, names: list[str]) -> None:
        self._order = list(names)
        self._index = 0
        self._condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self._condition:
            self._condition.wait_for(lambda: bool(self._order) and self._order[self._index] == name)

    def pass_on(self) -> None:
        with self._condition:
            self._index = (self._index + 1) % len(self._order)
            self._condition.notify_all()

    def finish(self, name: str) -> None:
        with self._condition:
            position = self._order.index(name)
            del self._order[position]
            if position < self._index:
                self._index -= 1
            if self._index >= len(self._order):
                self._index = 0
            self._condition.notify_all()


class StepRecorder:
    """Wall time (and, on CUDA, the peak memory) of each optimizer step; yields the turn after each step."""

    def __init__(self, name: str, device: torch.device, turns: Turns | None = None) -> None:
        self.name = name
        self.device = device
        self.turns = turns
        self.times: list[float] = []
        self.cuda_peaks: list[int] = []
        self._start = 0.0
        self._cuda_base = 0
        #: CPU memory subprocess: reset the peak-RSS counter when this many steps are done (first-step
        #: work — the JD self-check, lazy allocations — then does not count).
        self.reset_peak_after: int | None = None

    def begin(self) -> None:
        _synchronize(self.device)
        if self.reset_peak_after is not None and len(self.times) == self.reset_peak_after:
            reset_peak_rss()
        if self.device.type == "cuda":
            self._cuda_base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()

    def end(self) -> None:
        _synchronize(self.device)
        self.times.append(time.perf_counter() - self._start)
        if self.device.type == "cuda":
            self.cuda_peaks.append(torch.cuda.max_memory_allocated(self.device) - self._cuda_base)
        if self.turns is not None:
            self.turns.pass_on()
            self.turns.wait(self.name)


def _recorder_callback(recorder: StepRecorder) -> Any:
    from transformers import TrainerCallback

    class StepRecorderCallback(TrainerCallback):
        """``on_step_begin`` → ``on_step_end``: one optimizer step of the Trainer."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            recorder.begin()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            recorder.end()

    return StepRecorderCallback()


# ----------------------------------------------------------------------------------- variants
def check_available(variant: str) -> None:
    """Raise :class:`VariantUnavailable` when ``variant`` cannot run here."""
    if variant == "jd_gramian":
        try:
            module = importlib.import_module("hf_jd.gramian")
            module.GramianEngine  # noqa: B018
        except (ImportError, AttributeError) as error:
            raise VariantUnavailable(f"hf_jd.gramian.GramianEngine is not available ({error})") from None
    if variant.startswith("torchjd_"):
        try:
            importlib.import_module(
                "torchjd.autogram" if variant == "torchjd_autogram" else "torchjd.autojac"
            )
        except ImportError as error:
            raise VariantUnavailable(f"torchjd is not importable ({error})") from None


def run_trainer_variant(
    variant: str, workload: Workload, model: nn.Module, total_steps: int, recorder: StepRecorder
) -> None:
    """Train ``total_steps`` steps with the (JD)Trainer of ``variant``, recording every step."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_jd import JDTrainer, JDTrainingArguments

    device = recorder.device
    with tempfile.TemporaryDirectory() as output_dir:
        common: dict[str, Any] = timed_trainer_arguments(
            output_dir,
            workload.batch["labels"].shape[0],
            total_steps,
            use_cpu=device.type == "cpu",
            seed=0,
        )
        common["bf16"] = workload.bf16
        dataset = _FixedBatch(workload.batch)
        callbacks = [_recorder_callback(recorder)]
        if variant == "trainer_mean":
            trainer: Trainer = Trainer(
                model=model, args=TrainingArguments(**common), train_dataset=dataset, callbacks=callbacks
            )
        else:
            engine = "gramian" if variant == "jd_gramian" else "jacobian"
            args = JDTrainingArguments(
                **common, aggregator="upgrad", jd_engine=engine, jd_loss_type=workload.loss_type
            )
            trainer = JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        if variant != "trainer_mean":
            used = trainer.jd_engine.name if trainer.jd_engine is not None else None
            if used != engine:
                raise RuntimeError(f"JDTrainer used the {used!r} engine instead of {engine!r}.")


def torchjd_weighting_with_hf_jd_upgrad() -> Any:
    """A TorchJD ``Weighting`` that calls hf_jd's ``UPGradWeighting`` (TorchJD's UPGrad needs qpsolvers)."""
    from torchjd.aggregation import Weighting as TorchJDWeighting

    from hf_jd.aggregation import UPGradWeighting

    class HfJdUPGradWeighting(TorchJDWeighting):
        def __init__(self) -> None:
            super().__init__()
            self.inner = UPGradWeighting()

        def forward(self, gramian: Tensor, /) -> Tensor:
            return self.inner(gramian)

    return HfJdUPGradWeighting()


def run_loop_variant(
    variant: str, workload: Workload, model: nn.Module, total_steps: int, recorder: StepRecorder
) -> None:
    """Train ``total_steps`` steps in a plain loop (mean loss or TorchJD), recording every step."""
    from hf_jd.aggregation import UPGradWeighting
    from hf_jd.losses import per_example_losses

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=LEARNING_RATE)
    batch = workload.batch
    # Each `step` keeps only the loss(es) of the forward: the model outputs (e.g. GPT-2's [B, T, V]
    # logits) are freed before the backward, as in Trainer.compute_loss / JDTrainer.compute_losses.
    step: Callable[[], None]

    if variant == "loop_mean":

        def step() -> None:
            loss = model(**batch).loss
            loss.backward()

    elif variant == "torchjd_autogram":
        from torchjd.autogram import Engine

        engine = Engine(model, batch_dim=0)
        weighting = UPGradWeighting()

        def step() -> None:
            losses = per_example_losses(model(**batch), batch, workload.loss_type)
            gramian = engine.compute_gramian(losses)
            losses.backward(weighting(gramian))

    elif variant == "torchjd_autojac":
        from torchjd.aggregation import GramianWeightedAggregator
        from torchjd.autojac import backward as jac_backward
        from torchjd.autojac import jac_to_grad

        aggregator = GramianWeightedAggregator(torchjd_weighting_with_hf_jd_upgrad())

        def step() -> None:
            losses = per_example_losses(model(**batch), batch, workload.loss_type)
            jac_backward(losses, inputs=params)
            jac_to_grad(params, aggregator)

    else:
        raise ValueError(f"Unknown loop variant {variant!r}.")

    for _ in range(total_steps):
        recorder.begin()
        step()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        recorder.end()


def run_variant(
    variant: str, workload: Workload, model: nn.Module, total_steps: int, recorder: StepRecorder
) -> None:
    """Run ``total_steps`` optimizer steps of ``variant`` on ``model``."""
    check_available(variant)
    if variant in TRAINER_VARIANTS:
        run_trainer_variant(variant, workload, model, total_steps, recorder)
    else:
        run_loop_variant(variant, workload, model, total_steps, recorder)


# ----------------------------------------------------------------------------------- coverage
def gramian_coverage(workload: Workload) -> dict[str, Any]:
    """How the Gramian engine serves each trainable parameter tensor of ``workload``'s model.

    One captured forward of the batch, ``gramian(losses)`` with the self-check rows ``JDTrainer``
    verifies on its first step, then :meth:`hf_jd.gramian.GramianEngine.coverage`. As ``JDTrainer``
    does, the engine first expands broadcast module outputs (``expand_broadcast=True``) and, when that
    raises (the model's code cannot take the expanded tensor) or fails the self-check, runs again
    without (``expand_broadcast=False``); the result says which setting served.

    Returns ``status``, ``expand_broadcast``, ``parameter_tensors`` (trainable tensors), ``fallback``
    and ``generic`` (counts of the tensors on the exact batched-autograd fallback and on the generic
    per-example re-run of a module) with their names, ``unreached`` and the count per rule
    (``by_rule``); ``status: failed`` with the errors when no setting ran.
    """
    from collections import Counter

    from hf_jd.gramian import GramianEngine, default_rows
    from hf_jd.losses import per_example_losses

    device = next(iter(workload.batch.values())).device
    errors: list[str] = []
    model: nn.Module | None = None
    engine: GramianEngine | None = None
    for expand in (True, False):
        try:
            model = workload.build()
            model.train()
            engine = GramianEngine(model, expand_broadcast=expand)
            engine.check_supported()
            with (
                engine.capture(),
                torch.autocast(device.type, dtype=torch.bfloat16, enabled=workload.bf16),
            ):
                losses = per_example_losses(model(**workload.batch), workload.batch, workload.loss_type)
            engine.gramian(losses, verify_rows=default_rows(losses.numel()))
            served = engine.coverage()
        except Exception as error:  # the next setting, as JDTrainer's fallback
            errors.append(f"expand_broadcast={expand}: {type(error).__name__}: {one_line(str(error))}")
            continue
        finally:
            if engine is not None:
                engine.release()
            engine = model = None
        by_rule = Counter(served.values())
        result: dict[str, Any] = {
            "status": "ok",
            "expand_broadcast": expand,
            "parameter_tensors": len(served),
            "fallback": by_rule["fallback"],
            "generic": by_rule["generic"],
            "unreached": by_rule["unreached"],
            "fallback_names": [name for name, how in served.items() if how == "fallback"],
            "generic_names": [name for name, how in served.items() if how == "generic"],
            "by_rule": dict(sorted(by_rule.items())),
        }
        if errors:
            result["errors"] = errors
        return result
    return {"status": "failed", "errors": errors}


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (a markdown table cell), at most ``limit`` characters."""
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def grouped_names(names: list[str]) -> str:
    """Parameter names with their layer indices folded: ``a.layer.*.b.weight ×4`` for 4 layers."""
    import re

    counts: dict[str, int] = {}
    for name in names:
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(
        f"`{pattern}`" + (f" ×{count}" if count > 1 else "") for pattern, count in counts.items()
    )


def coverage_line(coverage: dict[str, Any]) -> str:
    """The markdown line under a model's table."""
    if coverage["status"] != "ok":
        errors = "; ".join(error.rstrip(".") for error in coverage["errors"])
        return f"Gramian engine coverage: failed ({errors})."
    fallback = coverage["fallback"]
    generic = coverage["generic"]
    text = (
        f"Gramian engine coverage (expand_broadcast={coverage['expand_broadcast']}): "
        f"{coverage['parameter_tensors']} parameter tensors, {fallback} on the exact fallback"
        + (f" ({grouped_names(coverage['fallback_names'])})" if fallback else "")
        + f", {generic} on the generic per-example path"
        + (f" ({grouped_names(coverage['generic_names'])})" if generic else "")
    )
    if coverage["unreached"]:
        text += f", {coverage['unreached']} unreached"
    if coverage.get("errors"):
        text += f"; first tried: {'; '.join(coverage['errors'])}"
    return text.rstrip(".") + "."


# ----------------------------------------------------------------------------------- memory
def current_rss_bytes() -> int:
    """Resident set size now (Linux ``/proc``; elsewhere the peak so far, a weaker baseline)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak RSS of this process: ``VmHWM`` of ``/proc/self/status`` on Linux, else ``ru_maxrss``.

    ``ru_maxrss`` is not used on Linux: a child started by ``fork`` + ``exec`` inherits the parent's
    peak in it (the kernel keeps the pre-``exec`` address space's high-water mark), so every memory
    subprocess would report the timing process's peak. ``VmHWM`` is the same counter for the current
    address space only, and ``/proc/self/clear_refs`` resets it.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux ``/proc/self/clear_refs``); False when not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _import_variant_modules(variant: str) -> None:
    """Import what ``variant`` uses, so that module loading is not counted as step memory."""
    import transformers  # noqa: F401

    import hf_jd  # noqa: F401
    import hf_jd.losses  # noqa: F401

    if variant == "jd_gramian":
        importlib.import_module("hf_jd.gramian")
    if variant.startswith("torchjd_"):
        importlib.import_module("torchjd.autogram")
        importlib.import_module("torchjd.autojac")


def single_variant(options: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this (fresh) process and return its peak RSS above the model+batch baseline."""
    device = torch.device(options.device)
    (model_name,) = options.models
    check_available(options.single_variant)
    _import_variant_modules(options.single_variant)
    workload = make_workload(model_name, options, device)
    model = workload.build()
    baseline_rss = current_rss_bytes()
    peak_was_reset = reset_peak_rss()
    baseline_peak = peak_rss_bytes()
    recorder = StepRecorder(options.single_variant, device)
    recorder.reset_peak_after = options.memory_warmup if peak_was_reset else None
    run_variant(
        options.single_variant, workload, model, options.memory_warmup + options.memory_steps, recorder
    )
    times = recorder.times
    peak = peak_rss_bytes()
    return {
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline_rss,
        "peak_counter_reset": peak_was_reset,
        "peak_delta_bytes": max(0, peak - baseline_rss),
        # Without a reset, a peak reached during imports/set-up hides the step's own peak.
        "peak_may_be_from_setup": (not peak_was_reset) and peak <= baseline_peak,
        "times_s": times,
    }


def memory_in_subprocess(variant: str, model_name: str, options: argparse.Namespace) -> dict[str, Any]:
    """Run ``--single-variant`` in a fresh interpreter and parse its result line."""
    command = [sys.executable, os.path.abspath(__file__), "--single-variant", variant, "--models", model_name]
    for flag in (
        "batch",
        "seq",
        "layers",
        "hidden",
        "heads",
        "intermediate",
        "vocab",
        "seed",
        "memory_steps",
        "memory_warmup",
        "image",
    ):
        value = getattr(options, flag)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    command += ["--device", options.device]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    return {"status": "failed", "error": " | ".join(tail) or f"exit code {completed.returncode}"}


# ----------------------------------------------------------------------------------- driver
def step_counts(variant: str, options: argparse.Namespace) -> tuple[int, int]:
    """``(warm-up steps, timed steps)`` of ``variant``."""
    if variant in JACOBIAN_VARIANTS:
        return options.jacobian_warmup, options.jacobian_steps
    return options.warmup, options.steps


def paired_ratios(entry: dict[str, Any], ref: dict[str, Any]) -> list[float]:
    """``entry``'s step time over the reference's, round by round, for the rounds timed in both."""
    mine = {entry["warmup"] + index: value for index, value in enumerate(entry["times_s"])}
    theirs = {ref["warmup"] + index: value for index, value in enumerate(ref["times_s"])}
    return [mine[round_] / theirs[round_] for round_ in sorted(mine.keys() & theirs.keys())]


def benchmark_model(model_name: str, options: argparse.Namespace) -> dict[str, Any]:
    """Time every variant on ``model_name`` in this process; measure memory (CUDA here, CPU in subprocesses)."""
    device = torch.device(options.device)
    workload = make_workload(model_name, options, device)
    reference = workload.build()
    initial_state = {key: value.detach().clone() for key, value in reference.state_dict().items()}
    n_params = sum(p.numel() for p in reference.parameters() if p.requires_grad)
    del reference
    results: dict[str, Any] = {variant: {"description": VARIANTS[variant]} for variant in options.variants}
    runnable = []
    for variant, entry in results.items():
        try:
            check_available(variant)
            runnable.append(variant)
        except VariantUnavailable as error:
            entry.update(status="unavailable", error=str(error))
    interleaved = options.schedule == "interleaved"
    turns = Turns(runnable) if interleaved else None

    def worker(variant: str) -> None:
        entry = results[variant]
        warmup, steps = step_counts(variant, options)
        recorder = StepRecorder(variant, device, turns)
        if turns is not None:
            turns.wait(variant)
        try:
            model = workload.build()
            model.load_state_dict(initial_state)
            run_variant(variant, workload, model, warmup + steps, recorder)
            timed = recorder.times[warmup:]
            entry.update(status="ok", warmup=warmup, times_s=timed, median_s=statistics.median(timed))
            if recorder.cuda_peaks:
                entry["peak_memory_bytes"] = max(recorder.cuda_peaks)
            del model
        except Exception as error:  # a failing variant is reported, not fatal
            entry.update(status="failed", error=f"{type(error).__name__}: {error}")
            traceback.print_exc()
        finally:
            if turns is not None:
                turns.finish(variant)
        print(
            f"[{model_name}] {variant}: {entry.get('status')} {entry.get('median_s', entry.get('error'))}",
            flush=True,
        )

    print(f"[{model_name}] timing {', '.join(runnable)} ({options.schedule}) ...", flush=True)
    if interleaved:
        threads = [threading.Thread(target=worker, args=(variant,), name=variant) for variant in runnable]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for variant in runnable:
            worker(variant)
    if device.type == "cpu" and not options.no_memory:
        for variant, entry in results.items():
            if entry["status"] != "ok":
                continue
            print(f"[{model_name}] {variant}: peak memory in a fresh process ...", flush=True)
            measured = memory_in_subprocess(variant, model_name, options)
            if "peak_delta_bytes" in measured:
                entry["peak_memory_bytes"] = measured["peak_delta_bytes"]
                entry["memory_detail"] = {k: v for k, v in measured.items() if k != "times_s"}
            else:
                entry["memory_error"] = measured.get("error")
    coverage = None
    if "jd_gramian" in runnable:
        print(f"[{model_name}] Gramian engine coverage ...", flush=True)
        coverage = gramian_coverage(workload)
    ref = results.get(REFERENCE, {})
    for entry in results.values():
        if entry.get("status") != "ok" or ref.get("status") != "ok":
            continue
        entry["time_ratio"] = entry["median_s"] / ref["median_s"]
        if interleaved:
            # Step k of every variant ran in the same round k: the ratio of the two steps of a round
            # cancels load changes slower than a round. Median over the rounds timed for both.
            ratios = paired_ratios(entry, ref)
            if ratios:
                entry["paired_time_ratio"] = statistics.median(ratios)
                entry["paired_rounds"] = len(ratios)
        if entry.get("peak_memory_bytes") is not None and ref.get("peak_memory_bytes"):
            entry["memory_ratio"] = entry["peak_memory_bytes"] / ref["peak_memory_bytes"]
    vocab = options.vocab if options.vocab is not None else DEFAULT_VOCAB.get(model_name, 8192)
    report = {"model": model_name, "vocab": vocab, "trainable_parameters": n_params, "variants": results}
    if coverage is not None:
        report["gramian_coverage"] = coverage
    return report


def markdown(report: dict[str, Any]) -> str:
    """Markdown tables of a report (one per model)."""
    settings = report["settings"]
    lines = [
        f"Machine: {report['machine']}; device {settings['device']}; torch {report['torch']}, "
        f"transformers {report['transformers']}, torchjd {report['torchjd']}; hf_jd {report['hf_jd_source']}.",
        f"batch {settings['batch']}, seq {settings['seq']}, layers {settings['layers']}, hidden "
        f"{settings['hidden']}, heads {settings['heads']}, intermediate {settings['intermediate']}"
        + (
            f", image {settings['image']}"
            if any(model["model"] in IMAGE_MODELS for model in report["models"])
            else ""
        )
        + "; "
        f"median of {settings['steps']} steps after {settings['warmup']} warm-up steps "
        f"({settings['jacobian_steps']} after {settings['jacobian_warmup']} for {', '.join(JACOBIAN_VARIANTS)}), "
        f"variants {settings['schedule']}; 'paired': median over rounds of the step-time ratio within a "
        "round (number of rounds). Memory: "
        + (
            "torch.cuda.max_memory_allocated during a step above the memory allocated at its start "
            "(max over steps)."
            if settings["device"] == "cuda"
            else "peak RSS above the RSS after model+batch creation, each variant in a fresh process "
            f"({settings['memory_steps']} steps after {settings['memory_warmup']} warm-up steps, whose peak "
            "is not counted)."
        ),
        "",
    ]
    for model in report["models"]:
        lines += [
            f"**{model['model']}** (vocab {model['vocab']}, {model['trainable_parameters'] / 1e6:.2f} M trainable "
            "parameters)",
            "",
            "| variant | what | step time (s) | × stock | × stock, paired | peak memory (MiB) | × stock |",
            "|---|---|---:|---:|---:|---:|---:|",
        ]
        for name, entry in model["variants"].items():
            if entry["status"] != "ok":
                lines.append(
                    f"| {name} | {entry['description']} | {entry['status']}: {one_line(entry['error'])} | | | | |"
                )
                continue
            memory = entry.get("peak_memory_bytes")
            memory_text = f"{memory / 2**20:.0f}" if memory is not None else "n/a"
            time_ratio = f"{entry['time_ratio']:.2f}" if "time_ratio" in entry else "n/a"
            memory_ratio = f"{entry['memory_ratio']:.2f}" if "memory_ratio" in entry else "n/a"
            paired = (
                f"{entry['paired_time_ratio']:.2f} ({entry['paired_rounds']})"
                if "paired_time_ratio" in entry
                else "n/a"
            )
            lines.append(
                f"| {name} | {entry['description']} | {entry['median_s']:.3f} | {time_ratio} | {paired} | "
                f"{memory_text} | {memory_ratio} |"
            )
        if "gramian_coverage" in model:
            lines += ["", coverage_line(model["gramian_coverage"])]
        lines.append("")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["bert", "gpt2"], choices=list(MODELS))
    parser.add_argument(
        "--image",
        type=int,
        default=64,
        help="image side (pixels) of the convnext, vit and swin workloads; vit uses patches of 16 from 64 "
        "pixels up, 4 below",
    )
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument(
        "--vocab",
        type=int,
        default=None,
        help="vocabulary size; default 30522 for BERT (bert-base's) and 8192 for every other text model "
        "(smaller than GPT-2's 50257 or Llama's 32000 to keep CPU runs short: the LM head dominates a small "
        "model's step)",
    )
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument(
        "--jacobian-steps",
        type=int,
        default=3,
        help="timed steps of the variants that build the explicit Jacobian (jd_jacobian, torchjd_autojac), "
        "10-30x slower than a stock step on CPU",
    )
    parser.add_argument("--jacobian-warmup", type=int, default=1, help="warm-up steps of those variants")
    parser.add_argument(
        "--memory-steps", type=int, default=1, help="steps measured by each memory subprocess (CPU)"
    )
    parser.add_argument(
        "--memory-warmup",
        type=int,
        default=1,
        help="steps each memory subprocess runs first, before the peak RSS counter is reset (CPU)",
    )
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--schedule",
        default="interleaved",
        choices=["interleaved", "sequential"],
        help="interleaved: the variants take turns step by step (one thread each, one running at a time); "
        "sequential: each variant runs all its steps before the next starts",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bf16", action="store_true", help="every Trainer variant trains under bf16 autocast"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the CPU memory subprocesses")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 4, seq 32, 2 layers, hidden 64, heads 2, intermediate 128, vocab 1000, "
        "1 warm-up + 2 timed steps; flags given explicitly keep their value (e.g. --quick --batch 64)",
    )
    parser.add_argument("--single-variant", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.quick:
        # The quick values replace the defaults only: parse again so that explicit flags win.
        parser.set_defaults(**QUICK_SETTINGS)
        options = parser.parse_args(argv)
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    options.variants = list(dict.fromkeys(options.variants))
    if REFERENCE not in options.variants and options.single_variant is None:
        options.variants = [REFERENCE, *options.variants]
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    if options.single_variant is not None:
        with _quiet():
            result = single_variant(options)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return
    try:
        torchjd_version = importlib.metadata.version("torchjd")
    except importlib.metadata.PackageNotFoundError:
        torchjd_version = "not installed"
    with _quiet():
        models = [benchmark_model(name, options) for name in options.models]
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}"
        + (f", {torch.cuda.get_device_name()}" if options.device == "cuda" else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_jd_source": source_fingerprint(),
        "torchjd": torchjd_version,
        "settings": {
            key: getattr(options, key)
            for key in (
                "device",
                "batch",
                "seq",
                "layers",
                "hidden",
                "heads",
                "intermediate",
                "vocab",
                "image",
                "steps",
                "warmup",
                "jacobian_steps",
                "jacobian_warmup",
                "memory_steps",
                "memory_warmup",
                "variants",
                "schedule",
                "quick",
            )
        },
        "models": models,
    }
    write_report(options.out_dir, "bench_step", report, markdown)


if __name__ == "__main__":
    main()
