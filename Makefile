# One-command set-up: every target creates the virtual environment and installs into it.
# TORCH_SPEC pins the CPU build available on the CI machines; override it for a CUDA machine,
# e.g. `make demo TORCH_SPEC=torch`.
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test test-fast lint bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,trl,deepspeed]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) examples/iwrm_digits.py

test: install
	$(PY) -m ruff check hf_jd tests examples benchmarks
	$(PY) -m ruff format --check hf_jd tests examples benchmarks
	$(PY) -m mypy hf_jd
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q --doctest-modules hf_jd

# The inner loop (under 2 minutes): the suite without the tests marked slow, distributed or zoo
# (tests/conftest.py marks them). `make test` and CI still run everything.
test-fast: install
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -q -m "not slow and not distributed and not zoo"

# The same suite at the declared minimum versions: a separate venv (MIN_VENV) where every dependency of
# pyproject.toml is pinned to its lower bound by constraints/minimum.txt (tests/test_minimum_versions.py
# keeps the two equal); the test extra resolves freely. No ruff/mypy: they check the code, not the versions.
MIN_VENV ?= .venv-min
MIN_CONSTRAINTS := constraints/minimum.txt
MIN_PY := $(MIN_VENV)/bin/python

.PHONY: test-min

$(MIN_VENV)/.installed: pyproject.toml Makefile $(MIN_CONSTRAINTS)
	rm -rf $(MIN_VENV)
	$(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q -c $(MIN_CONSTRAINTS) "$(TORCH_SPEC)"
	$(MIN_PY) -m pip install -q -c $(MIN_CONSTRAINTS) -e ".[test]"
	touch $@

test-min: $(MIN_VENV)/.installed
	HF_JD_MINIMUM_VERSIONS=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MIN_PY) -m pytest -q
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(MIN_PY) -m pytest -q --doctest-modules hf_jd

bench: install
	$(PY) benchmarks/bench_dual_cone.py
	$(PY) benchmarks/bench_step.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache outputs
