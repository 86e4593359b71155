"""The ``hf-jd`` command line and what the examples share for offline smoke runs.

* ``main``: ``hf-jd train --config recipes/<name>.yaml``, ``hf-jd aggregators``, ``hf-jd env``,
  ``hf-jd demo`` (also ``python -m hf_jd``).
* ``parse_args_with_config``: ``HfArgumentParser`` over a YAML recipe and the command line.
* ``tiny_config``, ``word_tokenizer``, ``smoke_tokenizer``, ``smoke_data``: what ``--offline_smoke`` runs on.
"""

from . import _smoke_data as smoke_data
from ._config import load_recipe, parse_args_with_config
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
    "cpu_defaults",
    "load_recipe",
    "main",
    "model_type_of",
    "offline_environment",
    "parse_args_with_config",
    "smoke_data",
    "smoke_tokenizer",
    "tiny_config",
    "word_tokenizer",
]
