"""Run TorchJD's own unit tests of ``aggregation`` and ``autojac`` against hf_jd.

A maintainer's tool, not part of CI (it needs a TorchJD checkout, which CI cannot download). Usage::

    .venv/bin/python benchmarks/torchjd_conformance.py /path/to/torchjd            # a checkout
    .venv/bin/python benchmarks/torchjd_conformance.py /path/to/torchjd.git --rev v0.18.0  # a bare repo
    .venv/bin/python benchmarks/torchjd_conformance.py /path/to/torchjd --json out.json -- -x

What it does:

1. copies the checkout's ``tests/`` harness (``conftest.py``, ``settings.py``, ``utils/``) and its
   ``tests/unit/aggregation`` and ``tests/unit/autojac`` into a temporary directory, with the checkout's
   ``src/torchjd`` beside them;
2. runs pytest there with a plugin (written by this script) that aliases ``torchjd.aggregation`` to
   ``hf_jd.aggregation`` and ``torchjd.autojac`` to ``hf_jd.autojac``, submodules included
   (``torchjd.aggregation._upgrad`` is ``hf_jd.aggregation._upgrad`` when hf_jd has such a module,
   otherwise the import fails). The rest of ``torchjd`` (``torchjd.linalg``'s ``QuadprogProjector``,
   ``torchjd._linalg``'s ``compute_gramian``, ``autogram``) is TorchJD's own code from the checkout:
   the tests use it to build inputs and check outputs, and hf_jd accepts TorchJD's projector;
3. prints the outcomes by file, and each failure with its class: ``private`` (the test imports or
   exercises a TorchJD-private module: ``_transform``, ``_utils``, a name starting with ``_``),
   ``documented`` (a difference listed in README's "Differences from TorchJD", see ``DOCUMENTED``
   below) or ``other`` (a gap to fix).

Harness changes, all outside the tests themselves (printed with the summary):

- ``tests/utils/optional_deps.py`` is replaced: it asks TorchJD's private mixin which optional
  packages each class needs, and hf_jd has no optional packages for its aggregators (all run).
- ``tests/utils/asserts.py`` reads ``.jac`` fields with TorchJD's private ``is_tensor_with_jac``; its
  definition (``hasattr(t, "jac")``) is inlined.
- Missing ``torchvision`` (imported by the harness, used only by autogram tests) and ``qpsolvers``
  (needed to build TorchJD's ``QuadprogProjector``) are replaced by stand-ins; the ``qpsolvers`` one
  forwards ``solve_qp`` to ``quadprog``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import Counter, defaultdict
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_DIRS = ("tests/unit/aggregation", "tests/unit/autojac")
HARNESS = (
    "tests/conftest.py",
    "tests/settings.py",
    "tests/paths.py",
    "tests/utils",
    "tests/unit/__init__.py",
)

# Tests that fail because of a deliberate, documented difference (README, "Differences from TorchJD").
# Keys are regular expressions matched against the node id; values the reason shown in the summary.
DOCUMENTED: dict[str, str] = {
    # Vectors in repr are lists (evaluable, the JSON of --aggregator_kwargs), not tensor(...); hf_jd's
    # own arguments (solver, max_norm, seed) are shown.
    r"test_(aligned_mtl|config|constant|dualproj|upgrad)\.py::test_representations": "repr writes vectors as lists",
    r"test_fairgrad\.py::test_representations": "FairGrad's repr shows hf_jd's max_norm and max_iter",
    r"test_graddrop\.py::test_representations": "GradDrop's repr shows leak as a list and the seed, f only if set",
    r"test_gradvac\.py::test_representations": "GradVac's beta defaults to the paper's 0.01 (TorchJD: 0.5)",
    r"test_aligned_mtl\.py::test_invalid_scale_mode": "AlignedMTL checks scale_mode at construction, not at the call",
    r"test_config\.py::test_pref_vector_setter": "ConFIG is Gramian-weighted: its weighting maps J to w",
    r"test_jac_to_grad\.py::test_optimize_gramian_computation_error": "ConFIG is Gramian-weighted in hf_jd",
    r"test_cr_mogm\.py::test_changing_m_raises": "a new number of objectives restarts the state with a warning",
    r"test_(dualproj|upgrad)\.py::test_projector_getter_returns_default": "default solver is hf_jd's active set",
    r"test_fairgrad\.py::test_alpha_zero": "FairGrad's alpha must be > 0",
    r"test_krum\.py::test_matrix_shape_check\[": "Krum with m < f + 3 rows averages all rows (TorchJD raises)",
    r"test_values\.py::test_(aggregator|weighting)_output\[Random": "Random draws from its own seeded generator",
    r"test_values\.py::test_aggregator_output\[GradDrop": "GradDrop draws from its own seeded generator",
    r"test_(backward|jac)\.py::test_repeated_tensors": "a repeated tensor gives repeated rows",
    r"test_mtl_backward\.py::test_repeated_(losses|features)": "repeated losses are repeated tasks, features deduplicated",
    r"_retaining_grad_fails": "vmap leaves an unusable .grad on tensors retaining grad (as TorchJD), another error",
    r"test_config\.py::test_linear_under_scaling\[": "float32: ConFIG from J Jᵀ, 1e-4 from round-off where J is rank-deficient",
    r"test_dualproj\.py::test_permutation_invariant\[": "float32 round-off of J Jᵀ: 2.2e-7 against a 2e-7 tolerance",
}

PRIVATE_PATHS = ("/_transform/", "/_utils/", "tests/unit/autojac/test_utils.py")
PRIVATE_MESSAGE = re.compile(
    r"TorchJD-private|has no attribute '_[a-z]|No module named '(hf_jd|torchjd)\.[\w.]*\._|cannot import name '_"
)

OPTIONAL_DEPS = '''\
"""hf_jd stand-in for TorchJD's tests/utils/optional_deps.py (written by torchjd_conformance.py).

