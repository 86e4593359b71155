"""JDGRPOTrainer: one GRPO loss per completion (or per prompt group), against TRL's GRPOTrainer and brute force.

Oracles: TRL's ``_compute_loss`` on the batch (the mean of the completion losses, for every served loss type,
with the KL term and clipping), the stock ``GRPOTrainer``'s step on the same generated batch
(``aggregator="mean"`` must take it), and UPGrad applied to the per-completion (or per-group) Jacobian built
row by row with ``torch.autograd.grad``.
"""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from _tiny_llama import tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from hf_jd import JDTrainingArguments  # noqa: E402
from hf_jd.aggregation import UPGrad  # noqa: E402
from hf_jd.cli import word_tokenizer  # noqa: E402
from hf_jd.trl._grpo import COMPLETION_LOSS_TYPES, JDGRPOConfig, JDGRPOTrainer  # noqa: E402

PROMPTS = ["the movie was", "tell me about the plot", "the cast", "was the ending good"]
WORDS = ["good", "bad", "fine", "dull", "great", "plot", "</s>"]
LR = 0.5


def tokenizer():
    return word_tokenizer(PROMPTS + [" ".join(WORDS)])


def policy(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(LlamaForCausalLM, seed, tokenizer=tokenizer())


def dataset() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS})


def good_count(completions, **kwargs) -> list[float]:
    """The reward: how many times the completion says ``good`` or ``great``, minus its length / 10."""
    return [
        sum(word in ("good", "great") for word in text.split()) - 0.1 * len(text.split())
        for text in completions
    ]


def settings(tmp_path, **overrides) -> dict:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=6,
        max_steps=1,
        learning_rate=LR,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        bf16=False,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        use_vllm=False,
    )
    values.update(overrides)
    return values


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


_REFERENCE: dict[str, str] = {}


def reference_path() -> str:
    """A saved reference model (``policy(seed=1)``), away from the policy: TRL loads its reference from the
    policy's ``_name_or_path`` (``beta > 0``)."""
    if "path" not in _REFERENCE:
        path = tempfile.mkdtemp(prefix="grpo-reference-")
        policy(seed=1).save_pretrained(path)
        _REFERENCE["path"] = path
    return _REFERENCE["path"]


def build(trainer_class, config, model, reference: bool = False):
    """A trainer on the prompts; with ``reference`` TRL loads the reference model of :func:`reference_path`."""
    if reference:
        model.config._name_or_path = reference_path()
    trainer = trainer_class(
        model=model,
        reward_funcs=good_count,
        args=config,
        train_dataset=dataset(),
        processing_class=tokenizer(),
    )
    return trainer


