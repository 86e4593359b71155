"""The backend seam (``hf_jd.trainer._backends``): selection, refusals, the generic update path, capabilities.

FSDP2 is exercised on a one-process gloo group (``fully_shard`` needs a process group; the sharded step
itself runs on two processes in ``tests/distributed/test_fsdp.py``); DeepSpeed and FSDP1 through a fake
accelerator state holding their accelerate plugin.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import get_type_hints

import pytest
import torch
import torch.distributed as dist
from _trainer_fixtures import base_args
from torch import nn
from torch.distributed.fsdp import fully_shard

from hf_jd import JDTrainingArguments
from hf_jd.aggregation import UPGrad
from hf_jd.distributed import FSDPGramianEngine
from hf_jd.gramian import GramianEngine
from hf_jd.trainer._backends import (
    Backend,
    DdpBackend,
    DeepSpeedBackend,
    EngineChoice,
    Fsdp2Backend,
    backend_for_module,
    select_backend,
)
from hf_jd.trainer._backends import _ddp as ddp_module
from hf_jd.trainer._engine_choice import EngineSelector
from hf_jd.trainer._engines import GlobalGramianEngine, JDEngine
from hf_jd.trainer._jacobian_backend import JacobianBackend
from hf_jd.trainer._jd_step import StepSettings, jd_update

HF_JD = Path(__file__).resolve().parents[2] / "hf_jd"


class TwoTasks(nn.Module):
    """A shared body and one head per task (task-specific parameters), or one head for both (all shared)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4))
        self.head_a = nn.Linear(4, 1)
        self.head_b = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)
        return self.head_a(h).sum(-1), self.head_b(h).sum(-1)  # sum: not a view (FSDP2 warns on views)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(6, 5, generator=generator), torch.randn(6, generator=generator)


def losses_of(model: TwoTasks, per_task: bool) -> torch.Tensor:
    x, y = batch()
    a, b = model(x)
    if per_task:
        return torch.stack([(a - y).pow(2).mean(), (b + y).abs().mean()])
    return (a - y).pow(2) + 0.5 * b.pow(2)


def grads_after_step(engine: JDEngine, model: TwoTasks, per_task: bool, backend: Backend | None) -> dict:
    with engine.capture():
        losses = losses_of(model, per_task)
    jd_update(engine, UPGrad(), losses, 0.5, StepSettings(per_task=per_task, global_scope=False), backend)
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def one_process_group(tmp_path):
    """A one-process gloo group, so that ``fully_shard`` can be applied in this process."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def sharded_model() -> TwoTasks:
    model = TwoTasks()
    for module in (model.body[0], model.body[2], model.head_a, model.head_b):
        fully_shard(module)
    fully_shard(model)
    return model


def accelerator_with(**plugins: object) -> SimpleNamespace:
    """A stand-in for ``Accelerator``: the state's FSDP / DeepSpeed plugins are what detection reads."""
    state = SimpleNamespace(fsdp_plugin=None, deepspeed_plugin=None)
    for name, plugin in plugins.items():
        setattr(state, name, plugin)
    return SimpleNamespace(state=state)


# ---------------------------------------------------------------------------------------- selection
def test_a_plain_run_is_served_by_the_ddp_backend():
    backend = select_backend(accelerator_with(), TwoTasks())
    assert isinstance(backend, DdpBackend) and backend.name == "ddp"
    assert isinstance(backend_for_module(TwoTasks()), DdpBackend)


def test_a_fully_shard_model_is_served_by_the_fsdp2_backend(one_process_group):
    model = sharded_model()
    backend = select_backend(accelerator_with(), model)
    assert isinstance(backend, Fsdp2Backend) and backend.version == 2
    assert isinstance(backend_for_module(model), Fsdp2Backend)
    engine = backend.build_engine(
        EngineChoice("gramian"), model, JDTrainingArguments(**base_args(Path("."))), 1
    )
    assert isinstance(engine, FSDPGramianEngine)


def test_accelerates_fsdp_plugin_selects_fsdp_by_its_version():
    for version in (1, 2):
        backend = select_backend(
            accelerator_with(fsdp_plugin=SimpleNamespace(fsdp_version=version)), TwoTasks()
        )
        assert isinstance(backend, Fsdp2Backend) and backend.version == version


def test_accelerates_deepspeed_plugin_selects_deepspeed_with_its_zero_stage():
    backend = select_backend(accelerator_with(deepspeed_plugin=SimpleNamespace(zero_stage=3)), TwoTasks())
    assert isinstance(backend, DeepSpeedBackend) and backend.zero_stage == 3


# ---------------------------------------------------------------------------------------- refusals
def test_fsdp1_is_refused_by_its_backend(tmp_path):
    args = JDTrainingArguments(**base_args(tmp_path))
    with pytest.raises(
        ValueError, match="accelerate config.*does not support FSDP1.*fsdp_version: 2.*DeepSpeed"
    ):
        Fsdp2Backend(1).check(args, None)


