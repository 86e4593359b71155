"""``JDTrainingArguments``: the ``TrainingArguments`` of a Jacobian-descent run.

Every field has a ``help`` so that ``HfArgumentParser`` exposes it on the command line
(``--aggregator mgda --aggregator_kwargs '{"epsilon": 0.01}'``), in JSON and in YAML.
"""

import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args

import numpy as np
import torch
from transformers import TrainingArguments

from ._name_registry import normalised_name
from .aggregation import (
    Aggregator,
    GramianWeightedAggregator,
    aggregator_class,
    aggregator_names,
    get_aggregator,
)
from .gramian import REENTRANT_ADVICE
from .scalarization import Scalarizer, get_scalarizer, scalarizer_class, scalarizer_names

Method = TypeVar("Method")
#: ``(name, kwargs key, instance)`` of the aggregator or scalarizer built when the arguments were validated.
Validated = tuple[str, str, Method]

JDObjectives = Literal["per_example", "per_task"]
JDEngine = Literal["auto", "jacobian", "gramian"]
JDScope = Literal["global", "local"]
JDGramian = Literal["exact", "representation"]
JDLossType = Literal[
    "auto",
    "sequence_classification",
    "multi_label_classification",
    "regression",
    "token_classification",
    "causal_lm",
    "masked_lm",
    "seq2seq_lm",
    "image_classification",
]
JD_OBJECTIVES, JD_ENGINES, JD_SCOPES, JD_GRAMIANS, JD_LOSS_TYPES = (
    get_args(choice) for choice in (JDObjectives, JDEngine, JDScope, JDGramian, JDLossType)
)