def run_one_step(trainer) -> tuple[torch.Tensor, dict]:
    """Train one step from a fixed random state; the parameter change and the batch the loss saw."""
    seen: dict = {}
    prepare = trainer._prepare_inputs

    def recording(batch):
        inputs = prepare(batch)
        seen.setdefault("inputs", {k: v.clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return inputs

    trainer._prepare_inputs = recording
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    torch.manual_seed(1234)
    trainer.train()
    return flat([p.detach() - b for p, b in zip(params, before)]), seen["inputs"]


def same_batch(first: dict, second: dict) -> None:
    for key in ("prompt_ids", "completion_ids", "completion_mask", "advantages"):
        assert torch.equal(first[key], second[key]), key


@pytest.fixture(scope="module")
def loss_trainer(tmp_path_factory):
    """A trainer whose loss settings the loss tests change, and one generated batch (two prompt groups)."""
    trainer = build(
        JDGRPOTrainer,
        JDGRPOConfig(**settings(tmp_path_factory.mktemp("grpo")), beta=0.1),
        policy(),
        reference=True,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop during training
    torch.manual_seed(7)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    assert float(batch["completion_mask"].sum(-1).float().std()) > 0  # completions of different lengths
    assert float(batch["advantages"].abs().sum()) > 0
    return trainer, batch


@pytest.mark.parametrize(
    "loss_type,beta,level",
    [(loss_type, beta, "token") for loss_type in COMPLETION_LOSS_TYPES for beta in (0.0, 0.1)]
    # TRL refuses sequence-level importance sampling with the token-normalised loss types
    + [("grpo", 0.0, "sequence"), ("grpo", 0.1, "sequence")],
)
def test_the_mean_of_the_completion_losses_is_trls_loss(loss_trainer, loss_type, beta, level):
    trainer, batch = loss_trainer
    trainer.loss_type = trainer.args.loss_type = loss_type
    trainer.beta = beta
    trainer.importance_sampling_level = level
    inputs = dict(batch)
    # an old policy away from the current one, so that the ratios move and clipping bites on some tokens
    inputs["old_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
        batch["completion_ids"].size(1),
    )[0].detach() + torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(0))
    trainer.epsilon_low, trainer.epsilon_high = 0.2, 0.28
    weight = trainer.model.lm_head.weight
    try:
        losses = trainer.compute_losses(trainer.model, inputs)
        expected = trainer._compute_loss(trainer.model, inputs)
        mean_grad = torch.autograd.grad(losses.losses.mean(), weight)[0]
        trl_grad = torch.autograd.grad(expected, weight)[0]
        clipped = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    finally:
        trainer.loss_type = trainer.args.loss_type = "grpo"
        trainer.beta, trainer.importance_sampling_level = 0.1, "token"
    assert losses.num_objectives == batch["completion_ids"].size(0)
    assert torch.equal(losses.row_objective, torch.arange(losses.num_objectives))
    assert float(losses.losses.detach().mean()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
    assert float(trl_grad.norm()) > 0
    assert relative_error(mean_grad, trl_grad) <= 1e-5
    assert clipped > 0  # clipping bites on some tokens


@pytest.mark.parametrize(
    "extra",
    [
        {"off_policy_mask_threshold": 0.05},
        {"top_entropy_quantile": 0.5},
        {"delta": 1.2},  # with TRL's default bias-corrected KL, which reads the ratio before this clipping
        {"use_bias_correction_kl": False},
    ],
    ids=["off-policy-mask", "high-entropy-tokens", "two-sided-clipping", "uncorrected-kl"],
)
def test_the_masks_and_clipping_options_keep_trls_loss(loss_trainer, extra):
    trainer, batch = loss_trainer
    inputs = dict(batch)
    inputs["old_per_token_logps"] = trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
        batch["completion_ids"].size(1),
    )[0].detach() + torch.randn(batch["completion_mask"].shape, generator=torch.Generator().manual_seed(1))
    saved_args = {key: getattr(trainer.args, key) for key in extra}
    saved = {key: getattr(trainer, key) for key in extra if hasattr(trainer, key)}
    weight = trainer.model.lm_head.weight
    without = trainer.compute_losses(trainer.model, inputs).losses.detach()
    try:
        for key, value in extra.items():
            setattr(trainer.args, key, value)
            if key in saved:
                setattr(trainer, key, value)
        losses = trainer.compute_losses(trainer.model, inputs).losses
        expected = trainer._compute_loss(trainer.model, inputs)
        mean_grad = torch.autograd.grad(losses.mean(), weight)[0]
        trl_grad = torch.autograd.grad(expected, weight)[0]
    finally:
        for key, value in saved_args.items():
            setattr(trainer.args, key, value)
        for key, value in saved.items():
            setattr(trainer, key, value)
    assert float(losses.detach().mean()) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
    assert relative_error(mean_grad, trl_grad) <= 1e-5
    assert not torch.allclose(losses.detach(), without)  # the option changes the losses of this batch


def test_the_metrics_are_trls(loss_trainer):
    trainer, batch = loss_trainer
    metrics = trainer._metrics["train"]
    metrics.clear()
    trainer.compute_losses(trainer.model, batch)
    ours = {key: list(values) for key, values in metrics.items()}
    metrics.clear()
    trainer._compute_loss(trainer.model, batch)
    assert set(ours) >= {"kl", "entropy", "clip_ratio/region_mean"}
    assert ours == {key: list(values) for key, values in metrics.items()}
    metrics.clear()


@pytest.mark.parametrize(
    "loss_type,beta,engine,objectives",
    [
        ("grpo", 0.0, "jacobian", "completion"),
        ("grpo", 0.1, "gramian", "completion"),
        ("dapo", 0.0, "gramian", "completion"),
        ("dr_grpo", 0.1, "jacobian", "completion"),
        ("bnpo", 0.1, "gramian", "prompt"),
    ],
)
def test_mean_takes_the_stock_grpo_step(tmp_path, loss_type, beta, engine, objectives):
    base = policy()
    stock = build(
        GRPOTrainer,
        GRPOConfig(**settings(tmp_path / "stock", loss_type=loss_type, beta=beta)),
        copy.deepcopy(base),
        reference=bool(beta),
    )
    jd = build(
        JDGRPOTrainer,
        JDGRPOConfig(
            **settings(tmp_path / "jd", loss_type=loss_type, beta=beta),
            aggregator="mean",
            jd_engine=engine,
            jd_grpo_objectives=objectives,
        ),
        copy.deepcopy(base),
        reference=bool(beta),
    )
    expected, stock_batch = run_one_step(stock)
    got, jd_batch = run_one_step(jd)
    same_batch(stock_batch, jd_batch)  # the same generated completions and advantages
    assert float(expected.norm()) > 0
    assert relative_error(got, expected) <= 1e-6
    assert jd.jd_engine is not None and jd.jd_engine.name == engine
    stock_logs, jd_logs = stock.state.log_history[0], jd.state.log_history[0]
    keys = ["reward", "completions/mean_length", "entropy", "clip_ratio/region_mean"] + (
        ["kl"] if beta else []
    )
    for key in keys:
        assert jd_logs[key] == pytest.approx(stock_logs[key], rel=1e-6), key


def test_a_rerun_forward_records_trls_metrics_once_under_accumulation(tmp_path, first_gramian_fails):
    """``jd_engine="auto"`` re-runs the micro-batch on the next engine when the first one fails: TRL's metrics
    count it once (a second record of the first of two accumulated micro-batches would shift their means),
    and the step is still the stock one (``dapo``'s normaliser spans the generation batch)."""
    base = policy()
    overrides = dict(loss_type="dapo", beta=0.1, gradient_accumulation_steps=2, per_device_train_batch_size=4)
    stock = build(
        GRPOTrainer, GRPOConfig(**settings(tmp_path / "stock", **overrides)), copy.deepcopy(base), True
    )
    expected, stock_batch = run_one_step(stock)
    failures = first_gramian_fails()
    jd = build(
        JDGRPOTrainer,
        JDGRPOConfig(**settings(tmp_path / "jd", **overrides), aggregator="mean"),
        copy.deepcopy(base),
        True,
    )
    with pytest.warns(RuntimeWarning, match="first Gramian engine fails"):
        got, jd_batch = run_one_step(jd)
    same_batch(stock_batch, jd_batch)
    assert failures == [True]  # the first engine failed once; the micro-batch ran again on the next one
    assert relative_error(got, expected) <= 1e-6
    stock_log, jd_log = stock.state.log_history[0], jd.state.log_history[0]
    for key in ("num_tokens", "reward", "entropy", "kl", "clip_ratio/region_mean"):
        assert jd_log[key] == pytest.approx(stock_log[key], rel=1e-6, abs=1e-9), key


def brute_force_update(trainer, inputs, prompt_groups: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``-LR · UPGrad(J)`` and ``-LR · mean(J)`` from the Jacobian of the completion (or group) losses, row by
    row with ``torch.autograd.grad``."""
    model = trainer.model
    params = [p for p in model.parameters() if p.requires_grad]
    logps = trainer._get_per_token_logps_and_entropies(
        model,
        torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1),
        inputs["completion_ids"].size(1),
    )[0]
    losses = trainer.completion_losses(logps, None, inputs)
    if prompt_groups:
        groups = inputs["jd_prompt_group"]
        keys = sorted(set(groups.tolist()))
        losses = torch.stack([losses[groups == g].sum() * len(keys) / losses.numel() for g in keys])
    jacobian = torch.stack([flat(torch.autograd.grad(loss, params, retain_graph=True)) for loss in losses])
    return -LR * UPGrad()(jacobian), -LR * jacobian.mean(dim=0)


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
@pytest.mark.parametrize("objectives", ["completion", "prompt"])
def test_upgrad_is_upgrad_of_the_brute_force_jacobian(tmp_path, engine, objectives, served_by):
    trainer = build(
        JDGRPOTrainer,
        JDGRPOConfig(
            **settings(tmp_path, beta=0.1, num_generations=2),  # four prompt groups of two completions
            aggregator="upgrad",
            jd_engine=engine,
            jd_grpo_objectives=objectives,
        ),
        policy(),
        reference=True,
    )
    model = trainer.model
    initial = copy.deepcopy(model.state_dict())
    got, inputs = run_one_step(trainer)
    assert trainer.jd_engine is not None and trainer.jd_engine.name == engine
    if (
        engine == "gramian"
    ):  # TRL's fused LM head stood in for: the head is the linear rule's, not the fallback's
        assert len(served_by) == 1 and served_by[0]["lm_head.weight"] == "linear", served_by
        assert "fallback" not in served_by[0].values()
    model.load_state_dict(initial)
    model.train()
    if objectives == "prompt":
        assert len(set(inputs["jd_prompt_group"].tolist())) == 4
    expected, mean = brute_force_update(trainer, inputs, prompt_groups=objectives == "prompt")
    assert relative_error(got, expected) <= 1e-5
    assert relative_error(got, mean) > 1e-3  # UPGrad is not the mean here: the objectives' gradients conflict


def test_prompt_groups_are_the_completions_of_one_prompt(loss_trainer):
    trainer, batch = loss_trainer
    groups = batch["jd_prompt_group"]
    for group in set(groups.tolist()):
        prompts = batch["prompt_ids"][groups == group]
        assert (prompts == prompts[0]).all()
        assert int((groups == group).sum()) == 4


@pytest.mark.parametrize("loss_type", ["cispo", "sapo", "luspo", "vespo"])
def test_an_unserved_loss_type_is_refused_by_name(tmp_path, loss_type):
    level = {"luspo": "sequence"}.get(loss_type, "token")
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}'"):
        JDGRPOConfig(**settings(tmp_path), loss_type=loss_type, importance_sampling_level=level)
    config = JDGRPOConfig(**settings(tmp_path))
    config.loss_type = loss_type  # changed after construction: the trainer refuses it too
    with pytest.raises(ValueError, match=f"loss_type='{loss_type}'"):
        build(JDGRPOTrainer, config, policy())


def test_the_entropy_bonus_is_refused(tmp_path):
    with pytest.raises(ValueError, match="entropy bonus"):
        JDGRPOConfig(**settings(tmp_path), entropy_coef=0.01)


def test_compute_losses_func_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Override"):
        JDGRPOTrainer(
            model=policy(),
            reward_funcs=good_count,
            args=JDGRPOConfig(**settings(tmp_path)),
            train_dataset=dataset(),
            processing_class=tokenizer(),
            compute_losses_func=lambda outputs, inputs: outputs.loss,
        )


def test_plain_arguments_are_refused_with_the_config_to_use(tmp_path):
    grpo_only = {"per_device_train_batch_size", "num_generations", "max_completion_length", "use_vllm"}
    plain = {k: v for k, v in settings(tmp_path).items() if k not in grpo_only}
    for arguments in (JDTrainingArguments(**plain), GRPOConfig(**settings(tmp_path))):
        with pytest.raises(TypeError, match="JDGRPOConfig"):
            build(JDGRPOTrainer, arguments, policy())


def test_the_config_holds_both_settings(tmp_path):
    config = JDGRPOConfig(
        **settings(tmp_path),
        aggregator="mgda",
        loss_type="bnpo",
        hub_token="secret",
        jd_grpo_objectives="prompt",
    )
    assert isinstance(config, GRPOConfig) and isinstance(config, JDTrainingArguments)
    assert config.aggregator == "mgda" and config.loss_type == "bnpo" and config.num_generations == 4
    assert config.jd_objectives == "per_example" and config.jd_grpo_objectives == "prompt"
    assert "secret" not in repr(config)


def _example():
    path = Path(__file__).resolve().parents[2] / "examples" / "trl_grpo.py"
    spec = importlib.util.spec_from_file_location("example_trl_grpo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_the_example_runs_offline(tmp_path):
    metrics = _example().main(["--offline_smoke", "--output_dir", str(tmp_path / "grpo")])
    assert math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["eval_loss"])
    assert metrics["epoch"] > 0
    card = (tmp_path / "grpo-smoke" / "README.md").read_text()
    assert "hf_jd" in card and "grpo" in card


def test_the_example_lists_trls_and_jds_settings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _example().main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--offline_smoke",
        "--aggregator",
        "--jd_engine",
        "--loss_type",
        "--jd_grpo_objectives",
        "--beta",
    ):
        assert flag in out, flag
