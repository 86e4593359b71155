"""JDSFTTrainer: one objective per sequence, against TRL's SFTTrainer and brute force.

Oracles: the stock ``SFTTrainer`` step (``aggregator="mean"`` with ``jd_sft_objective_weighting="tokens"``
must take it: padded, completion-only, assistant-only, gradient accumulation), UPGrad applied to the
per-sequence Jacobian built sequence by sequence with ``torch.autograd.grad`` (each sequence run alone),
and the padded run for padding-free and packed batches (the same sequences, one objective each).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("trl")

from _tiny_llama import tiny_llama  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import HfArgumentParser, LlamaForCausalLM, TrainingArguments  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from hf_jd import JDTrainingArguments, ObjectiveLosses  # noqa: E402
from hf_jd.aggregation import UPGrad  # noqa: E402
from hf_jd.cli import word_tokenizer  # noqa: E402
from hf_jd.losses import sequence_ids, sequence_losses, sequence_token_sums  # noqa: E402
from hf_jd.trainer import JDInputError  # noqa: E402
from hf_jd.trl import JDSFTConfig, JDSFTTrainer  # noqa: E402

TEXTS = ["a b c d e f", "g h", "i j k l m n o p q", "b d f h j"]
PROMPTS = ["a b", "c d e f g", "h", "i j k"]
COMPLETIONS = [" c d e", " h", " i j k l m n", " l m"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} </s>{% endgeneration %}"
    "{% else %}{{ message['content'] }} </s>{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tokenizer():
    tok = word_tokenizer(TEXTS + PROMPTS + COMPLETIONS + ["user assistant :"])
    tok.chat_template = CHAT_TEMPLATE
    return tok


def causal_model(seed: int = 0) -> LlamaForCausalLM:
    return tiny_llama(LlamaForCausalLM, seed, tokenizer=tokenizer(), max_position_embeddings=128)


def dataset(kind: str) -> Dataset:
    if kind == "text":
        return Dataset.from_dict({"text": TEXTS})
    if kind == "completion":
        return Dataset.from_dict({"prompt": PROMPTS, "completion": COMPLETIONS})
    if kind == "assistant":
        return Dataset.from_dict(
            {
                "messages": [
                    [{"role": "user", "content": p}, {"role": "assistant", "content": c.strip()}]
                    for p, c in zip(PROMPTS, COMPLETIONS)
                ]
            }
        )
    raise ValueError(kind)


def settings(tmp_path, **overrides) -> dict:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping: the oracles are the raw update
        bf16=False,
        activation_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        seed=0,
        max_length=64,
        disable_tqdm=True,
        dataloader_pin_memory=False,
    )
    values.update(overrides)
    return values


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def step(trainer) -> dict[str, torch.Tensor]:
    """The parameter change of one optimizer step."""
    before = params(trainer.model)
    trainer.train()
    after = params(trainer.model)
    return {name: after[name] - before[name] for name in before}


def relative_error(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    diff = torch.cat([(update[name] - reference[name]).flatten() for name in reference])
    ref = torch.cat([value.flatten() for value in reference.values()])
    return float(diff.norm() / ref.norm())


def jd_trainer(tmp_path, kind: str = "text", model=None, **overrides) -> JDSFTTrainer:
    extra = {key: overrides.pop(key) for key in ("compute_losses_func", "peft_config") if key in overrides}
    return JDSFTTrainer(
        model=model if model is not None else causal_model(),
        args=JDSFTConfig(**settings(tmp_path, **overrides)),
        train_dataset=dataset(kind),
        processing_class=tokenizer(),
        **extra,
    )


def fresh_copy(trainer) -> torch.nn.Module:
    """An unpatched model with the trainer's current weights (TRL's fused LM head binds the trained model's own
    forward, so a deep copy would still run the original's parameters)."""
    model = causal_model()
    if hasattr(trainer.model, "peft_config"):
        import peft

        model = peft.get_peft_model(model, trainer.model.peft_config["default"])
    model.load_state_dict(trainer.model.state_dict())
    return model