@dataclass(repr=False)  # a regenerated __repr__ would print hub_token in clear
class JDTrainingArguments(TrainingArguments):
    """``TrainingArguments`` plus the Jacobian-descent settings read by :class:`hf_jd.JDTrainer`.

    Parameters:
        aggregator (`str`, defaults to `"upgrad"` unless `scalarizer` is set):
            How the Jacobian of the loss vector becomes the update: a name of
            :func:`hf_jd.aggregation.aggregator_names` (``-`` and case are normalised).
        aggregator_kwargs (`dict` or JSON `str`, *optional*):
            Constructor arguments of the aggregator, e.g. ``{"pref_vector": [1, 2]}``. On the command line a
            JSON object string (parsed like the other dict fields of ``TrainingArguments``).
        scalarizer (`str`, *optional*):
            Instead of Jacobian descent, train on ONE scalar made of the loss vector by this scalarizer (a
            name of :func:`hf_jd.scalarization.scalarizer_names`: mean, uncertainty_weighting, dwa, famo,
            …) with one ordinary backward — the baselines of multi-task papers. Exclusive with `aggregator`.
        scalarizer_kwargs (`dict` or JSON `str`, *optional*):
            Constructor arguments of the scalarizer, e.g. ``{"temperature": 2.0}``. Scalarizers with a
            ``shape`` (uncertainty_weighting, imtl_l, famo) get the per-device batch size per example;
            per task, pass ``{"shape": <number of tasks>}``.
        jd_objectives (`"per_example"` or `"per_task"`, defaults to `"per_example"`):
            What the loss vector holds: one loss per training example (instance-wise risk minimisation) or
            one loss per task (multi-task learning; the model returns a dict/tuple of task losses).
        jd_engine (`"auto"`, `"gramian"` or `"jacobian"`, defaults to `"auto"`):
            The Gramian engine (no explicit Jacobian) or the explicit-Jacobian engine; ``auto`` picks the
            Gramian engine where it is exact and falls back with a warning otherwise.
        jd_scope (`"global"` or `"local"`, defaults to `"global"`):
            Several processes: the exact JD step over the global batch, or per-rank aggregation averaged.
        jd_gramian (`"exact"` or `"representation"`, defaults to `"exact"`):
            Per task: the Gramian of the task gradients with respect to the shared parameters (the JD step),
            or, opt-in, with respect to the shared representation (Sener & Koltun 2018's MGDA-UB bound,
            LibMTL's ``rep_grad``): an approximation that costs one backward through the encoder.
        jd_representation (`str`, *optional*):
            With ``jd_gramian="representation"``: the dotted name of the module whose output is the shared
            representation; unset: inferred on the first step.
        jd_loss_type (`str`, defaults to `"auto"`):
            How per-example losses are computed from the outputs (inferred from the model class by ``auto``).
        jd_parallel_chunk_size (`int`, *optional*):
            Jacobian engine: rows back-propagated per batched backward (``1``: a plain loop).
        jd_expand_broadcast (`bool`, defaults to `True`):
            Gramian engine: expand module outputs of leading dimension 1 to the batch.
        jd_verify_every (`int`, *optional*):
            Repeat the first step's exactness self-check of the Gramian engine every N optimizer steps.
        jd_freeze_batch_norm (`bool`, defaults to `False`):
            Batch-norm layers normalise with their running statistics, kept fixed, during the JD step.
        jd_check_rank_consistency (`bool`, defaults to `False`):
            Debug: compare parameter checksums across ranks after every optimizer step.

    The aggregator is validated (name and arguments) at construction; :meth:`build_aggregator` hands the
    validated instance to the first trainer that asks for it, and a fresh one to any later caller.
    """

    # The method kwargs are parsed from JSON strings like the dict fields of ``TrainingArguments``.
    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "aggregator_kwargs", "scalarizer_kwargs"]

    aggregator: str | None = field(
        default=None,
        metadata={
            "help": "How the Jacobian of the loss vector is turned into the update (default: upgrad, unless "
            f"--scalarizer is set). One of: {', '.join(aggregator_names())}.",
            "choices": list(aggregator_names()),
        },
    )
    aggregator_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the aggregator, as a dict or a JSON string on the command line, "
            'e.g. \'{"pref_vector": [1, 2]}\' or \'{"solver": "quadprog"}\'.'
        },
    )
    scalarizer: str | None = field(
        default=None,
        metadata={
            "help": "Train on one scalar made of the loss vector by this scalarizer, with one ordinary backward, "
            "instead of Jacobian descent (exclusive with --aggregator). One of: "
            f"{', '.join(scalarizer_names())}.",
            "choices": list(scalarizer_names()),
        },
    )
    scalarizer_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the scalarizer, as a dict or a JSON string on the command line, e.g. "
            '\'{"temperature": 2.0}\'. uncertainty_weighting, imtl_l and famo need {"shape": <number of tasks>} '
            "per task (per example it defaults to the per-device batch size)."
        },
    )
    jd_objectives: JDObjectives = field(
        default="per_example",
        metadata={
            "help": "What the loss vector holds: 'per_example' (one loss per training example: instance-wise "
            "risk minimisation) or 'per_task' (one loss per task, returned by the model as a dict/tuple)."
        },
    )
    jd_engine: JDEngine = field(
        default="auto",
        metadata={
            "help": "How the JD step is computed: 'jacobian' (explicit Jacobian, any aggregator), 'gramian' "
            "(Gramian engine: per-layer Gramians without materialising J; Gramian-weighted aggregators only) "
            "or 'auto' (the Gramian engine where it is exact for the model and aggregator, else 'jacobian')."
        },
    )
    jd_scope: JDScope = field(
        default="global",
        metadata={
            "help": "Under several processes: 'global' aggregates the rows of all ranks together (the exact "
            "JD step on the global batch); 'local' aggregates each rank's rows and averages the results "
            "(cheaper, not the global JD step). Identical on one process."
        },
    )
    jd_gramian: JDGramian = field(
        default="exact",
        metadata={
            "help": "Per-task JD only. 'exact': the task weights come from the Gramian of the task gradients "
            "with respect to the shared parameters (the JD step; its cost grows with the number of tasks). "
            "'representation': from the Gramian of the task gradients with respect to the shared "
            "representation (the encoder's output; Sener & Koltun 2018's MGDA-UB bound, LibMTL's rep_grad), "
            "formed through the heads only, then one ordinary backward: about the cost of a summed-loss step, "
            "but an approximation of the JD step (see the README)."
        },
    )
    jd_representation: str | None = field(
        default=None,
        metadata={
            "help": "With --jd_gramian representation: the dotted module name (as in model.named_modules()) "
            "whose output is the shared representation the task heads read, e.g. 'encoder' (its output, or "
            "the first tensor of it such as last_hidden_state). Unset: inferred on the first step as the last "
            "module whose output every path from the task losses to the shared parameters crosses."
        },
    )
    jd_loss_type: JDLossType = field(
        default="auto",
        metadata={
            "help": "How per-example losses are derived from the model outputs; 'auto' infers it from the "
            "model class and config (problem_type, num_labels)."
        },
    )
    jd_parallel_chunk_size: int | None = field(
        default=None,
        metadata={
            "help": "Jacobian engine only: how many rows are back-propagated at once with a batched (vmap) "
            "backward. None: all rows at once. 1: a plain loop, exact for models where batched backward is "
            "unsupported (torch.compile, RNNs)."
        },
    )
    jd_expand_broadcast: bool = field(
        default=True,
        metadata={
            "help": "Gramian engine: return module outputs with a leading dimension of 1 (position embeddings of "
            "position_ids [1, T]) expanded to the batch, so that their gradients stay per example. With False such "
            "calls take the exact but slower fallback. 'auto' retries without expansion when the model's code "
            "cannot take the expanded tensor."
        },
    )
    jd_verify_every: int | None = field(
        default=None,
        metadata={
            "help": "Gramian engine: the first JD step checks the engine's Gramian on a few rows against "
            "row-by-row autograd (a mismatch means loss i depends on other examples: 'auto' then switches to the "
            "Jacobian engine, 'gramian' raises). Set N to repeat the check every N optimizer steps."
        },
    )
    jd_freeze_batch_norm: bool = field(
        default=False,
        metadata={
            "help": "Keep batch-norm layers in eval mode during the JD step: they normalise with their running "
            "statistics, which stay fixed, so that each example's loss depends on that example only (what the "
            "Gramian engine needs). Without it, batch-norm in train mode requires jd_engine='jacobian'."
        },
    )
    jd_check_rank_consistency: bool = field(
        default=False,
        metadata={
            "help": "Debug option for multi-process runs: after every optimizer step, compare a checksum of "
            "the parameters across ranks and raise if they diverged."
        },
    )

    def __post_init__(self) -> None:
        _refuse_reentrant_checkpointing(bool(self.gradient_checkpointing), self.gradient_checkpointing_kwargs)
        _check_json_object("aggregator_kwargs", self.aggregator_kwargs)
        _check_json_object("scalarizer_kwargs", self.scalarizer_kwargs)
        super().__post_init__()  # parses the JSON strings of _VALID_DICT_FIELDS
        _check_fsdp_settings(self.fsdp, self.fsdp_config, self.jd_engine, self.scalarizer)
        self.aggregator_kwargs = _as_kwargs("aggregator_kwargs", self.aggregator_kwargs)
        self.scalarizer_kwargs = _as_kwargs("scalarizer_kwargs", self.scalarizer_kwargs)
        _check_choice("jd_objectives", self.jd_objectives, JD_OBJECTIVES)
        _check_choice("jd_engine", self.jd_engine, JD_ENGINES)
        _check_choice("jd_scope", self.jd_scope, JD_SCOPES)
        _check_choice("jd_gramian", self.jd_gramian, JD_GRAMIANS)
        _check_choice("jd_loss_type", self.jd_loss_type, JD_LOSS_TYPES)
        self._validated_aggregator: Validated[Aggregator] | None = None
        self._validated_scalarizer: Validated[Scalarizer] | None = None
        if self.scalarizer is not None:
            if self.aggregator is not None or self.aggregator_kwargs:
                raise ValueError(
                    f"Both aggregator={self.aggregator!r} and scalarizer={self.scalarizer!r} are set: a run either "
                    "aggregates the Jacobian (--aggregator, Jacobian descent) or scalarizes the loss vector "
                    "(--scalarizer, one ordinary backward). Remove one of them."
                )
            self.scalarizer = normalised_name(self.scalarizer)
            self._validated_scalarizer = _validated(
                "scalarizer",
                self.scalarizer,
                self.scalarizer_kwargs,
                self.resolved_scalarizer_kwargs,
                get_scalarizer,
            )
            self._check_positive_settings()
            self._check_representation_gramian()
            return
        if self.scalarizer_kwargs:
            raise ValueError(
                f"scalarizer_kwargs={self.scalarizer_kwargs!r} is set without --scalarizer: name the scalarizer, "
                "or remove scalarizer_kwargs."
            )
        self.aggregator = normalised_name(self.aggregator or "upgrad")
        # Validates the name (listing the valid ones) and the keyword arguments.
        self._validated_aggregator = _validated(
            "aggregator", self.aggregator, self.aggregator_kwargs, self.aggregator_kwargs, get_aggregator
        )
        if self.jd_engine == "gramian" and not issubclass(
            aggregator_class(self.aggregator), GramianWeightedAggregator
        ):
            raise ValueError(
                f"aggregator={self.aggregator!r} needs the explicit Jacobian, which the Gramian engine never "
                "builds. Use jd_engine='jacobian' (or 'auto'), or a Gramian-weighted aggregator such as 'upgrad'."
            )
        needs_jacobian = not issubclass(aggregator_class(self.aggregator), GramianWeightedAggregator)
        refusal = fsdp2_refusal(self.jd_engine, None, self.aggregator, needs_jacobian) if self.fsdp else None
        if refusal is not None:
            raise refusal
        self._check_positive_settings()
        self._check_representation_gramian()

    def _check_representation_gramian(self) -> None:
        """``jd_gramian="representation"`` weighs per-task losses with a Gramian-weighted aggregator."""
        if self.jd_gramian == "exact":
            if self.jd_representation is not None:
                raise ValueError(
                    f"jd_representation={self.jd_representation!r} is set but jd_gramian='exact': the representation "
                    "is read only by the representation Gramian. Add --jd_gramian representation, or remove it."
                )
            return
        problem = None
        if self.jd_objectives != "per_task":
            problem = (
                "it weighs task losses, and per-example losses each read their own example's representation "
                "(its Gramian would be diagonal). Set jd_objectives='per_task'"
            )
        elif self.scalarizer is not None:
            problem = "a scalarizer forms no Gramian. Remove --scalarizer, or use jd_gramian='exact'"
        elif self.jd_engine == "jacobian":
            problem = "the explicit-Jacobian engine forms the exact Gramian. Use jd_engine='auto'"
        elif not issubclass(aggregator_class(self.aggregator_name), GramianWeightedAggregator):
            problem = (
                f"aggregator {self.aggregator!r} needs the Jacobian itself, not a Gramian. Use a Gramian-weighted "
                "aggregator (e.g. 'upgrad', 'mgda', 'dualproj')"
            )
        elif self.fsdp:
            problem = "it is not served under FSDP2 yet. Use DDP or DeepSpeed"
        if problem is not None:
            raise ValueError(f"jd_gramian='representation' with these settings: {problem}.")

    def _check_positive_settings(self) -> None:
        if self.jd_verify_every is not None and (
            isinstance(self.jd_verify_every, bool) or self.jd_verify_every < 1
        ):
            raise ValueError(
                f"jd_verify_every must be a positive number of steps or None (first step only), got {self.jd_verify_every!r}."
            )
        if self.jd_parallel_chunk_size is not None and self.jd_parallel_chunk_size < 1:
            raise ValueError(
                f"jd_parallel_chunk_size must be a positive integer or None, got {self.jd_parallel_chunk_size}."
            )

    @property
    def aggregator_name(self) -> str:
        """The aggregator of a Jacobian-descent run (``upgrad`` by default); an error under ``--scalarizer``."""
        if self.aggregator is None:
            raise ValueError(
                f"This run scalarizes the losses with {self.scalarizer!r}: it has no aggregator."
            )
        return self.aggregator

    @property
    def resolved_scalarizer_kwargs(self) -> dict[str, Any]:
        """``scalarizer_kwargs``, with ``shape`` = the per-device batch size for per-example runs of the
        scalarizers that need the number of objectives."""
        kwargs = dict(self.scalarizer_kwargs) if isinstance(self.scalarizer_kwargs, dict) else {}
        if self.scalarizer is None or "shape" in kwargs:
            return kwargs
        if "shape" in inspect.signature(scalarizer_class(self.scalarizer)).parameters:
            if self.jd_objectives == "per_task":
                raise ValueError(
                    f"scalarizer={self.scalarizer!r} learns one weight per objective, so it needs their number: "
                    "pass scalarizer_kwargs={'shape': <number of tasks>} (e.g. --scalarizer_kwargs "
                    "'{\"shape\": 2}')."
                )
            kwargs["shape"] = self.per_device_train_batch_size
        return kwargs

    def build_scalarizer(self) -> Scalarizer:
        """The scalarizer of a ``--scalarizer`` run; the instance validated at construction for the first
        caller, a new one afterwards (as :meth:`build_aggregator`)."""
        if self.scalarizer is None:
            raise ValueError("This run aggregates the Jacobian (--aggregator): it has no scalarizer.")
        validated, self._validated_scalarizer = getattr(self, "_validated_scalarizer", None), None
        return _first_or_new(validated, self.scalarizer, self.resolved_scalarizer_kwargs, get_scalarizer)

    @property
    def aggregator_kwargs_dict(self) -> dict[str, Any]:
        """``aggregator_kwargs`` as the dict ``__post_init__`` made of it (``{}`` when unset)."""
        return self.aggregator_kwargs if isinstance(self.aggregator_kwargs, dict) else {}

    def build_aggregator(self) -> Aggregator:
        """The aggregator named by ``aggregator`` with ``aggregator_kwargs``.

        The first call returns the instance built (and so validated) at construction; every later call,
        or a call after the settings changed, builds a new one, so that two trainers never share the
        state of a stateful aggregator.
        """
        validated, self._validated_aggregator = getattr(self, "_validated_aggregator", None), None
        return _first_or_new(validated, self.aggregator_name, self.aggregator_kwargs_dict, get_aggregator)


