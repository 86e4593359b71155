"""The first JD step (with the exactness self-check) against the steady JD step and the stock Trainer step.

``JDTrainer``'s first step runs the Gramian engine's exactness self-check (``hf_jd/gramian/_verify.py``:
a ``3 × 3`` block of the Gramian against plain autograd); later steps do not. This script measures, per
optimizer step, the wall time and the peak memory of

* ``trainer_mean``  stock :class:`transformers.Trainer` on the mean loss (the reference of every ratio);
* ``jd_auto``       :class:`hf_jd.JDTrainer`, ``jd_engine="auto"``, UPGrad, one loss per example,

on a ``GPT2LMHeadModel`` built from a config (random weights; default GPT-2 medium: 24 layers, hidden
1024, 16 heads, vocabulary 50257, 354.8 M parameters) and one fixed batch of random token ids (labels =
input ids; default 4 × 128), the same settings as ``bench_step.py`` (SGD, clipping at 1.0, nothing
logged or saved; :mod:`_trainer_settings`).

Each variant runs ``--steps`` optimizer steps in a fresh process of this script (``--single-variant``),
which before every step collects garbage, returns the allocator's free memory to the system
(``malloc_trim``, glibc) and resets the kernel's peak-RSS counter; the step's peak is then the peak RSS
during the step minus the RSS right after the model and the batch were built ("above the model", as in
``bench_step.py``, whose machinery this reuses). The measuring processes run with a fixed glibc mmap
threshold (``--mmap-threshold``, 128 KiB by default), which turns off glibc's dynamic threshold: blocks
above it are unmapped as soon as they are freed, so the RSS follows the live tensors rather than what
the allocator keeps (with the default dynamic threshold, the peak of the same phase of the first
step differed by 550 MiB between two runs on GPT-2 124 M). Reported per variant: step 1 (first step)
and the median of steps 2 … ``--steps`` (steady state), each as a ratio to the stock Trainer's steady
step, in wall time and in CPU time of the process. CPU only (on CUDA, ``bench_step.py`` reads the
allocator's peaks directly).

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_first_step.py            # GPT-2 medium, heavy
    .venv/bin/python benchmarks/bench_first_step.py --layers 12 --hidden 768 --heads 12   # GPT-2 small
    .venv/bin/python benchmarks/bench_first_step.py --quick                       # smoke run

Writes ``<out-dir>/bench_first_step.json`` and ``<out-dir>/bench_first_step.md``. No assertion on timings.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import source_fingerprint, write_report  # noqa: E402
from _trainer_settings import timed_trainer_arguments  # noqa: E402
from bench_step import (  # noqa: E402
    StepRecorder,
    Workload,
    _FixedBatch,
    _import_variant_modules,
    _quiet,
    _recorder_callback,
    current_rss_bytes,
    make_workload,
    peak_rss_bytes,
    reset_peak_rss,
    run_trainer_variant,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = "trainer_mean"
VARIANTS = {
    "trainer_mean": "stock Trainer, mean loss",
    "jd_auto": "JDTrainer, jd_engine=auto, UPGrad",
}
RESULT_MARKER = "BENCH_FIRST_STEP_RESULT "
QUICK_SETTINGS: dict[str, int] = {
    "batch": 4,
    "seq": 32,
    "layers": 2,
    "hidden": 64,
    "heads": 2,
    "vocab": 1000,
    "steps": 3,
}


def _malloc_trim() -> None:
    """Give the C allocator's free memory back to the system (glibc ``malloc_trim``; no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    trim = getattr(ctypes.CDLL(name), "malloc_trim", None)
    if trim is not None:
        trim(0)


class StepPeaks(StepRecorder):
    """Each step's wall time, CPU time and peak RSS above ``baseline`` (the counter is reset before every step)."""

    def __init__(self, name: str, baseline: int) -> None:
        super().__init__(name, torch.device("cpu"))
        self.baseline = baseline
        self.peaks: list[int] = []
        self.cpu_times: list[float] = []
        self.reset_ok = True
        self._cpu_start = 0.0

    def begin(self) -> None:
        gc.collect()
        _malloc_trim()
        self.reset_ok = reset_peak_rss() and self.reset_ok
        self._cpu_start = time.process_time()
        super().begin()

    def end(self) -> None:
        super().end()
        self.cpu_times.append(time.process_time() - self._cpu_start)
        self.peaks.append(max(0, peak_rss_bytes() - self.baseline))


