"""Step time and bytes communicated per step: DDP vs hf_jd's distributed JD modes, on N CPU processes.

Run it by itself::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_distributed.py          # ~5-10 min on 2 cores
    .venv/bin/python benchmarks/bench_distributed.py --quick                   # smoke run

For every mode it launches ``python -m torch.distributed.run --standalone --nproc_per_node N
benchmarks/bench_distributed.py --worker --mode MODE ...`` (``N = --nproc``, 2 by default; gloo, ``use_cpu=True``,
``OMP_NUM_THREADS=1`` per process). Modes:

* ``ddp``                   stock ``Trainer`` under DDP, mean loss, small BERT classifier;
* ``jd_per_example_global`` ``JDTrainer``, one loss per example of the *global* batch (exact JD step),
  Gramian engine (cross-rank blocks from all-gathered factors or all-to-all rows);
* ``jd_per_example_global_jacobian`` the same with the explicit-Jacobian engine (all-to-all of ``J``);
* ``jd_per_example_local``  ``JDTrainer``, each rank aggregates its own examples, then an all-reduce;
* ``ddp_two_head``          stock ``Trainer`` under DDP on the two-head model, loss ``l_a + l_b``
  (the reference of the per-task modes);
* ``jd_per_task_global``    ``JDTrainer``, two task losses ``{"a": l_a, "b": l_b}`` over a shared
  BERT encoder, ``J`` averaged over ranks by a reduce-scatter of column shards;
* ``jd_per_task_local``     the same, each rank aggregates its own task Jacobian;
* ``zero2`` / ``zero3``     stock ``Trainer`` under DeepSpeed ZeRO-2 / ZeRO-3 (``TrainingArguments(deepspeed=...)``,
  DeepSpeed's CPU accelerator over gloo), mean loss;
* ``jd_zero2_global`` / ``jd_zero3_global`` ``JDTrainer`` under the same stage, one loss per example of the global
  batch (the JD update is DeepSpeed's own backward of the weighted losses).

Time per step: ``on_step_begin`` → ``on_step_end`` of a ``TrainerCallback``, the maximum over the ranks
of each step, median over the timed steps.

Bytes per step per rank, counted only between ``on_step_begin`` and ``on_step_end``:

* hf_jd modes: the Python collectives of ``torch.distributed`` (``all_reduce``, ``all_to_all_single``,
  ``all_gather``, ``broadcast``, ``broadcast_object_list``, ...) are replaced in the worker, before
  training, by wrappers that count the payload this rank contributes (all-reduce / all-gather: the
  tensor; all-to-all: the parts addressed to the other ranks; broadcast: the tensor on the source
  rank). On 2 ranks that is what a rank sends (a ring all-reduce sends ``2(n-1)/n`` times the payload).
* DDP: the same wrappers, plus a DDP communication hook registered on the wrapped model at
  ``on_train_begin`` that counts every gradient bucket and then runs the default
  ``allreduce_hook``, plus DDP's buffer broadcast (``torch.distributed._broadcast_coalesced``).
  The hook is registered in the hf_jd modes too: it must count 0 there (hf_jd bypasses DDP's reducer).

Peak memory per rank: the growth of the process's peak resident set size (``ru_maxrss``) during
``trainer.train()``, the maximum over the ranks and launches.

Writes ``<out-dir>/bench_distributed.json`` and ``<out-dir>/bench_distributed.md``. No assertion on
timings.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import source_fingerprint, write_report  # noqa: E402
from _trainer_settings import timed_trainer_arguments  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MODES: dict[str, str] = {
    "ddp": "stock Trainer + DDP, mean loss",
    "jd_per_example_global": "JDTrainer, per example, scope global (Gramian engine)",
    "jd_per_example_global_jacobian": "JDTrainer, per example, scope global, explicit Jacobian",
    "jd_per_example_local": "JDTrainer, per example, scope local",
    "ddp_two_head": "stock Trainer + DDP, two-head model, l_a + l_b",
    "jd_per_task_global": "JDTrainer, per task (2), scope global (J reduce-scattered)",
    "jd_per_task_local": "JDTrainer, per task (2), scope local",
    "zero2": "stock Trainer + DeepSpeed ZeRO-2, mean loss",
    "jd_zero2_global": "JDTrainer under ZeRO-2, per example, scope global",
    "zero3": "stock Trainer + DeepSpeed ZeRO-3, mean loss",
    "jd_zero3_global": "JDTrainer under ZeRO-3, per example, scope global",
}
REFERENCE = {
    "ddp": "ddp",
    "jd_per_example_global": "ddp",
    "jd_per_example_global_jacobian": "ddp",
    "jd_per_example_local": "ddp",
    "ddp_two_head": "ddp_two_head",
    "jd_per_task_global": "ddp_two_head",
    "jd_per_task_local": "ddp_two_head",
    "zero2": "ddp",
    "jd_zero2_global": "zero2",
    "zero3": "ddp",
    "jd_zero3_global": "zero3",
}
#: The ZeRO stage of the DeepSpeed modes.
ZERO_STAGE = {"zero2": 2, "jd_zero2_global": 2, "zero3": 3, "jd_zero3_global": 3}
#: Modes whose engine is fixed whatever ``--engine`` says.
ENGINE_OF_MODE = {"jd_per_example_global_jacobian": "jacobian"}


# ============================================================================ worker side
class CommCounter:
    """Counts the bytes this rank contributes to collectives while :attr:`active` is set."""

    def __init__(self) -> None:
        self.active = False
        self.paused = False  # set inside the DDP hook: its own all_reduce is already counted as the bucket
        self.step_bytes: list[dict[str, int]] = []
        self.step_calls: list[dict[str, int]] = []
        self._bytes: dict[str, int] = defaultdict(int)
        self._calls: dict[str, int] = defaultdict(int)

    def add(self, name: str, nbytes: int) -> None:
        if self.active and not self.paused:
            self._bytes[name] += int(nbytes)
            self._calls[name] += 1

    def begin_step(self) -> None:
        self._bytes, self._calls = defaultdict(int), defaultdict(int)
        self.active = True

    def end_step(self) -> None:
        self.active = False
        self.step_bytes.append(dict(self._bytes))
        self.step_calls.append(dict(self._calls))


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], index: int, *names: str) -> Any:
    """A collective's argument, given by position ``index`` or by one of its keyword ``names``."""
    if len(args) > index:
        return args[index]
    for name in names:
        if name in kwargs:
            return kwargs[name]
    raise TypeError(f"no argument {index} ({', '.join(names)})")