hf_jd's aggregators have no optional dependencies: every test runs."""

from torchjd.aggregation import IMTLG, GramianWeightedAggregator, IMTLGWeighting, UPGrad, UPGradWeighting

IS_QUADPROG_PROJ_AVAILABLE = True
IS_FAIRGRAD_AVAILABLE = True
IS_CAGRAD_AVAILABLE = True
IS_NASH_MTL_AVAILABLE = True


def deps_are_installed(cls: type) -> bool:
    return True


def skip_if_deps_not_installed(cls: type) -> None:
    return None


def base_agg() -> GramianWeightedAggregator:
    return UPGrad()


def base_weighting() -> UPGradWeighting:
    return UPGradWeighting()


__all__ = ["IMTLG", "IMTLGWeighting"]
'''

PLUGIN = '''\
"""pytest plugin written by torchjd_conformance.py: torchjd.aggregation / torchjd.autojac -> hf_jd."""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import os
import sys
import types

import hf_jd.aggregation  # first: transformers (imported by hf_jd) must see the real packages
import hf_jd.autojac

ALIASED = ("torchjd.aggregation", "torchjd.autojac")


def _stub_missing(name, **attributes):
    try:
        importlib.import_module(name)
    except ImportError:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def _solve_qp(P, q, G, h, solver=None, **_):
    import numpy as np
    import quadprog

    return quadprog.solve_qp(np.ascontiguousarray(P), -q, np.ascontiguousarray(-G.T), -h, 0)[0]


_stub_missing("torchvision")
_stub_missing("qpsolvers", solve_qp=_solve_qp)

# TorchJD's own modules that the tests use as helpers (loaded from the checkout copy).
import torchjd  # noqa: E402
import torchjd._linalg  # noqa: E402
import torchjd._mixins  # noqa: E402
import torchjd.linalg  # noqa: E402

for _name in list(sys.modules):
    if any(_name == p or _name.startswith(p + ".") for p in ALIASED):
        del sys.modules[_name]


PRIVATE = "TorchJD-private"


class PrivateMachineryError(RuntimeError):
    """A test used a TorchJD-private name that hf_jd does not have."""


class _Private:
    """Stands for a TorchJD-private name hf_jd lacks: importing it works, using it raises."""

    def __init__(self, qualname):
        object.__setattr__(self, "_qualname", qualname)

    def _fail(self, *args, **kwargs):
        raise PrivateMachineryError(f"{PRIVATE} `{self._qualname}` is not part of hf_jd")

    __call__ = __iter__ = __len__ = __getitem__ = __mro_entries__ = __bool__ = _fail

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self._fail()

    def __repr__(self):
        return f"<{PRIVATE} {self._qualname}>"


