"""Inference of how per-example losses are computed for a Hugging Face model."""

from __future__ import annotations

from torch import nn
from transformers.models.auto import modeling_auto

_MAPPINGS: tuple[tuple[str, str], ...] = (
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "seq2seq_lm"),
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "causal_lm"),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "masked_lm"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "token_classification"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "image_classification"),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "sequence_classification"),
)


def _class_names(mapping_name: str) -> set[str]:
    mapping = getattr(modeling_auto, mapping_name, {})
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def infer_loss_type(model: nn.Module) -> str | None:
    """Return the per-example loss type of a Hugging Face model, or ``None`` when unknown.

    The model class is looked up in transformers' auto mappings; sequence and image classifiers are
    refined with ``config.problem_type`` / ``config.num_labels`` (regression, multi-label). A model
    compiled with ``torch.compile`` is looked up by the class it wraps, and a PEFT model (a plain
    ``PeftModel``, e.g. LoRA without ``task_type``) by its base model.
    """
    model = unwrapped_model(model)
    class_name = type(model).__name__
    config = getattr(model, "config", None)
    for mapping_name, loss_type in _MAPPINGS:
        if class_name in _class_names(mapping_name):
            if loss_type in ("sequence_classification", "image_classification"):
                return _classification_kind(config, loss_type)
            return loss_type
    if class_name.endswith("ForCausalLM") or class_name.endswith("LMHeadModel"):
        return "causal_lm"
    if class_name.endswith("ForConditionalGeneration") and getattr(config, "is_encoder_decoder", False):
        return "seq2seq_lm"
    if class_name.endswith("ForMaskedLM"):
        return "masked_lm"
    if class_name.endswith("ForTokenClassification"):
        return "token_classification"
    if class_name.endswith("ForSequenceClassification"):
        return _classification_kind(config, "sequence_classification")
    if class_name.endswith("ForImageClassification"):
        return _classification_kind(config, "image_classification")
    return None


def unwrapped_model(model: nn.Module) -> nn.Module:
    """The model under ``torch.compile``'s ``OptimizedModule`` (``_orig_mod``) and PEFT's ``PeftModel``
    (``get_base_model()``), in any nesting: the class that says which loss the model computes."""
    for _ in range(8):  # each step removes one wrapper; real nestings are one or two deep
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        get_base_model = getattr(model, "get_base_model", None)
        if hasattr(model, "peft_config") and callable(get_base_model):
            base = get_base_model()
            if isinstance(base, nn.Module) and base is not model:
                model = base
                continue
        break
    return model


def _classification_kind(config: object, default: str) -> str:
    problem_type = getattr(config, "problem_type", None)
    if problem_type == "regression":
        return "regression"
    if problem_type == "multi_label_classification":
        return "multi_label_classification"
    if problem_type is None and getattr(config, "num_labels", 2) == 1:
        return "regression"
    return default
