"""Time of the UPGrad weighting (m dual-cone projections) with each exact solver, and their agreement.

For every Gramian family and size ``m`` (``m`` objectives, so ``m`` right-hand sides ``u_i = e_i / m``):

* ``active_set cold``  ``UPGradWeighting(solver="active_set")`` on a Gramian unrelated to the one of its
  previous call (a new batch of examples, the IWRM steady state: the warm start is not used; the
  work buffers the weighting keeps between calls are);
* ``active_set warm``  the same weighting on a Gramian 1 % away from the one of its previous call
  (consecutive steps of multi-task training): the previous active sets are the starting point;
* ``auto``             ``UPGradWeighting()``, the default (quadprog for small problems, the active-set
  solver otherwise), timed like ``active_set cold``;
* ``solver cold`` / ``factorisation-only cold``  the active-set solver called directly on the prepared
  Gramian, cold as above, with its preconditioned-CG phase (the default) and without it
  (``preconditioned_cg=False``: the previous implementation, factorisations only), and their ratio;
* ``quadprog``         ``UPGradWeighting(solver="quadprog")``, one Goldfarb–Idnani QP per row (skipped
  above ``--quadprog-max``: it grows as ``m^4``);
* ``torchjd``          TorchJD's ``UPGradWeighting`` with its default projector, when it can be built;
* ``max |dw|``         largest difference between the active-set and the quadprog weights;
* ``iters`` / ``fallback``  active-set iterations (max over rows) and rows handed to quadprog, from a
  direct call of the solver on the same (cold) problem.

Families: ``gaussian`` (i.i.d. normal rows in dimension ``4m``: nearly orthogonal gradients, about
half of the bounds free, the largest linear systems), ``clustered`` (ten class centres plus noise:
most rows agree, a few conflict), ``mlp`` (per-example gradients of a small two-layer classifier on a
synthetic ten-class mixture, as JDTrainer's IWRM produces them).

Each time is the median of ``--repeats`` calls (fewer when a method has used up ``--budget`` seconds
for that size). Usage::

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_dual_cone.py
    .venv/bin/python benchmarks/bench_dual_cone.py --sizes 64 256 --families mlp --repeats 3

Writes ``<out-dir>/bench_dual_cone.json`` and ``<out-dir>/bench_dual_cone.md`` and prints the table.
No assertion on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_jd.aggregation import UPGradWeighting  # noqa: E402
from hf_jd.aggregation._active_set import (  # noqa: E402
    ActiveSetState,
    solve_dual_cone_active_set,
    solve_dual_cone_active_set_with_info,
)
from hf_jd.aggregation._gramian_utils import normalize_gramian, regularize_gramian, symmetrize  # noqa: E402

FAMILIES = ("gaussian", "clustered", "mlp")


def jacobian(family: str, m: int, seed: int) -> Tensor:
    """An ``m``-row Jacobian (float64) of the given family."""
    g = torch.Generator().manual_seed(seed)
    if family == "gaussian":
        return torch.randn(m, 4 * m, generator=g, dtype=torch.float64)
    if family == "clustered":
        n = 4 * m
        centres = torch.randn(10, n, generator=g, dtype=torch.float64)
        labels = torch.randint(0, 10, (m,), generator=g)
        return centres[labels] + 0.5 * torch.randn(m, n, generator=g, dtype=torch.float64)
    if family == "mlp":
        return _mlp_per_example_gradients(m, g)
    raise ValueError(f"Unknown family {family!r}; choose from {FAMILIES}.")


def _mlp_per_example_gradients(m: int, g: torch.Generator) -> Tensor:
    from torch.func import functional_call, grad, vmap

    d, hidden, classes = 20, 32, 10
    centres = 2.0 * torch.randn(classes, d, generator=g)
    labels = torch.randint(0, classes, (m,), generator=g)
    x = centres[labels] + torch.randn(m, d, generator=g)
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
    net = torch.nn.Sequential(torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, classes))
    params = {name: p.detach() for name, p in net.named_parameters()}

    def loss(p: dict, xi: Tensor, yi: Tensor) -> Tensor:
        return torch.nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, labels)
    return torch.cat([v.reshape(m, -1) for v in grads.values()], dim=1).double()


def timed(fn: Callable[[], object], repeats: int, budget: float, device: torch.device) -> float:
    """Median wall time (ms) of ``fn`` over ``repeats`` calls, stopping early past ``budget`` seconds."""
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget:
            break
    return 1e3 * statistics.median(times)


def alternating(
    fn: Callable[[Tensor], object],
    before: Tensor,
    target: Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> float:
    """Median wall time (ms) of ``fn(target)``, each call preceded by an untimed ``fn(before)``."""
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(args.repeats):
        fn(before)
        _sync(device)
        t0 = time.perf_counter()
        fn(target)
        _sync(device)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > args.budget:
            break
    return 1e3 * statistics.median(times)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def torchjd_weighting() -> tuple[Callable[[Tensor], Tensor] | None, str]:
    """TorchJD's UPGradWeighting with its default projector, or ``None`` and the reason."""
    try:
        from torchjd.aggregation import UPGradWeighting as TorchJDUPGradWeighting

        return TorchJDUPGradWeighting(), "ok"
    except Exception as error:  # ImportError for torchjd itself or for its optional QP backend
        return None, f"{type(error).__name__}: {str(error).splitlines()[0]}"


