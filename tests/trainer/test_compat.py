"""The stock internals hf_jd relies on still exist, and the stock step does nothing the mixin does not know of."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from accelerate.state import AcceleratorState
from transformers import Trainer

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.trainer import _compat
from hf_jd.trainer._compat import (
    ACCELERATOR_INTERNALS,
    COMPUTE_LOSS_USES,
    OVERRIDDEN_HOOKS,
    TRAINER_INTERNALS,
    TRAINING_STEP_USES,
    Handling,
    names_used,
)

TABLES = {"training_step": TRAINING_STEP_USES, "compute_loss": COMPUTE_LOSS_USES}
GUARDS = (
    "refuse_unservable_setups",
    "DeepSpeedBackend.check",
    "JDTrainerMixin.__init__",
    "SageMaker branch only",
)


def _unclassified(function: Callable, table: dict) -> tuple[set[str], set[str]]:
    """The names ``function`` uses that the table does not classify, and the table's names it no longer uses."""
    used = names_used(function)
    return used - set(table), set(table) - used


@pytest.mark.parametrize("method", sorted(TABLES))
def test_every_name_the_stock_method_uses_is_served_refused_or_irrelevant(method):
    new, gone = _unclassified(getattr(Trainer, method), TABLES[method])
    assert not new, (
        f"Trainer.{method} now uses {sorted(new)}: decide whether JDTrainerMixin serves it (it runs inside "
        f"super().training_step), must refuse it at construction, or may ignore it, and add it to hf_jd/trainer/"
        f"_compat.py's table with the reason."
    )
    assert not gone, f"Trainer.{method} no longer uses {sorted(gone)}: remove them from _compat.py's table."


def test_a_new_name_in_the_stock_step_is_caught():
    def training_step(self, model, inputs, num_items_in_batch=None):
        cp_context, inputs = self._prepare_context_parallel_inputs(model, inputs)
        loss = self.compute_loss(model, inputs)
        self.accelerator.backward(loss)
        self.new_hook(loss)  # behaviour a new release might add
        model.zero_grad()
        return record_step(loss.detach())  # noqa: F821 (a global the release might add)

    new, _ = _unclassified(training_step, TRAINING_STEP_USES)
    assert new == {"self.new_hook", "model.zero_grad", "record_step"}


@pytest.mark.parametrize("method", sorted(TABLES))
def test_each_refusal_names_its_guard(method):
    for name, (handling, reason) in TABLES[method].items():
        assert reason, name
        if handling is Handling.REFUSED:
            assert any(guard in reason for guard in GUARDS), f"{name}: which guard refuses it? ({reason})"


def test_the_internals_exist_on_a_trained_trainer(tmp_path):
    args = JDTrainingArguments(**base_args(tmp_path, max_steps=1), jd_engine="jacobian")
    trainer = JDTrainer(model=tiny_bert(), args=args, train_dataset=classification_dataset(4))
    trainer.train()  # current_gradient_accumulation_steps is set by the training loop
    missing = [name for name in TRAINER_INTERNALS if not hasattr(trainer, name)]
    missing += [
        f"accelerator.{name}" for name in ACCELERATOR_INTERNALS if not hasattr(trainer.accelerator, name)
    ]
    assert not missing, f"gone from the installed transformers/accelerate: {missing}"
    assert _compat.current_gradient_accumulation_steps(trainer) == 1
    assert _compat.syncs_gradients(trainer.accelerator) in (True, False)
    assert _compat.grad_scaler(trainer.accelerator) is None and _compat.grad_scale(trainer.accelerator) == 1.0
    assert (
        _compat.deepspeed_zero_stage(trainer.accelerator) == (False, None)
        and _compat.fsdp_plugin_version(trainer.accelerator) is None
    )
    with _compat.compute_loss_context(trainer):
        pass


def test_accelerate_still_keeps_the_fsdp_plugin_on_its_state():
    source = inspect.getsource(AcceleratorState.__init__)
    assert "self.fsdp_plugin = fsdp_plugin" in source


@pytest.mark.parametrize(("hook", "caller"), sorted(OVERRIDDEN_HOOKS.items()))
def test_the_overridden_private_hooks_are_still_called_by_the_trainer(hook, caller):
    assert callable(getattr(Trainer, hook, None)), f"Trainer.{hook} is gone"
    assert f"self.{hook}" in names_used(getattr(Trainer, caller)), f"Trainer.{caller} no longer calls {hook}"


def test_the_stock_step_calls_backward_once_outside_the_loss_context():
    """The interception relies on it: one accelerator.backward, after compute_loss's `with` block."""
    tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(Trainer.training_step)))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(".backward")
    ]
    assert [ast.unparse(call.func) for call in calls] == ["self.accelerator.backward"]
    contexts = [node for node in ast.walk(tree) if isinstance(node, ast.With)]
    loss_context = [
        node for node in contexts if "compute_loss_context_manager" in ast.unparse(node.items[0].context_expr)
    ]
    assert len(loss_context) == 1
    assert all(node is not calls[0] for node in ast.walk(loss_context[0]))


def test_patched_attribute_restores_what_was_there():
    class Owner:
        def method(self):
            return "class"

    owner = Owner()
    with _compat.patched_attribute(owner, "method", lambda: "patched") as before:
        assert owner.method() == "patched" and before() == "class"
    assert owner.method() == "class" and "method" not in vars(owner)
    owner.method = lambda: "own"
    with pytest.raises(KeyError), _compat.patched_attribute(owner, "method", lambda: "patched"):
        raise KeyError
    assert owner.method() == "own"


def test_only_compat_touches_trainer_and_accelerate_internals():
    """The modules of JDTrainerMixin reach private Trainer attributes and the accelerator only through _compat."""
    root = Path(_compat.__file__).parent
    modules = [
        "_mixin.py",
        "_jd_trainer.py",
        "_scalarized.py",
        "_model_card.py",
        "_checkpoint.py",
        "_metrics.py",
    ]
    allowed_private = set(OVERRIDDEN_HOOKS) | {"_tag_names"}
    found = []
    for module in modules:
        tree = ast.parse((root / module).read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            private = node.attr.startswith("_") and not node.attr.startswith("__")
            if private and hasattr(Trainer, node.attr) and node.attr not in allowed_private:
                found.append(f"{module}: {ast.unparse(node)}")
            on_accelerator = isinstance(node.value, ast.Attribute) and node.value.attr == "accelerator"
            if on_accelerator and node.attr != "num_processes":  # num_processes: public, documented
                found.append(f"{module}: {ast.unparse(node)}")
    assert not found, "go through hf_jd/trainer/_compat.py: " + ", ".join(found)
