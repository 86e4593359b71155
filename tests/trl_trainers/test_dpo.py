"""JDDPOTrainer: one DPO loss per preference pair, against TRL's DPOTrainer and brute force.

Oracles: TRL's ``_compute_loss`` on each pair alone (the pair loss of every per-pair loss type), TRL's loss
on the whole batch (the mean of the pair losses, for every loss type, combinations, WPO, LD-DPO and f-DPO),
the stock ``DPOTrainer``'s step (``aggregator="mean"`` must take it, with a reference model and with LoRA's
reference), and UPGrad applied to the per-pair Jacobian built row by row with ``torch.autograd.grad``.
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
from transformers import LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from hf_jd import JDTrainingArguments  # noqa: E402
from hf_jd.aggregation import UPGrad  # noqa: E402
from hf_jd.cli import word_tokenizer  # noqa: E402
from hf_jd.trl._dpo import COUPLED_LOSS_TYPES, PAIR_LOSS_TYPES, JDDPOConfig, JDDPOTrainer  # noqa: E402

PAIRS = {
    "prompt": ["the movie was", "tell me about the plot", "the cast", "was the ending good"],
    "chosen": [" good and fine </s>", " it was lovely </s>", " was superb and great too </s>", " yes </s>"],
    "rejected": [" bad </s>", " dull and boring and poor </s>", " awful </s>", " no it was terrible </s>"],
}
LR = 0.5

#: TRL's metrics from a JD step against a stock step: during a JD step the policy's log-probabilities come from
#: the model's logits (hf_jd.trl._logits_head), not TRL's fused kernel, so they agree up to float32 rounding:
#: sums of ~10 token log-probabilities of size ~log V to a few 1e-6, the rewards (beta times the log-ratios,
#: exactly 0 in a stock first step) to ~1e-7 absolute.
METRIC_TOLERANCE = {"rel": 1e-6, "abs": 1e-5}


def tokenizer():
    return word_tokenizer([p + c for p, c in zip(PAIRS["prompt"], PAIRS["chosen"])] + PAIRS["rejected"])


def policy(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(LlamaForCausalLM, seed, tokenizer=tokenizer())


def dataset() -> Dataset:
    return Dataset.from_dict({key: list(values) for key, values in PAIRS.items()})


def settings(tmp_path, **overrides) -> dict:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=LR,
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
        beta=0.5,
    )
    values.update(overrides)
    return values


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def trainable_update(model, train) -> torch.Tensor:
    """The change of the trainable parameters in one training run, flattened."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    train()
    return flat([p.detach() - b for p, b in zip(params, before)])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


