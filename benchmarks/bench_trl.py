"""Jacobian descent inside TRL: one ``JDSFTTrainer`` / ``JDDPOTrainer`` step ÷ one stock TRL step.

On a small Llama built from a config (``--layers 4 --hidden 256 --heads 4 --intermediate 1024``, vocabulary
``--vocab 8192``), with a word-level tokenizer built locally (one word per token id, :func:`hf_jd.cli.word_tokenizer`)
and random words as data, so that TRL tokenises the texts itself as it would a real data set:

* SFT: ``--sft-batch 8`` texts of ``--seq 128`` tokens (``--seq − 1`` words, TRL appends the end-of-sequence
  token); the stock ``SFTTrainer`` against ``JDSFTTrainer`` (one objective per sequence);
* DPO: ``--dpo-batches 4 8 16`` preference pairs, each a prompt of ``--seq / 2`` words and two completions of
  ``--seq / 2 − 1`` words (rows of ``--seq`` tokens, ``2B`` rows per batch), a frozen copy of the policy as the
  reference model (its forward is part of both steps); the stock ``DPOTrainer`` (sigmoid loss) against
  ``JDDPOTrainer`` (one objective per pair, :class:`hf_jd.ObjectiveLosses`: the per-pair Gramian
  ``P G_rows Pᵀ`` from one backward) and, unless ``--no-per-task``, ``JDDPOTrainer`` with the ``B`` pair losses
  hand-routed through the engines' per-task route (``jd_objectives="per_task"``, no row map: each pair loss
  a scalar function of the whole batch, as the per-task route differentiates task losses).

Every JD variant: UPGrad, ``jd_engine="auto"`` (the report names the engine that served). Every step:
forward, backward, clipping at 1.0, SGD, ``zero_grad``; nothing logged or saved; no activation
checkpointing, float32. The variants of one workload run in one process, interleaved step by step (one thread
each, a round-robin token lets one run at a time: ``bench_step.py``'s ``Turns``), each from the same initial
weights; a ``TrainerCallback`` times ``on_step_begin`` → ``on_step_end``. Reported: the median over the
``--steps`` timed steps after ``--warmup``, and the paired ratio (the median over rounds of JD ÷ stock in the
same round: robust to load changes slower than a round).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_trl.py --no-per-task --warmup 1 --steps 3   # ≈ 3 min
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_trl.py           # > 20 min on 2 shared cores (not finished)
    .venv/bin/python benchmarks/bench_trl.py --quick                     # smoke run, seconds

Writes ``<out-dir>/bench_trl.json`` and ``<out-dir>/bench_trl.md``. No assertion on timings.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import source_fingerprint, write_report  # noqa: E402
from _trainer_settings import timed_trainer_arguments  # noqa: E402
from bench_step import StepRecorder, Turns, _recorder_callback  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

STOCK = "stock"
VARIANTS = {
    "sft": {"stock": "TRL SFTTrainer", "jd": "JDSFTTrainer, UPGrad, one objective per sequence"},
    "dpo": {
        "stock": "TRL DPOTrainer (sigmoid)",
        "jd": "JDDPOTrainer, UPGrad, one objective per pair (ObjectiveLosses)",
        "jd_per_task": "JDDPOTrainer, UPGrad, the pair losses hand-routed as jd_objectives='per_task'",
    },
}
#: What ``--quick`` sets (unless the flag is given).
QUICK_SETTINGS: dict[str, Any] = {
    "layers": 1,
    "hidden": 32,
    "heads": 2,
    "intermediate": 64,
    "vocab": 200,
    "seq": 16,
    "sft_batch": 4,
    "dpo_batches": [2, 4],
    "warmup": 1,
    "steps": 2,
}


# ----------------------------------------------------------------------------------- set-up
def words(vocab: int) -> list[str]:
    """The vocabulary: ``vocab − 5`` words (the word tokenizer adds its 5 special tokens)."""
    return [f"w{index}" for index in range(max(1, vocab - 5))]


def random_text(generator: torch.Generator, vocabulary: list[str], length: int) -> str:
    ids = torch.randint(0, len(vocabulary), (max(1, length),), generator=generator).tolist()
    return " ".join(vocabulary[index] for index in ids)


def build_tokenizer(options: argparse.Namespace) -> Any:
    from hf_jd.cli import word_tokenizer

    return word_tokenizer([words(options.vocab)], model_max_length=4 * options.seq)


def build_model(options: argparse.Namespace, tokenizer: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(options.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=options.hidden,
        num_hidden_layers=options.layers,
        num_attention_heads=options.heads,
        num_key_value_heads=options.heads,
        intermediate_size=options.intermediate,
        max_position_embeddings=max(512, 2 * options.seq),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    return LlamaForCausalLM(config)


def sft_dataset(options: argparse.Namespace) -> Any:
    from datasets import Dataset

    generator = torch.Generator().manual_seed(options.seed + 1)
    vocabulary = words(options.vocab)
    texts = [random_text(generator, vocabulary, options.seq - 1) for _ in range(options.sft_batch)]
    return Dataset.from_dict({"text": texts})


def dpo_dataset(options: argparse.Namespace, pairs: int) -> Any:
    from datasets import Dataset

    generator = torch.Generator().manual_seed(options.seed + 2)
    vocabulary = words(options.vocab)
    half = options.seq // 2
    columns: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(pairs):
        columns["prompt"].append(random_text(generator, vocabulary, half))
        columns["chosen"].append(" " + random_text(generator, vocabulary, half - 1))
        columns["rejected"].append(" " + random_text(generator, vocabulary, half - 1))
    return Dataset.from_dict(columns)


def common_arguments(output_dir: str, batch: int, options: argparse.Namespace) -> dict[str, Any]:
    values = timed_trainer_arguments(output_dir, batch, options.warmup + options.steps, use_cpu=True, seed=0)
    values.update(
        bf16=False,
        activation_checkpointing=False,
        dataloader_pin_memory=False,
        max_length=options.seq,
        dataset_num_proc=None,
    )
    return values


def per_task_dpo_trainer_class() -> type:
    """``JDDPOTrainer`` whose ``B`` pair losses take the engines' per-task route (no row map)."""
    from hf_jd.trl import JDDPOTrainer
    from hf_jd.trl._config import instance_attribute

    class PerTaskPairs(JDDPOTrainer):
        def compute_losses(self, model: Any, inputs: dict[str, Any]) -> Any:
            return super().compute_losses(model, inputs).losses

        def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
            with instance_attribute(self.args, "jd_objectives", "per_task"):
                return super().training_step(model, inputs, num_items_in_batch)

    return PerTaskPairs