def _private_fallback(module_name, previous=None, everything=False):
    def __getattr__(name):
        if previous is not None:
            try:
                return previous(name)
            except AttributeError:
                pass
        if not name.startswith("__") and (everything or name.startswith("_")):
            return _Private(f"{module_name}.{name}")
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target):
        self.target = target

    def create_module(self, spec):
        if self.target is None:
            module = types.ModuleType(spec.name)
            module.__path__ = []
            module.__getattr__ = _private_fallback(spec.name, everything=True)
            return module
        module = importlib.import_module(self.target)
        if not getattr(module, "_conformance_fallback", False):
            module.__getattr__ = _private_fallback(spec.name, module.__dict__.get("__getattr__"))
            module._conformance_fallback = True
        return module

    def exec_module(self, module):
        pass


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if not any(fullname == p or fullname.startswith(p + ".") for p in ALIASED):
            return None
        target_name = "hf_jd" + fullname[len("torchjd"):]
        try:
            found = importlib.util.find_spec(target_name)
        except ModuleNotFoundError:
            found = None
        if found is None:
            if not any(part.startswith("_") for part in fullname.split(".")[2:]):
                return None  # a public module hf_jd lacks: a real gap
            return importlib.util.spec_from_loader(fullname, _AliasLoader(None), is_package=True)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(target_name))


sys.meta_path.insert(0, _AliasFinder())

torchjd.aggregation = importlib.import_module("torchjd.aggregation")
torchjd.autojac = importlib.import_module("torchjd.autojac")
assert torchjd.aggregation is hf_jd.aggregation and torchjd.autojac is hf_jd.autojac

_REPORT = os.environ["HF_JD_CONFORMANCE_REPORT"]


