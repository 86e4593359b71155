#!/usr/bin/env bash
# One short script for a machine with an NVIDIA GPU (under ~8 minutes): installs hf_jd next to the
# machine's CUDA build of torch, runs the CUDA-only tests and the CUDA benchmarks, and writes one
# Markdown report to $OUT/gpu_check.md (plus the raw logs). Usage: OUT=/some/dir bash benchmarks/gpu_check.sh
set -uo pipefail
OUT="${OUT:-outputs/gpu_check}"
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.md"
PY="${PYTHON:-python3}"

# Keep the machine's CUDA torch; install the rest (no network beyond package registries is assumed).
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA-enabled torch in $PY" | tee "$REPORT"; exit 1
fi
"$PY" -m pip install -q -e ".[test]" 2>&1 | tail -3 > "$OUT/install.log"

{
  echo "# hf_jd GPU check"
  echo
  "$PY" -m hf_jd env | sed 's/^/    /'
  echo
} > "$REPORT"

run() {  # run NAME TIMEOUT CMD...: append a status line and keep the log
  local name="$1" limit="$2"; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED (rc $rc)") | $((SECONDS - start)) s |" >> "$REPORT"
}

echo "| check | result | time |" >> "$REPORT"
echo "|---|---|---|" >> "$REPORT"
export HF_HUB_OFFLINE=1
run cuda_tests 240 "$PY" -m pytest -q tests/gpu tests/trainer/test_mixed_precision.py tests/aggregation/test_dual_cone_solvers.py
run step_bench_bf16 240 "$PY" benchmarks/bench_step.py --device cuda --bf16 --models bert gpt2 llama --batch 32 --seq 512 \
  --hidden 768 --layers 12 --heads 12 --intermediate 3072 --steps 5 --warmup 2 --no-memory --out-dir "$OUT" \
  --variants trainer_mean jd_gramian torchjd_autogram
run dual_cone_bench 120 "$PY" benchmarks/bench_dual_cone.py --device cuda --sizes 256 1024 --repeats 5 --out-dir "$OUT"

{
  echo
  echo "## Step benchmark (CUDA)"
  echo
  tail -n 30 "$OUT/step_bench_bf16.log"
  echo
  echo "## Dual-cone solver (CUDA)"
  echo
  tail -n 20 "$OUT/dual_cone_bench.log"
  echo
  echo "## CUDA tests"
  echo
  tail -n 15 "$OUT/cuda_tests.log"
} >> "$REPORT"
cat "$REPORT"
