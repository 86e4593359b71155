"""JDRewardTrainer: one Bradley–Terry loss per preference pair, against TRL's RewardTrainer and brute force.

Oracles: the stock ``RewardTrainer``'s step (``aggregator="mean"`` must take it, margins and reward centring
included), TRL's loss on each pair alone (the pair losses), and UPGrad applied to the per-pair Jacobian
built row by row with ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from _tiny_llama import tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaForSequenceClassification  # noqa: E402
from trl import RewardConfig, RewardTrainer  # noqa: E402

from hf_jd import JDTrainingArguments, ObjectiveLosses  # noqa: E402
from hf_jd.aggregation import UPGrad  # noqa: E402
from hf_jd.cli import word_tokenizer  # noqa: E402
from hf_jd.trl._reward import JDRewardConfig, JDRewardTrainer, reward_pair_losses  # noqa: E402

PAIRS = {
    "chosen": [
        "the movie was good and fine </s>",
        "a lovely plot </s>",
        "the cast was superb and the ending too </s>",
        "great </s>",
    ],
    "rejected": [
        "the movie was bad </s>",
        "a dull and boring plot that was poor </s>",
        "awful </s>",
        "the ending was terrible </s>",
    ],
    "margin": [0.5, 0.0, 1.0, -0.25],
}


def tokenizer():
    return word_tokenizer(PAIRS["chosen"] + PAIRS["rejected"])


def reward_model(seed: int = 0) -> LlamaForSequenceClassification:
    return tiny_llama(LlamaForSequenceClassification, seed, tokenizer=tokenizer(), num_labels=1)


def dataset(margin: bool = True) -> Dataset:
    rows = {key: list(values) for key, values in PAIRS.items()}
    if not margin:
        rows.pop("margin")
    return Dataset.from_dict(rows)


def settings(tmp_path, **overrides) -> dict:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=0.1,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        activation_checkpointing=False,
        bf16=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        center_rewards_coefficient=0.1,
    )
    values.update(overrides)
    return values


def update(model, train) -> list[torch.Tensor]:
    """The parameter change of one training run."""
    return update_of(list(model.parameters()), train)


def update_of(params, train) -> list[torch.Tensor]:
    """The change of ``params`` in one training run."""
    before = [p.detach().clone() for p in params]
    train()
    return [p.detach() - b for p, b in zip(params, before)]


def relative_error(got: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    difference = torch.sqrt(sum(((g - e) ** 2).sum() for g, e in zip(got, expected)))
    return float(difference / torch.sqrt(sum((e**2).sum() for e in expected)))


def one_batch(trainer) -> dict:
    """The training batch of a one-step run over the whole (4-pair) data set."""
    batch = next(iter(trainer.get_train_dataloader()))
    return trainer._prepare_inputs(batch)


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
@pytest.mark.parametrize("margin", [True, False])
def test_mean_takes_the_stock_reward_step(tmp_path, engine, margin):
    base = reward_model()
    stock_model, jd_model = copy.deepcopy(base), copy.deepcopy(base)
    stock = RewardTrainer(
        model=stock_model,
        args=RewardConfig(**settings(tmp_path / "stock")),
        train_dataset=dataset(margin),
        processing_class=tokenizer(),
    )
    jd = JDRewardTrainer(
        model=jd_model,
        args=JDRewardConfig(**settings(tmp_path / "jd"), aggregator="mean", jd_engine=engine),
        train_dataset=dataset(margin),
        processing_class=tokenizer(),
    )
    expected = update(stock_model, stock.train)
    got = update(jd_model, jd.train)
    assert sum(float(e.abs().sum()) for e in expected) > 0
    assert relative_error(got, expected) <= 1e-6
    assert jd.jd_engine is not None and jd.jd_engine.name == engine
    # TRL's metrics come from the same forward
    stock_logs = stock.state.log_history[0]
    jd_logs = jd.state.log_history[0]
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward", "num_tokens"):
        assert jd_logs[key] == pytest.approx(stock_logs[key], rel=1e-6), key
    assert jd_logs["loss"] == pytest.approx(stock_logs["loss"], rel=1e-5)


def test_mean_takes_the_stock_reward_step_with_lora(tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            lora_dropout=0.0,
            modules_to_save=["score"],
        )

    base = reward_model()
    stock = RewardTrainer(
        model=copy.deepcopy(base),
        args=RewardConfig(**settings(tmp_path / "stock")),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        peft_config=lora(),
    )
    jd = JDRewardTrainer(
        model=copy.deepcopy(base),
        args=JDRewardConfig(**settings(tmp_path / "jd"), aggregator="mean"),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        peft_config=lora(),
    )
    stock_params = dict(stock.model.named_parameters())
    with torch.no_grad():  # the same adapter initialisation (A is random): copy the stock one's
        for name, param in jd.model.named_parameters():
            param.copy_(stock_params[name])
    names = sorted(name for name, p in jd.model.named_parameters() if p.requires_grad)
    assert names == sorted(name for name, p in stock.model.named_parameters() if p.requires_grad)
    params = [p for p in jd.model.parameters() if p.requires_grad]
    stock_trainable = [p for p in stock.model.parameters() if p.requires_grad]
    expected = update_of(stock_trainable, stock.train)
    got = update_of(params, jd.train)
    assert sum(float(e.abs().sum()) for e in expected) > 0
    assert relative_error(got, expected) <= 1e-6
    assert jd.jd_engine is not None and jd.jd_engine.name == "gramian"  # auto: no fallback


def test_a_mean_scalarizer_run_takes_the_stock_step(tmp_path):
    """--scalarizer mean: one ordinary backward of the mean pair loss, TRL's loss."""
    base = reward_model()
    stock = RewardTrainer(
        model=copy.deepcopy(base),
        args=RewardConfig(**settings(tmp_path / "stock")),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    jd = JDRewardTrainer(
        model=copy.deepcopy(base),
        args=JDRewardConfig(**settings(tmp_path / "jd"), scalarizer="mean"),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    expected = update(stock.model, stock.train)
    assert relative_error(update(jd.model, jd.train), expected) <= 1e-6


def test_compute_losses_func_reads_trls_outputs(tmp_path):
    """A custom pair loss from the rewards TRL's forward returns (here: the hinge of the reward gap)."""
    seen = []

    def hinge(outputs, inputs):
        chosen, rejected = outputs.logits.squeeze(-1).chunk(2)
        seen.append(inputs["input_ids"].shape[0])
        return ObjectiveLosses.paired(torch.relu(1 - (chosen - rejected)))

    trainer = JDRewardTrainer(
        model=reward_model(),
        args=JDRewardConfig(**settings(tmp_path), aggregator="mean"),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        compute_losses_func=hinge,
    )
    trainer.train()
    assert seen == [8]  # one forward of the 2B rows
    assert "accuracy" in trainer.state.log_history[0]  # TRL's metrics still come from its forward


def test_a_rerun_forward_records_trls_metrics_once(tmp_path, first_gramian_fails):
    """``jd_engine="auto"`` re-runs the micro-batch on the next engine when the first one fails: TRL's metrics
    (``num_tokens`` above all) count it once, and the step is still the stock one."""
    base = reward_model()
    stock = RewardTrainer(
        model=copy.deepcopy(base),
        args=RewardConfig(**settings(tmp_path / "stock")),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    expected = update(stock.model, stock.train)
    failures = first_gramian_fails()
    jd = JDRewardTrainer(
        model=copy.deepcopy(base),
        args=JDRewardConfig(**settings(tmp_path / "jd"), aggregator="mean"),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    with pytest.warns(RuntimeWarning, match="first Gramian engine fails"):
        got = update(jd.model, jd.train)
    assert failures == [True]  # the first engine failed once; the micro-batch ran again on the next one
    assert relative_error(got, expected) <= 1e-6
    stock_log, jd_log = stock.state.log_history[0], jd.state.log_history[0]
    for key in ("num_tokens", "accuracy", "margin", "mean_reward"):
        assert jd_log[key] == pytest.approx(stock_log[key], rel=1e-6, abs=1e-9), key


def test_pair_losses_are_trl_losses_of_each_pair_alone(tmp_path):
    """L_k is TRL's loss on the batch holding pair k only (margin and centring included)."""
    model = reward_model()
    trainer = JDRewardTrainer(
        model=model,
        args=JDRewardConfig(**settings(tmp_path)),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    batch = one_batch(trainer)
    objectives = trainer.compute_losses(model, batch)
    losses = objectives.losses
    assert losses.shape == (4,)
    assert objectives.row_objective.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # pair k: rows k and B + k
    rows = batch["input_ids"].shape[0] // 2
    for k in range(rows):
        alone = {
            "input_ids": batch["input_ids"][[k, rows + k]],
            "attention_mask": batch["attention_mask"][[k, rows + k]],
            "margin": batch["margin"][[k]],
        }
        trl_loss = RewardTrainer.compute_loss(trainer, model, alone)
        torch.testing.assert_close(losses[k], trl_loss, rtol=1e-5, atol=1e-6)


def test_reward_pair_losses_formula():
    rewards = torch.tensor([[1.0], [0.5], [-1.0], [2.0]])  # chosen 1, 0.5; rejected -1, 2
    margin = torch.tensor([0.5, -0.5])
    losses = reward_pair_losses(rewards, margin, 0.1)
    expected = -torch.nn.functional.logsigmoid(torch.tensor([1.5, -1.0])) + 0.1 * torch.tensor([0.0, 6.25])
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(
        reward_pair_losses(rewards), -torch.nn.functional.logsigmoid(torch.tensor([2.0, -1.5]))
    )


@pytest.mark.parametrize("engine", ["jacobian", "auto"])
def test_upgrad_is_upgrad_of_the_per_pair_jacobian(tmp_path, engine):
    base = reward_model()
    model = copy.deepcopy(base)
    trainer = JDRewardTrainer(
        model=model,
        args=JDRewardConfig(**settings(tmp_path), aggregator="upgrad", jd_engine=engine),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    # brute force on a copy: one autograd.grad per pair loss
    oracle = copy.deepcopy(base)
    oracle.config.pad_token_id = model.config.pad_token_id
    oracle.train()
    batch = one_batch(trainer)
    params = [p for p in oracle.parameters() if p.requires_grad]
    rewards = oracle(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    losses = reward_pair_losses(rewards, batch["margin"], 0.1)
    rows = [
        torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        for loss in losses
    ]
    jacobian = torch.stack(rows)
    direction = UPGrad()(jacobian)
    expected_flat = -0.1 * direction
    got = update(model, trainer.train)
    got_flat = torch.cat([g.reshape(-1) for g in got])
    assert float((got_flat - expected_flat).norm() / expected_flat.norm()) <= 1e-5
    assert trainer.jd_engine is not None
    assert trainer.jd_engine.name == ("jacobian" if engine == "jacobian" else "gramian")  # auto: no fallback
    # UPGrad is not the mean here: the pair gradients conflict
    mean_flat = -0.1 * jacobian.mean(dim=0)
    assert float((got_flat - mean_flat).norm() / mean_flat.norm()) > 1e-3


def test_plain_jd_training_arguments_are_refused_with_the_config_to_use(tmp_path):
    arguments = JDTrainingArguments(
        **{k: v for k, v in settings(tmp_path).items() if k != "center_rewards_coefficient"}
    )
    with pytest.raises(TypeError, match="JDRewardConfig"):
        JDRewardTrainer(
            model=reward_model(), args=arguments, train_dataset=dataset(), processing_class=tokenizer()
        )
    with pytest.raises(TypeError, match="JDRewardConfig"):
        JDRewardTrainer(
            model=reward_model(),
            args=RewardConfig(**settings(tmp_path)),
            train_dataset=dataset(),
            processing_class=tokenizer(),
        )


def test_the_config_holds_both_settings_and_fixes_the_objectives(tmp_path):
    config = JDRewardConfig(**settings(tmp_path), aggregator="mgda", aggregator_kwargs='{"epsilon": 0.01}')
    assert isinstance(config, RewardConfig) and isinstance(config, JDTrainingArguments)
    assert config.aggregator == "mgda" and config.aggregator_kwargs == {"epsilon": 0.01}
    assert config.center_rewards_coefficient == 0.1
    assert config.jd_objectives == "per_example"  # the pairs reach the engines as ObjectiveLosses
    assert "secret" not in repr(JDRewardConfig(**settings(tmp_path), hub_token="secret"))
    with pytest.raises(ValueError, match="one preference pair"):
        JDRewardConfig(**settings(tmp_path), jd_objectives="per_task")


def _example():
    path = Path(__file__).resolve().parents[2] / "examples" / "trl_reward.py"
    spec = importlib.util.spec_from_file_location("example_trl_reward", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_the_example_runs_offline(tmp_path):
    metrics = _example().main(["--offline_smoke", "--output_dir", str(tmp_path / "reward")])
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0
    card = (tmp_path / "reward-smoke" / "README.md").read_text()
    assert "hf_jd" in card and "reward-trainer" in card


def test_the_example_lists_trls_and_jds_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--offline_smoke",
        "--aggregator",
        "--jd_engine",
        "--center_rewards_coefficient",
        "--config",
    ):
        assert flag in out, flag
