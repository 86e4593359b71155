#!/usr/bin/env bash
# One short script for a machine with an NVIDIA GPU and no package registry (under ~8 minutes in all):
# installs the wheels of .whl/ (made beforehand by benchmarks/gpu_wheels.sh on a machine with the registry)
# next to the machine's CUDA torch, puts hf_jd on PYTHONPATH (not pip: its torch>=2.13 is not enforced, the
# machine's torch is used as it is), checks the requirements and imports, then runs the CUDA-only tests, a
# TRL and a DeepSpeed (CUDA, one process) smoke, the CUDA step and dual-cone benchmarks and the per-task
# benchmark, each under `timeout` and within one time budget. Writes one Markdown report to $OUT/gpu_check.md
# (the raw logs and the benchmarks' own files go to $OUT/logs.tar.gz).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh             # the check (on the GPU machine, .whl carried)
#   bash benchmarks/gpu_check.sh --install-only            # install, requirements and imports only
#
# Settings (environment): PYTHON (python3), WHEEL_DIR (.whl), SITE (/tmp/site: where the wheels go),
# BUDGET_S (450: the whole script's seconds; a step that would pass it is cut short or skipped).
# benchmarks/gpu_rehearse.sh runs the --install-only part here, with --no-index, before a lease.
set -uo pipefail
START=$SECONDS
cd "$(dirname "$0")/.." || exit 2
MODE="${1:-check}"
OUT="${OUT:-outputs/gpu_check}"
PY="${PYTHON:-python3}"
WHEELS="${WHEEL_DIR:-.whl}"
SITE="${SITE:-/tmp/site}"
BUDGET="${BUDGET_S:-450}"
LOGS="$OUT/logs"
REPORT="$OUT/gpu_check.md"
WORK="$(mktemp -d /tmp/gpu_check.XXXXXX)"  # the benchmarks' files and the DeepSpeed ranks' results
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$LOGS"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PIP_DISABLE_PIP_VERSION_CHECK=1 PY WORK

# 1. The carried wheels, with no index, then hf_jd from the checkout.
if ! compgen -G "$WHEELS/*.whl" > /dev/null; then
  echo "error: no wheels in $WHEELS/: run 'bash benchmarks/gpu_wheels.sh' where the package registry is" \
    "reachable, and carry $WHEELS to this machine" | tee "$REPORT" >&2
  exit 2
