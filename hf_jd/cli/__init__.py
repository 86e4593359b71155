"""The ``hf-jd`` command line and what the examples share: recipes, offline smoke runs, one-line errors.

* ``main``: ``hf-jd train --config <recipe>``, ``hf-jd recipes``, ``hf-jd aggregators``, ``hf-jd env``,
  ``hf-jd demo`` (also ``python -m hf_jd``); the scripts and recipes ship inside the package.
* ``parse_args_with_config``: ``HfArgumentParser`` over a YAML recipe (a shipped name or a file) and the
  command line; ``smoke_path``: where an ``--offline_smoke`` run writes.
* ``tiny_config``, ``word_tokenizer``, ``smoke_tokenizer``, ``smoke_data``: what ``--offline_smoke`` runs on.
* ``hub_access``, ``run_example``, ``missing_extra``: an unreachable Hub, a missing extra or an unusable
  recipe reported as one line instead of a traceback.
"""

from . import _smoke_data as smoke_data
from ._config import load_recipe, parse_args_with_config, smoke_path
from ._errors import (
    HubUnreachableError,
    MissingExtraError,
    OneLineError,
    RecipeError,
    missing_extra,
    run_example,
)
from ._hub import hub_access
from ._main import main
from ._smoke import (
    SMOKE_TRAINING_OVERRIDES,
    cpu_defaults,
    model_type_of,
    offline_environment,
    smoke_tokenizer,
    tiny_config,
    word_tokenizer,
)

__all__ = [
    "SMOKE_TRAINING_OVERRIDES",
    "HubUnreachableError",
    "MissingExtraError",
    "OneLineError",
    "RecipeError",
    "cpu_defaults",
    "hub_access",
    "load_recipe",
    "main",
    "missing_extra",
    "model_type_of",
    "offline_environment",
    "parse_args_with_config",
    "run_example",
    "smoke_data",
    "smoke_path",
    "smoke_tokenizer",
    "tiny_config",
    "word_tokenizer",
]