def install_counting_wrappers(counter: CommCounter) -> None:
    """Replace ``torch.distributed``'s Python collectives by counting wrappers (this process only)."""
    import torch.distributed as dist

    def rank() -> int:
        return dist.get_rank()

    def world() -> int:
        return dist.get_world_size()

    def all_to_all_single_bytes(
        output: Any,
        input: Any,
        output_split_sizes: Any = None,
        input_split_sizes: Any = None,
        *args: Any,
        **kwargs: Any,
    ) -> int:
        total = _nbytes(input)
        if input.dim() == 0 or input.shape[0] == 0:
            return 0
        row = total // input.shape[0]
        if input_split_sizes is None:
            return total - total // world()
        return sum(size for peer, size in enumerate(input_split_sizes) if peer != rank()) * row

    def all_to_all_bytes(output_list: Any, input_list: Any, *args: Any, **kwargs: Any) -> int:
        return sum(_nbytes(t) for peer, t in enumerate(input_list) if peer != rank())

    def source_only(nbytes: Callable[..., int]) -> Callable[..., int]:
        def count(*args: Any, **kwargs: Any) -> int:
            src = kwargs.get("src", args[1] if len(args) > 1 else 0)
            return nbytes(*args, **kwargs) if rank() == src else 0

        return count

    rules: dict[str, Callable[..., int]] = {
        "all_reduce": lambda tensor, *a, **k: _nbytes(tensor),
        "reduce": lambda tensor, *a, **k: _nbytes(tensor),
        "all_gather": lambda tensor_list, tensor, *a, **k: _nbytes(tensor),
        # DeepSpeed passes these by keyword (output_tensor=, input_tensor=)
        "all_gather_into_tensor": lambda *a, **k: _nbytes(_argument(a, k, 1, "input_tensor", "input")),
        "reduce_scatter": lambda *a, **k: sum(_nbytes(t) for t in _argument(a, k, 1, "input_list")),
        "reduce_scatter_tensor": lambda *a, **k: _nbytes(_argument(a, k, 1, "input", "input_tensor")),
        "all_to_all_single": all_to_all_single_bytes,
        "all_to_all": all_to_all_bytes,
        "broadcast": source_only(lambda tensor, *a, **k: _nbytes(tensor)),
        "broadcast_object_list": source_only(lambda objects, *a, **k: len(pickle.dumps(objects))),
        "all_gather_object": lambda object_list, obj, *a, **k: len(pickle.dumps(obj)),
        "gather": lambda tensor, *a, **k: _nbytes(tensor),
        "send": lambda tensor, *a, **k: _nbytes(tensor),
        "isend": lambda tensor, *a, **k: _nbytes(tensor),
    }
    for name, nbytes in rules.items():
        original = getattr(dist, name, None)
        if original is None:
            continue

        def wrapper(
            *args: Any,
            __original: Callable = original,
            __name: str = name,
            __nbytes: Callable[..., int] = nbytes,
            **kwargs: Any,
        ) -> Any:
            counter.add(__name, __nbytes(*args, **kwargs))
            return __original(*args, **kwargs)

        functools.update_wrapper(wrapper, original)
        setattr(dist, name, wrapper)

    # DDP's buffer broadcast at every forward (broadcast_buffers=True) goes through this C++ binding.
    coalesced = getattr(dist, "_broadcast_coalesced", None)
    if coalesced is not None:

        def broadcast_coalesced(process_group: Any, tensors: Any, buffer_size: int, src: int = 0) -> Any:
            if rank() == src:
                counter.add("ddp_broadcast_buffers", sum(_nbytes(t) for t in tensors))
            return coalesced(process_group, tensors, buffer_size, src)

        dist._broadcast_coalesced = broadcast_coalesced