def record_losses(trainer: JDSFTTrainer) -> list[torch.Tensor]:
    """Make ``trainer`` keep the loss vector of every JD forward."""
    seen: list[torch.Tensor] = []
    compute = trainer.compute_losses

    def recording(model, inputs):
        losses = compute(model, inputs)
        values = losses.losses if isinstance(losses, ObjectiveLosses) else losses  # packed: segment losses
        seen.append(values.detach().clone())
        return losses

    trainer.compute_losses = recording  # type: ignore[method-assign]
    return seen


# ---------------------------------------------------------------------------------------------- (a) stock step
@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
@pytest.mark.parametrize(
    ("kind", "accumulation"), [("text", 1), ("completion", 1), ("completion", 2), ("assistant", 1)]
)
def test_mean_with_token_weighting_is_the_stock_sft_step(tmp_path, engine, kind, accumulation):
    batch = 4 // accumulation
    extra = {"assistant_only_loss": True} if kind == "assistant" else {}
    stock = SFTTrainer(
        model=causal_model(),
        args=SFTConfig(
            **settings(
                tmp_path / "stock",
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
                **extra,
            )
        ),
        train_dataset=dataset(kind),
        processing_class=tokenizer(),
    )
    expected = step(stock)
    trainer = jd_trainer(
        tmp_path / "jd",
        kind,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        aggregator="mean",
        jd_engine=engine,
        jd_sft_objective_weighting="tokens",
        **extra,
    )
    seen = record_losses(trainer)
    update = step(trainer)
    assert [losses.numel() for losses in seen] == [batch] * accumulation  # one objective per sequence
    assert trainer.jd_engine is not None and trainer.jd_engine.name == engine
    assert relative_error(update, expected) <= 1e-6
    # TRL's metrics of the same forward (before the step) are TRL's own
    stock_log, jd_log = stock.state.log_history[0], trainer.state.log_history[0]
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert jd_log[key] == pytest.approx(stock_log[key], rel=1e-5, abs=1e-6), key


@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
@pytest.mark.parametrize(
    "options", [{"loss_type": "dft"}, {"activation_checkpointing": True}], ids=["dft", "checkpointing"]
)
def test_dft_loss_and_activation_checkpointing_keep_the_stock_step(tmp_path, engine, options):
    """TRL's DFT loss (each token weighted by its detached probability) and TRL's default activation
    checkpointing: ``mean`` with token weighting is still the stock step."""
    stock = SFTTrainer(
        model=causal_model(),
        args=SFTConfig(**settings(tmp_path / "stock", **options)),
        train_dataset=dataset("completion"),
        processing_class=tokenizer(),
    )
    expected = step(stock)
    trainer = jd_trainer(
        tmp_path / "jd",
        "completion",
        aggregator="mean",
        jd_engine=engine,
        jd_sft_objective_weighting="tokens",
        **options,
    )
    assert relative_error(step(trainer), expected) <= 1e-6


def test_a_rerun_forward_records_trls_metrics_once(tmp_path, first_gramian_fails):
    """``jd_engine="auto"`` re-runs the first micro-batch on the next engine when the first one fails: TRL's
    metrics (``num_tokens`` above all) count that micro-batch once, and the step is still the stock one."""
    stock = SFTTrainer(
        model=causal_model(),
        args=SFTConfig(**settings(tmp_path / "stock")),
        train_dataset=dataset("completion"),
        processing_class=tokenizer(),
    )
    expected = step(stock)
    failures = first_gramian_fails()
    trainer = jd_trainer(
        tmp_path / "jd", "completion", aggregator="mean", jd_sft_objective_weighting="tokens"
    )
    seen = record_losses(trainer)
    with pytest.warns(RuntimeWarning, match="first Gramian engine fails"):
        update = step(trainer)
    assert failures and len(seen) == 2  # the micro-batch's forward ran twice
    assert relative_error(update, expected) <= 1e-6
    stock_log, jd_log = stock.state.log_history[0], trainer.state.log_history[0]
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert jd_log[key] == pytest.approx(stock_log[key], rel=1e-5, abs=1e-6), key


def test_completion_only_sequence_losses_are_the_mean_over_completion_tokens(tmp_path):
    trainer = jd_trainer(tmp_path, "completion", aggregator="mean")
    seen = record_losses(trainer)
    model = fresh_copy(trainer)
    trainer.train()
    expected = sorted(float(loss.detach()) for loss in sequence_oracle_losses(model, trainer.train_dataset))
    assert sorted(seen[0].tolist()) == pytest.approx(expected, rel=1e-5)