fi
if ! timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target "$SITE" "$WHEELS"/*.whl > "$LOGS/setup.log" 2>&1; then
  { echo "error: installing $WHEELS/*.whl into $SITE failed:"; tail -n 20 "$LOGS/setup.log"; } | tee "$REPORT" >&2
  exit 1
fi
export PYTHONPATH="$SITE:$PWD"

# 2. Every requirement of hf_jd (with its test, trl, deepspeed and reference extras) and of each carried
# wheel, against what Python now imports first; then the imports themselves.
"$PY" - "$WHEELS" "$MODE" >> "$LOGS/setup.log" 2>&1 <<'EOF'
import importlib, importlib.metadata as md, pathlib, re, sys, tomllib
from packaging.requirements import Requirement

wheels, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
carried = {norm(w.name.split("-")[0]): w.name.split("-")[1] for w in wheels.glob("*.whl")}
# Known and accepted: hf_jd runs against the machine's torch; the linters are not carried.
accepted = {"torch": "the machine's torch, used as it is", "ruff": "linter, not carried", "mypy": "linter, not carried"}

def found(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None

problems = []
for name, version in sorted(carried.items()):
    if found(name) != version:
        problems.append(f"{name}: carried {version}, but {found(name)} is the one on sys.path first")
project = tomllib.loads(pathlib.Path("pyproject.toml").read_text())["project"]
requirements = [("hf_jd", text) for text in project["dependencies"]]
for extra in ("test", "trl", "deepspeed", "reference"):
    requirements += [(f"hf_jd[{extra}]", text) for text in project["optional-dependencies"][extra]]
for name in sorted(carried):
    requirements += [(name, text) for text in md.distribution(name).requires or []]
for who, text in requirements:
    requirement = Requirement(text)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue
    got = found(requirement.name)
    if got is not None and requirement.specifier.contains(got, prereleases=True):
        continue
    line = f"{who} needs {requirement}: {'MISSING' if got is None else got + ' found'}"
    note = accepted.get(norm(requirement.name))
    problems.append(f"{line} (accepted: {note})" if note else line)
print("requirements:", "all met" if not problems else f"{len(problems)} unmet or shadowed")
for problem in problems:
    print("  -", problem)

modules = ["hf_jd", "transformers", "datasets", "accelerate", "quadprog", "trl", "hf_jd.trl", "deepspeed", "peft",
           "torchjd", "pytest", "sklearn", "matplotlib"]
essential = {"hf_jd", "transformers", "datasets", "accelerate", "quadprog"}
failed = []
for module in modules:
    try:
        importlib.import_module(module)
    except Exception as error:  # noqa: BLE001 - any import error is the finding
        failed.append(module)
        print(f"import {module}: FAILED: {type(error).__name__}: {error}")
for name in ["torch", "transformers", "huggingface-hub", "tokenizers", "accelerate", "datasets", "trl", "deepspeed",
             "peft", "pydantic", "numpy", "pyarrow", "fsspec", "torchjd"]:
    try:
        dist = md.distribution(name)
        print(f"  {name:16} {dist.version:14} {dist.locate_file('')}")
    except md.PackageNotFoundError:
        print(f"  {name:16} not installed")
print("imports:", "all ok" if not failed else "FAILED: " + ", ".join(failed))
sys.exit(1 if (failed if mode == "--install-only" else essential & set(failed)) else 0)
EOF
setup_rc=$?
summary="$(grep -E '^(requirements|imports):|^  - |^import ' "$LOGS/setup.log")"
if [ "$MODE" = --install-only ]; then
  cat "$LOGS/setup.log"
  exit $setup_rc
fi
if [ $setup_rc -ne 0 ]; then
  { echo "# hf_jd GPU check: setup failed"; echo; echo '```'; cat "$LOGS/setup.log"; echo '```'; } | tee "$REPORT"
  exit 1
fi
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA-enabled torch in $PY" | tee "$REPORT"; exit 1
fi

{
  echo "# hf_jd GPU check"
  echo
  "$PY" -m hf_jd env | sed 's/^/    /'
  echo
  echo "Wheels from $WHEELS/ ($(find "$WHEELS" -maxdepth 1 -name '*.whl' | wc -l)) in $SITE, hf_jd from the checkout (PYTHONPATH)."
  echo
  echo '```'
  echo "$summary"
  echo '```'
  echo
  echo "| check | result | time |"
  echo "|---|---|---|"
} > "$REPORT"
DETAILS="$WORK/details.md"
: > "$DETAILS"

FAILED=0
row() {  # row NAME RC SECONDS LIMIT: one line of the report's table
  local status
  [ "$2" = 0 ] || FAILED=$((FAILED + 1))
  case "$2" in
    0) status=ok ;;
    124|137) status="TIMED OUT (limit $4 s)" ;;
    skipped) status="skipped: the ${BUDGET} s budget was spent" ;;
    *) status="FAILED (rc $2)" ;;
  esac
  echo "| $1 | $status | $3 s |" >> "$REPORT"
}

limit_for() {  # limit_for WANTED: WANTED, cut to what is left of the budget (0: nothing left)
  local left=$((BUDGET - (SECONDS - START) - 5))
  if [ "$left" -lt 20 ]; then echo 0; elif [ "$1" -gt "$left" ]; then echo "$left"; else echo "$1"; fi
}

run() {  # run NAME TIMEOUT CMD...: one step, its log, its row and the end of its log in the details
  local name="$1" limit
  limit="$(limit_for "$2")"; shift 2
  if [ "$limit" -eq 0 ]; then row "$name" skipped 0 0; return; fi
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  row "$name" "$rc" $((SECONDS - start)) "$limit"
  { echo; echo "## $name (last lines of its log)"; echo; echo '```'; tail -n 25 "$LOGS/$name.log"; echo '```'; } >> "$DETAILS"
}

# The per-task benchmark: on CUDA where it has a --device flag (in turn, after the dual-cone benchmark);
# without one (an older checkout), on the CPU with one thread, in the background while the GPU steps run.
per_task=("$PY" benchmarks/bench_per_task.py --tasks 2 8 --steps 5)
if grep -q -- '"--device"' benchmarks/bench_per_task.py; then
  per_task+=(--device cuda); per_task_bg=0
else
  per_task_bg=1
  per_task_limit="$(limit_for 400)"
  per_task_start=$SECONDS
  OMP_NUM_THREADS=1 timeout -k 10 "$per_task_limit" "${per_task[@]}" > "$LOGS/per_task_bench.log" 2>&1 &
  per_task_pid=$!
fi

run cuda_tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/trainer/test_mixed_precision.py \
  tests/aggregation/test_dual_cone_solvers.py
run step_bench_bf16 150 "$PY" benchmarks/bench_step.py --device cuda --bf16 --models bert gpt2 llama --batch 32 \
  --seq 512 --hidden 768 --layers 12 --heads 12 --intermediate 3072 --steps 5 --warmup 2 --no-memory \
  --out-dir "$WORK" --variants trainer_mean jd_gramian torchjd_autogram
run dual_cone_bench 60 "$PY" benchmarks/bench_dual_cone.py --device cuda --sizes 256 1024 --repeats 5 --out-dir "$WORK"
if [ "$per_task_bg" -eq 0 ]; then
  run per_task_bench 150 "${per_task[@]}"
fi
# TRL: JDSFTTrainer's UPGrad step against its per-sequence oracle (both engines, text and completion data).
run trl_smoke 90 "$PY" -m pytest -q -p no:cacheprovider tests/trl_trainers/test_sft.py -k upgrad
# DeepSpeed on CUDA: one process (NCCL), JDTrainer with UPGrad under ZeRO-2 and ZeRO-3, two steps each (the
# worker of tests/distributed/test_deepspeed.py, which runs it on two CPU processes there).
deepspeed_smoke() {
  local stage
  for stage in 2 3; do
    mkdir -p "$WORK/ds$stage"
    "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 tests/distributed/_deepspeed_worker.py \
      --out "$WORK/ds$stage" --stage "$stage" --trainer jd --use_cpu false --steps 2 || return 1
    "$PY" - "$WORK/ds$stage/rank0.pt" "$stage" <<'PYEOF' || return 1
import sys, torch
result = torch.load(sys.argv[1], weights_only=False)
assert "refusal" not in result, result.get("refusal")
print(f"ZeRO-{sys.argv[2]} on CUDA: backend {result['backend']}, engine {result['engine']}, {result['global_step']} steps")
assert result["backend"] == "deepspeed" and result["global_step"] == 2, result
PYEOF
  done
}
run deepspeed_smoke 120 bash -c "$(declare -f deepspeed_smoke); deepspeed_smoke"
if [ "$per_task_bg" -eq 1 ]; then
  wait "$per_task_pid"
  rc=$?
  row "per_task_bench (CPU, one thread, beside the GPU steps)" "$rc" $((SECONDS - per_task_start)) "$per_task_limit"
  { echo; echo "## per_task_bench (CPU: bench_per_task.py has no --device flag yet)"; echo
    echo '```'; tail -n 25 "$LOGS/per_task_bench.log"; echo '```'; } >> "$DETAILS"
fi

{
  echo
  echo "Total: $((SECONDS - START)) s (budget $BUDGET s); $FAILED of the checks above did not pass."
  echo
  echo "## Step benchmark (CUDA, bf16)"
  echo
  if [ -s "$WORK/bench_step.md" ]; then cat "$WORK/bench_step.md"; else echo '```'; tail -n 30 "$LOGS/step_bench_bf16.log"; echo '```'; fi
  echo
  echo "## Dual-cone solver (CUDA)"
  echo
  if [ -s "$WORK/bench_dual_cone.md" ]; then cat "$WORK/bench_dual_cone.md"; else echo '```'; tail -n 20 "$LOGS/dual_cone_bench.log"; echo '```'; fi
  cat "$DETAILS"
} >> "$REPORT"
# At most 8 files come back from $OUT: the report, and the logs with the benchmarks' own files in one archive.
cp "$WORK"/bench_*.json "$WORK"/bench_*.md "$LOGS"/ 2> /dev/null
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
cat "$REPORT"
[ "$FAILED" -eq 0 ]