def one_batch(trainer) -> dict:
    """The training batch of a one-step run over the whole (4-pair) data set."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


@pytest.fixture(scope="module")
def loss_trainer(tmp_path_factory):
    """One trainer whose loss settings the loss tests change (WPO needs its output from construction)."""
    base = policy()
    trainer = JDDPOTrainer(
        model=copy.deepcopy(base),
        ref_model=copy.deepcopy(base),
        args=JDDPOConfig(**settings(tmp_path_factory.mktemp("dpo")), use_weighting=True),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    with torch.no_grad():  # a policy away from the reference: the log-ratios are not all zero
        for param in trainer.model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    trainer.model.train()
    return trainer


def configure(
    trainer, loss_type, loss_weights=None, use_weighting=False, ld_alpha=None, f_divergence="reverse_kl"
):
    trainer.loss_types = list(loss_type)
    trainer.loss_weights = loss_weights or [1.0] * len(trainer.loss_types)
    trainer.use_weighting = use_weighting
    trainer.ld_alpha = ld_alpha
    trainer.f_divergence_type = f_divergence
    trainer.f_alpha_divergence_coef = 0.5
    trainer.label_smoothing = 0.1 if set(loss_type) & {"exo_pair", "robust"} else 0.0


def pair_rows(batch: dict, k: int) -> dict:
    rows = batch["input_ids"].shape[0] // 2
    return {key: value[[k, rows + k]] for key, value in batch.items()}


@pytest.mark.parametrize("loss_type", [name for name in PAIR_LOSS_TYPES if name != "sft"])
def test_each_pair_loss_is_trls_loss_of_that_pair_alone(loss_trainer, loss_type):
    configure(loss_trainer, [loss_type])
    model, batch = loss_trainer.model, one_batch(loss_trainer)
    with torch.no_grad():
        objectives = loss_trainer.compute_losses(model, batch)
        losses = objectives.losses
        alone = [DPOTrainer._compute_loss(loss_trainer, model, pair_rows(batch, k), False) for k in range(4)]
    assert losses.shape == (4,)
    assert objectives.row_objective.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]  # pair k: rows k and B + k
    torch.testing.assert_close(losses, torch.stack(alone), rtol=1e-5, atol=1e-6)
    assert float(losses.std()) > 0  # the pairs differ


@pytest.mark.parametrize(
    "case",
    [
        *[{"loss_type": [name]} for name in PAIR_LOSS_TYPES],
        {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.3]},
        {"loss_type": ["ipo", "bco_pair", "hinge"], "loss_weights": [0.5, 2.0, 1.0]},
        {"loss_type": ["sigmoid"], "use_weighting": True},
        {"loss_type": ["sigmoid", "apo_zero"], "ld_alpha": 0.5},
        {"loss_type": ["sigmoid"], "f_divergence": "alpha_divergence"},
        {"loss_type": ["robust"], "f_divergence": "js_divergence"},
        {"loss_type": ["hinge"], "f_divergence": "forward_kl"},
    ],
    ids=lambda case: "-".join(f"{key}={value}" for key, value in case.items()),
)
def test_the_mean_of_the_pair_losses_is_trls_loss(loss_trainer, case):
    configure(loss_trainer, **case)
    model, batch = loss_trainer.model, one_batch(loss_trainer)
    with torch.no_grad():
        losses = loss_trainer.compute_losses(model, batch).losses
        expected = DPOTrainer._compute_loss(loss_trainer, model, batch, False)
    assert losses.shape == (4,)
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-6, atol=1e-7)


def test_the_metrics_are_trls(loss_trainer):
    """The replay logs what TRL's own _compute_loss logs for the batch: the same metrics, the same values up to
    float32 rounding (METRIC_TOLERANCE)."""
    configure(loss_trainer, ["sigmoid"])
    model, batch = loss_trainer.model, one_batch(loss_trainer)
    metrics = loss_trainer._metrics["train"]
    with torch.no_grad():
        metrics.clear()
        DPOTrainer._compute_loss(loss_trainer, model, batch, False)
        stock = {key: list(values) for key, values in metrics.items()}
        metrics.clear()
        loss_trainer.compute_losses(model, batch)
        ours = {key: list(values) for key, values in metrics.items()}
    assert {
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
    } <= set(stock)
    assert ours.keys() == stock.keys()
    for key in stock:
        if key != "num_tokens":  # a running count: each call adds the batch's tokens
            assert ours[key] == pytest.approx(stock[key], **METRIC_TOLERANCE), key


@pytest.mark.parametrize(
    ("engine", "extra"),
    [
        ("jacobian", {}),
        ("gramian", {}),
        ("gramian", {"activation_checkpointing": True}),
        ("gramian", {"precompute_ref_log_probs": True}),
        ("gramian", {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}),
    ],
    ids=[
        "jacobian",
        "gramian",
        "gramian-checkpointing",
        "gramian-precomputed-reference",
        "gramian-accumulation",
    ],
)
def test_mean_takes_the_stock_dpo_step_with_a_reference_model(tmp_path, engine, extra):
    base = policy()
    stock_model, jd_model = copy.deepcopy(base), copy.deepcopy(base)
    stock = DPOTrainer(
        model=stock_model,
        ref_model=copy.deepcopy(base),
        args=DPOConfig(**settings(tmp_path / "stock", **extra)),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    jd = JDDPOTrainer(
        model=jd_model,
        ref_model=copy.deepcopy(base),
        args=JDDPOConfig(**settings(tmp_path / "jd", **extra), aggregator="mean", jd_engine=engine),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    expected = trainable_update(stock_model, stock.train)
    got = trainable_update(jd_model, jd.train)
    assert float(expected.norm()) > 0
    assert relative_error(got, expected) <= 1e-6
    assert jd.jd_engine is not None and jd.jd_engine.name == engine
    stock_logs, jd_logs = stock.state.log_history[0], jd.state.log_history[0]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "entropy",
    ):
        assert jd_logs[key] == pytest.approx(stock_logs[key], **METRIC_TOLERANCE), key
    assert jd_logs["loss"] == pytest.approx(stock_logs["loss"], rel=1e-5)


def test_a_rerun_forward_records_trls_metrics_once(tmp_path, first_gramian_fails):
    """``jd_engine="auto"`` re-runs the micro-batch on the next engine when the first one fails: TRL's metrics
    (``num_tokens`` above all) count it once, and the step is still the stock one."""
    base = policy()
    stock = DPOTrainer(
        model=copy.deepcopy(base),
        ref_model=copy.deepcopy(base),
        args=DPOConfig(**settings(tmp_path / "stock")),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    expected = trainable_update(stock.model, stock.train)
    failures = first_gramian_fails()
    jd = JDDPOTrainer(
        model=copy.deepcopy(base),
        ref_model=copy.deepcopy(base),
        args=JDDPOConfig(**settings(tmp_path / "jd"), aggregator="mean"),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    with pytest.warns(RuntimeWarning, match="first Gramian engine fails"):
        got = trainable_update(jd.model, jd.train)
    assert failures == [True]  # the first engine failed once; the micro-batch ran again on the next one
    assert relative_error(got, expected) <= 1e-6
    stock_log, jd_log = stock.state.log_history[0], jd.state.log_history[0]
    for key in ("num_tokens", "rewards/chosen", "rewards/margins", "entropy", "mean_token_accuracy"):
        assert jd_log[key] == pytest.approx(stock_log[key], **METRIC_TOLERANCE), key


def test_mean_takes_the_stock_dpo_step_with_loras_reference(tmp_path):
    peft = pytest.importorskip("peft")

    def lora():
        return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)

    base = policy()
    stock = DPOTrainer(
        model=copy.deepcopy(base),
        args=DPOConfig(**settings(tmp_path / "stock")),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        peft_config=lora(),
    )
    jd = JDDPOTrainer(
        model=copy.deepcopy(base),
        args=JDDPOConfig(**settings(tmp_path / "jd"), aggregator="mean"),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        peft_config=lora(),
    )
    # the same adapter initialisation (B = 0; A random): copy the stock one's
    stock_params = dict(stock.model.named_parameters())
    with torch.no_grad():
        for name, param in jd.model.named_parameters():
            if ".default." in name:
                param.copy_(stock_params[name])
    trainable = sorted(name for name, p in jd.model.named_parameters() if p.requires_grad)
    assert trainable == sorted(name for name, p in stock.model.named_parameters() if p.requires_grad)
    expected = trainable_update(stock.model, stock.train)
    got = trainable_update(jd.model, jd.train)
    assert float(expected.norm()) > 0
    assert relative_error(got, expected) <= 1e-6
    assert jd.jd_engine is not None and jd.jd_engine.name == "gramian"  # auto: no fallback


@pytest.mark.parametrize("engine", ["jacobian", "auto"])
def test_upgrad_is_upgrad_of_the_per_pair_jacobian(tmp_path, engine, served_by):
    base = policy()
    trainer = JDDPOTrainer(
        model=copy.deepcopy(base),
        ref_model=copy.deepcopy(base),
        args=JDDPOConfig(
            **settings(tmp_path), aggregator="upgrad", jd_engine=engine, loss_type=["sigmoid", "sft"]
        ),
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    model = trainer.model
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    losses = trainer.compute_losses(model, one_batch(trainer)).losses
    jacobian = torch.stack([flat(torch.autograd.grad(loss, params, retain_graph=True)) for loss in losses])
    expected = -LR * UPGrad()(jacobian)
    got = trainable_update(model, trainer.train)
    assert relative_error(got, expected) <= 1e-5
    assert trainer.jd_engine is not None
    assert trainer.jd_engine.name == ("jacobian" if engine == "jacobian" else "gramian")  # auto: no fallback
    if (
        engine == "auto"
    ):  # TRL's fused LM head stood in for: the head is the linear rule's, no backward per pair
        assert len(served_by) == 1 and served_by[0]["lm_head.weight"] == "linear", served_by
        assert "fallback" not in served_by[0].values()
    mean = -LR * jacobian.mean(dim=0)
    assert relative_error(got, mean) > 1e-3  # UPGrad is not the mean here: the pair gradients conflict


@pytest.mark.parametrize("loss_type", sorted(COUPLED_LOSS_TYPES))
def test_a_loss_type_that_couples_the_pairs_is_refused_by_name(tmp_path, loss_type):
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}'"):
        JDDPOConfig(**settings(tmp_path), loss_type=["sigmoid", loss_type])
    config = JDDPOConfig(**settings(tmp_path))
    config.loss_type = [loss_type]  # changed after construction: the trainer refuses it too
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}'"):
        JDDPOTrainer(
            model=policy(),
            ref_model=policy(),
            args=config,
            train_dataset=dataset(),
            processing_class=tokenizer(),
        )


def test_sft_under_wpo_weighting_is_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_type='sft' with use_weighting=True"):
        JDDPOConfig(**settings(tmp_path), loss_type=["sigmoid", "sft"], use_weighting=True)


def test_compute_losses_func_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Override pair_losses"):
        JDDPOTrainer(
            model=policy(),
            ref_model=policy(),
            args=JDDPOConfig(**settings(tmp_path)),
            train_dataset=dataset(),
            processing_class=tokenizer(),
            compute_losses_func=lambda outputs, inputs: outputs.loss,
        )


def test_an_unknown_loss_type_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not known to hf_jd"):
        JDDPOConfig(**settings(tmp_path), loss_type="shiny_new_loss")


def test_plain_arguments_are_refused_with_the_config_to_use(tmp_path):
    plain = {k: v for k, v in settings(tmp_path).items() if k != "beta"}
    for arguments in (JDTrainingArguments(**plain), DPOConfig(**settings(tmp_path))):
        with pytest.raises(TypeError, match="JDDPOConfig"):
            JDDPOTrainer(
                model=policy(),
                ref_model=policy(),
                args=arguments,
                train_dataset=dataset(),
                processing_class=tokenizer(),
            )


def test_the_config_holds_both_settings(tmp_path):
    config = JDDPOConfig(**settings(tmp_path), aggregator="mgda", loss_type="ipo", hub_token="secret")
    assert isinstance(config, DPOConfig) and isinstance(config, JDTrainingArguments)
    assert config.aggregator == "mgda" and config.loss_type == ["ipo"] and config.beta == 0.5
    assert config.jd_objectives == "per_example"  # the pairs reach the engines as ObjectiveLosses
    assert config.jd_parallel_chunk_size is None  # the LM head's logits: the batched (vmap) backward serves
    assert "secret" not in repr(config)


def _example():
    path = Path(__file__).resolve().parents[2] / "examples" / "trl_dpo.py"
    spec = importlib.util.spec_from_file_location("example_trl_dpo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "extra", [[], ["--use_peft", "--aggregator", "mean"]], ids=["reference-model", "lora"]
)
def test_the_example_runs_offline(tmp_path, extra):
    if extra:
        pytest.importorskip("peft")
    metrics = _example().main(["--offline_smoke", "--output_dir", str(tmp_path / "dpo"), *extra])
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["epoch"] > 0
    card = (tmp_path / "dpo-smoke" / "README.md").read_text()
    assert "hf_jd" in card and "dpo" in card


def test_the_example_lists_trls_and_jds_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--offline_smoke",
        "--use_peft",
        "--aggregator",
        "--jd_engine",
        "--loss_type",
        "--beta",
        "--config",
    ):
        assert flag in out, flag
