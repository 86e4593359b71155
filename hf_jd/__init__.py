"""hf_jd: Jacobian descent for the Hugging Face Trainer."""

__version__ = "0.1.0"