# ---------------------------------------------------------------------------------------------- (b) brute force
def sequence_oracle_losses(model, data) -> list[torch.Tensor]:
    """Each sequence alone (no padding): the mean cross entropy of its supervised next tokens."""
    losses = []
    for row in data:
        ids = torch.tensor(row["input_ids"])[None]
        labels = torch.tensor(row["labels"])[None]
        logits = model(input_ids=ids).logits[:, :-1]
        losses.append(F.cross_entropy(logits[0], labels[0, 1:], ignore_index=-100))
    return losses


def upgrad_oracle(model, data, lr: float) -> dict[str, torch.Tensor]:
    """``-lr · UPGrad(J)`` with ``J`` built sequence by sequence with ``torch.autograd.grad``."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    rows = []
    for loss in sequence_oracle_losses(model, data):
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        rows.append(
            torch.cat(
                [(torch.zeros_like(p) if g is None else g).flatten() for (_, p), g in zip(named, grads)]
            )
        )
    update = UPGrad(solver="quadprog")(torch.stack(rows))
    out, offset = {}, 0
    for name, p in named:
        out[name] = -lr * update[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out


@pytest.mark.parametrize("engine", ["gramian", "jacobian"])
@pytest.mark.parametrize("kind", ["text", "completion"])
def test_upgrad_step_is_upgrad_of_the_per_sequence_jacobian(tmp_path, engine, kind, served_by):
    trainer = jd_trainer(
        tmp_path, kind, aggregator="upgrad", aggregator_kwargs={"solver": "quadprog"}, jd_engine=engine
    )
    expected = upgrad_oracle(fresh_copy(trainer), trainer.train_dataset, lr=0.5)
    assert relative_error(step(trainer), expected) <= 1e-5
    if (
        engine == "gramian"
    ):  # TRL's fused LM head stood in for: the head is the linear rule's, not the fallback's
        assert len(served_by) == 1 and served_by[0]["lm_head.weight"] == "linear", served_by
        assert "fallback" not in served_by[0].values()


# ---------------------------------------------------------------------------------------------- (c) packed batches
PADDING_FREE = {"padding_free": True, "max_length": None}
BFD_PACKING = {"packing": True, "packing_strategy": "bfd", "per_device_train_batch_size": 1}


@pytest.mark.parametrize("engine", ["jacobian", "gramian", "auto"])
@pytest.mark.parametrize("packing", [PADDING_FREE, BFD_PACKING], ids=["padding_free", "bfd"])
@pytest.mark.parametrize("weighting", ["sequence", "tokens"])
def test_padding_free_and_packed_batches_give_one_objective_per_sequence(
    tmp_path, packing, engine, weighting
):
    """The packed row's sequences are the padded batch's rows: the same objectives, the same UPGrad step, on
    either engine (the Gramian engine serves them through its per-task path, self-checked)."""
    common = dict(
        aggregator="upgrad", aggregator_kwargs={"solver": "quadprog"}, jd_sft_objective_weighting=weighting
    )
    padded = jd_trainer(tmp_path / "padded", "completion", jd_engine="jacobian", **common)
    padded_losses = record_losses(padded)
    expected = step(padded)
    packed = jd_trainer(tmp_path / "packed", "completion", jd_engine=engine, **common, **packing)
    assert packed.packed_sequences
    packed_losses = record_losses(packed)
    update = step(packed)
    assert len(packed_losses) == 1 and packed_losses[0].numel() == len(PROMPTS)  # one objective per sequence
    assert sorted(packed_losses[0].tolist()) == pytest.approx(sorted(padded_losses[0].tolist()), rel=1e-5)
    assert packed.args.jd_objectives == "per_example"  # the per-task route is used during the step only
    assert packed.jd_engine is not None and packed.jd_engine.name == (
        "gramian" if engine == "auto" else engine
    )
    assert relative_error(update, expected) <= 1e-6
    log = packed.state.log_history[0]
    assert "jd/update_norm" in log and not [
        key for key in log if key.startswith("jd/task_")
    ]  # no per-index keys


def test_padding_free_mean_with_token_weighting_is_the_stock_padding_free_step(tmp_path):
    stock = SFTTrainer(
        model=causal_model(),
        args=SFTConfig(**settings(tmp_path / "stock", padding_free=True, max_length=None)),
        train_dataset=dataset("completion"),
        processing_class=tokenizer(),
    )
    expected = step(stock)
    trainer = jd_trainer(
        tmp_path / "jd",
        "completion",
        padding_free=True,
        max_length=None,
        aggregator="mean",
        jd_sft_objective_weighting="tokens",
    )
    assert relative_error(step(trainer), expected) <= 1e-6


def test_wrapped_packing_takes_one_objective_per_chunk_and_says_so(tmp_path, caplog):
    """Wrapped packing keeps no document boundaries (chunks attend across them): each chunk is one objective,
    and a warning says so."""
    with caplog.at_level("WARNING", logger="hf_jd.trl._sft"):
        trainer = jd_trainer(
            tmp_path,
            "text",
            packing=True,
            packing_strategy="wrapped",
            max_length=8,
            per_device_train_batch_size=2,
        )
    assert "each chunk (batch row) is one objective" in caplog.text
    assert not trainer.packed_sequences
    seen = record_losses(trainer)
    step(trainer)
    assert [losses.numel() for losses in seen] == [2]


def test_sequence_ids_follow_position_restarts_and_cu_seq_lens():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])
    assert sequence_ids(positions).tolist() == [[0, 0, 0, 1, 1, 2, 3, 4]]
    assert sequence_ids(cu_seq_lens=torch.tensor([0, 3, 5, 8]), shape=(1, 8)).tolist() == [
        [0, 0, 0, 1, 1, 2, 2, 2]
    ]
    assert sequence_ids(torch.tensor([[0, 1, 2], [0, 1, 0]])).tolist() == [[0, 0, 0], [1, 1, 2]]
    assert sequence_ids() is None
    with pytest.raises(ValueError, match="cumulative lengths"):
        sequence_ids(cu_seq_lens=torch.tensor([0, 3, 7]), shape=(1, 8))
    with pytest.raises(ValueError, match="ONE flattened row"):
        sequence_ids(cu_seq_lens=torch.tensor([0, 4]), shape=(2, 4))


def test_sequence_sums_drop_sequences_without_supervised_tokens_and_weightings_average_right():
    token_losses = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    supervised = torch.tensor([[True, True, False, True, False, False]])
    ids = torch.tensor([[0, 0, 1, 1, 2, 3]])  # sequence 2 and 3 have no supervised token
    sums, counts = sequence_token_sums(token_losses, supervised, ids)
    assert sums.tolist() == [3.0, 4.0] and counts.tolist() == [2, 1]
    assert sequence_losses(sums, counts, "sequence").tolist() == [1.5, 4.0]
    tokens = sequence_losses(sums, counts, "tokens", total_tokens=10, factor=2.0)
    assert float(tokens.mean()) == pytest.approx(2.0 * 7.0 / 10)
    rows_sums, rows_counts = sequence_token_sums(token_losses.view(2, 3), supervised.view(2, 3))
    assert rows_sums.tolist() == [3.0, 4.0] and rows_counts.tolist() == [2, 1]
    with pytest.raises(ValueError, match="weighting"):
        sequence_losses(sums, counts, "tokenz")


# ---------------------------------------------------------------------------------------------- (d) guards
@pytest.mark.parametrize(
    "args",
    [
        lambda out: JDTrainingArguments(output_dir=out, use_cpu=True, report_to="none"),
        lambda out: SFTConfig(output_dir=out, use_cpu=True, report_to="none", bf16=False),
        lambda out: TrainingArguments(output_dir=out, use_cpu=True, report_to="none"),
    ],
)
def test_arguments_that_are_not_a_jdsftconfig_are_refused_by_name(tmp_path, args):
    with pytest.raises(TypeError, match=r"hf_jd\.trl\.JDSFTConfig .*Replace"):
        JDSFTTrainer(
            model=causal_model(),
            args=args(str(tmp_path)),
            train_dataset=dataset("text"),
            processing_class=tokenizer(),
        )


def test_a_padded_row_holding_several_sequences_is_refused_not_merged(tmp_path):
    trainer = jd_trainer(tmp_path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    inputs = {
        "input_ids": ids,
        "labels": ids.clone(),
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]),
    }
    with pytest.raises(JDInputError, match="holds 2 sequences"):
        trainer.compute_losses(trainer.model, inputs)
    inputs["position_ids"] = torch.arange(8)[None]
    assert trainer.compute_losses(trainer.model, inputs).shape == (1,)


def test_a_padding_free_batch_without_sequence_boundaries_is_refused(tmp_path):
    trainer = jd_trainer(tmp_path, "completion", padding_free=True, max_length=None)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    inputs = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    with pytest.raises(JDInputError, match="cannot be told apart"):
        trainer.compute_losses(trainer.model, inputs)
    losses = trainer.compute_losses(trainer.model, {**inputs, "cu_seq_lens_q": torch.tensor([0, 3, 8])})
    assert isinstance(losses, ObjectiveLosses) and losses.losses.shape == (2,)
    # every input token belongs to its sequence's objective (the engines' segment map)
    assert losses.token_objective.tolist() == [[0, 0, 0, 1, 1, 1, 1, 1]]
    with pytest.raises(JDInputError, match="cumulative lengths"):
        trainer.compute_losses(trainer.model, {**inputs, "cu_seq_lens_q": torch.tensor([0, 3, 7])})


def test_settings_without_a_per_sequence_decomposition_are_refused(tmp_path):
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        jd_trainer(tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="per_task"):
        jd_trainer(tmp_path, jd_objectives="per_task")
    with pytest.raises(ValueError, match="jd_sft_objective_weighting"):
        JDSFTConfig(**settings(tmp_path, jd_sft_objective_weighting="words"))


def test_the_config_parses_from_the_command_line_and_hides_the_hub_token(tmp_path):
    (config,) = HfArgumentParser((JDSFTConfig,)).parse_args_into_dataclasses(
        [
            "--output_dir",
            str(tmp_path),
            "--aggregator",
            "mean",
            "--jd_sft_objective_weighting",
            "tokens",
            "--packing",
            "true",
            "--aggregator_kwargs",
            "{}",
            "--hub_token",
            "secret-token",
            "--use_cpu",
            "true",
        ]
    )
    assert isinstance(config, SFTConfig) and isinstance(config, JDTrainingArguments)
    assert (config.aggregator, config.jd_sft_objective_weighting, config.packing) == ("mean", "tokens", True)
    assert "secret-token" not in repr(config)


# ---------------------------------------------------------------------------------------------- (e) tags, metrics
def test_tags_metrics_and_model_card(tmp_path):
    trainer = jd_trainer(tmp_path, "completion")
    for tag in ("hf_jd", "jacobian-descent", "trl", "sft"):
        assert tag in trainer._tag_names
    trainer.train()
    log = trainer.state.log_history[0]
    for key in ("entropy", "mean_token_accuracy", "num_tokens", "loss", "jd/update_norm"):
        assert key in log, key
    evaluation = trainer.evaluate(dataset("completion"))  # TRL's own scalar compute_loss, outside the JD step
    assert evaluation["eval_loss"] > 0 and "eval_mean_token_accuracy" in evaluation
    trainer.create_model_card(model_name="tiny")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "<!-- hf_jd:begin -->" in card and "upgrad" in card
    for tag in ("trl", "sft", "hf_jd", "jacobian-descent"):
        assert f"- {tag}" in card, tag


# ---------------------------------------------------------------------------------------------- (f) LoRA
def test_lora_through_peft_config_trains_the_adapters_only(tmp_path):
    peft = pytest.importorskip("peft")
    model = causal_model()
    base = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = jd_trainer(
        tmp_path,
        "completion",
        model=model,
        peft_config=peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
    )
    assert isinstance(trainer.model, peft.PeftModel)
    expected = upgrad_oracle(fresh_copy(trainer), trainer.train_dataset, lr=0.5)
    update = step(trainer)
    assert update and all("lora_" in name for name in update)
    assert relative_error(update, expected) <= 1e-4
    for name, p in trainer.model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), base[name.replace(".base_layer", "")]), name
