"""``python -m hf_jd``: the ``hf-jd`` command line."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