def _counting_callback(counter: CommCounter, trainer_ref: list[Any], times: list[float]) -> Any:
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from transformers import TrainerCallback

    class CountingCallback(TrainerCallback):
        """Registers the DDP comm hook; opens/closes the counting window and times every step."""

        def __init__(self) -> None:
            self.start = 0.0
            self.hook_registered = False

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            wrapped = trainer_ref[0].model_wrapped
            if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
                # No annotations: DDP rejects a `bucket` annotation other than dist.GradBucket (and
                # `from __future__ import annotations` would turn that one into a string).
                def counting_allreduce_hook(process_group, bucket):  # noqa: ANN001, ANN202
                    counter.add("ddp_gradient_buckets", _nbytes(bucket.buffer()))
                    counter.paused = True
                    try:
                        return default_hooks.allreduce_hook(process_group, bucket)
                    finally:
                        counter.paused = False

                wrapped.register_comm_hook(None, counting_allreduce_hook)
                self.hook_registered = True

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            counter.begin_step()
            self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter() - self.start)
            counter.end_step()

    return CountingCallback()


def _build_models(options: argparse.Namespace) -> tuple[Any, Any]:
    """``(classifier factory, two-head factory)`` sharing the same small BERT configuration."""
    import torch
    from torch import nn
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    config = BertConfig(
        vocab_size=options.vocab,
        hidden_size=options.hidden,
        num_hidden_layers=options.layers,
        num_attention_heads=options.heads,
        intermediate_size=4 * options.hidden,
        max_position_embeddings=max(512, options.seq),
        num_labels=2,
    )

    class TwoHeadBert(nn.Module):
        """A shared BERT encoder with a classification head (task a) and a regression head (task b)."""

        def __init__(self, summed: bool) -> None:
            super().__init__()
            self.summed = summed
            self.encoder = BertModel(config, add_pooling_layer=False)
            self.head_a = nn.Linear(config.hidden_size, 2)
            self.head_b = nn.Linear(config.hidden_size, 1)

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            labels: torch.Tensor | None = None,
            targets: torch.Tensor | None = None,
        ) -> dict[str, Any]:
            features = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[
                :, 0
            ]
            loss_a = nn.functional.cross_entropy(self.head_a(features), labels)
            loss_b = nn.functional.mse_loss(self.head_b(features).squeeze(-1), targets)
            return {"loss": loss_a + loss_b if self.summed else {"a": loss_a, "b": loss_b}}

    def classifier() -> nn.Module:
        torch.manual_seed(options.seed)
        return BertForSequenceClassification(config)

    def two_head(summed: bool) -> nn.Module:
        torch.manual_seed(options.seed)
        return TwoHeadBert(summed)

    return classifier, two_head


