r"""``GramianEngine``: the Gramian :math:`G = J J^\top` of a loss vector without materialising :math:`J`.

For losses :math:`L \in \mathbb{R}^m` from one forward pass and :math:`J = \partial L / \partial \theta`,
the engine

1. records, during the forward, every call of a module owning trainable parameters (its input
   :math:`a`, and the gradient edges of its outputs);
2. runs ONE backward-type pass, ``torch.autograd.grad`` of the losses with respect to those module
   outputs only (never the parameters: no ``.grad`` is written, DDP's reducer never fires), which
   yields each call's gradient-output :math:`b` — per example for per-example objectives (the loss
   vector is back-propagated with ones: :math:`L_i` depends on example :math:`i` only, so slice
   :math:`i` of :math:`b` is :math:`\partial L_i/\partial y_i`), or per task (``k`` one-hot rows in
   one batched backward);
3. sums, parameter by parameter, the Gramian blocks :math:`G^{(p)}_{ij} = \langle g^{(p)}_i,
   g^{(p)}_j \rangle` that each module's rule derives from :math:`(a, b)` (per-sample gradients,
   Goodfellow 2015, materialised one layer at a time, or the ghost product of Li et al. 2022);
4. after the caller has turned :math:`G` into weights :math:`w`, writes
   :math:`\text{scale} \cdot J^\top w = \text{scale} \sum_i w_i \nabla L_i` into ``.grad`` from the
   same :math:`(a, b)` — no second forward or backward.

This is the Gramian-based formulation of Jacobian descent of Quinton & Rey, *Jacobian Descent for
Multi-Objective Optimization* (arXiv:2406.16232).

Exactness. Parameters that no rule can handle exactly — used outside their owning module, owned by
a call whose leading dimension is not the batch (T5's relative attention bias), owned by the root
model or by a batch-norm layer — get their per-row gradients from an exact batched autograd pass
with respect to those parameters only. Parameters used by several calls or modules (tied
embeddings, a layer applied twice) have their per-row gradients summed over the calls, chunk by
chunk, before inner products.

Objectives over groups of rows (``gramian(losses, row_objective=...)``, see :class:`hf_jd.ObjectiveLosses`):
the ``K`` losses each read a group of batch rows (a DPO pair, a GRPO group). The engine's rows are then
the ``n`` batch rows: the one backward of :math:`\sum_k L_k` gives each row's gradient-output
:math:`\partial L_{k(r)}/\partial y_r`, hence each row's contribution :math:`g_r` to
:math:`\nabla L_{k(r)}`; the rules form :math:`G_{\text{rows}} = [\langle g_r, g_s\rangle]` as for
per-example losses, and :math:`G = P G_{\text{rows}} P^\top` (:math:`P` the ``K x n`` incidence), while
the weighted gradient uses the row weights :math:`P^\top w` (:math:`w_{k(r)}` on row :math:`r`). The
fallback's parameters are differentiated per objective directly (``K`` one-hot rows), exact without the
map. The self-check compares objectives' gradients with autograd (``verify_rows`` index the objectives).

Objectives that are token segments of rows (``gramian(losses, token_objective=...)``, ``[n_rows, T]``, see
:meth:`hf_jd.ObjectiveLosses.segments`): the sequences of a packed batch. The engine's rows are then the
:math:`N = n_{\text{rows}} T` tokens: every call of a token-wise rule (``Rule.token_wise``: linear, norm,
embedding) whose primary input is ``[n_rows, T, ...]`` is read as :math:`N` rows of one token, the same
single backward gives each token's gradient-output :math:`\partial L_{s(t)}/\partial y_t` (when attention
keeps token :math:`t` inside segment :math:`s(t)`), and :math:`G = P G_{\text{tokens}} P^\top`,
:math:`J^\top w = J_{\text{tokens}}^\top (P^\top w)` with the ``K x N`` incidence (a zero column for a
token of no objective). Every other call (the generic rule, attention modules with parameters, calls
whose input is not ``[n_rows, T, ...]``) has its parameters on the fallback, differentiated exactly per
objective; no broadcast or region planning runs. The self-check's per-objective autograd gradients catch
a model whose attention crosses segments.

Per-task objectives (``objectives="per_task"``): the rows are ``k`` task losses over the whole batch.
Parameters reached by at least two tasks are *shared*: they make the ``k x k`` Gramian and receive
``scale * Σ_k w_k ∇L_k``. Parameters reached by a single task (its head) are left out of the Gramian
and receive that task's plain gradient ``scale * ∇L_k`` (TorchJD's ``mtl_backward`` semantics). Which
tasks reach a parameter is read from the per-task gradient-outputs (a task whose backward signal is
exactly zero at every call of the parameter does not reach it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor, nn

from .._objectives import check_row_objective, check_token_objective, objective_gramian, row_weights
from .._tensors import accumulation_dtype, add_to_grad, gram, written_gradients_are_finite
from ..autojac import reached_by_graph, shared_by_graph
from ._batch import (
    Flat,
    Follows,
)
from ._broadcast_plan import BroadcastPlanner, Verdicts
from ._capture import Recorder
from ._errors import GramianEngineError
from ._fallback import BatchedBackward
from ._functional import functional_rule
from ._generic import GenericRule
from ._global import Collectives, global_gramian
from ._passes import EnginePasses
from ._registry import registered_rule
from ._rule import Rule
from ._step import StepState, combined_gramian
from ._support import check_model
from ._torch_ops import BATCH_NORM
from ._utils import Context
from ._verify import check_block, is_low_precision, reference_block, reference_norms


def claimed_parameters(
    module: nn.Module, rule: type[Rule[Any]] | None
) -> tuple[dict[str, nn.Parameter], list[nn.Module]]:
    """The trainable parameters of the children that ``rule`` claims for ``module`` (by their path from
    ``module``: ``"out_proj.weight"``), and every module of the claimed subtrees."""
    if rule is None:
        return {}, []
    children = rule.claims(module)
    if not children:
        return {}, []
    paths = {id(sub): name for name, sub in module.named_modules() if sub is not module}
    params: dict[str, nn.Parameter] = {}
    subtree: list[nn.Module] = []
    for child in children:
        if id(child) not in paths:
            raise GramianEngineError(
                f"{rule.__name__}.claims() returned a {type(child).__name__} that is not a descendant of the "
                f"{type(module).__name__} it serves."
            )
        subtree.extend(child.modules())
        prefix = paths[id(child)]
        params.update({f"{prefix}.{n}": p for n, p in child.named_parameters() if p.requires_grad})
    return params, subtree


class GramianEngine(EnginePasses):
    """Per-example or per-task Gramian of a loss vector, and the weighted gradient, from one backward.

    Args:
        model: the (unwrapped) module whose trainable parameters (``requires_grad``) are trained.
        objectives: ``"per_example"`` (the losses are ``[B]``, ``L_i`` depends on example ``i`` only) or
            ``"per_task"`` (``k`` scalar losses, each over the whole batch).
        memory_budget_mb: the most memory (float32 MB) a rule may use at once to materialise per-row
            gradients; larger layers are processed in chunks.
        linear_strategy: ``"auto"`` (flop estimate per layer), ``"ghost"`` or ``"materialize"`` for affine
            layers (testing / tuning).
        expand_broadcast: return module outputs of leading dimension 1 (position embeddings of
            ``position_ids [1, T]``) expanded to the batch size, so that their gradient stays per example.
            With ``False`` such calls use the exact but slower batched-autograd fallback (for models whose
            code cannot take the expanded tensor).
        collectives: the collectives of :meth:`global_gramian` (``hf_jd.distributed.RankCollectives``).
        keep_graph: keep the graph of the losses after :meth:`gramian` (``keeps_graph``), so that the caller can
            back-propagate :math:`w^\top L` through it (the backends' generic update path); costs the memory
            of that graph until the losses are freed.

    Usage::

        engine = GramianEngine(model, objectives="per_example")
        engine.check_supported()
        with engine.capture():
            outputs = model(**inputs)
        losses = ...                      # [m]
        G = engine.gramian(losses)        # [m, m]
        engine.accumulate_grad(w, scale)  # p.grad += scale * Jᵀ w
    """

    name = "gramian"
    self_check = True  # exact under the per-example assumption, which the self-check verifies
    recomputes_overflow = False  # an overflowed float32 Gramian needs the micro-batch run again in float64
    synchronises_gradients = False  # .grad holds this rank's update: the trainer's backend synchronises ranks
    #: the graph of the losses outlives ``gramian()`` (``keep_graph=True``), for a second backward of ``wᵀL``
    keeps_graph = False

    def gradients_are_finite(self) -> bool:
        """Whether every ``.grad`` of ``params`` is finite (the trainer's last check before the optimizer)."""
        return written_gradients_are_finite(self.params)

    def __init__(
        self,
        model: nn.Module,
        objectives: Literal["per_example", "per_task"] = "per_example",
        *,
        memory_budget_mb: float = 64.0,
        linear_strategy: Literal["auto", "ghost", "materialize"] = "auto",
        expand_broadcast: bool = True,
        collectives: Collectives | None = None,
        keep_graph: bool = False,
    ) -> None:
        if objectives not in ("per_example", "per_task"):
            raise ValueError(f"objectives must be 'per_example' or 'per_task', got {objectives!r}.")
        if linear_strategy not in ("auto", "ghost", "materialize"):
            raise ValueError(
                f"linear_strategy must be 'auto', 'ghost' or 'materialize', got {linear_strategy!r}."
            )
        self.model = model
        self.objectives = objectives
        self.keeps_graph = keep_graph
        self.per_task = objectives == "per_task"
        self.params: list[nn.Parameter] = [p for p in model.parameters() if p.requires_grad]
        self.linear_strategy = linear_strategy
        self._budget = max(1, int(memory_budget_mb * 2**20 / 4))
        self._always_fallback: set[int] = set()
        owners: list[tuple[nn.Module, Rule[Any]]] = []
        op_rules: dict[int, Rule[Any]] = {}
        owner_of: dict[int, tuple[nn.Module, str]] = {}
        #: The modules whose parameters a parent's rule serves (``Rule.claims``), by id: no rule, no hook.
        claimed: dict[int, nn.Module] = {}
        for module in model.modules():  # parents before their children
            own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
            owner_of.update({id(p): (module, n) for n, p in own.items()})
            if id(module) in claimed:
                continue
            if module is model or isinstance(module, BATCH_NORM):
                # Re-running the whole model, or a layer that updates running statistics, is not
                # module-local: these parameters use the batched-autograd fallback.
                self._always_fallback.update(id(p) for p in own.values())
                continue
            registered = registered_rule(module)
            extra, subtree = claimed_parameters(module, registered)
            for sub in subtree:
                if id(sub) in claimed or any(sub is served for served, _ in owners):
                    raise GramianEngineError(
                        f"The rule of {type(module).__name__} claims a {type(sub).__name__} that another module's "
                        "rule already serves (a module shared by two parents)."
                    )
                claimed[id(sub)] = sub
            if not own and not extra:
                continue
            rule = (registered or GenericRule)(module, {**own, **extra})
            functional = functional_rule(module, own) if isinstance(rule, GenericRule) else None
            if functional is not None:  # a stock layer with its own forward: also recorded at its op
                op_rules[len(owners)] = functional
            owners.append((module, rule))
        self._recorder = Recorder(model, owners, self.per_task, expand_broadcast, op_rules)
        self._verdicts: Verdicts = {}
        self._planner = BroadcastPlanner(model, self.params, owner_of, self._verdicts, self._probe_graph)
        self._follows: Follows = {}
        self._flat: Flat = {}
        self._flat_by_graph: Flat = {}
        self._probe_failed = False
        self._batched = BatchedBackward()
        self._state: StepState | None = None
        #: Set by the global step (``_global.py``): keep every call's ``a``, ``b`` until the exchange.
        self.defer_compaction = False
        #: The collectives of the global per-example step (several processes, ``jd_scope="global"``).
        self.collectives = collectives

    # ------------------------------------------------------------------ public API
    @property
    def gramian_dtype(self) -> torch.dtype:
        return accumulation_dtype(*(p.dtype for p in self.params))

    def check_supported(self) -> None:
        """Raise :class:`GramianEngineError` when the model mixes examples or cannot be hooked."""
        check_model(self.model, self.per_task)

    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the forward run inside this block (hooks are installed only here)."""
        self.release()
        try:
            with self._recorder.active("capture"):
                yield
        except BaseException as error:
            expanded = sorted(set(self._recorder.expanded_modules))
            if expanded and isinstance(error, Exception) and hasattr(error, "add_note"):
                error.add_note(
                    f"hf_jd Gramian engine: during this forward, outputs of {', '.join(expanded)} with a leading "
                    "dimension of 1 were expanded to the batch size. If the error comes from code that needs the "
                    "unexpanded tensor, use GramianEngine(..., expand_broadcast=False) or jd_engine='jacobian'."
                )
            self.release()
            raise

    def gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> Tensor:
        """``G = J Jᵀ`` (``[m, m]``) of ``losses`` (``[m]``) from one backward pass; writes no ``.grad``.

        Args:
            losses: the loss vector of the captured forward.
            verify_rows: rows whose Gramian block is checked against row-by-row ``torch.autograd.grad``
                (exact, assumption-free) before returning; a mismatch raises
                :class:`GramianMismatchError` (see :mod:`hf_jd.gramian._verify`).
            dtype: the dtype the Gramian is accumulated in (default: :attr:`gramian_dtype`); ``float64``
                keeps it finite when float32 products of finite gradients overflow.
            row_objective: ``[n]`` integers, the objective (an index into ``losses``) of each row of the
                captured batch (per example only; see :class:`hf_jd.ObjectiveLosses`): ``G`` is the
                ``[m, m]`` Gramian of the ``m`` objectives, ``P G_rows Pᵀ``, and :meth:`accumulate_grad`
                takes ``m`` weights.
            token_objective: ``[n_rows, T]`` integers, the objective of each token (``-1``: none) when the
                objectives are token segments of rows (a packed batch, see
                :meth:`hf_jd.ObjectiveLosses.segments`): ``G`` is ``P G_tokens Pᵀ`` (``[m, m]``).
        """
        if not isinstance(losses, Tensor) or losses.dim() != 1 or losses.numel() == 0:
            raise GramianEngineError(
                f"gramian() needs a non-empty 1-D loss vector, got {getattr(losses, 'shape', losses)}."
            )
        if losses.grad_fn is None:
            raise GramianEngineError("The losses do not depend on any trainable parameter (no grad_fn).")
        recorder = self._recorder
        if recorder.mode != "off":
            raise GramianEngineError(
                "Call gramian() after the `with engine.capture():` block, not inside it."
            )
        if not recorder.outer_calls:
            raise GramianEngineError(
                "No forward pass was captured: run the model's forward inside `with engine.capture():`."
            )
        try:
            if token_objective is not None:
                token_rows, tokens = self._token_map(losses, row_objective, token_objective)
                return self._gramian(
                    losses, list(verify_rows), dtype or self.gramian_dtype, token_rows, tokens
                )
            rows = self._row_map(losses, row_objective)
            return self._gramian(losses, list(verify_rows), dtype or self.gramian_dtype, rows)
        except BaseException:
            self.release()
            raise

    def _row_map(self, losses: Tensor, row_objective: Tensor | None) -> Tensor | None:
        """The checked row map (``long``, on the losses' device), or ``None`` for one loss per row or task."""
        if row_objective is None:
            return None
        if self.per_task:
            raise GramianEngineError(
                "row_objective (objectives over groups of batch rows) needs GramianEngine(objectives='per_example'): "
                "per task, every loss reads the whole batch already, so there are no rows to group."
            )
        try:
            rows = check_row_objective(row_objective, losses.numel())
        except (TypeError, ValueError) as error:
            raise GramianEngineError(str(error)) from None
        batch = self._recorder.batch
        if batch is not None and batch != rows.numel():
            raise GramianEngineError(
                f"row_objective maps {rows.numel()} rows, but the captured forward has a batch of {batch} rows: "
                "give the objective of every row of the model's batch (e.g. 2B rows for B chosen/rejected pairs)."
            )
        return rows.to(losses.device)

    def _token_map(
        self, losses: Tensor, row_objective: Tensor | None, token_objective: Tensor
    ) -> tuple[Tensor, tuple[int, int]]:
        """The checked token map flattened to the engine's rows (``long``, ``-1`` kept), and ``(n_rows, T)``."""
        if row_objective is not None:
            raise GramianEngineError(
                "Give row_objective (groups of rows) or token_objective (token segments), not both."
            )
        if self.per_task:
            raise GramianEngineError(
                "token_objective (objectives that are token segments of rows) needs "
                "GramianEngine(objectives='per_example')."
            )
        try:
            tokens = check_token_objective(token_objective, losses.numel())
        except (TypeError, ValueError) as error:
            raise GramianEngineError(str(error)) from None
        batch = self._recorder.batch
        if batch is not None and batch != tokens.shape[0]:
            raise GramianEngineError(
                f"token_objective maps {tokens.shape[0]} rows, but the captured forward has a batch of {batch} rows: "
                "give the objective of every token of every row of the model's batch ([n_rows, T])."
            )
        shape = (int(tokens.shape[0]), int(tokens.shape[1]))
        return tokens.reshape(-1).to(losses.device), shape

    def _gramian(
        self,
        losses: Tensor,
        verify_rows: list[int],
        dtype: torch.dtype,
        row_objective: Tensor | None,
        tokens: tuple[int, int] | None = None,
    ) -> Tensor:
        recorder = self._recorder
        m = losses.numel() if row_objective is None else row_objective.numel()  # the engine's rows
        ctx = Context(m, self.per_task, dtype, self._budget, self.linear_strategy)
        state = StepState(ctx, self._plan_step(losses, ctx, tokens), self.params)
        state.objectives, state.row_objective = losses.numel(), row_objective
        # read the graph before the backward frees it
        state.reached = {id(p) for p, hit in zip(self.params, reached_by_graph(losses, self.params)) if hit}
        if self.per_task:
            state.shared_by_graph = shared_by_graph(losses, self.params)
        reference = None
        if verify_rows:
            with recorder.active("replay"):
                reference = reference_norms(losses, verify_rows, self.params)
        self._backward(losses, state)
        for use in state.active:
            use.check_versions()
        low_precision = is_low_precision(self.params, [g for use in state.active for g in (use.grads or [])])
        with torch.no_grad():
            gramian = self._assemble(state, losses.device)
        if reference is not None:
            shared = [state.shared.get(id(p), False) for p in self.params]
            check_block(
                gramian,
                verify_rows,
                reference_block(reference, shared, len(verify_rows)),
                low_precision=low_precision,
                per_task=self.per_task,
                row_groups=row_objective is not None,
            )
        return gramian

    def _assemble(self, state: StepState, device: torch.device) -> Tensor:
        """``G`` from the rules' blocks (rows) and the fallback's (objectives); ``P G_rows Pᵀ`` for row groups."""
        ctx = state.ctx
        state.find_shared(self.per_task)
        gramian = torch.zeros(ctx.rows, ctx.rows, dtype=ctx.dtype, device=device)
        # the fallback's rows are the objectives: the same matrix unless the rows are grouped
        objectives = gramian
        if state.row_objective is not None:
            objectives = torch.zeros(state.objectives, state.objectives, dtype=ctx.dtype, device=device)
        pending = {id(use): 0 for use in state.active}
        for pairs in state.param_uses.values():
            for use, _ in pairs:
                pending[id(use)] += 1
        for param in self.params:
            pid = id(param)
            pairs = state.param_uses.get(pid, [])
            if state.shared.get(pid, False):
                if pid in state.fallback_rows:
                    objectives += gram(state.fallback_rows[pid].to(ctx.dtype))
                elif len(pairs) == 1:
                    use, name = pairs[0]
                    gramian += use.rule.param_gramian(use, ctx, name).to(gramian.device)
                elif pairs:
                    gramian += combined_gramian(pairs, param, ctx)
            for use, _ in pairs:  # free a call's a, b as soon as its parameters are done
                pending[id(use)] -= 1
                if pending[id(use)] == 0 and not self.defer_compaction:
                    use.rule.compact(use)
        self._state = state
        if state.row_objective is not None:
            objectives += objective_gramian(state.row_objective, state.objectives, gramian)
        return objectives

    def global_gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> tuple[Tensor, list[int]]:
        """The Gramian of the examples of every rank (a collective; see :mod:`hf_jd.gramian._global`)
        and each rank's row count; ``verify_rows`` are checked on this rank's rows.

        Objectives over groups of rows (``row_objective``) are not served across ranks yet: refused (before
        any collective, so on every rank alike)."""
        if row_objective is not None or token_objective is not None:
            self.release()
            raise GramianEngineError(
                "The Gramian engine does not yet form the global Gramian of objectives over groups of rows or token "
                "segments "
                "(ObjectiveLosses / row_objective) across processes. Use jd_scope='local', or jd_engine='jacobian' "
                "(exact in the global scope), or jd_engine='auto', which switches to it."
            )
        if self.collectives is None:
            raise GramianEngineError("global_gramian() needs GramianEngine(..., collectives=...).")
        return global_gramian(self, losses, self.collectives, verify_rows, dtype)

    def coverage(self) -> dict[str, str]:
        """How the last ``gramian()`` served each trainable parameter, by name: the ``name`` of the rule
        (a registered rule's: ``"linear"``, ``"conv2d"``, ``"multihead_attention"``, a user rule's own name
        — for a claimed child's parameters, the rule of the module that claims it —; or the engine's:
        ``"broadcast"``, ``"region"``, ``"generic"`` for the per-example re-run of a module),
        ``"fallback"`` (exact batched autograd, the slow path) or ``"unreached"`` (the losses do not use
        it). Call it between ``gramian()`` and ``accumulate_grad()``."""
        state = self._state
        if state is None:
            raise GramianEngineError("coverage() needs gramian(losses) to have run on the captured forward.")
        served = {id(p): "fallback" for p in self.params if id(p) in state.fallback}
        for pid, pairs in state.param_uses.items():
            served.setdefault(pid, pairs[0][0].rule.name)
        names = [name for name, p in self.model.named_parameters() if p.requires_grad]  # self.params' order
        return {name: served.get(id(p), "unreached") for name, p in zip(names, self.params)}

    @property
    def step_state(self) -> StepState | None:
        """What the last ``gramian()`` left for ``accumulate_grad`` (``None`` once released)."""
        return self._state

    def accumulate_grad(self, weights: Tensor, scale: float = 1.0) -> None:
        """``p.grad += scale · Σ_i w_i ∂L_i/∂p`` for every trainable ``p`` the losses reach (plain task
        gradients for task-specific parameters in per-task mode); then frees the captured state.

        A parameter the autograd graph of the losses does not reach gets no gradient at all: its
        ``.grad`` stays as it was (``None`` after ``zero_grad``), as with ``loss.backward()``."""
        state = self._state
        if state is None:
            raise GramianEngineError(
                "accumulate_grad() needs gramian(losses) to have run on the captured forward."
            )
        try:
            with torch.no_grad():
                self._write_grads(state, weights, scale)
        finally:
            self.release()

    def _write_grads(self, state: StepState, weights: Tensor, scale: float) -> None:
        ctx = state.ctx
        weights = torch.as_tensor(weights).detach().reshape(-1)
        if weights.numel() != state.objectives:
            raise GramianEngineError(f"Expected {state.objectives} weights, got {weights.numel()}.")
        device = self.params[0].device if self.params else weights.device
        shared_weights = weights.to(device=device, dtype=ctx.dtype) * scale
        task_weights = torch.full((ctx.rows,), float(scale), dtype=ctx.dtype, device=device)
        # the rules' rows are the batch rows: row r takes its objective's weight (Pᵀ w); the fallback's are
        # the objectives themselves
        rule_weights = shared_weights
        if state.row_objective is not None:
            rule_weights = row_weights(state.row_objective, shared_weights)
        reached = self._reached(state, device)
        for param in self.params:
            pid = id(param)
            if pid not in reached:
                continue
            shared = state.shared.get(pid, True)
            update = None
            if pid in state.fallback_rows:
                rows = state.fallback_rows[pid]
                by_objective = shared_weights if shared else task_weights
                update = torch.tensordot(by_objective.to(rows.dtype), rows, dims=1)
            else:
                by_row = rule_weights if shared else task_weights
                for use, name in state.param_uses.get(pid, []):
                    term = use.rule.param_weighted(use, ctx, name, by_row)
                    update = term if update is None else update + term
            if update is None:
                update = torch.zeros_like(param)
            self._add_update(param, update)

    def _reached(self, state: StepState, device: torch.device) -> set[int]:
        """The ids of the parameters that get a gradient (the FSDP2 engine agrees on them across ranks)."""
        del device
        return state.reached

    def _add_update(self, param: nn.Parameter, update: Tensor) -> None:
        """``param.grad += update`` (full size); the FSDP2 engine reduce-scatters it into the shards instead."""
        add_to_grad(param, update)

    def release(self) -> None:
        """Free everything captured (inputs, gradient-outputs, per-row gradients) without writing."""
        for call in self._recorder.calls:
            call.release()
        self._recorder.reset()
        self._state = None