def _validated(
    kind: str, name: str, given: object, kwargs: dict[str, Any], build: Callable[..., Method]
) -> Validated[Method]:
    """Build ``name`` with ``kwargs`` once, to validate the settings; the error names both fields."""
    try:
        return name, _kwargs_key(kwargs), build(name, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{kind}={name!r}, {kind}_kwargs={given!r}: {error}") from None


def _first_or_new(
    validated: Validated[Method] | None, name: str, kwargs: dict[str, Any], build: Callable[..., Method]
) -> Method:
    """The validated instance when the settings have not changed since, else a new one."""
    if validated is not None and validated[:2] == (name, _kwargs_key(kwargs)):
        return validated[2]
    return build(name, **kwargs)


def _as_kwargs(name: str, value: object) -> dict[str, Any]:
    """A method's kwargs field as a dict (``{}`` when unset), or a clear error."""
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise ValueError(
            f"{name} must be a dict or a JSON object string such as '{{\"pref_vector\": [1, 2]}}', got {value!r}."
        )
    return _plain_value(name, value)


def _plain_value(where: str, value: object) -> Any:
    """``value`` as plain data (numbers, strings, booleans, ``None``, lists and dicts of them).

    numpy arrays and scalars and torch tensors become Python lists and numbers (float64 keeps every
    digit), so that the arguments saved in a checkpoint load with ``torch.load(weights_only=True)`` and
    ``TrainingArguments`` stays JSON-serialisable. Any other object is refused here, naming the field,
    rather than making a checkpoint that cannot be resumed.
    """
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):  # before float: np.float64 is a float
        return value.tolist()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_value(f"{where}[{index}]", item) for index, item in enumerate(value)]
    if isinstance(value, dict):
        return {str(key): _plain_value(f"{where}[{key!r}]", item) for key, item in value.items()}
    raise ValueError(
        f"{where} is a {type(value).__name__}; method arguments must be plain values (numbers, strings, "
        "booleans, None, lists and dicts of them, numpy arrays or tensors), which a checkpoint stores and "
        'resumes safely. Pass the setting\'s plain equivalent (e.g. {"solver": "quadprog"} instead of a '
        "projector object)."
    )