def _dataset(options: argparse.Namespace, size: int) -> Any:
    import torch
    from datasets import Dataset

    generator = torch.Generator().manual_seed(options.seed)
    return Dataset.from_dict(
        {
            "input_ids": torch.randint(0, options.vocab, (size, options.seq), generator=generator).tolist(),
            "attention_mask": torch.ones(size, options.seq, dtype=torch.long).tolist(),
            "labels": torch.randint(0, 2, (size,), generator=generator).tolist(),
            "targets": torch.randn(size, generator=generator).tolist(),
        }
    )


def _peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ``ru_maxrss`` in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(options: argparse.Namespace) -> None:
    """One rank of one mode: train, count, gather the results on rank 0 and write them."""
    import torch
    import torch.distributed as dist
    import transformers
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from hf_jd import JDTrainer, JDTrainingArguments

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    mode = options.mode
    counter = CommCounter()
    times: list[float] = []
    trainer_ref: list[Any] = []
    classifier, two_head = _build_models(options)
    per_task = mode in ("ddp_two_head", "jd_per_task_global", "jd_per_task_local")
    model = two_head(summed=mode == "ddp_two_head") if per_task else classifier()
    total_steps = options.warmup + options.steps
    with tempfile.TemporaryDirectory() as output_dir:
        common: dict[str, Any] = timed_trainer_arguments(
            output_dir, options.batch, total_steps, use_cpu=True, seed=options.seed
        )
        common["ddp_backend"] = "gloo"
        if mode in ZERO_STAGE:  # DeepSpeed's CPU accelerator over gloo; batch sizes from the arguments
            common["deepspeed"] = {
                "zero_optimization": {"stage": ZERO_STAGE[mode]},
                "zero_allow_untested_optimizer": True,
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "gradient_clipping": "auto",
            }
        callbacks = [_counting_callback(counter, trainer_ref, times)]
        dataset = _dataset(options, options.batch * int(os.environ.get("WORLD_SIZE", "1")))
        if mode.startswith("ddp") or mode.startswith("zero"):
            trainer: Trainer = Trainer(
                model=model, args=TrainingArguments(**common), train_dataset=dataset, callbacks=callbacks
            )
        else:
            args = JDTrainingArguments(
                **common,
                aggregator="upgrad",
                jd_engine=ENGINE_OF_MODE.get(mode, options.engine),
                jd_objectives="per_task" if per_task else "per_example",
                jd_scope="global" if "_global" in mode else "local",
                jd_loss_type="auto" if per_task else "sequence_classification",
            )
            trainer = JDTrainer(model=model, args=args, train_dataset=dataset, callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        trainer_ref.append(trainer)
        install_counting_wrappers(counter)
        rss_before = _peak_rss_bytes()
        trainer.train()
        rss_growth = _peak_rss_bytes() - rss_before
        engine = getattr(getattr(trainer, "jd_engine", None), "name", None)
        hook_registered = callbacks[0].hook_registered
    local = {
        "times_s": times,
        "step_bytes": counter.step_bytes,
        "step_calls": counter.step_calls,
        "peak_rss_growth": rss_growth,
    }
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)  # after the counting window: not counted
    if dist.get_rank() == 0:
        result = {
            "mode": mode,
            "engine": engine,
            "ddp_hook_registered": hook_registered,
            "world_size": dist.get_world_size(),
            "warmup": options.warmup,
            "ranks": gathered,
            # under ZeRO-3 a parameter is a partition: its full size is ds_numel
            "trainable_parameters": sum(
                getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad
            ),
        }
        Path(options.result_file).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ============================================================================ launcher side