def run_jd_auto(workload: Workload, model: torch.nn.Module, steps: int, recorder: StepRecorder) -> str:
    """``steps`` optimizer steps of ``JDTrainer(jd_engine="auto")``; returns the engine it settled on."""
    from transformers import PrinterCallback

    from hf_jd import JDTrainer, JDTrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:
        common = timed_trainer_arguments(
            output_dir, workload.batch["labels"].shape[0], steps, use_cpu=True, seed=0
        )
        args = JDTrainingArguments(
            **common, aggregator="upgrad", jd_engine="auto", jd_loss_type=workload.loss_type
        )
        trainer = JDTrainer(
            model=model,
            args=args,
            train_dataset=_FixedBatch(workload.batch),
            callbacks=[_recorder_callback(recorder)],
        )
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        return trainer.jd_engine.name if trainer.jd_engine is not None else "none"


def single_variant(options: argparse.Namespace) -> dict[str, Any]:
    """Run one variant in this (fresh) process: per-step times and peaks above the model+batch RSS."""
    variant = options.single_variant
    _import_variant_modules("jd_gramian" if variant == "jd_auto" else variant)
    import hf_jd

    workload = make_workload("gpt2", options, torch.device("cpu"))
    model = workload.build()
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    recorder = StepPeaks(variant, current_rss_bytes())
    engine = None
    if variant == "jd_auto":
        engine = run_jd_auto(workload, model, options.steps, recorder)
    else:
        run_trainer_variant(variant, workload, model, options.steps, recorder)
    return {
        "hf_jd_file": hf_jd.__file__,
        "trainable_parameters": n_params,
        "engine": engine,
        "times_s": recorder.times,
        "cpu_times_s": recorder.cpu_times,
        "peak_bytes": recorder.peaks,
        "peak_counter_reset": recorder.reset_ok,
    }