def make_trainer(
    kind: str, variant: str, model: torch.nn.Module, options: argparse.Namespace, batch: int, output_dir: str
) -> Any:
    """The trainer of ``variant`` (``stock``, ``jd``, ``jd_per_task``) on the ``kind`` (``sft``/``dpo``) data."""
    tokenizer = build_tokenizer(options)
    common = common_arguments(output_dir, batch, options)
    jd = {"aggregator": "upgrad", "jd_engine": "auto"}
    if kind == "sft":
        from trl import SFTConfig, SFTTrainer

        from hf_jd.trl import JDSFTConfig, JDSFTTrainer

        data = sft_dataset(options)
        if variant == STOCK:
            return SFTTrainer(
                model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer
            )
        return JDSFTTrainer(
            model=model, args=JDSFTConfig(**common, **jd), train_dataset=data, processing_class=tokenizer
        )
    from trl import DPOConfig, DPOTrainer

    from hf_jd.trl import JDDPOConfig, JDDPOTrainer

    data = dpo_dataset(options, batch)
    reference = copy.deepcopy(model)
    common["max_length"] = 2 * options.seq  # prompt + completion; the rows are --seq tokens long anyway
    if variant == STOCK:
        trainer_class: Any = DPOTrainer
        args: Any = DPOConfig(**common)
    else:
        trainer_class = JDDPOTrainer if variant == "jd" else per_task_dpo_trainer_class()
        args = JDDPOConfig(**common, **jd)
    return trainer_class(
        model=model, ref_model=reference, args=args, train_dataset=data, processing_class=tokenizer
    )


