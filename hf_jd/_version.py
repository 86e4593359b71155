"""The package version, in one place (read by ``hf_jd.__version__`` and checkpoints)."""

__version__ = "0.1.0"