def _kwargs_key(kwargs: object) -> str:
    return json.dumps(kwargs, sort_keys=True, default=repr)


def _check_json_object(name: str, value: object) -> None:
    """A JSON string for a dict field must parse (``TrainingArguments`` would raise a bare decode error)."""
    if not isinstance(value, str) or not value.strip().startswith("{"):
        return
    try:
        json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--{name} must be a JSON object, e.g. '{{\"pref_vector\": [1, 2]}}'; got {value!r} ({error})."
        ) from None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid. Valid values: {', '.join(choices)}.")


def sharding_refusal(name: str, source: str) -> ValueError:
    """The error for FSDP1, whether set in the arguments or by the accelerate config (the trainer's backends,
    ``hf_jd/trainer/_backends/``, raise it for the latter)."""
    return ValueError(
        f"{source}: JDTrainer does not support {name}: the JD step writes its gradients itself and, with sharded "
        "parameters, serves FSDP2 (fully_shard: fsdp_version: 2 in the accelerate config, "
        "recipes/accelerate/fsdp.yaml, or fsdp=True with fsdp_config={'version': 2}) and DeepSpeed ZeRO "
        "(recipes/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml). Without sharding, train with plain DDP "
        "(recipes/accelerate/multi_gpu.yaml), which JDTrainer synchronises exactly."
    )


