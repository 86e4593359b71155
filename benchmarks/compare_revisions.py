"""``bench_step.py`` on two revisions of hf_jd, alternated in one run: did a change move the step time?

A refactor promises "step times within noise"; two ``bench_step.py`` runs made at different times cannot
show it (the load of the machine moves more than the change). This script checks out ``--base`` (a git
revision) into a temporary worktree and runs ``bench_step.py`` of each tree in turn, ``--rounds`` times,
alternating which tree goes first. Each run imports the hf_jd of its own tree (``bench_step.py`` puts its
repository first on ``sys.path``) and reports, per model and variant, the ratio of the median step time to
the stock ``Trainer`` step measured in the same process (interleaved step by step). The table gives, per
tree, the median of those ratios over the rounds and every round's value, and the change
``current / base`` of the medians.

Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/compare_revisions.py --base 11bd2d7 --rounds 3 \\
        -- --models bert llama --variants jd_gramian --steps 6 --warmup 2 --no-memory

Everything after ``--`` goes to ``bench_step.py``. Writes ``<out-dir>/compare_revisions.json`` and
``.md``. No assertion on timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _provenance import write_report  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
Ratios = dict[str, dict[str, float]]  # model -> variant -> step time / stock step time


def run_bench_step(tree: Path, bench_args: list[str], out_dir: Path) -> Ratios:
    """One ``bench_step.py`` run of ``tree``; the time ratio of every variant that ran."""
    command = [
        sys.executable,
        str(tree / "benchmarks" / "bench_step.py"),
        *bench_args,
        "--out-dir",
        str(out_dir),
    ]
    subprocess.run(command, cwd=tree, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out_dir / "bench_step.json").read_text())
    ratios: Ratios = {}
    for model in report["models"]:
        for variant, entry in model["variants"].items():
            ratio = entry.get("paired_time_ratio", entry.get("time_ratio"))
            if ratio is not None and variant != "trainer_mean":
                ratios.setdefault(model["model"], {})[variant] = float(ratio)
    return ratios


def summarise(rounds: dict[str, list[Ratios]]) -> list[dict[str, Any]]:
    """Per model and variant: every round's ratio of each tree, their medians and current ÷ base."""
    rows = []
    base_rounds, current_rounds = rounds["base"], rounds["current"]
    for model, variants in current_rounds[0].items():
        for variant in variants:
            base = [r[model][variant] for r in base_rounds if variant in r.get(model, {})]
            current = [r[model][variant] for r in current_rounds if variant in r.get(model, {})]
            if not base or not current:
                continue
            base_median, current_median = statistics.median(base), statistics.median(current)
            rows.append(
                {
                    "model": model,
                    "variant": variant,
                    "base": base,
                    "current": current,
                    "base_median": base_median,
                    "current_median": current_median,
                    "change": current_median / base_median,
                }
            )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"`bench_step.py {' '.join(report['bench_args'])}`, {report['rounds']} rounds alternated; base "
        f"{report['base']}, current {report['current']}. Step time ÷ stock Trainer step (paired, same process).",
        "",
        "| model | variant | base (median) | current (median) | current ÷ base | base rounds | current rounds |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['variant']} | {row['base_median']:.3f} | {row['current_median']:.3f} | "
            f"{row['change']:.3f} | {', '.join(f'{r:.3f}' for r in row['base'])} | "
            f"{', '.join(f'{r:.3f}' for r in row['current'])} |"
        )
    return "\n".join(lines)


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO_ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    own, bench_args = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="git revision to compare the working tree against")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each tree, alternated")
    parser.add_argument("--out-dir", default=str(REPO_ROOT / "benchmarks" / "results"))
    options = parser.parse_args(own)
    if options.rounds < 1:
        parser.error("--rounds must be at least 1")
    base_commit = git("rev-parse", "--short", options.base)
    current = git("rev-parse", "--short", "HEAD") + (
        "+changes" if git("status", "--porcelain", "hf_jd") else ""
    )
    with tempfile.TemporaryDirectory(prefix="hf_jd_base_") as scratch:
        worktree = Path(scratch) / "base"
        git("worktree", "add", "--detach", str(worktree), base_commit)
        try:
            trees = {"base": worktree, "current": REPO_ROOT}
            rounds: dict[str, list[Ratios]] = {"base": [], "current": []}
            for index in range(options.rounds):
                order = ["base", "current"] if index % 2 == 0 else ["current", "base"]
                for name in order:
                    print(f"round {index + 1}/{options.rounds}: {name} ...", flush=True)
                    out_dir = Path(scratch) / f"{name}_{index}"
                    rounds[name].append(run_bench_step(trees[name], bench_args, out_dir))
        finally:
            git("worktree", "remove", "--force", str(worktree))
    report = {
        "base": base_commit,
        "current": current,
        "rounds": options.rounds,
        "bench_args": bench_args,
        "rows": summarise(rounds),
    }
    write_report(options.out_dir, "compare_revisions", report, markdown)


if __name__ == "__main__":
    main()