def measure(variant: str, options: argparse.Namespace) -> dict[str, Any]:
    """``--single-variant variant`` in a fresh interpreter; its result line, or ``status: failed``."""
    command = [sys.executable, os.path.abspath(__file__), "--single-variant", variant]
    for flag in ("batch", "seq", "layers", "hidden", "heads", "intermediate", "vocab", "seed", "steps"):
        command += [f"--{flag}", str(getattr(options, flag))]
    env = dict(os.environ)
    if options.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(options.mmap_threshold)
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    for line in reversed(completed.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return {"status": "ok", **json.loads(line[len(RESULT_MARKER) :])}
    tail = (completed.stderr or completed.stdout).strip().splitlines()[-5:]
    return {"status": "failed", "error": " | ".join(tail) or f"exit code {completed.returncode}"}


def summarise(results: dict[str, dict[str, Any]]) -> None:
    """Add first-step and steady (median of steps 2…) values, and their ratios to the stock steady step."""
    for entry in results.values():
        if entry["status"] != "ok":
            continue
        for key in ("times_s", "cpu_times_s", "peak_bytes"):
            values = entry[key]
            entry[f"first_{key}"] = values[0]
            entry[f"steady_{key}"] = statistics.median(values[1:]) if len(values) > 1 else None
    ref = results.get(REFERENCE, {})
    if ref.get("status") != "ok" or ref.get("steady_times_s") is None:
        return
    for entry in results.values():
        if entry["status"] != "ok":
            continue
        for key in ("times_s", "cpu_times_s", "peak_bytes"):
            base = ref[f"steady_{key}"]
            for when in ("first", "steady"):
                value = entry[f"{when}_{key}"]
                entry[f"{when}_{key}_ratio"] = value / base if value is not None and base else None


def _ratio(value: float | None) -> str:
    return f"{value:.2f}×" if value is not None else "n/a"


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        f"Machine: {report['machine']}; torch {report['torch']}, transformers {report['transformers']}; "
        f"hf_jd {report['hf_jd_source']} ({report['hf_jd_file']}).",
        f"GPT2LMHeadModel, {settings['layers']} layers, hidden {settings['hidden']}, {settings['heads']} heads, "
        f"vocab {settings['vocab']} ({report['trainable_parameters'] / 1e6:.1f} M parameters); batch "
        f"{settings['batch']} × {settings['seq']}; {settings['steps']} steps per variant, each variant in a "
        "fresh process. Peak: RSS above the RSS after model+batch creation, counter reset before every "
        "step (after gc and malloc_trim); "
        + (
            f"MALLOC_MMAP_THRESHOLD_={settings['mmap_threshold']}"
            if settings["mmap_threshold"]
            else "glibc's default allocator settings"
        )
        + ". Steady: median of steps 2 … N. Ratios: to the stock Trainer's steady step.",
        "",
        "| variant | first-step peak (MiB) | × stock | steady peak (MiB) | × stock | first-step time (s) | × stock "
        "| steady time (s) | × stock | CPU time: first / steady × stock |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, entry in report["variants"].items():
        if entry["status"] != "ok":
            lines.append(f"| {name} | {entry['status']}: {entry['error']} |" + " |" * 9)
            continue
        label = name + (f" ({entry['engine']} engine)" if entry.get("engine") else "")
        steady_peak = entry["steady_peak_bytes"]
        steady_time = entry["steady_times_s"]
        lines.append(
            f"| {label} | {entry['first_peak_bytes'] / 2**20:.0f} | {_ratio(entry.get('first_peak_bytes_ratio'))} "
            f"| {steady_peak / 2**20 if steady_peak is not None else float('nan'):.0f} "
            f"| {_ratio(entry.get('steady_peak_bytes_ratio'))} "
            f"| {entry['first_times_s']:.2f} | {_ratio(entry.get('first_times_s_ratio'))} "
            f"| {steady_time if steady_time is not None else float('nan'):.2f} "
            f"| {_ratio(entry.get('steady_times_s_ratio'))} "
            f"| {_ratio(entry.get('first_cpu_times_s_ratio'))} / {_ratio(entry.get('steady_cpu_times_s_ratio'))} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=None, help="default 4 × hidden (GPT-2's)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--steps", type=int, default=5, help="optimizer steps per variant (the first included)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=131072,
        help="MALLOC_MMAP_THRESHOLD_ of the measuring processes (glibc): a fixed threshold turns off glibc's "
        "dynamic one, so that freed blocks above it go back to the system at once and the RSS follows the live "
        "memory instead of what the allocator keeps; 0 leaves glibc's default",
    )
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 layers, hidden 64, vocab 1000, batch 4 × 32, 3 steps",
    )
    parser.add_argument("--single-variant", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.quick:
        parser.set_defaults(**QUICK_SETTINGS)
        options = parser.parse_args(argv)
    if options.intermediate is None:
        options.intermediate = 4 * options.hidden
    if options.steps < 2:
        parser.error("--steps must be at least 2 (the first step and one steady step)")
    options.bf16 = False
    options.variants = list(dict.fromkeys([REFERENCE, *options.variants]))
    return options


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    options = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    if options.single_variant is not None:
        with _quiet():
            result = single_variant(options)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return None
    results: dict[str, dict[str, Any]] = {}
    for variant in options.variants:
        print(f"{variant}: {options.steps} steps in a fresh process ...", flush=True)
        results[variant] = {"description": VARIANTS[variant], **measure(variant, options)}
    summarise(results)
    first_ok = next((entry for entry in results.values() if entry["status"] == "ok"), {})
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_jd_source": source_fingerprint(),
        "hf_jd_file": first_ok.get("hf_jd_file", "n/a"),
        "trainable_parameters": first_ok.get("trainable_parameters", 0),
        "settings": {
            key: getattr(options, key)
            for key in (
                "layers",
                "hidden",
                "heads",
                "intermediate",
                "vocab",
                "batch",
                "seq",
                "steps",
                "mmap_threshold",
                "quick",
            )
        },
        "variants": results,
    }
    write_report(options.out_dir, "bench_first_step", report, markdown)
    return report


if __name__ == "__main__":
    main()
