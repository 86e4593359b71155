"""Forward hooks: record every call of a parameter-owning module, broadcast leading-1 outputs.

The recorder runs in one of three modes:

* ``capture`` (inside :meth:`GramianEngine.capture`): each call of a module that owns trainable
  parameters becomes a :class:`~hf_jd.gramian._use.Call` holding its inputs and the gradient edges of its outputs. An output
  whose leading dimension is 1 while the batch has ``B > 1`` examples (BERT's and GPT-2's position
  embeddings of the default ``position_ids [1, T]``) is returned expanded to ``B``: the model computes
  the same values (it broadcast that tensor over the batch anyway), but the gradient captured at the
  expanded tensor keeps one slice per example instead of their sum.
* ``replay`` (during the engine's backward): activation checkpointing recomputes modules; the hooks
  expand outputs exactly as in the original forward and record nothing.
* ``probe``: a calibration forward on one example records the leading dimension of every input and
  output, which tells apart dimensions that follow the batch from ones that merely equal ``B``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from ._functional import FunctionalCalls, op_weight_position
from ._plan import CallKind
from ._replay import RngState, autocast_snapshot, rng_changed, rng_snapshot
from ._rule import Rule
from ._torch_ops import (
    TRACE_ELEMENTWISE,
    TreeSpec,
    is_view,
    next_functions,
    op_name,
    output_shape,
    tree_flatten,
    tree_unflatten,
    version,
    view_base,
)
from ._use import Call, CallKey

BATCH_INPUT_NAMES = (
    "input_ids",
    "inputs_embeds",
    "pixel_values",
    "input_values",
    "input_features",
    "attention_mask",
    "decoder_input_ids",
    "labels",
)

Mode = Literal["off", "capture", "replay", "probe"]
#: A call of the model (an outermost module call) captured for the probe: ``(module, args, kwargs)``.
OuterCall = tuple[nn.Module, tuple[object, ...], dict[str, object]]
#: Leading dimensions of a call's input leaves and output leaves, as seen by the probe.
Leads = tuple[list[int | None], list[int | None]]
ProbeLeads = dict[CallKey, Leads]
PreHook = Callable[[nn.Module, tuple[object, ...], dict[str, object]], None]
PostHook = Callable[[nn.Module, tuple[object, ...], dict[str, object], object], object]


def loss_count_mismatch(batch: int, losses: int) -> str:
    """The message for a per-example loss vector whose length is not the batch size (both engines use it)."""
    return (
        f"per_example objectives need one loss per example: the batch has {batch} examples but the loss vector "
        f"has {losses} entries. Reduce token losses per example, or use per-task objectives (jd_objectives='per_task')."
    )


def infer_batch_size(args: tuple[object, ...], kwargs: dict[str, object]) -> int | None:
    """Batch size of a model call, from its usual input names, else its first tensor argument."""
    for name in BATCH_INPUT_NAMES:
        value = kwargs.get(name)
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    for value in (*args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _lead(value: object) -> int | None:
    return value.shape[0] if isinstance(value, Tensor) and value.dim() >= 1 else None


def base_lead(value: object) -> tuple[int, str] | None:
    """Leading dimension and producing op of the contiguous tensor that ``value`` is a reshape of.

    Both contiguous over the same memory, same offset and size: ``value`` is ``base.reshape(...)``, so
    with ``base`` of leading dimension ``B`` and ``value`` of ``B·k`` rows, rows ``[i k, (i+1) k)`` of
    ``value`` are exactly ``base[i]``. The op (``grad_fn`` name) tells apart a ``.contiguous()`` copy
    from a tensor that needed none: with a single example, ``x.transpose(0, 1)`` is already contiguous,
    so the calibration forward may see an earlier base than the real one (compare the ops, not just
    the leading dimensions).
    """
    base = view_base(value) if isinstance(value, Tensor) else None
    if base is None or not isinstance(value, Tensor) or base.dim() == 0 or value.dim() == 0:
        return None
    same = value.storage_offset() == base.storage_offset() and value.numel() == base.numel()
    if base.grad_fn is None or not (same and value.is_contiguous() and base.is_contiguous()):
        return None
    return base.shape[0], op_name(base.grad_fn)


@dataclass
class Frame:
    """What the pre-hook of an owner's call saw, for the post-hook of the same call."""

    key: CallKey
    #: RNG state before the call (capture mode, for rules that replay it).
    rng: RngState | None = None
    #: Version counter of every input leaf (``None`` for non-tensors) before the call (capture mode).
    versions: list[int | None] | None = None
    #: The flattened ``(args, kwargs)`` of the call and their structure (capture mode).
    leaves: list[object] | None = None
    spec: TreeSpec | None = None