@pytest.mark.parametrize(
    "setting",
    [
        {"jd_engine": "jacobian"},
        {"scalarizer": "mean"},
        {"aggregator": "trimmed_mean", "aggregator_kwargs": {"trim_number": 1}},
    ],
)
def test_an_fsdp2_refusal_is_the_same_from_the_arguments_and_from_the_backend(tmp_path, setting):
    with pytest.raises(ValueError) as from_arguments:
        JDTrainingArguments(**base_args(tmp_path), fsdp=True, fsdp_config={"version": 2}, **setting)
    args = JDTrainingArguments(**base_args(tmp_path), **setting)
    aggregator = None if args.scalarizer is not None else args.build_aggregator()
    with pytest.raises(ValueError) as from_backend:
        Fsdp2Backend().check(args, aggregator)
    assert str(from_backend.value) == str(from_arguments.value)
    DdpBackend().check(args, aggregator)  # DDP serves every one of them


@pytest.mark.parametrize(
    "text",
    [
        "the JD step writes its gradients itself and, with sharded",  # FSDP1 and DeepSpeed (arguments or accelerate)
        "the explicit Jacobian would hold full-size gradients",  # FSDP2 + jd_engine='jacobian'
        "with --scalarizer is not supported yet",  # FSDP2 + --scalarizer
        "needs the Jacobian itself, which is never formed under FSDP2",  # FSDP2 + an aggregator that needs J
    ],
)
def test_each_sharding_refusal_is_written_once(text):
    where = [
        str(p.relative_to(HF_JD))
        for p in sorted(HF_JD.rglob("*.py"))
        if text in p.read_text(encoding="utf-8")
    ]
    assert where == ["training_args.py"], where


def test_the_fsdp2_backend_offers_only_the_sharded_gramian_engine(tmp_path):
    args = JDTrainingArguments(**base_args(tmp_path))
    assert Fsdp2Backend().engine_choices(args, UPGrad(), 2) == [
        EngineChoice("gramian", expand_broadcast=True),
        EngineChoice("gramian", expand_broadcast=False),
    ]
    with pytest.raises(ValueError, match="must land in the shards"):
        Fsdp2Backend().build_engine(EngineChoice("jacobian"), TwoTasks(), args, 1)


# ---------------------------------------------------------------------------------------- update paths
@pytest.mark.parametrize("per_task", [False, True])
def test_the_generic_update_path_writes_what_the_one_backward_writers_write(per_task):
    objectives = "per_task" if per_task else "per_example"
    written = {}
    for key, backend in (("writer", DdpBackend()), ("generic", DdpBackend(update="backward"))):
        model = TwoTasks()
        engine = JacobianBackend(model, per_task=per_task, keep_graph=backend.update == "backward")
        written[key] = grads_after_step(engine, model, per_task, backend)
    model = TwoTasks()
    written["gramian"] = grads_after_step(GramianEngine(model, objectives=objectives), model, per_task, None)
    model = TwoTasks()  # the Gramian engine's Gramian, then the backend's own backward of s·wᵀL
    engine = GramianEngine(model, objectives=objectives, keep_graph=True)
    written["gramian_generic"] = grads_after_step(engine, model, per_task, DdpBackend(update="backward"))
    assert written["generic"].keys() == written["writer"].keys() == written["gramian"].keys()
    assert written["gramian_generic"].keys() == written["writer"].keys()
    for name, grad in written["writer"].items():
        assert float(grad.abs().max()) > 1e-3, name
        assert torch.allclose(written["generic"][name], grad, atol=1e-6, rtol=0), name
        assert torch.allclose(written["gramian"][name], grad, atol=1e-6, rtol=0), name
        assert torch.allclose(written["gramian_generic"][name], grad, atol=1e-6, rtol=0), name
    if per_task:  # a head reached by one task only gets its plain task gradient, not w_k times it
        model = TwoTasks()
        with JacobianBackend(model, per_task=True, keep_graph=True).capture():
            losses = losses_of(model, per_task=True)
        (plain,) = torch.autograd.grad(losses[0] * 0.5, model.head_a.weight)
        assert torch.allclose(written["generic"]["head_a.weight"], plain, atol=1e-6, rtol=0)


class GenericUpdateBackend(DdpBackend):
    """DDP's engines with the base class's own (generic) ``write_update``."""

    write_update = Backend.write_update


def test_the_generic_update_path_needs_the_graph_kept():
    model = TwoTasks()
    engine = GramianEngine(model)
    with engine.capture():
        losses = losses_of(model, per_task=False)
    with pytest.raises(ValueError, match="frees when it forms the Gramian"):
        jd_update(
            engine,
            UPGrad(),
            losses,
            1.0,
            StepSettings(per_task=False, global_scope=False),
            GenericUpdateBackend(),
        )