def bench_one(family: str, m: int, args: argparse.Namespace, device: torch.device, tj) -> dict:
    J = jacobian(family, m, seed=m)
    J_other = jacobian(family, m, seed=m + 10_000)
    noise = torch.randn(J.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    J_near = J + 0.01 * noise * J.norm() / noise.norm()
    G, G_other, G_near = ((X @ X.T).to(device) for X in (J, J_other, J_near))

    record: dict = {"family": family, "m": m}
    active = UPGradWeighting(solver="active_set")
    w_active = active(G)
    # cold: the previous step had another batch; warm: nearly the same Gramian
    record["active_set_cold_ms"] = alternating(active, G_other, G, args, device)
    record["active_set_warm_ms"] = alternating(active, G_near, G, args, device)
    auto = UPGradWeighting()  # the default: quadprog for small problems, the active-set solver otherwise
    auto(G)
    record["auto_ms"] = alternating(auto, G_other, G, args, device)

    prepared, prepared_other = (
        regularize_gramian(normalize_gramian(symmetrize(X), active.norm_eps), active.reg_eps)
        for X in (G, G_other)
    )
    U = torch.eye(m, dtype=prepared.dtype, device=device) / m
    for key, with_cg in (("solver_cold_ms", True), ("factorisation_only_cold_ms", False)):
        state = ActiveSetState()  # keeps the work buffers between calls, as a weighting does

        def solve(gramian: Tensor, state: ActiveSetState = state, with_cg: bool = with_cg) -> Tensor:
            return solve_dual_cone_active_set(U, gramian, state, preconditioned_cg=with_cg)

        solve(prepared)
        record[key] = alternating(solve, prepared_other, prepared, args, device)
    _, info = solve_dual_cone_active_set_with_info(U, prepared)
    record["iterations"] = int(info.iterations.max())
    record["fallback_rows"] = int(info.fallback.sum())
    record["cg_certified_rows"] = int(info.cg_certified.sum())
    record["mean_free_set"] = float((~info.active).sum(dim=1).double().mean())

    if m <= args.quadprog_max:
        quadprog = UPGradWeighting(solver="quadprog")
        w_quadprog = quadprog(G)
        record["quadprog_ms"] = timed(lambda: quadprog(G), args.repeats, args.budget, device)
        record["max_abs_dw"] = float((w_active - w_quadprog).abs().max())
    else:
        record["quadprog_ms"] = None
        record["max_abs_dw"] = None

    if tj is not None and m <= args.quadprog_max:
        G_cpu = G.cpu()
        record["torchjd_ms"] = timed(lambda: tj(G_cpu), args.repeats, args.budget, torch.device("cpu"))
        record["torchjd_max_abs_dw"] = float((w_active.cpu() - tj(G_cpu)).abs().max())
    else:
        record["torchjd_ms"] = None
    return record


def markdown(records: list[dict], header: str) -> str:
    def ms(x: float | None) -> str:
        return "—" if x is None else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")

    lines = [
        header,
        "",
        "| family | m | active-set cold (ms) | active-set warm (ms) | default `auto` (ms) | solver cold (ms) "
        "| factorisation-only cold (ms) | factorisation-only / solver | quadprog (ms) "
        "| TorchJD (ms) | quadprog / cold | max \\|Δw\\| | iters | fallback rows | CG-certified rows "
        "| mean \\|free set\\| |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ratio = "—" if r["quadprog_ms"] is None else f"{r['quadprog_ms'] / r['active_set_cold_ms']:.1f}×"
        dw = "—" if r["max_abs_dw"] is None else f"{r['max_abs_dw']:.1e}"
        speedup = r["factorisation_only_cold_ms"] / r["solver_cold_ms"]
        lines.append(
            f"| {r['family']} | {r['m']} | {ms(r['active_set_cold_ms'])} | {ms(r['active_set_warm_ms'])} "
            f"| {ms(r['auto_ms'])} | {ms(r['solver_cold_ms'])} | {ms(r['factorisation_only_cold_ms'])} "
            f"| {speedup:.1f}× | {ms(r['quadprog_ms'])} | {ms(r['torchjd_ms'])} | {ratio} | {dw} | {r['iterations']} "
            f"| {r['fallback_rows']} | {r['cg_certified_rows']} | {r['mean_free_set']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8, 16, 32, 64, 128, 256, 512, 1024])
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per method and size")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per method and size")
    parser.add_argument("--quadprog-max", type=int, default=256, help="largest m timed with quadprog")
    parser.add_argument("--device", default="cpu", help="device of the Gramian (cpu, cuda, ...)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tj, tj_status = torchjd_weighting()
    header = (
        f"UPGrad weighting, {device.type}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f", torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {platform.processor() or platform.machine()}; "
        f"medians of up to {args.repeats} calls; TorchJD: {tj_status}."
    )
    print(header, flush=True)
    records = []
    for family in args.families:
        for m in args.sizes:
            record = bench_one(family, m, args, device, tj)
            records.append(record)
            print(json.dumps(record), flush=True)

    table = markdown(records, header)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_dual_cone.json").write_text(
        json.dumps({"header": header, "torchjd": tj_status, "records": records}, indent=2) + "\n"
    )
    (args.out_dir / "bench_dual_cone.md").write_text(table)
    print()
    print(table)


if __name__ == "__main__":
    main()
