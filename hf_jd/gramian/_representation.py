r"""The representation-level Gramian of per-task losses: an opt-in approximation of the per-task JD step.

For ``k`` task losses :math:`L_t` that read a shared encoder only through its output :math:`z` (the
*shared representation*, :math:`z = f_\theta(x)`, one row :math:`z_b` per example), the chain rule gives
:math:`\nabla_\theta L_t = J_z^\top g_t` with :math:`g_t = \partial L_t / \partial z` and
:math:`J_z = \partial z / \partial \theta`. The exact per-task Gramian is :math:`G = C\, J_z J_z^\top C^\top`
(:math:`C` the ``k`` rows :math:`g_t`), which costs one backward through the encoder per task. The
representation Gramian drops the encoder's kernel :math:`J_z J_z^\top`:

.. math::

    G^z_{ts} = \langle g_t, g_s \rangle = \sum_b \Big\langle \frac{\partial L_t}{\partial z_b},
    \frac{\partial L_s}{\partial z_b} \Big\rangle ,

formed from ONE batched backward of the ``k`` task losses to :math:`z` (through the heads only, never the
encoder). The aggregator's weights :math:`w = W(G^z)` then drive the exact weighted update: the shared
parameters receive :math:`s\, J^\top w = s\, J_z^\top \sum_t w_t g_t` and each head its own task's plain
gradient :math:`s\,\nabla L_t`, from one ordinary backward. This is the "MGDA-UB" bound of Sener &
Koltun, *Multi-Task Learning as Multi-Objective Optimization* (NeurIPS 2018), applied to any
Gramian-weighted aggregator, as LibMTL's ``rep_grad`` does for its weightings (Lin & Zhang, JMLR 2023).
It is NOT the JD step: :math:`w` is chosen for :math:`G^z`, not for :math:`G` (see the README for when
the difference matters).

The update is written by back-propagating the surrogate

.. math:: S = s \sum_t L_t + \Big\langle z,\; s \sum_t (w_t - 1)\, g_t \Big\rangle_{\text{const}},

whose gradient is :math:`s\,\nabla L_t` for a head of task :math:`t` and :math:`s\, J_z^\top \sum_t w_t g_t`
for every parameter behind :math:`z`: one backward, which writes ``.grad`` of exactly the parameters
the losses reach (as the stock ``loss.backward()``).

Over several processes (``collectives``): rank :math:`r` holds the representation rows of its own examples,
and the global task loss is the rank mean :math:`L_t = \frac1R \sum_r L^r_t`, so
:math:`G^z = \frac{1}{R^2} \sum_r G^{z,r}` exactly (different ranks' rows are different coordinates of
:math:`z`): one all-reduce of a ``k x k`` matrix, then every rank writes its own :math:`J_r^\top w` and the
backend averages the ranks' gradients.

The representation is the first tensor of a named module's output (its output if it is a tensor; the
first field of a ``ModelOutput``, e.g. ``last_hidden_state``), summed over the module's calls; or, when no
module is named, inferred on the first step as the last module (in forward order) whose output every
path from the task losses to the shared parameters crosses. The engine checks that property (no
parameter two tasks share is reached, by any task, around the representation) on the first step and on verification steps,
and refuses a model that breaks it, naming the parameter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from .._tensors import accumulation_dtype, gramian_of_blocks, written_gradients_are_finite
from ..autojac import SHARED_MIN_TASKS, leaves_per_task, shared_leaves
from ._errors import GramianEngineError
from ._fallback import BatchedBackward
from ._global import Collectives


class RepresentationEngine:
    """The per-task JD engine that weighs the tasks by the Gramian of their representation gradients.

    It implements the trainer's ``JDEngine`` protocol (capture → :meth:`gramian` → :meth:`accumulate_grad`);
    see the module docstring for the math. ``jd_gramian="representation"`` selects it in ``JDTrainer``.

    Args:
        model: the model whose forward produces the ``k`` task losses.
        representation: the dotted name of the module whose output is the shared representation
            (``""`` is refused: the whole model is not a representation); ``None``: inferred on the first step.
        collectives: several processes in the global scope: the Gramian is the global one (module docstring).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from hf_jd.aggregation import UPGrad
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> encoder, heads = nn.Linear(3, 4), nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
        >>> model = nn.ModuleDict({"encoder": encoder, "heads": heads})
        >>> engine = RepresentationEngine(model, "encoder")
        >>> with engine.capture():
        ...     z = encoder(torch.randn(8, 3))
        ...     losses = torch.stack([head(z).pow(2).mean() for head in heads])
        >>> gramian = engine.gramian(losses)
        >>> engine.accumulate_grad(UPGrad().gramian_weighting(gramian), 1.0)
        >>> gramian.shape, encoder.weight.grad is not None
        (torch.Size([2, 2]), True)
    """

    name = "representation"
    #: the structural check (every shared parameter behind the representation) runs on verification steps
    self_check = True
    recomputes_overflow = False
    synchronises_gradients = False
    #: the graph of the losses stays alive after :meth:`gramian` (the generic update path may use it)
    keeps_graph = True

    def __init__(
        self, model: nn.Module, representation: str | None = None, collectives: Collectives | None = None
    ) -> None:
        if representation is not None:
            representation_module(model, representation)
        self.model = model
        self.representation = representation
        self.collectives = collectives
        self.params = [p for p in model.parameters() if p.requires_grad]
        self._batched = BatchedBackward()
        self._outputs: list[tuple[str, Tensor]] = []
        self._cut: list[Tensor] = []
        self._gradients: list[Tensor] = []
        self._losses: Tensor | None = None

    # ------------------------------------------------------------------ capture
    @contextmanager
    def capture(self) -> Iterator[None]:
        """Record the representation during the forward (every module's output while it is being inferred)."""
        self.release()
        if self.representation is not None:
            modules = [(self.representation, representation_module(self.model, self.representation))]
        else:
            modules = [(name, module) for name, module in self.model.named_modules() if name]
        handles = [module.register_forward_hook(self._recorder(name)) for name, module in modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _recorder(self, name: str) -> Any:
        def record(module: nn.Module, inputs: Any, output: Any) -> None:
            tensor = first_tensor(output)
            if tensor is not None and tensor.grad_fn is not None:
                self._outputs.append((name, tensor))

        return record

    # ------------------------------------------------------------------ Gramian
    def gramian(
        self,
        losses: Tensor,
        *,
        verify_rows: Sequence[int] = (),
        dtype: torch.dtype | None = None,
        row_objective: Tensor | None = None,
        token_objective: Tensor | None = None,
    ) -> Tensor:
        """``G^z = C Cᵀ`` (``[k, k]``), ``C`` the task gradients with respect to the representation; writes no
        ``.grad``. ``verify_rows`` non-empty: check that every shared parameter lies behind the representation."""
        if row_objective is not None or token_objective is not None:
            raise GramianEngineError(
                "The representation Gramian weighs per-task losses; objectives over batch rows or token segments "
                "are per-example objectives. Use jd_gramian='exact'."
            )
        if losses.dim() != 1 or losses.numel() < SHARED_MIN_TASKS:
            raise GramianEngineError(
                f"The representation Gramian needs a vector of at least two task losses, got shape {tuple(losses.shape)}."
            )
        inferred = self.representation is None
        if self.representation is None:
            self.representation = infer_representation(losses, self._outputs)
        self._cut = [t for name, t in self._outputs if name == self.representation]
        self._outputs = []
        if not self._cut:
            raise GramianEngineError(
                f"The representation module {self.representation!r} produced no tensor with a gradient during the "
                "forward: name the module whose output the task heads read (jd_representation)."
            )
        if verify_rows and not inferred:  # an inferred representation passed the same check
            check_representation(losses, self._cut, self.representation, self._names())
        k = losses.numel()
        eye = torch.eye(k, dtype=losses.dtype, device=losses.device)
        found = self._batched(losses, self._cut, eye, retain_graph=True)
        kept = [(z, g) for z, g in zip(self._cut, found) if g is not None]
        if not kept:
            raise GramianEngineError(
                f"No task loss depends on the output of {self.representation!r}: name the module whose output the "
                "task heads read (jd_representation)."
            )
        self._cut = [z for z, _ in kept]
        self._gradients = [g.detach() for _, g in kept]
        self._losses = losses
        gramian = gramian_of_blocks(self._gradients, dtype or accumulation_dtype(self._gradients[0].dtype))
        if self.collectives is not None and self.collectives.world_size() > 1:
            self.collectives.all_reduce_sum_(gramian)
            gramian = gramian / self.collectives.world_size() ** 2
        return gramian

    # ------------------------------------------------------------------ update
    def accumulate_grad(self, weights: Tensor, scale: float) -> None:
        """``.grad += scale · ∇S`` for the surrogate ``S`` of the module docstring: ``scale · Jᵀw`` behind the
        representation, ``scale · ∇L_t`` in the heads; frees the capture."""
        losses = self._losses
        if losses is None:
            raise RuntimeError(
                "accumulate_grad before gramian: capture a forward and form its Gramian first."
            )
        try:
            if weights.numel() != losses.numel():
                raise GramianEngineError(f"Expected {losses.numel()} weights, got {weights.numel()}.")
            shifted = weights.detach().reshape(-1) - 1
            surrogate = losses.sum() * scale
            for z, g in zip(self._cut, self._gradients):
                direction = torch.tensordot(shifted.to(g.dtype), g, dims=1) * scale
                surrogate = surrogate + (z * direction.to(z.dtype)).sum()
            surrogate.backward()
        finally:
            self.release()

    def _names(self) -> dict[int, str]:
        return {id(p): name for name, p in self.model.named_parameters()}

    def release(self) -> None:
        """Free everything captured without writing ``.grad``."""
        self._outputs, self._cut, self._gradients, self._losses = [], [], [], None

    def gradients_are_finite(self) -> bool:
        return written_gradients_are_finite(self.params)


def first_tensor(output: Any) -> Tensor | None:
    """The representation a module call produces: its output if a tensor, else the first tensor of it
    (a ``ModelOutput``'s first field, a tuple's first tensor)."""
    if isinstance(output, Tensor):
        return output
    leaves, _ = tree_flatten(output)
    return next((leaf for leaf in leaves if isinstance(leaf, Tensor)), None)


def representation_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule ``name`` of ``model`` (``jd_representation``), or a clear error listing its children."""
    if not name:
        raise ValueError(
            "jd_representation='' names the whole model; name the submodule whose output the task heads read "
            "(e.g. 'encoder'), or leave it unset to infer it."
        )
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = [child for child, _ in model.named_children()]
        raise ValueError(
            f"jd_representation={name!r} is not a submodule of {type(model).__name__} (its children: "
            f"{', '.join(children) or 'none'}). Name the module whose output the task heads read, as in "
            "model.named_modules()."
        ) from None


def _task_leaves(losses: Tensor, stop: Sequence[Tensor]) -> list[dict[int, Tensor]]:
    """Per task, the leaves its loss reaches without going through the tensors of ``stop``."""
    per_task = leaves_per_task(losses, stop)
    if per_task is None:
        raise GramianEngineError(
            "The representation Gramian tells the tasks apart by their autograd graphs, which needs the loss "
            "vector built by torch.stack of the task losses (as hf_jd.losses.task_losses does)."
        )
    return per_task


def _shared_params(losses: Tensor) -> dict[int, Tensor]:
    """The parameters (by ``id``) at least two task losses reach; raises when there are none."""
    shared = shared_leaves(_task_leaves(losses, ()))
    if not shared:
        raise GramianEngineError(
            "No parameter is reached by two task losses: per-task JD has nothing shared to weigh."
        )
    return shared


def _reached_around(losses: Tensor, cut: Sequence[Tensor], shared: dict[int, Tensor]) -> dict[int, Tensor]:
    """The ``shared`` parameters some task loss reaches without passing through the tensors of ``cut``. When
    there are none, every path from the losses to a shared parameter crosses ``cut``: they all lie behind it."""
    return {
        key: leaf for leaves in _task_leaves(losses, cut) for key, leaf in leaves.items() if key in shared
    }


def check_representation(losses: Tensor, cut: Sequence[Tensor], name: str, names: dict[int, str]) -> None:
    """Refuse a representation that some shared parameter is reached around: that path's gradient would
    reach the parameter unweighted, and the Gramian would not see it."""
    around = _reached_around(losses, cut, _shared_params(losses))
    if around:
        raise GramianEngineError(
            f"The parameters {_listed(around, names)} are reached by several task losses, and by at least one "
            f"without passing through the output of {name!r} (the shared representation, its output's first "
            "tensor): the representation Gramian cannot weigh them. Name a later module whose output every task "
            "head reads (jd_representation), or use jd_gramian='exact'."
        )


def infer_representation(losses: Tensor, outputs: Sequence[tuple[str, Tensor]]) -> str:
    """The last module (in the order calls finished) whose output separates the task losses from every
    parameter they share; raises when there is none."""
    shared = _shared_params(losses)
    calls: dict[str, list[Tensor]] = {}
    for name, tensor in outputs:  # re-inserted at each call: ordered by each module's last finished call
        calls[name] = [*calls.pop(name, []), tensor]
    for name in reversed(calls):
        if not _reached_around(losses, calls[name], shared):
            return name
    raise GramianEngineError(
        "No module's output separates the task losses from the parameters they share (a shared parameter is "
        "reached around every candidate). Name the representation (jd_representation) or use jd_gramian='exact'."
    )


def _listed(found: dict[int, Tensor], names: dict[int, str], limit: int = 3) -> str:
    """The names of the first ``limit`` parameters of ``found`` (their shapes when unnamed)."""
    shown = [
        names.get(key, f"<parameter of shape {tuple(t.shape)}>") for key, t in list(found.items())[:limit]
    ]
    more = f" and {len(found) - limit} more" if len(found) > limit else ""
    return ", ".join(shown) + more