# ----------------------------------------------------------------------------------- timing
def measure(kind: str, batch: int, variants: list[str], options: argparse.Namespace) -> dict[str, Any]:
    """Every variant of one workload, interleaved step by step; their step times and engines."""
    from transformers import PrinterCallback

    tokenizer = build_tokenizer(options)
    initial = build_model(options, tokenizer).state_dict()
    turns = Turns(list(variants))
    recorders = {name: StepRecorder(name, torch.device("cpu"), turns) for name in variants}
    results: dict[str, dict[str, Any]] = {name: {} for name in variants}

    def run(name: str) -> None:
        turns.wait(name)
        try:
            with tempfile.TemporaryDirectory() as output_dir:
                model = build_model(options, tokenizer)
                model.load_state_dict(initial)
                trainer = make_trainer(kind, name, model, options, batch, output_dir)
                trainer.remove_callback(PrinterCallback)
                trainer.add_callback(_recorder_callback(recorders[name]))
                trainer.train()
                engine = getattr(trainer, "jd_engine", None)
                results[name]["engine"] = engine.name if engine is not None else None
        except Exception as error:  # reported in the table; the other variants go on
            results[name]["error"] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        finally:
            turns.finish(name)

    threads = [threading.Thread(target=run, args=(name,), name=f"bench-{name}") for name in variants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name in variants:
        times = recorders[name].times
        results[name]["times"] = times
        timed = times[options.warmup :]
        results[name]["median_s"] = statistics.median(timed) if timed else None
    stock = results[STOCK]
    for name in variants:
        entry = results[name]
        if name == STOCK or entry.get("median_s") is None or stock.get("median_s") is None:
            continue
        entry["ratio"] = entry["median_s"] / stock["median_s"]
        pairs = list(zip(entry["times"], stock["times"]))[options.warmup :]
        entry["paired_ratio"] = statistics.median(mine / theirs for mine, theirs in pairs) if pairs else None
        entry["paired_rounds"] = len(pairs)
    return {"kind": kind, "batch": batch, "variants": results}


# ----------------------------------------------------------------------------------- report
def load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except OSError:
        return None


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"Provenance: {report['provenance']}; {report['machine']}.",
        f"Llama {settings['layers']} layers × hidden {settings['hidden']}, {settings['heads']} heads, intermediate "
        f"{settings['intermediate']}, vocab {settings['vocab']}; rows of {settings['seq']} tokens; UPGrad, "
        f"jd_engine=auto; median of {settings['steps']} steps after {settings['warmup']} warm-up, variants "
        f"interleaved; load average {report['load_before']} before, {report['load_after']} after.",
        "",
        "| trainer | B | variant | engine served | stock step (s) | JD step (s) | JD ÷ stock | paired (rounds) |",
        "|---|---:|---|---|---:|---:|---:|---:|",
    ]
    for workload in report["workloads"]:
        stock = workload["variants"][STOCK]
        for name, entry in workload["variants"].items():
            if name == STOCK:
                continue
            label = "pairs" if workload["kind"] == "dpo" else "sequences"
            batch = f"{workload['batch']} {label}"
            if "error" in entry or "error" in stock:
                why = entry.get("error") or f"stock: {stock.get('error')}"
                lines.append(
                    f"| {workload['kind'].upper()} | {batch} | {name} | failed: {why[:120]} | | | | |"
                )
                continue
            paired = entry.get("paired_ratio")
            lines.append(
                f"| {workload['kind'].upper()} | {batch} | {name} | {entry.get('engine')} | {stock['median_s']:.3f} | "
                f"{entry['median_s']:.3f} | {entry['ratio']:.2f}× | "
                + (f"{paired:.2f}× ({entry['paired_rounds']})" if paired is not None else "")
                + " |"
            )
    return "\n".join(lines)


def parse_options(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with :data:`QUICK_SETTINGS` applied under ``--quick`` (flags given keep their value)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trainers", nargs="+", default=["sft", "dpo"], choices=["sft", "dpo"])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument(
        "--seq", type=int, default=128, help="tokens per row (SFT sequence, DPO prompt + completion)"
    )
    parser.add_argument("--sft-batch", type=int, default=8)
    parser.add_argument(
        "--dpo-batches", type=int, nargs="+", default=[4, 8, 16], help="preference pairs per batch"
    )
    parser.add_argument("--no-per-task", action="store_true", help="skip DPO's hand-routed per-task variant")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--quick", action="store_true", help="tiny model and batches, 1 warm-up + 2 timed steps"
    )
    options = parser.parse_args(argv)
    if options.quick:
        given = {arg.split("=")[0].lstrip("-").replace("-", "_") for arg in (argv or sys.argv[1:])}
        for key, value in QUICK_SETTINGS.items():
            if key not in given:
                setattr(options, key, value)
    return options


def main(argv: list[str] | None = None) -> dict[str, Any]:
    options = parse_options(argv)
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    started, load_before = time.time(), load_average()
    plan: list[tuple[str, int, list[str]]] = []
    if "sft" in options.trainers:
        plan.append(("sft", options.sft_batch, [STOCK, "jd"]))
    if "dpo" in options.trainers:
        variants = [STOCK, "jd"] + ([] if options.no_per_task else ["jd_per_task"])
        plan.extend(("dpo", pairs, variants) for pairs in options.dpo_batches)
    workloads = []
    for kind, batch, names in plan:
        workloads.append(measure(kind, batch, names, options))
        summary = {name: entry.get("median_s") for name, entry in workloads[-1]["variants"].items()}
        print(f"{kind} B={batch}: median step (s) {summary}", flush=True)  # progress of a long run
    versions = {name: importlib.metadata.version(name) for name in ("torch", "transformers", "trl")}
    report = {
        "provenance": source_fingerprint(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads, "
        + ", ".join(f"{name} {version}" for name, version in versions.items()),
        "load_before": load_before,
        "load_after": load_average(),
        "wall_s": round(time.time() - started, 1),
        "settings": {key: value for key, value in vars(options).items() if key != "out_dir"},
        "variants": VARIANTS,
        "workloads": workloads,
    }
    write_report(options.out_dir, "bench_trl", report, markdown)
    return report


if __name__ == "__main__":
    main()