def _write(record):
    with open(_REPORT, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\\n")


def _message(report):
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    return str(report.longrepr).strip().splitlines()[-1] if report.longrepr else ""


def pytest_collectreport(report):
    if report.failed:
        _write({"nodeid": report.nodeid, "when": "collect", "outcome": "error", "message": _message(report)})


def pytest_runtest_logreport(report):
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if xfail:
            outcome = "xfailed" if report.skipped else "xpassed"
        else:
            outcome = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.skipped:
        outcome = "xfailed" if xfail else "skipped"
    else:
        return
    _write({"nodeid": report.nodeid, "when": report.when, "outcome": outcome, "message": _message(report)})
'''

ASSERTS_IMPORT = "from torchjd.autojac._accumulation import is_tensor_with_jac\n"
ASSERTS_INLINE = (
    "def is_tensor_with_jac(t: Tensor) -> bool:  # TorchJD's private helper, inlined by torchjd_conformance.py\n"
    '    return hasattr(t, "jac")\n'
)


def materialise(source: Path, rev: str, destination: Path) -> None:
    """Copy ``src/torchjd`` and ``tests`` of a checkout (or of ``rev`` in a bare repository)."""
    if (source / "src" / "torchjd").is_dir() and (source / "tests").is_dir():
        shutil.copytree(source / "src", destination / "src")
        shutil.copytree(source / "tests", destination / "tests")
        return
    archive = subprocess.run(
        ["git", f"--git-dir={source}", "archive", rev, "src/torchjd", "tests"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "x", "-C", str(destination)], input=archive, check=True)


def describe(source: Path, rev: str) -> str:
    """``<commit> (<describe>)`` of the checkout, or ``unknown`` outside git."""
    git = ["git", "-C", str(source)] if (source / "tests").is_dir() else ["git", f"--git-dir={source}"]
    ref = "HEAD" if (source / "tests").is_dir() else rev
    try:
        commit = subprocess.run([*git, "rev-parse", ref], check=True, capture_output=True, text=True).stdout
        tag = subprocess.run([*git, "describe", "--tags", ref], capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit.strip()} ({tag.strip() or 'no tag'})"


def build(source: Path, rev: str, work: Path) -> list[str]:
    """Lay out the aliased copy in ``work``; return the harness changes made."""
    full = work / "_checkout"
    full.mkdir()
    materialise(source, rev, full)
    shutil.copytree(full / "src" / "torchjd", work / "torchjd_src" / "torchjd")
    for relative in (*HARNESS, *TEST_DIRS):
        origin = full / relative
        if origin.is_dir():
            shutil.copytree(origin, work / relative)
        elif origin.is_file():
            (work / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, work / relative)
    shutil.rmtree(full)
    changes = []
    optional = work / "tests" / "utils" / "optional_deps.py"
    if optional.exists():
        optional.write_text(OPTIONAL_DEPS)
        changes.append(
            "tests/utils/optional_deps.py replaced (hf_jd has no optional aggregator dependencies)"
        )
    asserts = work / "tests" / "utils" / "asserts.py"
    if asserts.exists() and ASSERTS_IMPORT in asserts.read_text():
        asserts.write_text(asserts.read_text().replace(ASSERTS_IMPORT, ASSERTS_INLINE))
        changes.append("tests/utils/asserts.py: TorchJD's is_tensor_with_jac (hasattr(t, 'jac')) inlined")
    (work / "_hf_jd_alias.py").write_text(PLUGIN)
    (work / "pytest.ini").write_text("[pytest]\nxfail_strict = true\n")
    return changes


def classify(record: dict[str, str]) -> tuple[str, str]:
    """``(class, reason)`` of a failure or error."""
    nodeid, message = record["nodeid"], record["message"]
    for pattern, reason in DOCUMENTED.items():
        if re.search(pattern, nodeid):
            return "documented", reason
    if any(part in nodeid for part in PRIVATE_PATHS) or PRIVATE_MESSAGE.search(message):
        return "private", message
    return "other", message


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def summarise(records: list[dict[str, str]]) -> dict[str, object]:
    """Outcomes by file and in total (one per test, the worst of its phases: an error in teardown wins)."""
    rank = {"passed": 0, "skipped": 1, "xfailed": 2, "xpassed": 3, "failed": 4, "error": 5}
    final: dict[str, dict[str, str]] = {}
    for record in records:
        previous = final.get(record["nodeid"])
        if previous is None or rank[record["outcome"]] > rank[previous["outcome"]]:
            final[record["nodeid"]] = record
    by_file: dict[str, Counter[str]] = defaultdict(Counter)
    for record in final.values():
        by_file[file_of(record["nodeid"])][record["outcome"]] += 1
    failures = []
    for record in final.values():
        if record["outcome"] in ("failed", "error", "xpassed"):
            kind, reason = classify(record)
            failures.append({**record, "class": kind, "reason": reason})
    total: Counter[str] = Counter(r["outcome"] for r in final.values())
    return {
        "total": dict(total),
        "by_file": {f: dict(c) for f, c in sorted(by_file.items())},
        "failures": failures,
    }


def print_summary(version: str, changes: list[str], summary: dict[str, object]) -> None:
    outcomes = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")
    print(f"TorchJD tests: {version}")
    for change in changes:
        print(f"harness: {change}")
    print()
    by_file: dict[str, dict[str, int]] = summary["by_file"]  # type: ignore[assignment]
    width = max([len(f) for f in by_file] + [10])
    print(f"{'file':<{width}} " + " ".join(f"{o:>7}" for o in outcomes))
    for name, counts in by_file.items():
        print(f"{name:<{width}} " + " ".join(f"{counts.get(o, 0):>7}" for o in outcomes))
    total: dict[str, int] = summary["total"]  # type: ignore[assignment]
    print(f"{'total':<{width}} " + " ".join(f"{total.get(o, 0):>7}" for o in outcomes))
    failures: list[dict[str, str]] = summary["failures"]  # type: ignore[assignment]
    for kind in ("other", "documented", "private"):
        selected = [f for f in failures if f["class"] == kind]
        print(f"\n{kind}: {len(selected)}")
        for failure in sorted(selected, key=lambda f: f["nodeid"]):
            reason = textwrap.shorten(failure["reason"].replace("\n", " "), 160)
            print(f"  {failure['outcome']:<7} {failure['nodeid']}\n          {reason}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- are passed to pytest (e.g. -- -x -k upgrad).",
    )
    parser.add_argument("torchjd", type=Path, help="a TorchJD checkout, or a bare git repository of it")
    parser.add_argument("--rev", default="HEAD", help="revision to test in a bare repository (default HEAD)")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter with hf_jd and pytest installed"
    )
    parser.add_argument("--json", type=Path, help="also write the summary here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory and print its path")
    args, pytest_args = parser.parse_known_args(argv)  # what follows "--" goes to pytest
    args.pytest_args = [a for a in pytest_args if a != "--"]
    source = args.torchjd.resolve()
    work = Path(tempfile.mkdtemp(prefix="torchjd_conformance_"))
    try:
        changes = build(source, args.rev, work)
        report = work / "report.jsonl"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(work), str(work / "torchjd_src"), str(REPO_ROOT)])
        env["HF_JD_CONFORMANCE_REPORT"] = str(report)
        env.setdefault("OMP_NUM_THREADS", "1")
        command = [
            args.python,
            "-m",
            "pytest",
            "-p",
            "_hf_jd_alias",
            "-q",
            "-p",
            "no:cacheprovider",
            "--continue-on-collection-errors",
        ]
        command += ["-W", "ignore::DeprecationWarning", *args.pytest_args, *TEST_DIRS]
        result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
        if not report.exists():
            print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
            return 2
        records = [json.loads(line) for line in report.read_text().splitlines()]
        summary = summarise(records)
        version = describe(source, args.rev)
        print_summary(version, changes, summary)
        if args.json:
            args.json.write_text(json.dumps({"torchjd": version, "harness": changes, **summary}, indent=1))
        if args.keep:
            print(f"\nkept: {work}")
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