@dataclass
class ProbeRecord:
    """What the calibration forward (probe mode) saw of each call, by call key."""

    #: Leading dimensions of the call's input and output leaves.
    leads: ProbeLeads = field(default_factory=dict)
    #: :func:`base_lead` of the call's primary input.
    bases: dict[CallKey, tuple[int, str] | None] = field(default_factory=dict)
    #: With gradients enabled: the gradient edges of the call's outputs that require grad (they hold
    #: the calibration graph: keep the record no longer than needed).
    edges: dict[CallKey, list[GradientEdge]] = field(default_factory=dict)


@dataclass
class CapturedOutput:
    """A call's flattened output, with the leading-1 tensors expanded to the batch size."""

    #: Output leaves, expanded where ``expanded`` says so (what the model then receives).
    leaves: list[object]
    spec: TreeSpec
    #: Leading dimension of every leaf before the expansion.
    out_lead: list[int | None]
    expanded: list[bool]


class Recorder:
    """Installs the hooks for one mode and collects what they see."""

    def __init__(
        self,
        model: nn.Module,
        owners: list[tuple[nn.Module, Rule[Any]]],
        per_task: bool,
        expand_broadcast: bool = True,
        op_rules: dict[int, Rule[Any]] | None = None,
    ) -> None:
        self.model = model
        self.owners = owners
        #: Owners (by index, hooked with the generic rule) that are also recorded at the functional op
        #: they call, with the stock rule of that op (:mod:`hf_jd.gramian._functional`). Their op calls
        #: are keyed ``CallKey(CallKind.OP, index, call)``; when an owner's op was recorded in a capture,
        #: its module-level (generic) calls are dropped at the end of it.
        self.op_rules = op_rules or {}
        #: The same, for ``x @ weight.T`` calls of ``nn.Linear``-based owners: the linear rule on the weight
        #: alone (their bias is added outside the product).
        self.matmul_rules: dict[int, Rule[Any]] = {
            index: type(rule)(rule.module, {"weight": rule.params["weight"]})
            for index, rule in self.op_rules.items()
            if isinstance(rule.module, nn.Linear)
        }
        #: Never serve an op-level owner by its module-level (generic) record: under FSDP2, whose
        #: engine cannot re-run a module (its full parameters are freed after use).
        self.op_level_only = False
        watched = {
            index: (owners[index][0], *op_weight_position(rule)) for index, rule in self.op_rules.items()
        }
        #: The op-level owners whose calls are running, innermost last (the ops are watched while any).
        self._running: list[int] = []
        self._functional = FunctionalCalls(watched, self._op_call, self._running) if watched else None
        self.per_task = per_task
        self.expand_broadcast = expand_broadcast
        self.mode: Mode = "off"
        self._modules = list(model.modules())
        self.reset()

    def reset(self) -> None:
        self.batch: int | None = None
        self.outer_calls: list[OuterCall] = []
        self.calls: list[Call] = []
        self.expanded_modules: list[str] = []
        #: Capture mode: the owners (by index) that returned an expanded output, whose hooks replay it.
        self._expanded_owners: set[int] = set()
        #: Probe mode: what the calibration forward sees (:meth:`probe`).
        self._probe: ProbeRecord | None = None
        #: Capture mode: the call key of each recorded output's graph node.
        self._out_nodes: dict[Node, CallKey] = {}
        self._depth = 0
        self._counts: dict[tuple[CallKind, int], int] = {}
        self._frames: dict[int, list[Frame | None]] = {}

    # ------------------------------------------------------------------ installation
    @contextmanager
    def active(self, mode: Mode) -> Iterator[None]:
        handles = []
        self.mode = mode
        self._depth = 0
        self._counts = {}
        self._frames = {}
        try:
            if mode == "capture":  # the outer calls (batch size, probe) are read in capture mode only
                for module in self._modules:
                    handles.append(module.register_forward_pre_hook(self._outer_pre, with_kwargs=True))
                    handles.append(module.register_forward_hook(self._outer_post, always_call=True))
            for index, (module, rule) in enumerate(self.owners):
                if mode == "replay" and index not in self._expanded_owners:
                    continue  # a recomputed call of this module has nothing to expand: no hook needed
                handles.append(module.register_forward_pre_hook(self._pre(index, rule), with_kwargs=True))
                handles.append(module.register_forward_hook(self._post(index, rule), with_kwargs=True))
            if self._functional is not None and mode in ("capture", "probe"):
                # Watch the functional ops only inside the calls of the op-level owners.
                for index in self.op_rules:
                    module = self.owners[index][0]
                    handles.append(module.register_forward_pre_hook(self._watch_ops(index)))
                    handles.append(module.register_forward_hook(self._unwatch_ops, always_call=True))
            yield
            if mode == "capture" and self.op_rules:
                self._keep_op_level_calls()
        finally:
            for handle in handles:
                handle.remove()
            self.mode = "off"

    def rules(self) -> list[Rule[Any]]:
        """Every rule instance: the owners' and the op-level ones (whose ``params`` FSDP2 swaps)."""
        return [rule for _, rule in self.owners] + [*self.op_rules.values(), *self.matmul_rules.values()]

    def _keep_op_level_calls(self) -> None:
        """Drop the module-level (generic) calls of the owners whose functional op was recorded in this capture."""
        at_op = {call.key.owner for call in self.calls if call.key.kind is CallKind.OP}
        if self.op_level_only:
            at_op = set(self.op_rules)
        kept = []
        for call in self.calls:
            if call.key.kind is CallKind.MODULE and call.key.owner in at_op:
                call.release()
            else:
                kept.append(call)
        self.calls = kept

    # ------------------------------------------------------------------ outer call (batch size, probe)
    def _outer_pre(self, module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        if self._depth == 0 and self.mode == "capture":
            self.outer_calls.append((module, args, kwargs))
            if self.batch is None:
                self.batch = infer_batch_size(args, kwargs)
        self._depth += 1

    def _outer_post(self, module: nn.Module, args: tuple[object, ...], output: object) -> None:
        self._depth -= 1

    # ------------------------------------------------------------------ owner hooks
    def _expand_to(self) -> int | None:
        if not self.expand_broadcast or self.per_task or self.mode not in ("capture", "replay"):
            return None
        if self.batch is None or self.batch <= 1:
            return None
        return self.batch

    def _pre(self, index: int, rule: Rule[Any]) -> PreHook:
        def hook(module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            if self.mode in ("capture", "probe"):
                key = self._next_key(CallKind.MODULE, index)
                frame = Frame(key)
                if self.mode == "capture":
                    if rule.needs_rng:
                        frame.rng = rng_snapshot()
                    # To detect a module that modifies its own inputs in place.
                    frame.leaves, frame.spec = tree_flatten((args, kwargs))
                    frame.versions = [
                        version(leaf) if isinstance(leaf, Tensor) else None for leaf in frame.leaves
                    ]
                self._frames.setdefault(index, []).append(frame)
            else:
                self._frames.setdefault(index, []).append(None)

        return hook

    def _post(self, index: int, rule: Rule[Any]) -> PostHook:
        def hook(
            module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object], output: object
        ) -> object:
            frames = self._frames.get(index)
            frame = frames.pop() if frames else None
            if self.mode == "off":
                return None
            # An owner also recorded at its op keeps its output as is: the op's call, inside, sees the
            # unexpanded tensor, and expanding here would make the two records disagree.
            captured = self._expand_output(output, expand=index not in self.op_rules)
            if self.mode == "probe":
                if frame is not None:
                    self._probe_record(frame.key, tree_flatten((args, kwargs))[0], captured)
                return None
            if self.mode == "capture" and frame is not None:
                self._record(rule, frame, args, kwargs, captured)
            if any(captured.expanded):
                if self.mode == "capture":
                    self.expanded_modules.append(type(module).__name__)
                    self._expanded_owners.add(index)
                return tree_unflatten(captured.leaves, captured.spec)
            return None

        return hook

    def probe(self, body: Callable[[], None]) -> ProbeRecord:
        """Run ``body`` (the model's outer calls on one example) in probe mode and return what the hooks
        saw; the capture's own record is left as it was."""
        saved = (self.calls, self.outer_calls, self.batch)
        record = self._probe = ProbeRecord()
        try:
            with self.active("probe"):
                body()
            return record
        finally:
            self._probe = None
            self.calls, self.outer_calls, self.batch = saved

    def _probe_record(self, key: CallKey, in_leaves: list[object], captured: CapturedOutput) -> None:
        """Probe mode: the leading dimensions, the base of the primary input and the output edges."""
        record = self._probe
        if record is None:
            return
        record.leads[key] = ([_lead(v) for v in in_leaves], captured.out_lead)
        tensors = [v for v in in_leaves if isinstance(v, Tensor)]
        record.bases[key] = base_lead(tensors[0]) if tensors else None
        record.edges[key] = [
            get_gradient_edge(leaf)
            for leaf in captured.leaves
            if isinstance(leaf, Tensor) and leaf.requires_grad
        ]

    def _watch_ops(self, index: int) -> Callable[[nn.Module, tuple[object, ...]], None]:
        def hook(module: nn.Module, args: tuple[object, ...]) -> None:
            if not self._running and self._functional is not None:
                self._functional.__enter__()
            self._running.append(index)

        return hook

    def _unwatch_ops(self, module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if self._running:
            self._running.pop()
            if not self._running and self._functional is not None:
                self._functional.__exit__(None, None, None)

    def _op_call(self, index: int, output: object, first: object, matmul: bool = False) -> None:
        """One call of the functional op of an op-level owner (``first``: its input), as a module call."""
        if self.mode not in ("capture", "probe"):
            return
        key = self._next_key(CallKind.OP, index)
        leaves, spec = tree_flatten(output)
        captured = CapturedOutput(leaves, spec, [_lead(leaf) for leaf in leaves], [False] * len(leaves))
        if self.mode == "probe":
            self._probe_record(key, [first], captured)
            return
        before = version(first) if isinstance(first, Tensor) else None
        rule = self.matmul_rules[index] if matmul else self.op_rules[index]
        self._record(rule, Frame(key, versions=[before]), (first,), {}, captured)

    def _next_key(self, kind: CallKind, index: int) -> CallKey:
        """The key of the next call of owner ``index`` (module-level or at its op)."""
        call = self._counts.get((kind, index), 0)
        self._counts[(kind, index)] = call + 1
        return CallKey(kind, index, call)

    def _expand_output(self, output: object, expand: bool = True) -> CapturedOutput:
        """Flatten ``output``; expand its leading-1 tensors that require grad to the batch size (if any)."""
        leaves, spec = tree_flatten(output)
        captured = CapturedOutput(leaves, spec, [_lead(leaf) for leaf in leaves], [False] * len(leaves))
        batch = self._expand_to() if expand else None
        if batch is not None:
            for j, leaf in enumerate(leaves):
                if isinstance(leaf, Tensor) and leaf.requires_grad and leaf.dim() >= 1 and leaf.shape[0] == 1:
                    leaves[j] = leaf.expand(batch, *leaf.shape[1:])
                    captured.expanded[j] = True
        return captured

    def _record(
        self,
        rule: Rule[Any],
        frame: Frame,
        args: tuple[object, ...],
        kwargs: dict[str, object],
        output: CapturedOutput,
    ) -> None:
        """Append the :class:`~hf_jd.gramian._use.Call` of one call of an owner (nothing if no output
        requires grad)."""
        outputs = {
            j: leaf for j, leaf in enumerate(output.leaves) if isinstance(leaf, Tensor) and leaf.requires_grad
        }
        if not outputs:  # no-grad call, or frozen parameters only: nothing to differentiate
            return
        if frame.leaves is not None and frame.spec is not None:
            in_leaves, in_spec = frame.leaves, frame.spec
        else:
            in_leaves, in_spec = tree_flatten((args, kwargs))
        versions_before = frame.versions
        mutated = (
            versions_before is None
            or len(versions_before) != len(in_leaves)
            or any(
                isinstance(leaf, Tensor) and version(leaf) != before
                for leaf, before in zip(in_leaves, versions_before)
            )
        )
        tensors = {k: leaf for k, leaf in enumerate(in_leaves) if isinstance(leaf, Tensor)}
        primary = next(iter(tensors), None)
        kept: list[object]
        if rule.keep_all_inputs:
            kept = [leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in in_leaves]
        else:
            kept = [None] * len(in_leaves)
            if primary is not None:
                kept[primary] = tensors[primary].detach()
        in_nodes: list[Node] = []
        for leaf in in_leaves:
            if isinstance(leaf, Tensor) and leaf.requires_grad:
                in_nodes.append(get_gradient_edge(leaf).node)
        primary_tensor = tensors[primary] if primary is not None else None
        primary_output = None
        if primary_tensor is not None and primary_tensor.requires_grad:
            edge = get_gradient_edge(primary_tensor)
            primary_output = (edge.node, edge.output_nr)
        call = Call(
            rule=rule,
            key=frame.key,
            inputs=kept,
            in_spec=in_spec,
            in_lead=[_lead(v) for v in in_leaves],
            primary=primary,
            out_lead=output.out_lead,
            out_index=list(outputs),
            edges=[get_gradient_edge(leaf) for leaf in outputs.values()],
            expanded=[output.expanded[j] for j in outputs],
            in_nodes=in_nodes,
            versions=[(v, version(v)) for v in kept if isinstance(v, Tensor)],
            mutated=mutated,
            rng=frame.rng if frame.rng is not None and rng_changed(frame.rng) else None,
            autocast=autocast_snapshot() if rule.needs_rng else None,
            base_lead=base_lead(primary_tensor) if primary_tensor is not None else None,
            source=self._source(primary_tensor) if primary_tensor is not None else None,
            primary_output=primary_output,
            out_versions=[(leaf, version(leaf)) for leaf in outputs.values() if is_view(leaf)],
        )
        self._out_nodes.update({edge.node: frame.key for edge in call.edges})
        self.calls.append(call)

    def _source(self, value: Tensor) -> CallKey | None:
        """The recorded call whose output ``value`` is, through elementwise ops only."""
        node = value.grad_fn
        while node is not None and node not in self._out_nodes and op_name(node) in TRACE_ELEMENTWISE:
            inputs = [(n, k) for n, k in next_functions(node) if n is not None]
            if len(inputs) != 1:
                return None
            before, k = inputs[0]
            same_shape = output_shape(node) == output_shape(before, k)
            node = before if same_shape else None
        return self._out_nodes.get(node) if node is not None else None