def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Median step time (max over ranks per step) and mean bytes per step per rank, by collective.

    ``results`` are the launches (rounds) of one mode; their timed steps are pooled.
    """
    per_step: list[float] = []
    steps: list[dict[str, int]] = []
    per_rank_totals: list[list[int]] = [[] for _ in results[0]["ranks"]]
    for result in results:
        warmup = result["warmup"]
        ranks = result["ranks"]
        per_step += [max(values) for values in zip(*(rank["times_s"] for rank in ranks))][warmup:]
        steps += [step for rank in ranks for step in rank["step_bytes"][warmup:]]
        for index, rank in enumerate(ranks):
            per_rank_totals[index] += [sum(step.values()) for step in rank["step_bytes"][warmup:]]
    names = sorted(set().union(*steps)) if steps else []
    bytes_per_collective = {name: statistics.mean(step.get(name, 0) for step in steps) for name in names}
    return {
        "median_step_s": statistics.median(per_step),
        "step_times_s": per_step,
        "bytes_per_step_per_rank": statistics.mean(v for totals in per_rank_totals for v in totals),
        "bytes_per_step_by_rank": [statistics.mean(totals) for totals in per_rank_totals],
        "bytes_by_collective": bytes_per_collective,
        "ddp_hook_bytes": bytes_per_collective.get("ddp_gradient_buckets", 0.0),
        # the most any rank's peak RSS grew while training (model, optimizer state, activations, JD buffers)
        "peak_rss_growth_bytes": max(
            rank.get("peak_rss_growth", 0) for result in results for rank in result["ranks"]
        ),
    }


def run_mode(mode: str, options: argparse.Namespace) -> dict[str, Any]:
    """Launch the 2-process worker of ``mode`` with torch.distributed.run and read its result."""
    with tempfile.TemporaryDirectory() as scratch:
        result_file = os.path.join(scratch, "result.json")
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(options.nproc),
            os.path.abspath(__file__),
            "--worker",
            "--mode",
            mode,
            "--result-file",
            result_file,
        ]
        for flag in (
            "batch",
            "seq",
            "layers",
            "hidden",
            "heads",
            "vocab",
            "steps",
            "warmup",
            "engine",
            "seed",
        ):
            command += [f"--{flag}", str(getattr(options, flag))]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        started = time.perf_counter()
        try:
            completed = subprocess.run(
                command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=options.mode_timeout
            )
        except subprocess.TimeoutExpired:
            return {"mode": mode, "status": "failed", "error": f"timed out after {options.mode_timeout} s"}
        wall = time.perf_counter() - started
        if completed.returncode != 0 or not os.path.exists(result_file):
            output = (completed.stderr + completed.stdout).splitlines()
            lines = [line for line in output if re.match(r"\[rank\d+\]: \w*(Error|Exception)\b", line)]
            lines = lines or [line for line in output if "Error" in line]
            return {
                "mode": mode,
                "status": "failed",
                "error": (lines[0] if lines else f"exit code {completed.returncode}")[:300],
                "output_tail": [line for line in output if not line.startswith(" ")][-80:],
            }
        result = json.loads(Path(result_file).read_text())
    return {"status": "ok", "launch_wall_s": wall, **result}


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"Machine: {report['machine']}; {settings['nproc']} processes (gloo, OMP_NUM_THREADS=1 each); torch {report['torch']}, "
        f"transformers {report['transformers']}; hf_jd {report['hf_jd_source']}.",
        f"BERT: {settings['layers']} layers, hidden {settings['hidden']}, {settings['heads']} heads, vocab "
        f"{settings['vocab']}; per-device batch {settings['batch']}, seq {settings['seq']}; median of "
        f"{settings['steps']} steps after {settings['warmup']} warm-up steps x {settings['rounds']} launches "
        "(per step: the slowest rank). "
        "Bytes: payload contributed per rank per step (see README).",
        "",
        "| mode | what | engine | params (M) | step time (s) | × ref | MB / step / rank | × ref | via DDP hook (MB) "
        "| peak RSS growth / rank (MB) | × ref |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    modes = report["modes"]
    for mode, entry in modes.items():
        if entry["status"] != "ok":
            lines.append(f"| {mode} | {MODES[mode]} | failed: {entry['error']} | | | | | | | | |")
            continue
        ref = modes.get(REFERENCE[mode], {})
        ok = ref.get("status") == "ok"
        time_ratio = f"{entry['median_step_s'] / ref['median_step_s']:.2f}" if ok else "n/a"
        byte_ratio = (
            f"{entry['bytes_per_step_per_rank'] / ref['bytes_per_step_per_rank']:.2f}"
            if ok and ref["bytes_per_step_per_rank"]
            else "n/a"
        )
        memory_ratio = (
            f"{entry['peak_rss_growth_bytes'] / ref['peak_rss_growth_bytes']:.2f}"
            if ok and ref.get("peak_rss_growth_bytes")
            else "n/a"
        )
        lines.append(
            f"| {mode} | {MODES[mode]} | {entry['engine'] or ('DeepSpeed' if mode in ZERO_STAGE else 'DDP')} | {entry['trainable_parameters'] / 1e6:.2f} | "
            f"{entry['median_step_s']:.3f} | {time_ratio} | {entry['bytes_per_step_per_rank'] / 1e6:.2f} | "
            f"{byte_ratio} | {entry['ddp_hook_bytes'] / 1e6:.2f} | {entry['peak_rss_growth_bytes'] / 1e6:.0f} | "
            f"{memory_ratio} |"
        )
    lines += ["", "Bytes per step per rank by collective (MB):", ""]
    for mode, entry in modes.items():
        if entry["status"] == "ok":
            parts = ", ".join(
                f"{name} {value / 1e6:.3f}" for name, value in sorted(entry["bytes_by_collective"].items())
            )
            lines.append(f"- {mode}: {parts or 'none'}")
    lines.append("")
    lines.append(
        "Ratios (× ref): JD per-example DDP modes and the stock ZeRO modes vs `ddp`, JD per-task modes vs "
        "`ddp_two_head`, JD under ZeRO-2 / ZeRO-3 vs the stock step under the same stage. Peak RSS growth: how "
        "much each rank's peak resident memory grew during training (CPU; the first launch of a ZeRO mode also "
        "builds DeepSpeed's op)."
    )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--nproc", type=int, default=2, help="processes (gloo, one OpenMP thread each)")
    parser.add_argument("--batch", type=int, default=8, help="per-device batch size")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=30522)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    parser.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "jacobian", "gramian"],
        help="jd_engine of the JD modes ('auto': the Gramian engine where it applies)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="launch every mode this many times (alternating the order) and pool the timed steps",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=1,
        help="relaunch a failed mode this many times (the failure is kept in the JSON)",
    )
    parser.add_argument("--mode-timeout", type=int, default=900, help="seconds before a mode is abandoned")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: batch 2, seq 16, 1 layer, hidden 32, vocab 1000, 1 warm-up + 2 timed steps",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.quick:
        options.batch, options.seq, options.layers, options.hidden, options.heads = 2, 16, 1, 32, 2
        options.vocab, options.warmup, options.steps, options.rounds = 1000, 1, 2, 1
    return options


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    if options.worker:
        worker(options)
        return
    import torch
    import transformers

    launches: dict[str, list[dict[str, Any]]] = {mode: [] for mode in options.modes}
    failures: dict[str, list[dict[str, Any]]] = {mode: [] for mode in options.modes}
    for round_index in range(options.rounds):
        # Alternate the order of the modes between rounds, so that slow drifts of the machine even out.
        order = options.modes if round_index % 2 == 0 else list(reversed(options.modes))
        for mode in order:
            print(
                f"[round {round_index + 1}/{options.rounds}] {mode}: launching {options.nproc} processes ...",
                flush=True,
            )
            entry = run_mode(mode, options)
            for attempt in range(options.retries):
                if entry["status"] == "ok":
                    break
                print(
                    f"    failed ({entry['error']}); retrying ({attempt + 1}/{options.retries}) ...",
                    flush=True,
                )
                failures[mode].append(entry)
                entry = run_mode(mode, options)
            if entry["status"] == "ok":
                launches[mode].append(entry)
                times = [max(v) for v in zip(*(rank["times_s"] for rank in entry["ranks"]))][
                    entry["warmup"] :
                ]
                print(f"    ok: median {statistics.median(times):.3f} s/step", flush=True)
            else:
                failures[mode].append(entry)
                print(f"    failed: {entry['error']}", flush=True)
    modes: dict[str, Any] = {}
    for mode in options.modes:
        ok = launches[mode]
        if ok:
            modes[mode] = {
                "status": "ok",
                "engine": ok[0]["engine"],
                "trainable_parameters": ok[0]["trainable_parameters"],
                "ddp_hook_registered": ok[0]["ddp_hook_registered"],
                "rounds_ok": len(ok),
                "failures": failures[mode],
                **summarise(ok),
                "launches": ok,
            }
        else:
            modes[mode] = {
                "status": "failed",
                "error": failures[mode][-1]["error"],
                "failures": failures[mode],
            }
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_jd_source": source_fingerprint(),
        "settings": {
            key: getattr(options, key)
            for key in (
                "nproc",
                "batch",
                "seq",
                "layers",
                "hidden",
                "heads",
                "vocab",
                "steps",
                "warmup",
                "rounds",
                "engine",
                "quick",
            )
        },
        "modes": modes,
    }
    write_report(options.out_dir, "bench_distributed", report, markdown)


if __name__ == "__main__":
    main()