def fsdp2_refusal(
    jd_engine: str, scalarizer: object, aggregator: str | None, needs_jacobian: bool
) -> ValueError | None:
    """The error for a setting FSDP2 does not serve, ``None`` when it serves it: the one statement of these
    refusals, raised by the arguments (``fsdp=True``) and by the trainer's FSDP2 backend (an accelerate config).

    ``needs_jacobian``: the aggregator needs ``J`` itself (it is not Gramian-weighted).
    """
    if jd_engine == "jacobian":
        return ValueError(
            "FSDP2 with jd_engine='jacobian': the explicit Jacobian would hold full-size gradients of every "
            "parameter. Use jd_engine='auto' or 'gramian' (the sharded Gramian engine)."
        )
    if scalarizer is not None:
        return ValueError("FSDP2 with --scalarizer is not supported yet; use an aggregator, or plain DDP.")
    if needs_jacobian:
        return ValueError(
            f"aggregator {aggregator!r} needs the Jacobian itself, which is never formed under FSDP2; use a "
            "Gramian-weighted aggregator (e.g. 'upgrad', 'mgda', 'mean')."
        )
    return None


def _check_fsdp_settings(fsdp: object, fsdp_config: object, jd_engine: str, scalarizer: object) -> None:
    """FSDP is served as FSDP2 with the sharded Gramian engine (``hf_jd/trainer/_backends/_fsdp2.py``); the
    aggregator is checked once it is validated."""
    if not fsdp:
        return
    version = int(fsdp_config.get("version", 2)) if isinstance(fsdp_config, dict) else 2
    if version != 2:
        raise sharding_refusal(f"FSDP version {version}", f"fsdp_config={{'version': {version}}}")
    refusal = fsdp2_refusal(jd_engine, scalarizer, None, needs_jacobian=False)
    if refusal is not None:
        raise refusal


def _refuse_reentrant_checkpointing(enabled: bool, kwargs: object) -> None:
    if enabled and isinstance(kwargs, dict) and kwargs.get("use_reentrant"):
        raise ValueError(
            REENTRANT_ADVICE.format(name="gradient_checkpointing_kwargs={'use_reentrant': True}")
        )