def test_the_engine_writer_through_a_backend_is_bit_identical_to_no_backend():
    model = TwoTasks()
    without = grads_after_step(GramianEngine(model), model, False, None)
    model = TwoTasks()
    through = grads_after_step(GramianEngine(model), model, False, DdpBackend())
    assert all(torch.equal(through[name], grad) for name, grad in without.items())


def test_the_engine_selector_builds_the_backends_engines(tmp_path):
    args = JDTrainingArguments(**base_args(tmp_path))
    backend = DdpBackend(update="backward")
    selector = EngineSelector(backend.engine_choices(args, UPGrad(), 1), args, backend)
    engine = selector.current(TwoTasks())
    assert isinstance(engine, JacobianBackend) and engine.keeps_graph
    with pytest.raises(ValueError, match="jd_engine='gramian' with the generic update path"):
        backend.check(JDTrainingArguments(**base_args(tmp_path), jd_engine="gramian"), None)
    default = EngineSelector(DdpBackend().engine_choices(args, UPGrad(), 1), args)
    assert isinstance(default.current(TwoTasks()), GramianEngine)


@pytest.mark.parametrize(
    ("scope", "objectives", "update", "op"),
    [
        ("local", "per_example", "engine", "mean"),
        ("global", "per_example", "engine", "sum"),
        ("global", "per_task", "engine", None),  # J was averaged over ranks by the engine
        ("global", "per_task", "backward", "mean"),  # the generic path wrote each rank's own J_rᵀw
    ],
)
def test_ddp_synchronises_once_per_optimizer_step_matching_the_scope(
    monkeypatch, tmp_path, scope, objectives, update, op
):
    calls = []
    monkeypatch.setattr(ddp_module, "world_size", lambda: 2)
    monkeypatch.setattr(ddp_module, "all_reduce_grads_", lambda params, op: calls.append(op))
    args = JDTrainingArguments(**base_args(tmp_path), jd_scope=scope, jd_objectives=objectives)
    engine = JacobianBackend(TwoTasks(), per_task=objectives == "per_task")
    backend = DdpBackend(update=update)
    backend.after_micro_batch(engine, args, sync_gradients=False)
    assert calls == []
    backend.after_micro_batch(engine, args, sync_gradients=True)
    assert calls == ([op] if op else [])


def test_fsdp2_adds_nothing_after_a_micro_batch(monkeypatch, tmp_path):
    monkeypatch.setattr(
        ddp_module, "all_reduce_grads_", lambda *a, **k: pytest.fail("no all-reduce under FSDP2")
    )
    engine = JacobianBackend(TwoTasks(), per_task=False)
    Fsdp2Backend().after_micro_batch(engine, JDTrainingArguments(**base_args(tmp_path)), sync_gradients=True)


# ---------------------------------------------------------------------------------------- capabilities
def test_the_protocol_states_the_capabilities():
    hints = get_type_hints(JDEngine)
    assert hints["synchronises_gradients"] is bool and hints["keeps_graph"] is bool
    assert callable(JDEngine.gradients_are_finite)


def test_every_engine_states_its_capabilities(one_process_group):
    gramian = GramianEngine(TwoTasks())
    jacobian = JacobianBackend(TwoTasks(), per_task=False)
    sharded = FSDPGramianEngine(sharded_model())
    for engine in (gramian, jacobian, sharded):
        assert isinstance(engine, JDEngine) and isinstance(engine, GlobalGramianEngine)
    assert (
        gramian.synchronises_gradients,
        jacobian.synchronises_gradients,
        sharded.synchronises_gradients,
    ) == (
        False,
        False,
        True,
    )
    assert (gramian.keeps_graph, jacobian.keeps_graph, sharded.keeps_graph) == (False, False, False)
    assert JacobianBackend(TwoTasks(), per_task=False, keep_graph=True).keeps_graph
    assert GramianEngine(TwoTasks(), keep_graph=True).keeps_graph


@pytest.mark.parametrize("kind", ["gramian", "jacobian"])
def test_gradients_are_finite_reads_the_written_gradients(kind):
    model = TwoTasks()
    engine = GramianEngine(model) if kind == "gramian" else JacobianBackend(model, per_task=False)
    assert engine.gradients_are_finite()  # no .grad yet
    grads_after_step(engine, model, False, None)
    assert engine.gradients_are_finite() and DdpBackend().gradients_are_finite(engine)
    model.head_b.bias.grad[0] = float("nan")
    assert not engine.gradients_are_finite() and not DdpBackend().gradients_are_finite(engine)


def test_fsdp2_gradients_are_finite_reads_the_local_shards(one_process_group):
    model = sharded_model()
    engine = FSDPGramianEngine(model)
    engine.check_supported()
    with engine.capture():
        losses = losses_of(model, per_task=False)
    jd_update(engine, UPGrad(), losses, 1.0, StepSettings(per_task=False, global_scope=False), Fsdp2Backend())
    assert Fsdp2Backend().gradients_are_finite(engine)
    model.head_a.weight.grad.to_local()[0, 0] = float("inf")
    assert not Fsdp2Backend().gradients_are_finite(engine)
