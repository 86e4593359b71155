#!/usr/bin/env bash
# The GPU check's install, rehearsed HERE before a lease: it shows a missing or clashing package at no
# device time. This machine has Python 3.11, not the GPU image's 3.12, so it downloads the SAME versions
# (benchmarks/gpu_wheels.txt, through benchmarks/gpu_wheels.sh) as cp311 wheels, builds a fresh venv that
# stands in for the GPU image (the image's packages from the registry: torch as the CPU build, transformers
# 5.17.0, huggingface-hub 1.33.0, accelerate 1.15.0, ...; then everything the image's package list does not
# name is removed again), installs the wheels as benchmarks/gpu_check.sh does on the GPU machine (its
# --install-only part: --no-index --no-deps --target, PYTHONPATH=site:checkout, no pip configuration), checks
# the requirements and imports, and runs one small test file that trains through JDTrainer.
#
#   bash benchmarks/gpu_rehearse.sh        # about 2 minutes once pip's cache is warm; exit 0 = ready
#
# Settings (environment): REHEARSE_DIR (/tmp/hf_jd_rehearse: wheels, site, report), VENV
# (/tmp/rehearse_venv), REHEARSE_TEST (tests/trainer/test_trainer_equivalence.py).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${REHEARSE_DIR:-/tmp/hf_jd_rehearse}"
VENV="${VENV:-/tmp/rehearse_venv}"
TEST="${REHEARSE_TEST:-tests/trainer/test_trainer_equivalence.py}"
BASE_PY="${PYTHON:-python3}"
PYVER="$("$BASE_PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"

# What the GPU image holds (python3 -m pip list there, as recorded for the 'cuda' image on 2026-11-17): the
# stand-in keeps only these names.
IMAGE_PACKAGES="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx humanize
huggingface-hub hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib
jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml
markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas
nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile
nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13
nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript opencv-python-headless optax
opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision
tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug
wheel wrapt xarray xxhash yarl zipp"
# The stand-in's packages, from the registry (that part stands for the image, so it may use an index). The
# versions the image is known to have where this Python has them (numpy 2.5.2 has no cp311 wheel); torch is the
# CPU build on this machine's disk (the registry's torch 2.11.0 is the CUDA build, with its nvidia-* packages).
IMAGE_SPECS=(torch==2.13.0+cpu transformers==5.17.0 huggingface-hub==1.33.0 accelerate==1.15.0 tokenizers==0.23.2
  safetensors==0.8.0 numpy peft pytest pytest-timeout scikit-learn matplotlib scipy pandas pyarrow fsspec xxhash
  pyyaml regex requests httpx jinja2 psutil py-cpuinfo msgpack ninja einops typer click hf-xet packaging filelock
  tqdm typing-extensions anyio idna h11)

echo "== 1. the wheels of benchmarks/gpu_wheels.txt for CPython $PYVER (the GPU machine gets cp312)"
rm -rf "$DIR"
mkdir -p "$DIR"
WHEEL_PY="$PYVER" WHEEL_DIR="$DIR/whl" PYTHON="$BASE_PY" bash benchmarks/gpu_wheels.sh | tail -n 1

echo "== 2. a fresh venv standing in for the GPU image: $VENV"
rm -rf "$VENV"
"$BASE_PY" -m venv "$VENV"
VPY="$VENV/bin/python"
"$VPY" -m pip install "${IMAGE_SPECS[@]}" > "$DIR/image_install.log" 2>&1 || {
  tail -n 30 "$DIR/image_install.log" >&2; exit 1
}
"$VPY" -I - "$IMAGE_PACKAGES" > "$DIR/not_in_image.txt" <<'EOF'  # -I: not the checkout's hf_jd.egg-info
import importlib.metadata as md, re, sys
norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()
image = {norm(name) for name in sys.argv[1].split()}
print("\n".join(sorted({norm(d.metadata["Name"]) for d in md.distributions()} - image)))
EOF
if [ -s "$DIR/not_in_image.txt" ]; then
  echo "removing what the image's list does not name: $(tr '\n' ' ' < "$DIR/not_in_image.txt")"
  xargs "$VPY" -m pip uninstall -q -y < "$DIR/not_in_image.txt"
fi
"$VPY" -m pip list --format=freeze > "$DIR/image_standin.txt"
echo "stand-in: $(wc -l < "$DIR/image_standin.txt") packages ($(grep -iE '^(torch|transformers|huggingface.hub|accelerate|numpy)==' "$DIR/image_standin.txt" | tr '\n' ' '))"

echo "== 3. gpu_check.sh --install-only: --no-index --no-deps --target, no pip configuration"
rm -rf "$DIR/site"
PIP_CONFIG_FILE=/dev/null env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT \
  PYTHON="$VPY" WHEEL_DIR="$DIR/whl" SITE="$DIR/site" OUT="$DIR/out" \
  bash benchmarks/gpu_check.sh --install-only

echo "== 4. one test file with PYTHONPATH as on the GPU machine: $TEST"
PYTHONPATH="$DIR/site:$PWD" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1 \
  nice -n 19 "$VPY" -m pytest -q -p no:cacheprovider "$TEST"
echo "== rehearsal passed: the wheels install with --no-index and hf_jd, datasets, quadprog, trl, deepspeed import"
