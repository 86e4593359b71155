"""JDTrainer's FSDP2 wiring without launching FSDP: arguments, accelerate's FSDP plugin, engine choice.

transformers replaces FSDP by DDP on CPU, so accelerate's FSDP plugin is constructed here and put on
the accelerator state by hand (never launched). The sharded step itself runs on two gloo processes in
``tests/distributed/test_fsdp.py`` (which also drives ``JDTrainer.training_step`` on a ``fully_shard`` model).
"""

from __future__ import annotations

import pytest
from _trainer_fixtures import base_args, classification_dataset, tiny_bert
from accelerate.utils import FullyShardedDataParallelPlugin
from transformers import Trainer

from hf_jd import JDTrainer, JDTrainingArguments
from hf_jd.trainer._backends import gramian_engine_choices
from hf_jd.trainer._compat import fsdp_plugin_version


def test_fsdp2_arguments_are_accepted(tmp_path):
    args = JDTrainingArguments(**base_args(tmp_path), fsdp=True, fsdp_config={"version": 2})
    assert args.fsdp and args.fsdp_config["version"] == 2


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"jd_engine": "jacobian"}, "jd_engine='jacobian'"),
        ({"scalarizer": "mean"}, "--scalarizer is not supported"),
        (
            {"aggregator": "trimmed_mean", "aggregator_kwargs": {"trim_number": 1}},
            "needs the Jacobian itself",
        ),
    ],
)
def test_unserved_fsdp2_settings_are_refused(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        JDTrainingArguments(**base_args(tmp_path), fsdp=True, fsdp_config={"version": 2}, **setting)


@pytest.fixture
def fsdp_plugin(monkeypatch):
    """Put an accelerate FSDP plugin of a given version on the accelerator state of the next Trainer."""

    def install(version: int) -> None:
        plugin = FullyShardedDataParallelPlugin(fsdp_version=version)
        original = Trainer.create_accelerator_and_postprocess

        def patched(self):
            original(self)
            monkeypatch.setattr(self.accelerator.state, "fsdp_plugin", plugin, raising=False)

        monkeypatch.setattr(Trainer, "create_accelerator_and_postprocess", patched)

    return install


def test_accelerate_fsdp2_plugin_routes_to_the_sharded_engine(tmp_path, fsdp_plugin):
    fsdp_plugin(2)
    trainer = JDTrainer(
        model=tiny_bert(),
        args=JDTrainingArguments(**base_args(tmp_path)),
        train_dataset=classification_dataset(),
    )
    assert fsdp_plugin_version(trainer.accelerator) == 2
    assert trainer._engines is not None and trainer._engines.choices == gramian_engine_choices(trainer.args)
    assert all(choice.kind == "gramian" for choice in trainer._engines.choices)


def test_accelerate_fsdp1_plugin_is_refused(tmp_path, fsdp_plugin):
    fsdp_plugin(1)
    with pytest.raises(ValueError, match="does not support FSDP1.*FSDP2"):
        JDTrainer(model=tiny_bert(), args=JDTrainingArguments(**base_args(tmp_path)))


def test_accelerate_fsdp2_plugin_with_a_jacobian_aggregator_is_refused(tmp_path, fsdp_plugin):
    fsdp_plugin(2)
    args = JDTrainingArguments(
        **base_args(tmp_path), aggregator="trimmed_mean", aggregator_kwargs={"trim_number": 1}
    )
    with pytest.raises(ValueError, match="needs the Jacobian itself"):
        JDTrainer(model=tiny_bert(), args=args, train_dataset=classification_dataset())
