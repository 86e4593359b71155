"""The model card of a JD run: it names hf_jd, the aggregator and the JD settings, with Hub tags.

As TRL's trainers do, ``JDTrainer`` carries ``_tag_names`` (``hf_jd``, ``jacobian-descent``) and adds
them, with the aggregator's name, to the tags of the card the stock ``Trainer.create_model_card``
writes; a "Jacobian descent" section with the settings and the citation is appended to ``README.md``.
``push_to_hub`` calls ``create_model_card``, so it needs no change; ``save_model`` writes the card next
to the weights too.
"""

from __future__ import annotations

import os
from typing import Any

from .._version import __version__

JD_TAG_NAMES = ["hf_jd", "jacobian-descent"]
_BEGIN, _END = "<!-- hf_jd:begin -->", "<!-- hf_jd:end -->"
_SETTINGS = ("aggregator", "aggregator_kwargs", "jd_objectives", "jd_engine", "jd_scope", "jd_loss_type")
_SCALARIZER_SETTINGS = ("scalarizer", "scalarizer_kwargs", "jd_objectives", "jd_loss_type")
_OBJECTIVES = {"per_example": "one loss per training example", "per_task": "one loss per task"}
CITATION = """```bibtex
@article{quinton2024jacobian,
  title   = {Jacobian Descent for Multi-Objective Optimization},
  author  = {Quinton, Pierre and Rey, Val{\\'e}rian},
  journal = {arXiv preprint arXiv:2406.16232},
  year    = {2024}
}
```"""


def jd_tags(args: Any, tag_names: list[str] | None = None) -> list[str]:
    """``_tag_names`` plus the aggregator's (or scalarizer's) name and the objectives (``upgrad``, ``per_example``)."""
    tags = list(tag_names or JD_TAG_NAMES)
    method = getattr(args, "scalarizer", None) or getattr(args, "aggregator", None)
    for extra in (method, getattr(args, "jd_objectives", None)):
        if extra and extra not in tags:
            tags.append(str(extra))
    return tags


def merge_tags(given: str | list[str] | None, extra: list[str]) -> list[str]:
    """``given`` (a tag or a list) followed by the ``extra`` tags it does not hold yet."""
    tags = [given] if isinstance(given, str) else list(given or [])
    return tags + [tag for tag in extra if tag not in tags]


def jd_section(args: Any) -> str:
    """The Markdown section describing the JD run (between markers, so that it is replaced, not repeated)."""
    objectives = str(getattr(args, "jd_objectives", "per_example"))
    vector = f"the loss vector ({_OBJECTIVES.get(objectives, objectives)})"
    scalarizer = getattr(args, "scalarizer", None)
    settings: tuple[str, ...]
    if scalarizer:
        title, settings = "Scalarized multi-objective training", _SCALARIZER_SETTINGS
        how = f"turns {vector} into one loss with the `{scalarizer}` scalarizer (one ordinary backward)."
    else:
        title, settings = "Jacobian descent", _SETTINGS
        how = (
            f"aggregates the Jacobian of {vector} with the `{getattr(args, 'aggregator', '?')}` aggregator "
            "instead of averaging the losses."
        )
        if getattr(args, "jd_gramian", "exact") == "representation":
            settings += ("jd_gramian", "jd_representation")
            how = how[:-1] + (
                ", with the task weights taken from the Gramian of the task gradients at the shared "
                "representation (`jd_gramian='representation'`, an approximation of the JD step)."
            )
    rows = "\n".join(f"| `{name}` | `{getattr(args, name, None)!r}` |" for name in settings)
    return (
        f"{_BEGIN}\n## {title}\n\n"
        f"Trained with hf_jd {__version__} (`pip install hf-jd`): at every step its `JDTrainer` {how}\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n\n{CITATION}\n{_END}\n"
    )


def add_jd_section(readme: str, args: Any) -> None:
    """Append (or replace) the JD section of the card at ``readme``."""
    with open(readme, encoding="utf-8") as handle:
        text = handle.read()
    if _BEGIN in text and _END in text:
        text = text[: text.index(_BEGIN)] + text[text.index(_END) + len(_END) :].lstrip("\n")
    with open(readme, "w", encoding="utf-8") as handle:
        handle.write(text.rstrip("\n") + "\n\n" + jd_section(args))


def merged_tag_names(cls: type) -> list[str]:
    """The ``_tag_names`` of every class in ``cls``'s MRO, in MRO order, without repeats.

    TRL's trainers (and ``JDModelCardMixin``) tag their cards through the class attribute ``_tag_names``;
    a class combining two of them would otherwise keep only the first one's tags.
    """
    tags: list[str] = []
    for klass in cls.__mro__:
        own = vars(klass).get("_tag_names")
        if isinstance(own, list | tuple):
            tags += [str(tag) for tag in own if str(tag) not in tags]
    return tags


class JDModelCardMixin:
    """``Trainer`` mixin: tagged model cards with the JD settings (``create_model_card``, ``save_model``).

    Every class built on it carries the ``_tag_names`` of its whole MRO (:func:`merged_tag_names`), so that
    ``class T(JDTrainerMixin, SFTTrainer)`` tags its cards ``hf_jd``, ``jacobian-descent``, ``trl`` and
    ``sft``; ``create_model_card`` then calls the parent's (TRL's writes its own card) and appends the JD
    section.
    """

    _tag_names: list[str] = JD_TAG_NAMES

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._tag_names = merged_tag_names(cls)

    def create_model_card(self, *args: Any, tags: str | list[str] | None = None, **kwargs: Any) -> None:
        """The parent's card with the JD tags added, then the JD section appended."""
        trainer: Any = self
        extra = jd_tags(trainer.args, self._tag_names)
        if hasattr(trainer.model, "add_model_tags"):  # model.push_to_hub tags the card too
            trainer.model.add_model_tags(extra)
        super().create_model_card(*args, tags=merge_tags(tags, extra), **kwargs)  # type: ignore[misc]
        readme = os.path.join(trainer.args.output_dir, "README.md")
        if trainer.is_world_process_zero() and os.path.isfile(readme):
            add_jd_section(readme, trainer.args)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save as the stock ``Trainer`` does; a call by the user also writes the card next to the weights.

        Checkpoints (``_internal_call``) are left alone, and ``push_to_hub`` writes its own card.
        """
        trainer: Any = self
        super().save_model(output_dir, _internal_call)  # type: ignore[misc]
        if _internal_call or not trainer.args.should_save:
            return
        target = output_dir or trainer.args.output_dir
        original = trainer.args.output_dir
        try:
            trainer.args.output_dir = target  # create_model_card writes into args.output_dir
            self.create_model_card(model_name=os.path.basename(os.path.normpath(target)) or None)
        finally:
            trainer.args.output_dir = original
