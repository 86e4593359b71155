"""Collection of the docstring examples (``pytest --doctest-modules hf_jd``): ``hf_jd.trl`` needs the optional
TRL, which ``make test-min`` does not install (TRL needs a newer accelerate than the tested minimum), so
its modules (and the TRL example scripts) are collected only where TRL is installed."""

import importlib.util

collect_ignore_glob = (
    [] if importlib.util.find_spec("trl") is not None else ["hf_jd/trl/*", "hf_jd/examples/trl_*"]
)
